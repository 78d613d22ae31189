"""Limits enforced before a request reaches its route: body size, admission of generation
requests (a bounded wait instead of an unbounded queue) and refusal while draining.

Admission counts generation requests *in flight* at the HTTP layer: admitted and not yet
answered to the last byte, whether they are retrieving demonstrations, queued in the engine,
running or streaming. The engine runs at most `max_num_seqs` sequences at once; up to
`max_waiting` more requests may wait beyond that. Past `max_num_seqs + max_waiting` a new
generation request is answered 429 at once, without its body being read. The count is kept
here rather than read from the engine's own queue because the engine reports its queue only
once per scheduler step, so a burst arriving within one step would all be admitted. A
request counts once whatever its `n` or number of prompts (its body is not parsed yet when
it is admitted); `max_n` and `max_prompts_per_request` bound how far that can be off.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.api.body_limit import body_too_large, content_length, limited_receive
from serve.errors import APIError
from serve.settings import Settings

# The routes whose requests occupy the engine; the ones admission control bounds.
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
# Probes and scrapes must keep answering during a drain and never hold one up.
PROBE_PATHS = frozenset({"/health", "/metrics"})
# vLLM's own default for its OpenAI server on CPU, used only when neither the engine nor
# the settings say how many sequences run at once.
FALLBACK_MAX_NUM_SEQS = 128


@dataclass
class RequestGate:
    """What is in flight, and the metrics of what was turned away."""

    registry: CollectorRegistry
    # How many sequences the engine runs at once (read when deciding, since the engine
    # may be attached after the gate is built).
    engine_slots: Callable[[], int] = lambda: FALLBACK_MAX_NUM_SEQS
    max_waiting: int = 256
    generation: int = 0
    requests: int = 0
    rejected: Counter = field(init=False)

    def __post_init__(self) -> None:
        self.rejected = Counter(
            "crosstask_requests_rejected",
            "Requests turned away before their route ran, by reason "
            "(overloaded, draining, body_too_large).",
            ["reason"],
            registry=self.registry,
        )
        for reason in ("overloaded", "draining", "body_too_large"):
            self.rejected.labels(reason=reason)
        in_flight = Gauge(
            "crosstask_generation_requests_in_flight",
            "Generation requests admitted and not yet answered to the last byte.",
            registry=self.registry,
        )
        in_flight.set_function(lambda: float(self.generation))
        limit = Gauge(
            "crosstask_generation_requests_limit",
            "Generation requests in flight beyond which new ones get 429 "
            "(max_num_seqs + max_waiting).",
            registry=self.registry,
        )
        limit.set_function(lambda: float(self.limit()))

    def limit(self) -> int:
        return self.engine_slots() + self.max_waiting

    def try_admit(self) -> bool:
        # No await between the test and the increment: the event loop cannot interleave
        # another admission, so the bound holds exactly.
        if self.generation >= self.limit():
            self.rejected.labels(reason="overloaded").inc()
            return False
        self.generation += 1
        return True

    def release(self) -> None:
        self.generation -= 1


def engine_slots(engine: object, settings: Settings) -> int:
    """Sequences the engine runs at once: the engine's own figure when it reports one
    (`Engine.max_num_seqs`), else the configured one, else vLLM's CPU default."""
    reported = getattr(engine, "max_num_seqs", None)
    if isinstance(reported, int) and reported > 0:
        return reported
    return settings.max_num_seqs or FALLBACK_MAX_NUM_SEQS


class AdmittingState(Protocol):
    """What admission reads of the server's state (serve/api/state.py)."""

    settings: Settings
    gate: RequestGate

    @property
    def ready(self) -> bool: ...

    @property
    def draining(self) -> bool: ...


async def send_error(send: Send, error: APIError, retry_after: int | None = None) -> None:
    """Answer with an OpenAI error body straight from ASGI (nothing of the app has run)."""
    payload = json.dumps(error.body(), separators=(",", ":")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    # The body was not read; the connection cannot be reused for another request.
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class AdmissionMiddleware:
    """Refuses, before any route runs: /v1 requests while draining (503), generation
    requests past the admission bound (429), bodies past the size limit (413, from the
    Content-Length header at once, else as the body arrives). Counts what is in flight
    for admission and for the drain."""

    def __init__(self, app: ASGIApp, state: AdmittingState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        state = self.state
        settings = state.settings
        gate = state.gate
        gate.requests += 1
        admitted = False
        try:
            if path.startswith("/v1/") and state.draining:
                gate.rejected.labels(reason="draining").inc()
                await send_error(
                    send,
                    APIError(
                        "The server is shutting down; send the request to another replica "
                        "or retry shortly.",
                        503,
                        "server_error",
                        None,
                        "draining",
                    ),
                    settings.retry_after_seconds,
                )
                return
            limit = settings.max_body_bytes
            declared = content_length(scope)
            if declared is not None and declared > limit:
                gate.rejected.labels(reason="body_too_large").inc()
                await send_error(send, body_too_large(limit))
                return
            if scope["method"] == "POST" and path in GENERATION_PATHS and state.ready:
                if not gate.try_admit():
                    await send_error(
                        send,
                        APIError(
                            f"The server is at capacity ({gate.limit()} generation requests "
                            "in flight); retry after the time in Retry-After.",
                            429,
                            "rate_limit_error",
                            None,
                            "server_overloaded",
                        ),
                        settings.retry_after_seconds,
                    )
                    return
                admitted = True
            refused = gate.rejected.labels(reason="body_too_large").inc
            await self.app(scope, limited_receive(receive, limit, refused), send)
        finally:
            gate.requests -= 1
            if admitted:
                gate.release()
