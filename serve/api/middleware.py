"""Request metrics as a plain ASGI middleware: it sees streaming responses through to their
last byte, which a BaseHTTPMiddleware would not without buffering."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.metrics import Metrics


class MetricsMiddleware:
    def __init__(
        self, app: ASGIApp, metrics: Metrics, known_paths: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.metrics = metrics
        # Paths of the app's routes without parameters: a request refused before routing
        # (limits, see serve/api/admission.py) is labelled with its path when it is one of them.
        self.known_paths = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = _route_template(scope, self.known_paths)
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - start)


def _route_template(scope: Scope, known_paths: frozenset[str] = frozenset()) -> str:
    # The template, not the raw path, keeps label cardinality bounded.
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return str(path)
    raw = scope.get("path")
    return raw if raw in known_paths else "unmatched"
