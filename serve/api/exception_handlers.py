"""Every error leaves the server as an OpenAI error body: 4xx for what the client did wrong,
5xx only for the server's own failures."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.api.body_limit import BodyTooLargeError, body_too_large
from serve.errors import APIError, error_body, invalid_request

log = logging.getLogger(__name__)


# FastAPI answers any failure to decode a JSON body with this one detail; the cause says
# which of the client's mistakes it was.
_PARSE_FAILURE = "There was an error parsing the body"
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _parse_failure(exc: BaseException | None) -> str:
    if isinstance(exc, RecursionError):
        return "The request body is not valid JSON: it is nested too deeply."
    if isinstance(exc, UnicodeDecodeError):
        return "The request body is not valid JSON: it is not valid UTF-8."
    if isinstance(exc, ValueError) and "integer string conversion" in str(exc):
        return "The request body is not valid JSON: a number in it has too many digits."
    return "The request body is not valid JSON."


def _retry_after(request: Request) -> str:
    state = getattr(request.app.state, "crosstask", None)
    seconds = state.settings.retry_after_seconds if state is not None else 1
    return str(seconds)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": _retry_after(request)} if exc.status_code in (429, 503) else None
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(BodyTooLargeError)
    async def too_large(request: Request, exc: BodyTooLargeError) -> JSONResponse:
        # Part of the body is still unread: the connection cannot carry another request.
        return JSONResponse(
            body_too_large(exc.limit).body(), status_code=413, headers={"Connection": "close"}
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = invalid_request(list(exc.errors()))
        return JSONResponse(error.body(), status_code=error.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message, code = str(exc.detail), _HTTP_CODES.get(exc.status_code, str(exc.status_code))
        if exc.status_code == 400 and message == _PARSE_FAILURE:
            message, code = _parse_failure(exc.__cause__), "invalid_json"
        return JSONResponse(
            error_body(message, type_, None, code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("Unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body(
                "The server had an error while processing the request.",
                "server_error",
                None,
                "internal_error",
            ),
            status_code=500,
        )
