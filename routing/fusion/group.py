"""The API-side half of a fusion group: run the members' streams and release the group's
output only once every member has produced the same tokens.

The engine makes all members take the same token at every step (processor.py); this is the
check that it did. A position is released (member 0's delta, whose text the client gets)
when every member has reached it with the same token. A member that disagrees, or that
ends at a different length, means the group lost lockstep: FusionLockstepError, and the
engine's generator closes every member's stream (aborting them in vLLM).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Protocol, TypeVar


class Delta(Protocol):
    token_ids: list[int]
    finish_reason: str | None


D = TypeVar("D", bound=Delta)


class FusionLockstepError(RuntimeError):
    """The members of a fusion group did not produce the same tokens."""


_END = object()


async def lockstep(streams: Sequence[AsyncIterator[list[D]]]) -> AsyncGenerator[D, None]:
    """Member 0's deltas, each released once every member has confirmed its tokens."""
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[list[D]]) -> None:
        try:
            async for deltas in stream:
                await queue.put((i, deltas[0]))
            await queue.put((i, _END))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    tokens: list[list[int]] = [[] for _ in streams]
    ended = [False] * len(streams)
    pending: deque[tuple[int, D]] = deque()  # member 0's deltas and the length they reach
    checked = 0
    try:
        while not all(ended):
            i, item = await queue.get()
            if item is _END:
                ended[i] = True
            elif isinstance(item, BaseException):
                raise item
            else:
                delta: D = item  # type: ignore[assignment]
                tokens[i].extend(delta.token_ids)
                if i == 0:
                    pending.append((len(tokens[0]), delta))
            common = min(len(t) for t in tokens)
            for position in range(checked, common):
                token = tokens[0][position]
                if any(t[position] != token for t in tokens[1:]):
                    raise FusionLockstepError(
                        f"fusion members disagree at output position {position}"
                    )
            checked = common
            while pending and pending[0][0] <= common:
                yield pending.popleft()[1]
            if any(ended[j] and len(tokens[j]) < max(map(len, tokens)) for j in range(len(tokens))):
                raise FusionLockstepError("a fusion member ended before the others")
        while pending:  # only reachable with every member ended at the same length
            yield pending.popleft()[1]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
