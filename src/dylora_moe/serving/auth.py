"""API key check for mutating endpoints: ``Authorization: Bearer KEY``, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from .config import API_KEY_ENV
from .errors import APIError

CHALLENGE = {"WWW-Authenticate": "Bearer"}


def check_key(request: Request, api_key: str | None) -> None:
    """Raise 403 when the server has no key (mutations are off), 401 when the request's key is missing or wrong."""
    check_authorization(request.headers.get("authorization", ""), api_key)


def check_authorization(header: str, api_key: str | None) -> None:
    """``check_key`` on the ``Authorization`` header value as the ASGI server decoded it (latin-1, byte for
    byte): its bytes are compared with the key's UTF-8 bytes, which is what a client in a UTF-8 shell sends."""
    if not api_key:
        raise APIError(403, f"this endpoint changes the served system and the server has no API key: start it with "
                            f"{API_KEY_ENV}=... or --api-key ... and send `Authorization: Bearer <key>`",
                       code="api_key_not_configured")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "missing API key: send `Authorization: Bearer <key>`", code="missing_api_key",
                       headers=CHALLENGE)
    if not hmac.compare_digest(_header_bytes(token.strip()), api_key.encode("utf-8")):
        raise APIError(401, "invalid API key", code="invalid_api_key", headers=CHALLENGE)


def _header_bytes(value: str) -> bytes:
    """The bytes a header value was sent as: ASGI servers decode headers as latin-1, one character per byte (a
    value that did not come from a header may hold wider characters: those are taken as UTF-8)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")
