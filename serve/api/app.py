"""The app factory: settings and the start-up steps are injected, nothing is global."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from pydantic import BaseModel

from serve.api import exception_handlers
from serve.api.adapters.api_router import router as adapters_router
from serve.api.admission import AdmissionMiddleware
from serve.api.chat_completion.api_router import router as chat_router
from serve.api.chat_completion.protocol import ChatCompletionChunk
from serve.api.completion.api_router import router as completion_router
from serve.api.completion.protocol import CompletionChunk
from serve.api.demonstrations.api_router import router as demonstrations_router
from serve.api.health.api_router import router as health_router
from serve.api.middleware import MetricsMiddleware
from serve.api.models.api_router import router as models_router
from serve.api.state import ServerState, Status
from serve.runtime import Startup
from serve.settings import Settings

log = logging.getLogger(__name__)


async def _start(state: ServerState, startup: Startup) -> None:
    try:
        runtime = await startup.start()
    except Exception as exc:
        log.exception("Start-up failed")
        state.fail(f"start-up failed: {exc}")
        state.on_fatal(1)
        return
    state.attach(runtime.engine, runtime.retriever, runtime.routing)
    log.info(
        "Engine ready: serving %s from %s",
        state.engine_config.served_name,
        state.engine_config.model_dir,
    )


async def _watch_engine(state: ServerState, period: float = 1.0) -> None:
    while True:
        await asyncio.sleep(period)
        # A drain does not make a dead engine fine: the process must still exit non-zero.
        serving = state.status in (Status.READY, Status.DRAINING)
        if serving and state.engine is not None and state.engine.errored:
            log.error("The engine died; the server can no longer serve.")
            state.fail("the engine died")
            state.on_fatal(1)
            return


async def drain(state: ServerState, seconds: float, poll: float = 0.05) -> float:
    """Turn /health and new /v1 requests to 503, then wait until no request is in flight
    (probes aside) or `seconds` have passed. Returns the seconds left of the grace period,
    which the HTTP server then gives the last responses before it cancels them."""
    deadline = time.monotonic() + seconds
    state.begin_drain()
    log.info(
        "Draining: %d request(s) in flight get up to %.0f s to finish", state.gate.requests, seconds
    )
    while state.gate.requests > 0 and time.monotonic() < deadline:
        await asyncio.sleep(poll)
    left = max(0.0, deadline - time.monotonic())
    if state.gate.requests:
        log.warning("Drain period over with %d request(s) in flight", state.gate.requests)
    else:
        log.info("Drained: no request in flight")
    return left


_STREAM_CHUNKS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionChunk,
    "/v1/completions": CompletionChunk,
}


def _event_schema(schema: dict[str, Any], chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event of a stream (OpenAPI 3.1 describes each event): its `data` is
    a chunk as JSON, an error body as JSON, or the final `[DONE]`."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    chunk_schema = chunk.model_json_schema(
        mode="serialization", ref_template="#/components/schemas/{model}"
    )
    for name, definition in chunk_schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components.setdefault(chunk.__name__, chunk_schema)
    return {
        "type": "object",
        "description": "With `stream: true`: `data: <chunk JSON>` events, then `data: [DONE]`. "
        "An error after the stream began is an event holding the error body.",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {
                            "anyOf": [
                                {"$ref": f"#/components/schemas/{chunk.__name__}"},
                                {"$ref": "#/components/schemas/ErrorResponse"},
                            ]
                        },
                    },
                ]
            }
        },
    }


def _document_actual_responses(schema: dict[str, Any]) -> dict[str, Any]:
    """Make the OpenAPI document say what the server answers, so that clients and schema
    checkers (tests/reliability/test_schemathesis.py) can rely on it:
    validation errors are 400 (documented on every route), never FastAPI's 422; generation
    routes stream server-sent events when asked; /metrics is Prometheus text; /health is
    503 while the server starts, drains or after the engine failed."""
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.get("responses", {})
            responses.pop("422", None)
            chunk = _STREAM_CHUNKS.get(path)
            if chunk is not None and "200" in responses:
                content = responses["200"].setdefault("content", {})
                content["text/event-stream"] = {"schema": _event_schema(schema, chunk)}
    health = schema.get("paths", {}).get("/health", {}).get("get")
    if health is not None:
        status_body = {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"status": {"type": "string"}},
                    "required": ["status"],
                }
            }
        }
        health["responses"] = {
            "200": {"description": "The engine serves requests.", "content": status_body},
            "503": {
                "description": "Starting, draining, or the engine failed.",
                "content": status_body,
            },
        }
    metrics = schema.get("paths", {}).get("/metrics", {}).get("get")
    if metrics is not None:
        metrics["responses"] = {
            "200": {
                "description": "Prometheus text exposition format.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        }
    schemas = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return schema


def create_app(
    settings: Settings,
    startup: Startup,
    on_fatal: Callable[[int], None] | None = None,
) -> FastAPI:
    """The app; the engine, store and router start in the background (serve/runtime.py)
    while /health answers 503."""
    state = ServerState(settings=settings, engine_config=startup.engine_config)
    if on_fatal is not None:
        state.on_fatal = on_fatal

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starter = asyncio.create_task(_start(state, startup))
        watchdog = asyncio.create_task(_watch_engine(state))
        try:
            yield
        finally:
            if state.status is Status.READY:
                state.status = Status.DRAINING
            watchdog.cancel()
            starter.cancel()
            if state.retriever is not None:
                await state.retriever.close()
            if state.engine is not None:
                state.engine.shutdown()

    app = FastAPI(
        title="crosstask",
        summary="OpenAI-compatible serving with cross-task demonstrations and LoRA routing.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.crosstask = state
    exception_handlers.install(app)
    for router in (
        health_router,
        models_router,
        chat_router,
        completion_router,
        demonstrations_router,
        adapters_router,
    ):
        app.include_router(router)
    # Outermost last: CORS (when on), then metrics (they see every answer, refusals
    # included), then the limits, which refuse before any route runs.
    app.add_middleware(AdmissionMiddleware, state=state)
    app.add_middleware(
        MetricsMiddleware,
        metrics=state.metrics,
        known_paths=frozenset(
            path for route in app.routes if "{" not in (path := str(getattr(route, "path", "")))
        ),
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document_actual_responses(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
