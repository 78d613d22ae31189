"""Retry policy: unit rules, then against a real socket server on 127.0.0.1."""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Any, Callable

import httpx
import pytest
from payloads import chat_chunks, chat_completion, completion
from stub_server import SSE, Close, Reply, StubServer, free_port

from crosstask_client import (
    APIConnectionError,
    AsyncCrosstask,
    BadRequestError,
    Crosstask,
    RateLimitError,
    ServerError,
)
from crosstask_client._retry import Kind, RetryPolicy, parse_retry_after

MSG = [{"role": "user", "content": "2+2?"}]
FAST: dict[str, Any] = {"backoff_base": 0.05, "backoff_max": 0.2}


def _busy(status: int = 503, retry_after: str = "0") -> Reply:
    return Reply(
        status,
        {"error": {"message": "busy", "type": "ServiceUnavailable", "param": None, "code": status}},
        headers={"Retry-After": retry_after} if retry_after else {},
    )


# -- policy rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "retried"),
    [
        (Kind.READ, 503, True),
        (Kind.READ, 429, True),
        (Kind.READ, 500, False),
        (Kind.READ, 502, False),
        (Kind.READ, 404, False),
        (Kind.GENERATE, 503, True),
        (Kind.GENERATE, 429, True),
        (Kind.GENERATE, 400, False),
        (Kind.GENERATE, 500, False),
        (Kind.GENERATE, 504, False),
        (Kind.WRITE, 503, False),
        (Kind.WRITE, 429, False),
        (Kind.PROBE, 503, False),
    ],
)
def test_status_rules(kind: Kind, status: int, retried: bool) -> None:
    policy = RetryPolicy(max_retries=2)
    assert policy.retry_status(kind, status, 0) is retried
    assert policy.retry_status(kind, status, 2) is False  # out of retries


@pytest.mark.parametrize(
    ("kind", "exc", "retried"),
    [
        (Kind.READ, httpx.ConnectError("refused"), True),
        (Kind.READ, httpx.ReadTimeout("slow"), True),
        (Kind.READ, httpx.RemoteProtocolError("closed"), True),
        (Kind.READ, httpx.ReadError("reset"), True),
        (Kind.READ, httpx.UnsupportedProtocol("ftp"), False),
        (Kind.PROBE, httpx.ConnectError("refused"), True),
        (Kind.GENERATE, httpx.ConnectError("refused"), True),
        (Kind.GENERATE, httpx.ConnectTimeout("slow"), True),
        (Kind.GENERATE, httpx.PoolTimeout("busy"), True),
        (Kind.GENERATE, httpx.ReadTimeout("slow"), False),
        (Kind.GENERATE, httpx.RemoteProtocolError("closed"), False),
        (Kind.GENERATE, httpx.WriteError("broken"), False),
        (Kind.WRITE, httpx.ConnectError("refused"), True),
        (Kind.WRITE, httpx.ReadTimeout("slow"), False),
        (Kind.WRITE, httpx.RemoteProtocolError("closed"), False),
    ],
)
def test_exception_rules(kind: Kind, exc: Exception, retried: bool) -> None:
    policy = RetryPolicy(max_retries=1)
    assert policy.retry_exception(kind, exc, 0) is retried
    assert policy.retry_exception(kind, exc, 1) is False


