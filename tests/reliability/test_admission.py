"""Admission, draining and the body limit at the level of the app (fake engine, no server):
exact bounds, the metrics of refusals, and the drain's wait for requests in flight."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from serve.api.app import create_app, drain
from serve.api.state import ServerState, Status
from serve.engine.types import EngineConfig, GenerationParams, OutputDelta
from serve.settings import Settings
from tests.unit.fake_engine import FakeEngine, fake_config, fake_startup

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 2}


class GatedEngine(FakeEngine):
    """Generates only once `gate` is set, so that requests pile up in flight."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.gate = threading.Event()
        self.started = 0

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: GenerationParams,
        request_id: str,
        **options: Any,  # whatever else the engine takes (a LoRA, ...), passed on
    ) -> AsyncIterator[list[OutputDelta]]:
        self.started += 1
        while not self.gate.is_set():
            await asyncio.sleep(0.01)
        async for deltas in super().generate(prompt_token_ids, params, request_id, **options):
            yield deltas


@pytest.fixture
def gated() -> Iterator[tuple[TestClient, GatedEngine, ServerState]]:
    engines: list[GatedEngine] = []

    def start(config: EngineConfig) -> GatedEngine:
        engines.append(GatedEngine(config))
        return engines[0]

    settings = Settings(max_num_seqs=2, max_waiting=1, retry_after_seconds=3, max_body_bytes=4096)
    app = create_app(
        settings,
        fake_startup(start),
    )  # type: ignore[arg-type]
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield client, engines[0], app.state.crosstask
        engines[0].gate.set()


def _metric(client: TestClient, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(line_start)


def test_exactly_max_num_seqs_plus_max_waiting_are_admitted(
    gated: tuple[TestClient, GatedEngine, ServerState],
) -> None:
    client, engine, state = gated
    assert _metric(client, "crosstask_generation_requests_limit") == 3
    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(client.post, "/v1/chat/completions", json=CHAT) for _ in range(3)]
        deadline = time.monotonic() + 10
        while state.gate.generation < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for _ in range(4):
            refused = client.post("/v1/chat/completions", json=CHAT)
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "3"
            assert refused.json()["error"]["code"] == "server_overloaded"
        # Other routes are not generation: still served.
        assert client.get("/v1/models").status_code == 200
        engine.gate.set()
        assert [f.result().status_code for f in held] == [200, 200, 200]
    assert _metric(client, 'crosstask_requests_rejected_total{reason="overloaded"}') == 4
    assert _metric(client, "crosstask_generation_requests_in_flight") == 0
    # Refusals are counted per route too, though no route ran for them.
    assert (
        _metric(client, 'crosstask_requests_total{route="/v1/chat/completions",status="429"}') == 4
    )
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_streams_hold_their_slot_until_the_last_byte(
    gated: tuple[TestClient, GatedEngine, ServerState],
) -> None:
    client, engine, state = gated
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        assert r.status_code == 200
        assert state.gate.generation == 1
        engine.gate.set()
        body = r.read().decode()
    assert body.rstrip().endswith("data: [DONE]")
    assert state.gate.generation == 0


def test_body_limit(gated: tuple[TestClient, GatedEngine, ServerState]) -> None:
    client, engine, _ = gated
    engine.gate.set()
    big = {**CHAT, "user": "x" * 5000}
    declared = client.post("/v1/chat/completions", json=big)
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "fake-model", "user": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    streamed = client.post(
        "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413
    assert streamed.json()["error"]["code"] == "request_too_large"
    assert _metric(client, 'crosstask_requests_rejected_total{reason="body_too_large"}') == 2
    # Just under the limit: served.
    assert client.post("/v1/chat/completions", json={**CHAT, "user": "x" * 3000}).status_code == 200


def test_draining_refuses_v1_and_fails_health_but_serves_probes(
    gated: tuple[TestClient, GatedEngine, ServerState],
) -> None:
    client, engine, state = gated
    engine.gate.set()
    state.begin_drain()
    assert client.get("/health").status_code == 503
    assert client.get("/health").json() == {"status": "draining"}
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
        response = client.request(method, path, json=CHAT if method == "POST" else None)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "draining"
        assert response.headers["retry-after"] == "3"
    assert client.get("/metrics").status_code == 200
    assert _metric(client, 'crosstask_requests_rejected_total{reason="draining"}') == 2


def test_drain_waits_for_requests_in_flight_and_no_longer() -> None:
    state = ServerState(settings=Settings(), engine_config=fake_config())
    state.status = Status.READY

    async def scenario() -> tuple[float, float, float]:
        state.gate.requests = 2

        async def finish_later() -> None:
            await asyncio.sleep(0.3)
            state.gate.requests = 0

        started = time.monotonic()
        finisher = asyncio.create_task(finish_later())
        left = await drain(state, 5)
        waited = time.monotonic() - started
        await finisher
        # A request that never finishes: the drain gives up at the deadline.
        state.gate.requests = 1
        started = time.monotonic()
        left_when_stuck = await drain(state, 0.2)
        return waited, left, time.monotonic() - started + left_when_stuck

    waited, left, stuck = asyncio.run(scenario())
    assert state.status is Status.DRAINING
    assert 0.25 < waited < 2 and 3 < left <= 5
    assert 0.15 < stuck < 1


def test_a_dead_engine_is_still_fatal_while_draining() -> None:
    fatal: list[int] = []
    engines: list[FakeEngine] = []

    def start(config: EngineConfig) -> FakeEngine:
        engines.append(FakeEngine(config))
        return engines[0]

    app = create_app(
        Settings(),
        fake_startup(start),
        on_fatal=fatal.append,
    )  # type: ignore[arg-type]
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        app.state.crosstask.begin_drain()
        engines[0].errored = True
        while not fatal:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert fatal == [1]


def test_the_openapi_document_describes_what_is_served() -> None:
    app = create_app(
        Settings(),
        fake_startup(),
    )
    doc = app.openapi()
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            assert "422" not in operation["responses"], path
            if path.startswith("/v1/"):
                assert operation.get("security"), path
    for path in ("/v1/chat/completions", "/v1/completions"):
        content = doc["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
    assert set(doc["paths"]["/health"]["get"]["responses"]) == {"200", "503"}
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    httpx.Response(200, json=doc)  # serializable as it is
