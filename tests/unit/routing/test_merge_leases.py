"""The merge cache's leases: an evicted merge keeps its folder while leased, comes back
whole if asked for again, and goes once the last lease is released (or dropped)."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable
from pathlib import Path

from routing.merge import MergeCache, Source
from tests.unit.tiny_lora import write_tiny_lora


def _sources(tmp_path: Path) -> list[Source]:
    return [
        Source(name, write_tiny_lora(tmp_path / "adapters" / name, seed=seed), f"f{seed}")
        for seed, name in enumerate(("one", "two"))
    ]


async def _eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


def test_a_leased_merge_outlives_its_eviction(tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    told: list[str] = []

    async def on_evict(name: str) -> None:
        told.append(name)

    async def scenario() -> None:
        cache = MergeCache(tmp_path / "merges", capacity=1, max_rank=8, on_evict=on_evict)
        held = await cache.get(sources, [1, 1], pin=True)
        assert held.lease is not None
        plain = await cache.get(sources, [3, 1])  # evicts `held`, which is leased
        assert held.path.is_dir() and told == []
        # Asked for again while still leased: the same folder, back in the cache, no build.
        again = await cache.get(sources, [2, 2], pin=True)
        assert (again.path, again.hit, cache.misses) == (held.path, True, 2)
        await _eventually(lambda: told == [plain.name] and not plain.path.exists())
        held.lease.release()
        held.lease.release()  # idempotent
        await asyncio.sleep(0.05)
        assert held.path.is_dir()  # `again` still holds it, and it is cached again
        await cache.get(sources, [1, 3])  # evicts it; its lease from another thread
        assert again.lease is not None
        thread = threading.Thread(target=again.lease.release)
        thread.start()
        thread.join(10)
        assert not thread.is_alive()
        await _eventually(lambda: not held.path.exists())
        assert told == [plain.name, held.name]

    asyncio.run(scenario())


def test_a_dropped_lease_is_released(tmp_path: Path) -> None:
    sources = _sources(tmp_path)

    async def scenario() -> None:
        cache = MergeCache(tmp_path / "merges", capacity=1, max_rank=8)
        result = await cache.get(sources, [1, 1], pin=True)
        path = result.path
        await cache.get(sources, [3, 1])
        assert path.is_dir()
        del result  # a request that ended without releasing
        gc.collect()
        await _eventually(lambda: not path.exists())

    asyncio.run(scenario())
