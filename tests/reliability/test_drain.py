"""SIGTERM drains: /health turns 503 first, new requests get 503 (`draining`), requests
in flight (a stream among them) finish, then the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.reliability.conftest import SPARE_DRAIN_SECONDS
from tests.server import Server

STREAM_TOKENS = 48


def _chat(server: Server, stream: bool, max_tokens: int) -> str:
    return json.dumps(
        {
            "model": server.model,
            "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
        }
    )


HEADERS = {"Content-Type": "application/json"}


@pytest.mark.timeout(240)
@pytest.mark.ends_spare_server
def test_sigterm_drains_then_exits_zero(spare_server: Server) -> None:
    server = spare_server
    process = server.process
    results: dict[str, httpx.Response] = {}

    def non_streaming() -> None:
        results["plain"] = httpx.post(
            f"{server.v1}/chat/completions",
            content=_chat(server, False, 24),
            headers=HEADERS,
            timeout=SPARE_DRAIN_SECONDS,
        )

    with (
        httpx.Client(timeout=SPARE_DRAIN_SECONDS) as client,
        client.stream(
            "POST",
            f"{server.v1}/chat/completions",
            content=_chat(server, True, STREAM_TOKENS),
            headers=HEADERS,
        ) as response,
    ):
        assert response.status_code == 200
        events = response.iter_lines()
        received: list[str] = []
        for line in events:
            if line.startswith("data: "):
                received.append(line)
            if len(received) >= 3:
                break
        plain = threading.Thread(target=non_streaming)
        plain.start()
        deadline = time.monotonic() + 30
        while server.metric("crosstask_generation_requests_in_flight") < 2:
            assert time.monotonic() < deadline, "the second request was never admitted"
            time.sleep(0.05)

        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # First: the health probe fails, while the listener still answers.
        while True:
            health = httpx.get(f"{server.base_url}/health", timeout=5)
            if health.status_code == 503:
                break
            assert time.monotonic() - signalled < 5, "health stayed 200 after SIGTERM"
            time.sleep(0.05)
        assert health.json() == {"status": "draining"}

        # New requests: 503 draining, with Retry-After, on every /v1 route.
        refused = httpx.post(
            f"{server.v1}/chat/completions",
            content=_chat(server, False, 4),
            headers=HEADERS,
            timeout=10,
        )
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "draining"
        assert refused.headers["retry-after"]
        assert httpx.get(f"{server.v1}/models", timeout=10).status_code == 503

        # The stream in flight runs to its end.
        for line in events:
            if line.startswith("data: "):
                received.append(line)
    assert received[-1] == "data: [DONE]", received[-3:]
    chunks = [json.loads(line[6:]) for line in received[:-1]]
    assert not any("error" in chunk for chunk in chunks), chunks[-2:]
    finished = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finished] == ["length"]
    # Every token was generated and sent: nothing was cut short by the drain.
    assert chunks[-1]["usage"]["completion_tokens"] == STREAM_TOKENS

    plain.join(timeout=SPARE_DRAIN_SECONDS)
    assert results["plain"].status_code == 200, results["plain"].text
    assert results["plain"].json()["usage"]["completion_tokens"] == 24

    # Then the process exits, cleanly, within the drain period.
    code = process.wait(timeout=SPARE_DRAIN_SECONDS + 30)
    assert code == 0, server.log_path.read_text()[-3000:]
    assert time.monotonic() - signalled < SPARE_DRAIN_SECONDS + 30
    log = server.log_path.read_text()
    assert "Drained: no request in flight" in log
    assert "Traceback" not in log, log[-3000:]
