"""The app factory: settings and the engine starter are injected, nothing is global."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from retrieval.retriever import Retriever
from serve.api import exception_handlers
from serve.api.chat_completion.api_router import router as chat_router
from serve.api.completion.api_router import router as completion_router
from serve.api.demonstrations.api_router import router as demonstrations_router
from serve.api.health.api_router import router as health_router
from serve.api.middleware import MetricsMiddleware
from serve.api.models.api_router import router as models_router
from serve.api.state import ServerState, Status
from serve.engine import Engine, EngineConfig
from serve.settings import Settings

log = logging.getLogger(__name__)

EngineStarter = Callable[[EngineConfig], Engine]
RetrieverOpener = Callable[[], Retriever | None]


async def _start_engine(
    state: ServerState, start: EngineStarter, open_retriever: RetrieverOpener
) -> None:
    try:
        # Loading and compiling blocks for tens of seconds; threads keep /health
        # answering 503 meanwhile, and the store opens while the engine compiles.
        engine_task = asyncio.create_task(asyncio.to_thread(start, state.engine_config))
        retriever = await asyncio.to_thread(open_retriever)
        engine = await engine_task
    except Exception as exc:
        log.exception("Start-up failed")
        state.fail(f"start-up failed: {exc}")
        state.on_fatal(1)
        return
    state.attach(engine, retriever)
    log.info(
        "Engine ready: serving %s from %s",
        state.engine_config.served_name,
        state.engine_config.model_dir,
    )


async def _watch_engine(state: ServerState, period: float = 1.0) -> None:
    while True:
        await asyncio.sleep(period)
        if state.status is Status.READY and state.engine is not None and state.engine.errored:
            log.error("The engine died; the server can no longer serve.")
            state.fail("the engine died")
            state.on_fatal(1)
            return


def create_app(
    settings: Settings,
    engine_config: EngineConfig,
    start_engine: EngineStarter = Engine.start,
    open_retriever: RetrieverOpener = lambda: None,
    on_fatal: Callable[[int], None] | None = None,
) -> FastAPI:
    state = ServerState(settings=settings, engine_config=engine_config)
    if on_fatal is not None:
        state.on_fatal = on_fatal

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starter = asyncio.create_task(_start_engine(state, start_engine, open_retriever))
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
    ):
        app.include_router(router)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app
