"""FastAPI dependencies: the server state, readiness and API-key checks."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serve.api.chat_completion.serving import ChatServing
from serve.api.completion.serving import CompletionServing
from serve.api.state import ServerState, Status
from serve.errors import APIError, unavailable
from serve.pipeline import Pipeline


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.crosstask
    return state


def require_ready(state: ServerState) -> Pipeline:
    if state.status is Status.READY and state.pipeline is not None:
        return state.pipeline
    if state.status is Status.STARTING:
        raise unavailable("The engine is still starting; retry shortly.", code="starting")
    if state.status is Status.DRAINING:
        raise unavailable("The server is shutting down.", code="draining")
    raise unavailable(f"The engine failed: {state.failure}", code="engine_dead")


# Dependencies are `async def`: FastAPI runs a plain `def` dependency in a worker thread,
# and under a burst of requests those thread hops delay admission to the engine.


async def get_pipeline(request: Request) -> Pipeline:
    return require_ready(get_state(request))


async def get_chat_serving(request: Request) -> ChatServing:
    state = get_state(request)
    require_ready(state)
    assert state.chat is not None
    return state.chat


async def get_completion_serving(request: Request) -> CompletionServing:
    state = get_state(request)
    require_ready(state)
    assert state.completion is not None
    return state.completion


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(token: str, keys: list[str]) -> bool:
    # Compare against every key, in constant time each, so timing tells nothing.
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def _unauthorized(message: str) -> APIError:
    return APIError(message, 401, "invalid_request_error", None, "invalid_api_key")


# Declares the bearer scheme in the OpenAPI document (each /v1 operation lists it under
# `security`); the check itself is check_api_key's, which refuses with OpenAI error bodies.
_bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="APIKey",
    description="An API key (CROSSTASK_API_KEYS) or the admin key, when keys are configured.",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)]


async def require_api_key(request: Request, _credentials: Credentials) -> None:
    """Every /v1 route, when keys are configured: any API key or the admin key."""
    check_api_key(request)


def check_api_key(request: Request) -> None:
    settings = get_state(request).settings
    if not settings.auth_enabled:
        return
    token = _bearer(request)
    if token is None:
        raise _unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'.")
    keys = [k.get_secret_value() for k in settings.api_keys]
    if settings.admin_key is not None:
        keys.append(settings.admin_key.get_secret_value())
    if not _matches(token, keys):
        raise _unauthorized("Incorrect API key provided.")


async def require_admin(request: Request, _credentials: Credentials) -> None:
    """Management writes, when keys are configured: the admin key only."""
    settings = get_state(request).settings
    if not settings.auth_enabled:
        return
    check_api_key(request)
    token = _bearer(request) or ""
    if settings.admin_key is None or not _matches(token, [settings.admin_key.get_secret_value()]):
        raise APIError(
            "This route changes the server and needs the admin key.",
            403,
            "invalid_request_error",
            None,
            "admin_key_required",
        )