def test_backoff_grows_with_jitter_and_caps() -> None:
    policy = RetryPolicy(backoff_base=0.5, backoff_max=4.0)
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0)]:
        delays = {policy.delay(attempt) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jittered


def test_retry_after_parsing_and_cap() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("nan") is None
    in_ten = parse_retry_after(formatdate(time.time() + 10, usegmt=True))
    assert in_ten is not None and 8 <= in_ten <= 11
    policy = RetryPolicy(retry_after_max=5.0)
    assert policy.delay(0, "2") == 2.0
    assert policy.delay(0, "120") == 5.0


# -- sync client against the stub server ------------------------------------------


def test_503_retry_after_is_honoured(stub: StubServer, clients: Callable[..., Crosstask]) -> None:
    stub.on("GET", "/v1/models", _busy(503, "1"), Reply(200, {"object": "list", "data": []}))
    client = clients(stub.base_url, max_retries=2, backoff_base=0.01)
    assert client.models().data == []
    first, second = stub.calls("/v1/models")
    assert 0.9 <= second.at - first.at < 3.0


def test_429_then_success_for_chat(stub: StubServer, clients: Callable[..., Crosstask]) -> None:
    stub.on("POST", "/v1/chat/completions", _busy(429), _busy(429), Reply(200, chat_completion()))
    client = clients(stub.base_url, max_retries=2, **FAST)
    assert client.chat(MSG).text == "4"
    assert len(stub.calls("/v1/chat/completions")) == 3


def test_backoff_without_retry_after(stub: StubServer, clients: Callable[..., Crosstask]) -> None:
    stub.on("POST", "/v1/completions", _busy(503, ""), _busy(503, ""), Reply(200, completion()))
    client = clients(stub.base_url, max_retries=3, backoff_base=0.2, backoff_max=1.0)
    assert client.complete("x").text == " 4"
    times = [r.at for r in stub.calls("/v1/completions")]
    assert times[1] - times[0] >= 0.1  # attempt 0: between 0.1 and 0.2 s
    assert times[2] - times[1] >= 0.2  # attempt 1: between 0.2 and 0.4 s


def test_retry_after_is_capped(stub: StubServer, clients: Callable[..., Crosstask]) -> None:
    stub.on("GET", "/v1/models", _busy(503, "100"), Reply(200, {"object": "list", "data": []}))
    client = clients(stub.base_url, retry_after_max=0.2)
    started = time.monotonic()
    client.models()
    assert time.monotonic() - started < 2.0


def test_gives_up_after_max_retries(stub: StubServer, clients: Callable[..., Crosstask]) -> None:
    stub.on("GET", "/v1/models", _busy(503))
    client = clients(stub.base_url, max_retries=2, **FAST)
    with pytest.raises(ServerError) as caught:
        client.models()
    assert caught.value.status_code == 503 and caught.value.message == "busy"
    assert len(stub.calls("/v1/models")) == 3
    with pytest.raises(RateLimitError):
        stub.on("GET", "/v1/models", _busy(429))
        clients(stub.base_url, max_retries=0).models()
    assert len(stub.calls("/v1/models")) == 4


@pytest.mark.parametrize("status", [400, 401, 404, 500, 502, 504])
def test_other_statuses_are_not_retried(
    stub: StubServer, status: int, clients: Callable[..., Crosstask]
) -> None:
    stub.on(
        "POST",
        "/v1/chat/completions",
        Reply(status, {"error": {"message": "no"}}),
        Reply(200, chat_completion()),
    )
    with pytest.raises(Exception) as caught:
        clients(stub.base_url, max_retries=3, **FAST).chat(MSG)
    assert getattr(caught.value, "status_code", None) == status
    assert len(stub.calls("/v1/chat/completions")) == 1


def test_writes_are_not_retried_on_503(stub: StubServer, clients: Callable[..., Crosstask]) -> None:
    stub.on("POST", "/v1/demonstrations", _busy(503), Reply(200, {"ids": ["x"]}))
    stub.on("POST", "/v1/load_lora_adapter", _busy(429), Reply(200, "ok"))
    stub.on("POST", "/v1/unload_lora_adapter", _busy(503), Reply(200, "ok"))
    client = clients(stub.base_url, max_retries=3, **FAST)
    with pytest.raises(ServerError):
        client.demonstrations.add("t", "d", [{"input": "a", "output": "b"}])
    with pytest.raises(RateLimitError):
        client.adapters.load("a", "/p")
    with pytest.raises(ServerError):
        client.adapters.unload("a")
    for path in ("/v1/demonstrations", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert len(stub.calls(path)) == 1


def test_closed_connection_retried_for_reads_only(
    stub: StubServer, clients: Callable[..., Crosstask]
) -> None:
    stub.on("GET", "/v1/models", Close(), Reply(200, {"object": "list", "data": []}))
    stub.on("POST", "/v1/demonstrations/search", Close(), Close(), Reply(200, {"hits": []}))
    stub.on("POST", "/v1/chat/completions", Close(), Reply(200, chat_completion()))
    stub.on("POST", "/v1/demonstrations", Close(), Reply(200, {"ids": ["x"]}))
    client = clients(stub.base_url, max_retries=2, **FAST)
    assert client.models().data == []
    assert client.demonstrations.search("q") == []
    # The request went out before the connection closed: a generation or a write may
    # have been acted on, so it is raised, not retried.
    with pytest.raises(APIConnectionError):
        client.chat(MSG)
    with pytest.raises(APIConnectionError):
        client.demonstrations.add("t", "d", [])
    assert [
        len(stub.calls(p))
        for p in (
            "/v1/models",
            "/v1/demonstrations/search",
            "/v1/chat/completions",
            "/v1/demonstrations",
        )
    ] == [2, 3, 1, 1]


def _late_server(delay: float) -> StubServer:
    stub = StubServer(port=free_port())
    stub.on("POST", "/v1/chat/completions", Reply(200, chat_completion()))
    stub.on("POST", "/v1/demonstrations", Reply(200, {"ids": ["new"]}))
    stub.on("POST", "/v1/load_lora_adapter", Reply(200, "loaded"))
    stub.on("POST", "/v1/chat/completions#stream", Reply(200, chat_completion()))
    stub.start_later(delay)
    return stub


def test_connection_refused_is_retried_for_every_kind(clients: Callable[..., Crosstask]) -> None:
    stub = _late_server(0.4)
    base = f"http://127.0.0.1:{stub._port}"
    try:
        client = clients(base, max_retries=6, backoff_base=0.1, backoff_max=0.4)
        assert client.demonstrations.add("t", "d", [{"input": "a", "output": "b"}]) == ["new"]
        assert client.adapters.load("a", "/p") == "loaded"
        assert client.chat(MSG).text == "4"
        assert len(stub.calls("/v1/demonstrations")) == 1
    finally:
        time.sleep(0.5)
        stub.stop()


def test_connection_refused_without_retries(clients: Callable[..., Crosstask]) -> None:
    base = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(APIConnectionError):
        clients(base, max_retries=0).chat(MSG)
    started = time.monotonic()
    with pytest.raises(APIConnectionError):
        clients(base, max_retries=2, **FAST).models()
    assert time.monotonic() - started < 2.0


def test_health_retries_connection_but_not_503(
    stub: StubServer, clients: Callable[..., Crosstask]
) -> None:
    stub.on("GET", "/health", Close(), Reply(503, ""), Reply(200, ""))
    client = clients(stub.base_url, max_retries=2, **FAST)
    assert client.health().status_code == 503
    assert client.health().ok
    assert len(stub.calls("/health")) == 3


def test_stream_retried_before_first_event(
    stub: StubServer, clients: Callable[..., Crosstask]
) -> None:
    stub.on("POST", "/v1/chat/completions", _busy(503), _busy(429), SSE(chat_chunks(["a", "b"])))
    client = clients(stub.base_url, max_retries=2, **FAST)
    with client.chat(MSG, stream=True) as stream:
        assert [c.choices[0].delta.content for c in stream] == ["a", "b"]
    assert len(stub.calls("/v1/chat/completions")) == 3


def test_stream_not_retried_after_first_event(
    stub: StubServer, clients: Callable[..., Crosstask]
) -> None:
    stub.on(
        "POST",
        "/v1/chat/completions",
        SSE(chat_chunks(["a", "b", "c"]), drop_after=1),
        SSE(chat_chunks(["x"])),
    )
    client = clients(stub.base_url, max_retries=3, **FAST)
    got: list[Any] = []
    with pytest.raises(APIConnectionError):
        for chunk in client.chat(MSG, stream=True):
            got.append(chunk)
    assert [c.choices[0].delta.content for c in got] == ["a"]
    assert len(stub.calls("/v1/chat/completions")) == 1


def test_bad_request_stream_is_raised_at_call(
    stub: StubServer, clients: Callable[..., Crosstask]
) -> None:
    stub.on(
        "POST",
        "/v1/completions",
        Reply(
            400,
            {
                "error": {
                    "message": "max_tokens must be at least 1",
                    "type": "BadRequestError",
                    "param": "max_tokens",
                    "code": 400,
                }
            },
        ),
    )
    with pytest.raises(BadRequestError) as caught:
        clients(stub.base_url).complete("x", stream=True, max_tokens=0)
    assert caught.value.param == "max_tokens"


# -- async client against the stub server -----------------------------------------


async def test_async_retries(stub: StubServer) -> None:
    stub.on("GET", "/v1/models", _busy(503, "1"), Reply(200, {"object": "list", "data": []}))
    stub.on("POST", "/v1/chat/completions", _busy(429), Reply(200, chat_completion()))
    stub.on("POST", "/v1/completions", Close(), Reply(200, completion()))
    stub.on("POST", "/v1/demonstrations", _busy(503), Reply(200, {"ids": ["x"]}))
    stub.on("POST", "/v1/demonstrations/search", Close(), Reply(200, {"hits": []}))
    async with AsyncCrosstask(stub.base_url, max_retries=2, **FAST) as client:
        started = time.monotonic()
        assert (await client.models()).data == []
        assert time.monotonic() - started >= 0.9
        assert (await client.chat(MSG)).text == "4"
        with pytest.raises(APIConnectionError):
            await client.complete("x")
        with pytest.raises(ServerError):
            await client.demonstrations.add("t", "d", [])
        assert await client.demonstrations.search("q") == []
    counts = [
        len(stub.calls(p))
        for p in (
            "/v1/models",
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/demonstrations",
            "/v1/demonstrations/search",
        )
    ]
    assert counts == [2, 2, 1, 1, 2]


async def test_async_connection_refused_then_up() -> None:
    stub = _late_server(0.4)
    try:
        async with AsyncCrosstask(
            f"http://127.0.0.1:{stub._port}", max_retries=6, backoff_base=0.1, backoff_max=0.4
        ) as client:
            assert await client.adapters.load("a", "/p") == "loaded"
            assert (await client.chat(MSG)).text == "4"
    finally:
        time.sleep(0.5)
        stub.stop()


async def test_async_stream_retried_before_first_event(stub: StubServer) -> None:
    stub.on("POST", "/v1/chat/completions", _busy(503), SSE(chat_chunks(["a", "b"])))
    async with AsyncCrosstask(stub.base_url, max_retries=1, **FAST) as client:
        stream = await client.chat(MSG, stream=True)
        async with stream:
            assert [c.choices[0].delta.content async for c in stream] == ["a", "b"]
    assert len(stub.calls("/v1/chat/completions")) == 2
