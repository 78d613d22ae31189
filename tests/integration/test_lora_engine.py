"""serve.engine.engine.Engine serves PEFT LoRA adapters through vLLM, with crosstask's fast CPU LoRA
path: greedy output with an adapter equals transformers + PEFT token for token (float32),
adapters and base requests mixed in one batch each give what they give alone, and adapters
vLLM cannot load are refused while the engine keeps serving."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serve.engine.engine import Engine
from serve.engine.types import EngineConfig, GenerationParams, LoraLoadError, LoraTarget
from tests.integration.lora_fixtures import (
    chat_prompt_ids,
    load_reference_model,
    make_random_lora,
    random_lora_targets,
)

PROMPTS = [
    "What is the capital of France?",
    "List three fruits.",
    "Write one sentence about the sea.",
]
MAX_TOKENS = 24
ACTIVE_LINE = "crosstask fast CPU LoRA path active"
# vLLM's AsyncLLM runs its output handler on the event loop of its first request: every
# test of the module must share that loop (pytest-asyncio gives each test its own by default).
module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def reference_model(model_dir: Path) -> Any:
    return load_reference_model(model_dir)


@pytest.fixture(scope="module")
def adapters(
    model_dir: Path, reference_model: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, LoraTarget]:
    _, model = reference_model
    return random_lora_targets(
        model_dir, model, tmp_path_factory.mktemp("adapters"), {"alpha": 0, "beta": 1}
    )


@pytest.fixture(scope="module")
def engine_and_log(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An in-process engine with LoRA on and the fast path forced on. Its EngineCore and
    worker processes write to a file (stdout and stderr redirected while they are spawned),
    so the test can see the line the worker logs when it builds the fast wrapper."""
    log_path = tmp_path_factory.mktemp("engine") / "engine.log"
    config = EngineConfig(
        model_dir=model_dir,
        served_name="smollm2-135m-instruct",
        enforce_eager=True,
        kv_cache_gb=0.5,
        max_model_len=1024,
        enable_lora=True,
        # Two slots for two adapters: with every slot taken, vLLM's own CPU ops would apply
        # the last slot's adapter to base requests (they index the weights with -1).
        max_loras=2,
        max_cpu_loras=4,
        max_lora_rank=8,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CROSSTASK_FAST_LORA", "1")
        # vLLM logs to stdout; the children keep the descriptors they were spawned with.
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        with open(log_path, "wb") as log:
            for fd in saved:
                os.dup2(log.fileno(), fd)
            try:
                engine = Engine.start(config)
            finally:
                for fd, copy in saved.items():
                    os.dup2(copy, fd)
                    os.close(copy)
    try:
        yield engine, log_path
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def engine(engine_and_log: Any) -> Engine:
    engine: Engine = engine_and_log[0]
    return engine


async def _generate(
    engine: Engine, prompt_ids: list[int], lora: LoraTarget | None, request_id: str
) -> list[int]:
    params = GenerationParams(max_tokens=MAX_TOKENS, temperature=0.0)
    tokens: list[int] = []
    async for deltas in engine.generate(prompt_ids, params, request_id, lora=lora):
        tokens.extend(deltas[0].token_ids)
    return tokens


def _strip_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:-1] if ids and ids[-1] == eos else ids


def test_fast_path_runs_in_the_worker(engine_and_log: Any) -> None:
    _, log_path = engine_and_log
    lines = [line for line in Path(log_path).read_text().splitlines() if ACTIVE_LINE in line]
    assert lines, "the worker did not build serve.engine.lora_cpu.FastPunicaWrapperCPU"
    assert "Worker" in lines[0]


@module_loop
async def test_adapter_greedy_equals_peft(
    engine: Engine, adapters: dict[str, LoraTarget], reference_model: Any
) -> None:
    import torch
    from peft import PeftModel

    tokenizer, model = reference_model
    # Every prompt with one adapter, one with the other (PEFT on CPU is the slow part).
    for name, prompts in (("alpha", PROMPTS), ("beta", PROMPTS[:1])):
        target = adapters[name]
        peft_model = PeftModel.from_pretrained(model, str(target.path))
        peft_model.eval()
        try:
            for i, prompt in enumerate(prompts):
                ids = chat_prompt_ids(tokenizer, prompt)
                with torch.inference_mode():
                    output = peft_model.generate(
                        input_ids=torch.tensor([ids]),
                        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        max_new_tokens=MAX_TOKENS,
                        do_sample=False,
                    )
                expected = output[0][len(ids) :].tolist()
                got = await _generate(engine, ids, target, f"parity-{name}-{i}")
                eos = tokenizer.eos_token_id
                assert _strip_eos(got, eos) == _strip_eos(expected, eos), (name, prompt)
        finally:
            peft_model.unload()


@module_loop
async def test_mixed_batch_equals_alone(
    engine: Engine, adapters: dict[str, LoraTarget], reference_model: Any
) -> None:
    tokenizer, _ = reference_model
    jobs = [
        (prompt, lora)
        for prompt in PROMPTS[:2]
        for lora in (None, adapters["alpha"], adapters["beta"])
    ]
    alone = [
        await _generate(engine, chat_prompt_ids(tokenizer, p), lora, f"alone-{i}")
        for i, (p, lora) in enumerate(jobs)
    ]
    together = await asyncio.gather(
        *(
            _generate(engine, chat_prompt_ids(tokenizer, p), lora, f"together-{i}")
            for i, (p, lora) in enumerate(jobs)
        )
    )
    assert list(together) == alone
    # The adapters do change the output, or this test would prove nothing.
    assert alone[0] != alone[1] or alone[0] != alone[2] or alone[3] != alone[4]


@module_loop
async def test_refused_adapters_leave_the_engine_serving(
    engine: Engine,
    adapters: dict[str, LoraTarget],
    reference_model: Any,
    model_dir: Path,
    tmp_path: Path,
) -> None:
    tokenizer, model = reference_model
    ids = chat_prompt_ids(tokenizer, PROMPTS[0])
    before = await _generate(engine, ids, None, "before-refusals")

    broken = tmp_path / "broken"
    shutil.copytree(adapters["alpha"].path, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    too_big = make_random_lora(model_dir, tmp_path / "rank16", rank=16, base_model=model)
    for target in (
        LoraTarget("missing", tmp_path / "does-not-exist"),
        LoraTarget("broken", broken),
        LoraTarget("too-big", too_big),
    ):
        with pytest.raises(LoraLoadError):
            await engine.add_lora(target)
        with pytest.raises(LoraLoadError):
            await _generate(engine, ids, target, f"refused-{target.name}")
    assert not engine.errored
    assert await _generate(engine, ids, None, "after-refusals") == before
    assert "broken" not in engine.lora_names()


@module_loop
async def test_remove_and_reload(
    engine: Engine, adapters: dict[str, LoraTarget], reference_model: Any
) -> None:
    tokenizer, _ = reference_model
    ids = chat_prompt_ids(tokenizer, PROMPTS[1])
    target = adapters["alpha"]
    first = await _generate(engine, ids, target, "reload-1")
    assert await engine.remove_lora(target.name)
    assert target.name not in engine.lora_names()
    assert not await engine.remove_lora(target.name)
    assert await _generate(engine, ids, target, "reload-2") == first
