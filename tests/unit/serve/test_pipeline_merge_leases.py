"""A merge handed to a request keeps its folder until that request ends, however many newer
merges push it out of the cache meanwhile: vLLM loads the LoRA from that folder when it
schedules the request, after the routing step has long returned."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from routing.merge import MergeCache
from routing.modes import RoutingMode
from routing.registry import AdapterRegistry
from routing.router import RouterConfig
from routing.service import RoutingService
from serve.engine.types import GenerationParams
from serve.errors import APIError
from serve.metrics import Metrics
from serve.pipeline import CrosstaskOptions, GenerationRequest, Message, Pipeline
from serve.settings import Settings
from tests.unit.fake_engine import FakeEngine, fake_config
from tests.unit.tiny_lora import write_tiny_base, write_tiny_lora


def _pipeline(tmp_path: Path, told: list[str]) -> Pipeline:
    root = tmp_path / "adapters"
    for seed, name in enumerate(("one", "two", "three")):
        write_tiny_lora(root / name, seed=seed)
    registry = AdapterRegistry(root, write_tiny_base(tmp_path / "base"), max_rank=8)
    registry.scan()

    async def on_evict(name: str) -> None:  # what the engine is told: drop that LoRA
        told.append(name)

    merges = MergeCache(tmp_path / "merges", capacity=1, max_rank=8, on_evict=on_evict)
    routing = RoutingService(registry, merges, RouterConfig(), "fake-model")
    engine = FakeEngine(fake_config())
    return Pipeline(Settings(), engine, Metrics(), None, routing)  # type: ignore[arg-type]


def _request(adapters: list[str], words: int = 3) -> GenerationRequest:
    return GenerationRequest(
        model="fake-model",
        params=GenerationParams(max_tokens=2, temperature=0.0),
        max_tokens=2,
        messages=[Message("user", " ".join(["word"] * words))],
        options=CrosstaskOptions(routing_mode=RoutingMode.MERGE, adapters=adapters),
    )


async def _eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    # The folder goes in a task of the event loop once the request lets go of it.
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


def test_an_evicted_merge_keeps_its_folder_until_its_request_ends(tmp_path: Path) -> None:
    async def scenario() -> None:
        told: list[str] = []
        pipeline = _pipeline(tmp_path, told)
        held = await pipeline.prepare(_request(["one", "two"]))
        assert held.lora is not None and held.lora.path.is_dir()
        folder, name = held.lora.path, held.lora.name
        # Newer merges, each served to the end, push it out of the cache of one.
        for adapters in (["one", "three"], ["two", "three"]):
            other = await pipeline.prepare(_request(adapters))
            await pipeline.complete(other, "other")
        # The held request has not reached the engine yet: its merge must still be there.
        assert (folder / "adapter_model.safetensors").is_file()
        assert (folder / "adapter_config.json").is_file()
        assert len(told) == 1 and name not in told  # the second merge went at once
        done = await pipeline.complete(held, "held")
        assert done.completion_tokens == 2
        await _eventually(lambda: not folder.exists())
        assert told[-1] == name  # the engine is told once the request is over

    asyncio.run(scenario())


def test_a_request_refused_after_routing_lets_its_merge_go(tmp_path: Path) -> None:
    async def scenario() -> None:
        told: list[str] = []
        pipeline = _pipeline(tmp_path, told)
        # Routed to a merge, then refused: the prompt does not fit the fake's context.
        with pytest.raises(APIError) as refused:
            await pipeline.prepare(_request(["one", "two"], words=200))
        assert refused.value.code == "context_length_exceeded"
        # The exception (and its traceback's frames) still lives here, so only an explicit
        # release can have let go of the merge: the next merge evicts it at once.
        other = await pipeline.prepare(_request(["one", "three"]))
        await _eventually(lambda: len(told) == 1)
        assert other.lora is not None and told[0] != other.lora.name
        await pipeline.complete(other, "other")

    asyncio.run(scenario())
