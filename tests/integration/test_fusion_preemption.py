"""Logit fusion under a real preemption: a KV cache too small for every group to finish at
once makes vLLM's scheduler preempt in mid-decode (it frees the last running request's
blocks; the fusion scheduler puts members first, so with only groups running the one
preempted is a member: alone, or with the rest of its group when that is last). A group
that lost a member alone can no longer decode in lockstep: its request must fail with
FusionError after releasing only fused tokens (a prefix of what the group gives alone),
never return other text, and never hang. A group that kept its members, or was preempted
whole and recomputed together, must give exactly what it gives alone. And the engine must
serve fused requests as before afterwards.

The cache holds 6 usable blocks of 128 tokens (7, one of which vLLM keeps as its null
block). A group is two members (weights summing to 1, so no base member) of a ~50-token
prompt and 150 tokens with `ignore_eos`: each member needs a second block past 128 tokens,
so one group alone (4 blocks) never preempts and two at once (8 blocks) must. The fusion
scheduler admits a group only while its prompt blocks, and a block for each running
request, are free; 6 let the second group in beside the first, 5 would hold it back until
the first had finished (and so avoid the preemption)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serve.engine.engine import Engine
from serve.engine.types import EngineConfig, FusionError, FusionTarget, GenerationParams, LoraTarget
from tests.integration.lora_fixtures import (
    chat_prompt_ids,
    load_reference_model,
    random_lora_targets,
)

PROMPTS = [
    "Write a long story about a lighthouse keeper and the storm that changed her life.",
    "Describe, in as much detail as you can, how a river carves a canyon over time.",
]
MAX_TOKENS = 150
BLOCK_TOKENS = 128  # vLLM's CPU default block size
# SmolLM2-135M: 30 layers x 3 KV heads x 64 dims, keys and values, float32.
KV_BYTES_PER_TOKEN = 30 * 3 * 64 * 2 * 4
KV_BLOCKS = 7
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def base_model(model_dir: Path) -> Any:
    return load_reference_model(model_dir)


@pytest.fixture(scope="module")
def adapters(
    model_dir: Path, base_model: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, LoraTarget]:
    _, model = base_model
    return random_lora_targets(
        model_dir, model, tmp_path_factory.mktemp("preemption-adapters"), {"a": 21, "b": 22}
    )


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Engine]:
    engine = Engine.start(
        EngineConfig(
            model_dir=model_dir,
            served_name="smollm2-135m-instruct",
            enforce_eager=True,
            kv_cache_gb=KV_BLOCKS * BLOCK_TOKENS * KV_BYTES_PER_TOKEN / 2**30,
            max_model_len=512,
            enable_lora=True,
            max_loras=2,
            max_cpu_loras=2,
            max_lora_rank=8,
            max_num_seqs=8,
        )
    )
    try:
        yield engine
    finally:
        engine.shutdown()


async def _fused(
    engine: Engine, ids: list[int], fusion: FusionTarget, rid: str, max_tokens: int = MAX_TOKENS
) -> tuple[list[int], BaseException | None]:
    """The tokens the group released, and the error it ended with (None if it finished)."""
    tokens: list[int] = []
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    try:
        async for deltas in engine.generate_fused(ids, params, rid, fusion):
            tokens.extend(deltas[0].token_ids)
    except FusionError as exc:
        return tokens, exc
    return tokens, None


async def test_preemption_never_gives_wrong_text(
    engine: Engine, adapters: dict[str, LoraTarget], base_model: Any
) -> None:
    tokenizer, _ = base_model
    fusion = FusionTarget([adapters["a"], adapters["b"]], [0.5, 0.5], [1.0, 1.0])
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
    assert all(len(ids) + MAX_TOKENS > BLOCK_TOKENS for ids in prompts)

    alone = []
    for i, ids in enumerate(prompts):
        tokens, error = await _fused(engine, ids, fusion, f"alone-{i}")
        assert error is None and len(tokens) == MAX_TOKENS
        alone.append(tokens)
    assert engine.preemptions == 0  # one group fits: what follows is the concurrency's doing

    results = await asyncio.wait_for(
        asyncio.gather(
            *(_fused(engine, ids, fusion, f"together-{i}") for i, ids in enumerate(prompts))
        ),
        timeout=600,
    )
    failed = 0
    for (tokens, error), expected in zip(results, alone, strict=True):
        if error is None:
            assert tokens == expected
        else:
            failed += 1
            assert "lockstep" in str(error)
            assert tokens == expected[: len(tokens)]  # only fused tokens went out
    # The cache cannot hold both groups to the end, so vLLM preempted: a member alone (its
    # group failed above; vLLM reports a preemption only with the request's next output,
    # which an aborted member never has) or a whole group (recomputed later, in lockstep,
    # and counted).
    assert failed > 0 or engine.preemptions > 0

    # Nothing of the broken group lingers: the engine serves a group as before.
    assert await _fused(engine, prompts[0], fusion, "after", 16) == (alone[0][:16], None)
