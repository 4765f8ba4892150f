"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``, with a clear message.

Every bad input ends as a 4xx through ``APIError``; the handlers below turn FastAPI's own validation and
routing errors into the same shape, and anything unexpected into a 500 that is logged with its traceback.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

logger = logging.getLogger("dylora_moe.serving")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error", 409: "conflict_error",
         413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
         429: "rate_limit_error"}


class APIError(Exception):
    """An error answered to the client; ``message`` says what is wrong and how to fix it."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        # a message or param quoting the request (a key holding a lone surrogate) must still encode as UTF-8
        message, param = _encodable(message), None if param is None else _encodable(param)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _encodable(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (lone surrogates) written as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """The first pydantic error as ``(message, param)``: ``messages.0.role: Input should be ...``."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    return (f"{param}: {first['msg']}" if param else first["msg"]), param


def install(app: FastAPI, on_error) -> None:
    """Register the handlers; ``on_error(kind, status)`` counts every error answered."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        on_error(err.code or err.type, err.status)
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(err.errors()))
        return await api_error(request, APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = err.detail if isinstance(err.detail, str) else str(err.detail)
        if err.status_code == 404:
            message = f"no endpoint {request.method} {request.url.path}; see /docs for the API"
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return await api_error(request, APIError(err.status_code, message, headers=err.headers))

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, err: ClientDisconnect) -> Response:
        # the client left while its body was being read: nobody to answer, and no server error to count
        logger.info("client disconnected", extra={"fields": {"event": "client_disconnected", "path": request.url.path}})
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path,
                         extra={"fields": {"event": "error", "kind": type(err).__name__, "path": request.url.path}})
        return await api_error(request, APIError(500, f"internal error ({type(err).__name__}); see the server log",
                                                 type="server_error", code="internal_error"))
