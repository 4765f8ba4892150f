"""ASGI middleware: request body limits (413 before the body is read), a deadline for sending the body (408),
and per-request metrics and logs."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from .auth import check_authorization
from .config import ServerConfig
from .errors import APIError
from .metrics import Metrics

logger = logging.getLogger("dylora_moe.serving")

UPLOAD_PATHS = ("/skills",)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
QUIET_PATHS = ("/metrics", "/health")  # logged at debug level: scrapers and probes call them all the time


class Observe:
    def __init__(self, app, metrics: Metrics, config: ServerConfig) -> None:
        self.app = app
        self.metrics = metrics
        self.config = config

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500
        path = route_path(scope)
        upload = path in UPLOAD_PATHS
        limit = self.config.max_upload_bytes if upload else self.config.max_body_bytes

        async def observed_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if upload and scope["method"] == "POST":  # the key is checked before an upload's body is read
                headers = dict(scope.get("headers") or [])
                try:
                    check_authorization(headers.get(b"authorization", b"").decode("latin-1"), self.config.api_key)
                except APIError as error:
                    self.metrics.error(error.code or error.type, error.status)
                    await _send_json(observed_send, error.status, error.body(), error.headers)
                    return
            receive = self._deadline(receive, start + self.config.body_timeout)
            try:  # a body without a declared length is read here, outside the app and its error handlers
                receive = await self._limited(scope, receive, limit, upload)
            except APIError as error:  # 408: the body did not arrive in time; 400: its declared length is no number
                self.metrics.error(error.code or error.type, error.status)
                await _send_json(observed_send, error.status, error.body(), error.headers)
                return
            if receive is None:
                error = APIError(413, f"the request body is larger than this server's limit of {limit} bytes"
                                      + (" for skill uploads: split the upload" if upload else ""),
                                 code="request_too_large")
                self.metrics.error("request_too_large", 413)
                await _send_json(observed_send, error.status, error.body())
                return
            await self.app(scope, receive, observed_send)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            seconds = time.perf_counter() - start
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"  # bounded label values
            self.metrics.latency.labels(endpoint, method, str(status)).observe(seconds)
            level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
            logger.log(level, "request", extra={"fields": {
                "event": "request", "method": scope["method"], "path": scope["path"], "endpoint": endpoint,
                "status": status, "ms": round(seconds * 1000, 2)}})

    def _deadline(self, receive, deadline: float):
        """``receive`` that fails with 408 when the body is not complete by ``deadline`` (a client that declares
        a length and sends less would otherwise hold a connection open for as long as it likes). Once the body
        is in, messages pass through untouched: waiting for a disconnect has no deadline."""
        body_done = False

        async def timed():
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.perf_counter(), 0.0))
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body did not arrive within {self.config.body_timeout:g}s: send "
                                    "the whole body at once (and a Content-Length that matches it)",
                               code="request_timeout") from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return timed

    @staticmethod
    async def _limited(scope, receive, limit: int, upload: bool):
        """``receive`` when the declared length fits; ``None`` when the body is too large; a 400 when the
        declared length is not a number. A body without a declared length is read here up to the limit and
        replayed."""
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise APIError(400, f"Content-Length {declared.decode('latin-1')!r} is not a number of bytes: send "
                                    "the body's length in bytes, or no Content-Length", code="invalid_content_length")
            digits = declared.lstrip(b"0") or b"0"  # int() refuses more than 4300 digits: so many are too large
            return receive if len(digits) <= len(str(limit)) and int(digits) <= limit else None
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return receive
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return receive
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


def route_path(scope) -> str:
    """The path the app routes on: ``path`` without the ``root_path`` it is mounted under (a Ray Serve
    ``route_prefix``, a proxy's prefix), which ASGI servers leave at the front of ``path``."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):][:1] in ("", "/"):
        return path[len(root):]
    return path


async def _send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode("utf-8")
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": data})
