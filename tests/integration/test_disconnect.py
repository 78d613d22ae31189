"""A client that goes away frees its engine slot, and the metrics show it."""

from __future__ import annotations

import json
import time

import httpx

from tests.server import Server


def _wait_idle(server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while server.metric("crosstask_requests_running") != 0:
        assert time.monotonic() < deadline, "the engine kept running an abandoned request"
        time.sleep(0.2)


def _wait_aborted(server: Server, expected: float, timeout: float = 10.0) -> None:
    # The engine frees the slot before the server counts the abort (one await apart).
    deadline = time.monotonic() + timeout
    while server.metric("crosstask_requests_aborted_total") < expected:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)


def _long_request(server: Server, stream: bool) -> str:
    return json.dumps(
        {
            "model": server.model,
            "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
            "max_tokens": 1500,
            "ignore_eos": True,
            "temperature": 0,
            "stream": stream,
        }
    )


def test_streaming_disconnect_aborts(server: Server) -> None:
    _wait_idle(server)
    aborted_before = server.metric("crosstask_requests_aborted_total")
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST",
            f"{server.v1}/chat/completions",
            content=_long_request(server, True),
            headers={"Content-Type": "application/json", **server.headers()},
        ) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        received = 0
        for line in lines:
            if line.startswith("data: "):
                received += 1
            if received >= 5:
                break
        assert server.metric("crosstask_requests_running") == 1
    # Connection closed mid-stream: 1500 tokens would take far longer than this wait.
    _wait_idle(server, timeout=20)
    _wait_aborted(server, aborted_before + 1)
    assert server.metric("crosstask_requests_aborted_total") == aborted_before + 1


def test_non_streaming_disconnect_aborts(server: Server) -> None:
    _wait_idle(server)
    aborted_before = server.metric("crosstask_requests_aborted_total")
    try:
        httpx.post(
            f"{server.v1}/chat/completions",
            content=_long_request(server, False),
            headers={"Content-Type": "application/json", **server.headers()},
            timeout=3,
        )
        raise AssertionError("the long request finished within 3 s")
    except httpx.ReadTimeout:
        pass
    _wait_idle(server, timeout=20)
    _wait_aborted(server, aborted_before + 1)
    assert server.metric("crosstask_requests_aborted_total") == aborted_before + 1
