"""Beyond capacity the server answers 429 with Retry-After at once, instead of queueing
without bound; everything it admits succeeds; afterwards it serves normally."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.reliability.conftest import SPARE_MAX_NUM_SEQS, SPARE_MAX_WAITING
from tests.server import Server

LIMIT = SPARE_MAX_NUM_SEQS + SPARE_MAX_WAITING
BURST = 4 * LIMIT


@dataclass
class Outcome:
    status: int
    seconds: float
    retry_after: str | None
    body: str


def _body(server: Server, i: int, stream: bool, max_tokens: int) -> str:
    return json.dumps(
        {
            "model": server.model,
            "messages": [{"role": "user", "content": f"Count to ten. ({i})"}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": stream,
        }
    )


async def _one(client: httpx.AsyncClient, server: Server, i: int, max_tokens: int = 24) -> Outcome:
    stream = i % 2 == 1
    started = time.monotonic()
    async with client.stream(
        "POST",
        f"{server.v1}/chat/completions",
        content=_body(server, i, stream, max_tokens),
        headers={"Content-Type": "application/json"},
    ) as response:
        body = (await response.aread()).decode()
    if response.status_code == 200 and stream:
        assert body.rstrip().endswith("data: [DONE]"), body[-300:]
        assert '"error"' not in body, body
    return Outcome(
        response.status_code, time.monotonic() - started, response.headers.get("retry-after"), body
    )


async def _burst(server: Server) -> list[Outcome]:
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(_one(client, server, i) for i in range(BURST)))


def _rejected(server: Server) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith('crosstask_requests_rejected_total{reason="overloaded"}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no rejected-requests metric")


@pytest.mark.timeout(300)
def test_burst_beyond_capacity_gets_quick_429s(spare_server: Server) -> None:
    server = spare_server
    assert server.metric("crosstask_generation_requests_limit") == LIMIT
    rejected_before = _rejected(server)

    outcomes = asyncio.run(_burst(server))

    statuses = sorted(o.status for o in outcomes)
    assert all(o.status in (200, 429) for o in outcomes), statuses
    ok = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 429]
    # Exactly LIMIT can be in flight; the burst arrives far faster than any of them ends.
    assert len(ok) >= LIMIT, statuses
    assert refused, f"a burst of {BURST} over a limit of {LIMIT} was all admitted"
    for o in refused:
        assert o.retry_after == "2", o
        error = json.loads(o.body)["error"]
        assert error["code"] == "server_overloaded" and error["type"] == "rate_limit_error"
        # Refused without waiting for anything: well under one generation's time.
        assert o.seconds < 5, o
    slowest_refusal = max(o.seconds for o in refused)
    fastest_success = min(o.seconds for o in ok)
    assert slowest_refusal < fastest_success, (slowest_refusal, fastest_success)
    assert _rejected(server) == rejected_before + len(refused)

    # Afterwards: nothing left in flight, and the server serves as before.
    deadline = time.monotonic() + 30
    while server.metric("crosstask_generation_requests_in_flight") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=4,
    )
    assert reply.choices[0].message.content is not None


def test_openai_client_sees_rate_limit_error(spare_server: Server) -> None:
    """The official client maps the 429 to RateLimitError (and, with retries on, would
    honour Retry-After)."""
    server = spare_server

    async def hold_and_probe() -> BaseException | None:
        async with httpx.AsyncClient(timeout=120) as client:
            holders = [
                asyncio.create_task(_one(client, server, 100 + i, max_tokens=32))
                for i in range(LIMIT)
            ]
            await asyncio.sleep(0.5)
            probe = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)
            caught: BaseException | None = None
            try:
                await probe.chat.completions.create(
                    model=server.model,
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=2,
                )
            except openai.RateLimitError as exc:
                caught = exc
            await asyncio.gather(*holders)
            return caught

    assert isinstance(asyncio.run(hold_and_probe()), openai.RateLimitError)
