"""The one error type of the request path, shaped like the OpenAI error body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class APIError(Exception):
    """A request that cannot be served, with the HTTP status and the OpenAI error fields."""

    message: str
    status_code: int = 400
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(message, 400, "invalid_request_error", param, code)


def not_found(message: str, param: str | None = None, code: str = "not_found") -> APIError:
    return APIError(message, 404, "invalid_request_error", param, code)


def unavailable(message: str, code: str = "service_unavailable") -> APIError:
    return APIError(message, 503, "server_error", None, code)
