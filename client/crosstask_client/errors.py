"""Exceptions raised by the client.

Every HTTP error answer becomes an :class:`APIStatusError` subclass chosen by its status
code, carrying the OpenAI error fields (``message``, ``type``, ``param``, ``code``) and the
``status_code``. Failures to reach the server become :class:`APIConnectionError` (or
:class:`APITimeoutError`).

::

    CrosstaskError
    ├── APIStatusError                (any HTTP error status)
    │   ├── BadRequestError           400, and any other 4xx not listed below
    │   ├── AuthenticationError       401
    │   ├── PermissionDeniedError     403
    │   ├── NotFoundError             404
    │   ├── UnprocessableEntityError  422
    │   ├── RateLimitError            429
    │   └── ServerError               5xx
    ├── APIConnectionError            the server could not be reached or the connection broke
    │   └── APITimeoutError           a connect, read, write or pool timeout
    └── APIResponseValidationError    a success answer that is not what the route returns
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    import httpx

__all__ = [
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "CrosstaskError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "UnprocessableEntityError",
]


class CrosstaskError(Exception):
    """Base of every exception this client raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIStatusError(CrosstaskError):
    """The server answered with an HTTP error status.

    Attributes:
        message: the error message (``error.message`` of the body, or the body's text).
        type: the OpenAI error ``type`` (e.g. ``"invalid_request_error"``), if given.
        param: the request parameter at fault, if given.
        code: the OpenAI error ``code``, if given.
        status_code: the HTTP status code.
        body: the decoded JSON body, or its text when it was not JSON.
        response: the ``httpx.Response`` (``None`` for an error inside an event stream).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        type: Optional[str] = None,
        param: Optional[str] = None,
        code: Union[str, int, None] = None,
        body: Any = None,
        response: Optional[httpx.Response] = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.body = body
        self.response = response

    def __str__(self) -> str:
        kind = f" {self.type}" if self.type else ""
        return f"HTTP {self.status_code}{kind}: {self.message}"


class BadRequestError(APIStatusError):
    """400, and any other 4xx status without a class of its own: the request was wrong."""


class AuthenticationError(APIStatusError):
    """401: no API key, or a wrong one."""


class PermissionDeniedError(APIStatusError):
    """403: the key may not do this (a management write without the admin key)."""


class NotFoundError(APIStatusError):
    """404: unknown model, adapter, or route."""


class UnprocessableEntityError(APIStatusError):
    """422: the body could not be validated."""


class RateLimitError(APIStatusError):
    """429: the server is overloaded or the caller over its quota."""


class ServerError(APIStatusError):
    """5xx: the server failed (503: not ready, draining or overloaded)."""


class APIConnectionError(CrosstaskError):
    """The server could not be reached, or the connection broke during the exchange."""

    def __init__(
        self, message: str = "Connection error.", *, cause: Optional[BaseException] = None
    ):
        super().__init__(message)
        self.cause = cause


class APITimeoutError(APIConnectionError):
    """The request timed out (connecting, sending, waiting for or reading the answer)."""

    def __init__(
        self, message: str = "Request timed out.", *, cause: Optional[BaseException] = None
    ):
        super().__init__(message, cause=cause)


class APIResponseValidationError(CrosstaskError):
    """A success answer whose body is not what the route returns (not JSON, wrong shape)."""

    def __init__(self, message: str, *, status_code: int, body: Any = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def error_class_for(status_code: int) -> type[APIStatusError]:
    """The exception class for an HTTP error status."""
    if status_code in _BY_STATUS:
        return _BY_STATUS[status_code]
    if 400 <= status_code < 500:
        return BadRequestError
    if status_code >= 500:
        return ServerError
    return APIStatusError


def _error_fields(body: Any) -> dict[str, Any]:
    """The OpenAI error fields of a decoded body, tolerating vLLM and FastAPI shapes."""
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict):
            return inner
        if isinstance(inner, str):
            return {"message": inner}
        if "message" in body:  # vLLM's flat ErrorResponse
            return body
        if "detail" in body:  # FastAPI / Starlette
            detail = body["detail"]
            return {"message": detail if isinstance(detail, str) else json.dumps(detail)}
    return {}


def status_error(
    status_code: int,
    body: Any,
    *,
    response: Optional[httpx.Response] = None,
    reason: str = "",
) -> APIStatusError:
    """Build the exception for an error answer from its status and (decoded or raw) body."""
    fields = _error_fields(body)
    message = fields.get("message")
    if not isinstance(message, str) or not message:
        if isinstance(body, str) and body.strip():
            message = body.strip()
        elif fields or body:
            message = json.dumps(body) if not isinstance(body, str) else body
        else:
            message = reason or f"HTTP {status_code}"
    param = fields.get("param")
    code = fields.get("code")
    type_ = fields.get("type")
    return error_class_for(status_code)(
        message,
        status_code=status_code,
        type=type_ if isinstance(type_, str) else None,
        param=param if isinstance(param, str) else None,
        code=code if isinstance(code, (str, int)) else None,
        body=body,
        response=response,
    )


def error_from_response(response: httpx.Response) -> APIStatusError:
    """Build the exception for an HTTP error answer; the body must have been read."""
    body: Any
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return status_error(
        response.status_code, body, response=response, reason=response.reason_phrase
    )
