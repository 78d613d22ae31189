"""The request body size limit: refused from Content-Length at once, else as the body
arrives."""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope

from serve.errors import APIError


class BodyTooLargeError(HTTPException):
    """Raised from `receive` once a body grows past the limit; FastAPI re-raises
    HTTPExceptions from body reading, so it reaches the exception handlers as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than the limit of {limit} bytes.")
        self.limit = limit


def body_too_large(limit: int) -> APIError:
    return APIError(
        f"The request body is larger than the limit of {limit} bytes.",
        413,
        "invalid_request_error",
        None,
        "request_too_large",
    )


def content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def limited_receive(receive: Receive, limit: int, on_refusal: Callable[[], None]) -> Receive:
    """`receive` that raises BodyTooLargeError once more than `limit` bytes arrived."""
    received = 0

    async def limited() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                on_refusal()
                raise BodyTooLargeError(limit)
        return message

    return limited
