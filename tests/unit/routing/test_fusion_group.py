"""The API-side lockstep check (routing/fusion/group.py): member 0's deltas go out once every
member has produced the same tokens; any disagreement is an error, never text."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from routing.fusion.group import FusionLockstepError, lockstep


@dataclass
class D:
    token_ids: list[int]
    finish_reason: str | None = None
    text: str = ""


async def stream(
    tokens: list[int], delay: float = 0.0, fail: Exception | None = None, finish: str = "stop"
) -> AsyncIterator[list[D]]:
    for i, t in enumerate(tokens):
        await asyncio.sleep(delay)
        yield [D([t], finish if i == len(tokens) - 1 else None, text=str(t))]
    if fail is not None:
        raise fail


async def collect(streams: list[AsyncIterator[list[D]]]) -> list[int]:
    out: list[int] = []
    async for delta in lockstep(streams):
        out.extend(delta.token_ids)
    return out


def test_identical_members_release_member_zero() -> None:
    tokens = [5, 6, 7, 8]
    got = asyncio.run(collect([stream(tokens), stream(tokens, 0.001), stream(tokens, 0.002)]))
    assert got == tokens


def test_disagreement_is_an_error() -> None:
    with pytest.raises(FusionLockstepError, match="position 2"):
        asyncio.run(collect([stream([1, 2, 3, 4]), stream([1, 2, 9, 4])]))


def test_member_ending_early_is_an_error() -> None:
    with pytest.raises(FusionLockstepError):
        asyncio.run(collect([stream([1, 2, 3, 4], 0.001), stream([1, 2])]))


def test_nothing_unconfirmed_goes_out() -> None:
    released: list[int] = []

    async def run() -> None:
        async for delta in lockstep([stream([1, 2, 3]), stream([1, 2, 4], 0.01)]):
            released.extend(delta.token_ids)

    with pytest.raises(FusionLockstepError):
        asyncio.run(run())
    assert released == [1, 2]


def test_member_errors_propagate_and_streams_close() -> None:
    closed: list[int] = []

    async def tracked(i: int) -> AsyncIterator[list[D]]:
        try:
            for t in range(100):
                await asyncio.sleep(0.001)
                yield [D([t])]
        finally:
            closed.append(i)

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(collect([tracked(0), stream([0, 1], fail=RuntimeError("boom"))]))
    assert closed == [0]
