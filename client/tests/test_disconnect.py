"""Leaving a stream early closes the connection, and the server sees it go."""

from __future__ import annotations

import asyncio
import gc
from typing import Callable

from payloads import chat_chunks, completion_chunks
from stub_server import SSE, StubServer

from crosstask_client import AsyncCrosstask, Crosstask

MSG = [{"role": "user", "content": "count to a million"}]
FILLER = chat_chunks(["tick"])[0]


def _endless(stub: StubServer, path: str = "/v1/chat/completions") -> None:
    chunks = chat_chunks(["a", "b"]) if "chat" in path else completion_chunks(["a", "b"])
    stub.on("POST", path, SSE(chunks[:1], forever=True, filler=chunks[0], interval=0.02))


def test_break_out_of_for_loop(stub: StubServer, clients: Callable[..., Crosstask]) -> None:
    _endless(stub)
    client = clients(stub.base_url)
    for seen, _chunk in enumerate(client.chat(MSG, stream=True), start=1):
        if seen == 3:
            break
    assert stub.disconnected.wait(3.0)


def test_leave_with_block(stub: StubServer, clients: Callable[..., Crosstask]) -> None:
    _endless(stub, "/v1/completions")
    with clients(stub.base_url) as client, client.complete("1, 2,", stream=True) as stream:
        first = next(iter(stream))
        assert first.choices[0].text == "a"
    assert stub.disconnected.wait(3.0)


def test_close_without_iterating(stub: StubServer, clients: Callable[..., Crosstask]) -> None:
    _endless(stub)
    stream = clients(stub.base_url).chat(MSG, stream=True)
    stream.close()
    assert stub.disconnected.wait(3.0)


def test_client_keeps_working_after_break(
    stub: StubServer, clients: Callable[..., Crosstask]
) -> None:
    _endless(stub)
    client = clients(stub.base_url)
    for _ in range(3):
        stub.disconnected.clear()
        for _chunk in client.chat(MSG, stream=True):
            break
        assert stub.disconnected.wait(3.0)
    assert len(stub.calls("/v1/chat/completions")) == 3


async def test_async_break_inside_async_with(stub: StubServer) -> None:
    _endless(stub)
    async with AsyncCrosstask(stub.base_url) as client:
        async with await client.chat(MSG, stream=True) as stream:
            async for _chunk in stream:
                break
        assert await asyncio.to_thread(stub.disconnected.wait, 3.0)


async def test_async_break_without_context_manager(stub: StubServer) -> None:
    _endless(stub, "/v1/completions")
    client = AsyncCrosstask(stub.base_url)
    async for _chunk in await client.complete("1, 2,", stream=True):
        break
    # asyncio finalizes the abandoned generator on a following loop turn.
    gc.collect()
    for _ in range(50):
        await asyncio.sleep(0.02)
        if stub.disconnected.is_set():
            break
    assert await asyncio.to_thread(stub.disconnected.wait, 3.0)
    await client.aclose()
