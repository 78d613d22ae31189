"""The errors of the server: the one error type of the request path, shaped like the OpenAI
error body, and the start-up error."""

from __future__ import annotations

from collections.abc import Sequence
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


def _describe(error: dict[str, Any]) -> tuple[str, str | None]:
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    # Pydantic reports union members as extra path parts ("str", "list[...]"); keep the
    # field names a client would recognise.
    fields = [p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int")]
    param = ".".join(fields) or None
    message = str(error.get("msg", "invalid value"))
    if error.get("type") == "json_invalid":
        return f"The request body is not valid JSON: {error.get('ctx', {}).get('error', '')}", None
    if error.get("type") == "model_attributes_type" and not fields:
        return "The request body must be a JSON object.", None
    return (f"{param}: {message}" if param else message), param


def invalid_request(errors: Sequence[Any]) -> APIError:
    """Pydantic validation errors (of the request body) as one 400, naming the first."""
    message, param = _describe(errors[0]) if errors else ("Invalid request.", None)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return APIError(message, 400, "invalid_request_error", param, "invalid_request")


class StartupError(RuntimeError):
    """A setting that cannot be served (a missing folder, a folder of the wrong kind, a port
    in use, too little shared memory): the server does not start."""
