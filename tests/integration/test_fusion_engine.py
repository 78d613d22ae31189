"""Logit fusion inside vLLM (routing/fusion, serve.engine.Engine.generate_fused), greedy:
the invariants of the issue, the engine against the transformers + PEFT reference token for
token, and fused and unfused requests in one batch each giving what they give alone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serve.engine import Engine, EngineConfig, FusionTarget, GenerationParams, LoraTarget
from tests.integration.fusion_reference import FusionReference
from tests.integration.lora_fixtures import make_random_lora

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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def adapters(
    model_dir: Path, base_model: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, LoraTarget]:
    root = tmp_path_factory.mktemp("fusion-adapters")
    _, model = base_model
    return {
        name: LoraTarget(
            name, make_random_lora(model_dir, root / name, seed=seed, base_model=model)
        )
        for name, seed in (("alpha", 10), ("beta", 11))
    }


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
        )
    )
    try:
        yield engine
    finally:
        engine.shutdown()


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
    )
    return list(ids["input_ids"])


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
        ids = _prompt_ids(tokenizer, prompt)
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
                ids = _prompt_ids(tokenizer, prompt)
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
        ids = _prompt_ids(tokenizer, prompt)
        if isinstance(kind, FusionTarget):
            return await _fused(engine, ids, kind, rid)
        return await _plain(engine, ids, kind, rid)

    alone = [await run(p, k, f"alone-{i}") for i, (p, k) in enumerate(jobs)]
    together = await asyncio.gather(*(run(p, k, f"together-{i}") for i, (p, k) in enumerate(jobs)))
    assert list(together) == alone
    # Fusion does something: the fused texts are neither the base's nor alpha's.
    assert alone[2] not in (alone[0], alone[1]) or alone[6] not in (alone[4], alone[5])
