"""`crosstask serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import threading
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from serve.cli.common import SERVE_FIELDS, add_engine_flags, configure_logging, settings_from_args
from serve.cli.preflight import check_shared_memory, exit_now, listen

log = logging.getLogger("crosstask")

# After the engine died: how long /health keeps answering 503 before the listener closes,
# and how long responses still being sent then get.
FATAL_LINGER_SECONDS = 2.0
FATAL_GRACE_SECONDS = 5


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="Serve the OpenAI-compatible HTTP API.",
        description="Serve the OpenAI-compatible HTTP API (/v1/chat/completions, "
        "/v1/completions, /v1/models, /health, /metrics). Every option can also be set "
        "through its CROSSTASK_* environment variable (e.g. CROSSTASK_PORT); flags win.",
    )
    p.add_argument("--host", help="Address to bind (default 127.0.0.1).")
    p.add_argument("--port", type=int, help="Port to bind (default 8000).")
    add_engine_flags(p)
    p.add_argument(
        "--store-readonly",
        dest="store_readonly",
        action="store_const",
        const=True,
        help="Serve the store as a read-only replica: the snapshot its CURRENT names (or "
        "the flat store), writes refused (env CROSSTASK_STORE_READONLY).",
    )
    p.add_argument(
        "--store-publish-snapshots",
        dest="store_publish_snapshots",
        action="store_const",
        const=True,
        help="Be the store's one writer for read-only replicas: publish a snapshot of the "
        "store after writes (env CROSSTASK_STORE_PUBLISH_SNAPSHOTS).",
    )
    p.add_argument(
        "--store-reload-seconds",
        dest="store_reload_seconds",
        type=float,
        help="Read-only: check the store's CURRENT this often for a newer snapshot "
        "(default 30; 0 = never).",
    )
    p.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        default=[],
        help="Accept this API key on /v1 routes (repeatable; env "
        "CROSSTASK_API_KEYS, comma-separated).",
    )
    p.add_argument(
        "--admin-key", dest="admin_key", help="Key for management writes (env CROSSTASK_ADMIN_KEY)."
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from serve.api.app import create_app
    from serve.runtime import Startup

    settings = settings_from_args(args, ["host", "port", "api_keys", "admin_key", *SERVE_FIELDS])
    configure_logging(settings.log_level)
    check_shared_memory()
    sock = listen(settings.host, settings.port)
    startup = Startup.from_settings(settings)
    if settings.auth_enabled:
        log.info(
            "API keys required on /v1 routes (%d key(s), admin key %s)",
            len(settings.api_keys),
            "set" if settings.admin_key else "not set",
        )
    exit_code = 0
    grace = int(settings.drain_seconds)

    def fatal(code: int) -> None:
        nonlocal exit_code
        exit_code = code
        # Nothing in flight can succeed without the engine: exit soon, for the supervisor,
        # but keep listening a moment so that probes read the 503 rather than a refusal.
        server.config.timeout_graceful_shutdown = min(FATAL_GRACE_SECONDS, grace)

        def stop() -> None:
            server.should_exit = True

        asyncio.get_running_loop().call_later(FATAL_LINGER_SECONDS, stop)
        # The orderly stop cannot finish while a thread still loads the engine: whatever
        # it is doing then, the process leaves once the grace is over.
        backstop = threading.Timer(
            FATAL_LINGER_SECONDS + FATAL_GRACE_SECONDS + 1, exit_now, (code, cause())
        )
        backstop.daemon = True
        backstop.start()

    def cause() -> str:
        return app.state.crosstask.failure or "the server could not serve"

    app = create_app(settings, startup, on_fatal=fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=grace,
        timeout_keep_alive=settings.keep_alive_seconds,
        access_log=False,
    )
    server = DrainingServer(config, app, settings.drain_seconds)
    log.info(
        "Listening on http://%s:%d (health 503 until the engine is ready)",
        settings.host,
        settings.port,
    )
    server.run(sockets=[sock])
    if exit_code:
        exit_now(exit_code, cause())
    return exit_code


class DrainingServer(uvicorn.Server):
    """A uvicorn server on which SIGTERM (or a first Ctrl-C) drains before stopping:
    /health and new /v1 requests answer 503 at once while the listener stays open (so
    clients and load balancers are told, not refused), the requests in flight, streams
    included, get up to `drain_seconds` to finish, then the server stops and the process
    exits 0. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_seconds = drain_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Deliberately not uvicorn's: it records the signal and re-raises it after
        # shutdown, so a clean drain would still end as "killed by SIGTERM".
        if self._draining or self._loop is None:
            self.force_exit = self._draining
            self.should_exit = True
            return
        self._draining = True
        log.info("Signal %d: draining (a second signal stops at once)", sig)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        from serve.api.app import drain

        left = await drain(self._app.state.crosstask, self._drain_seconds)
        # What is left of the grace period goes to responses still being sent.
        self.config.timeout_graceful_shutdown = max(1, math.ceil(left))
        self.should_exit = True
