"""Logit fusion inside vLLM (routing/fusion, serve.engine.Engine.generate_fused), greedy:
the invariants of the issue, the engine against the transformers + PEFT reference token for
token, fused and unfused requests in one batch each giving what they give alone (with a
small token budget, so that long unfused prompts are chunked around the groups), and a
group that falls out of lockstep failing with an error rather than returning text.

The engine runs with a 256-token step budget and 16 sequences: a group of three members
with ~35-token prompts must then be admitted beside 200-token prefills that the scheduler
chunks, which is where vLLM's own scheduler would split a group across steps."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from routing.fusion.group import FusionLockstepError, lockstep
from routing.fusion.spec import FusionSpec
from serve.engine.engine import Engine
from serve.engine.types import EngineConfig, FusionTarget, GenerationParams, LoraTarget
from tests.integration.fusion_reference import FusionReference
from tests.integration.lora_fixtures import (
    chat_prompt_ids,
    load_reference_model,
    random_lora_targets,
)

PROMPTS = [
    "What is the capital of France?",
    "List three fruits.",
    "Write one sentence about the sea.",
    "Name a color.",
    "What is two plus three?",
]
MAX_TOKENS = 16
# vLLM's AsyncLLM runs its output handler on the event loop of its first request: every
# test of the module shares that loop.
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
        model_dir, model, tmp_path_factory.mktemp("fusion-adapters"), {"alpha": 10, "beta": 11}
    )


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Engine]:
    engine = Engine.start(
        EngineConfig(
            model_dir=model_dir,
            served_name="smollm2-135m-instruct",
            enforce_eager=True,
            kv_cache_gb=0.5,
            max_model_len=1024,
            enable_lora=True,
            max_loras=2,
            max_cpu_loras=4,
            max_lora_rank=8,
            max_num_batched_tokens=256,
            max_num_seqs=16,
        )
    )
    try:
        yield engine
    finally:
        engine.shutdown()


def _params() -> GenerationParams:
    return GenerationParams(max_tokens=MAX_TOKENS, temperature=0.0)


async def _plain(engine: Engine, ids: list[int], lora: LoraTarget | None, rid: str) -> list[int]:
    tokens: list[int] = []
    async for deltas in engine.generate(ids, _params(), rid, lora=lora):
        tokens.extend(deltas[0].token_ids)
    return tokens


async def _fused(engine: Engine, ids: list[int], fusion: FusionTarget, rid: str) -> list[int]:
    tokens: list[int] = []
    async for deltas in engine.generate_fused(ids, _params(), rid, fusion):
        tokens.extend(deltas[0].token_ids)
    return tokens


def _fixed(adapters: list[LoraTarget], alphas: list[float]) -> FusionTarget:
    return FusionTarget(adapters, alphas, [1.0] * len(adapters))


async def test_invariants(engine: Engine, adapters: dict[str, LoraTarget], base_model: Any) -> None:
    tokenizer, _ = base_model
    a = adapters["alpha"]
    for i, prompt in enumerate(PROMPTS[:3]):
        ids = chat_prompt_ids(tokenizer, prompt)
        base = await _plain(engine, ids, None, f"inv-base-{i}")
        alone = await _plain(engine, ids, a, f"inv-a-{i}")
        assert alone != base  # or the invariants would prove nothing
        assert await _fused(engine, ids, _fixed([a], [1.0]), f"inv-one-{i}") == alone
        assert await _fused(engine, ids, _fixed([a], [0.0]), f"inv-zero-{i}") == base
        assert await _fused(engine, ids, _fixed([a, a], [0.5, 0.5]), f"inv-aa-{i}") == alone
        dynamic = FusionTarget([a], None, [1.0])
        assert await _fused(engine, ids, dynamic, f"inv-dyn-{i}") == alone


async def test_engine_equals_reference(
    engine: Engine, adapters: dict[str, LoraTarget], base_model: Any
) -> None:
    tokenizer, model = base_model
    reference = FusionReference(model, {n: t.path for n, t in adapters.items()})
    pair = [adapters["alpha"], adapters["beta"]]
    sets = {
        "fixed": FusionTarget(pair, [0.6, 0.4], [1.0, 1.0]),
        "dynamic": FusionTarget(pair, None, [1.0, 1.0]),
    }
    try:
        for label, fusion in sets.items():
            for i, prompt in enumerate(PROMPTS):
                ids = chat_prompt_ids(tokenizer, prompt)
                expected = reference.greedy(
                    ids,
                    [t.name for t in fusion.adapters],
                    fusion.alphas,
                    fusion.prior,
                    MAX_TOKENS,
                    tokenizer.eos_token_id,
                )
                got = await _fused(engine, ids, fusion, f"ref-{label}-{i}")
                assert got == expected, (label, prompt)
    finally:
        reference.close()


async def test_fused_and_unfused_together_equal_alone(
    engine: Engine, adapters: dict[str, LoraTarget], base_model: Any
) -> None:
    tokenizer, _ = base_model
    a, b = adapters["alpha"], adapters["beta"]
    kinds: list[Any] = [None, a, _fixed([a, b], [0.5, 0.5]), FusionTarget([a, b], None, [1, 1])]
    jobs = [(p, kind) for p in PROMPTS[:3] for kind in kinds]

    async def run(prompt: str, kind: Any, rid: str) -> list[int]:
        ids = chat_prompt_ids(tokenizer, prompt)
        if isinstance(kind, FusionTarget):
            return await _fused(engine, ids, kind, rid)
        return await _plain(engine, ids, kind, rid)

    # Long unfused prompts (about 200 tokens) that the 256-token budget must chunk.
    long_prompts = [f"Repeat after me: {'sea wave ' * 90}" for _ in range(6)]
    fillers = [(p, None) for p in long_prompts]
    alone = [await run(p, k, f"alone-{i}") for i, (p, k) in enumerate(jobs)]
    together = await asyncio.gather(
        *(run(p, k, f"together-{i}") for i, (p, k) in enumerate(jobs + fillers))
    )
    assert list(together)[: len(jobs)] == alone
    # Fusion does something: the fused texts are neither the base's nor alpha's.
    assert alone[2] not in (alone[0], alone[1]) or alone[6] not in (alone[4], alone[5])


async def test_member_finishing_early_fails_instead_of_returning_text(
    engine: Engine, adapters: dict[str, LoraTarget], base_model: Any
) -> None:
    """Members sent by hand with different max_tokens: the adapter member stops after 3
    tokens, the base member goes on alone, so the processor breaks the group and the
    lockstep check fails the request. What it released before is the fused text's start."""
    tokenizer, _ = base_model
    a = adapters["alpha"]
    ids = chat_prompt_ids(tokenizer, PROMPTS[0])
    fused = await _fused(engine, ids, _fixed([a, a], [0.5, 0.5]), "early-reference")
    members = []
    for i, (lora, max_tokens) in enumerate(((None, MAX_TOKENS), (a, 3), (a, MAX_TOKENS))):
        spec = FusionSpec("early", i, 3, (0.5, 0.5), (1.0, 1.0))
        params = GenerationParams(max_tokens=max_tokens, temperature=0.0)
        members.append(
            engine.generate(ids, params, f"early-m{i}", lora=lora, extra_args=spec.to_extra_args())
        )
    released: list[int] = []
    with pytest.raises(FusionLockstepError):
        async for delta in lockstep(members):
            released.extend(delta.token_ids)
    assert released == fused[: len(released)] and len(released) <= 3
    # The engine still serves, fused and plain.
    assert await _fused(engine, ids, _fixed([a, a], [0.5, 0.5]), "early-after") == fused
