"""Merging LoRA adapters: the exact merge is the weighted sum of the adapters' updates (same
logits through PEFT), svd is the optimal truncation, and the cache builds each merge once."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from routing.merge import (
    MergeCache,
    MergeError,
    Source,
    merge_adapters,
    merge_key,
    normalize_weights,
)
from tests.integration.lora_fixtures import make_random_lora


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from serve.default_model import ensure_default_model

    home = Path(os.environ.get("CROSSTASK_HOME", "~/.cache/crosstask")).expanduser()
    return ensure_default_model(home)


@pytest.fixture(scope="module")
def base(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapters(model_dir: Path, base: Any, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("loras")
    return [
        make_random_lora(model_dir, root / "one", rank=4, seed=1, std=0.02, base_model=base),
        make_random_lora(
            model_dir, root / "two", rank=8, alpha=8, seed=2, std=0.02, base_model=base
        ),
    ]


def logits_with_adapter(model_dir: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(fresh, str(adapter)).eval()(ids).logits


def reference_logits(
    model_dir: Path, adapters: list[Path], weights: list[float], ids: torch.Tensor
) -> torch.Tensor:
    """The base model with sum_i w_i * s_i * B_i @ A_i added to each weight by hand."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for path, w in zip(adapters, weights, strict=True):
            config = json.loads((path / "adapter_config.json").read_text())
            scale = config["lora_alpha"] / config["r"]
            tensors = load_file(str(path / "adapter_model.safetensors"))
            for key, a in tensors.items():
                if not key.endswith(".lora_A.weight"):
                    continue
                b = tensors[key.replace("lora_A", "lora_B")]
                target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                params[target] += w * scale * (b @ a)
        return model(ids).logits


def test_exact_merge_gives_the_weighted_sum_of_updates(
    model_dir: Path, adapters: list[Path], tmp_path: Path
) -> None:
    info = merge_adapters(adapters, [0.7, 0.3], tmp_path / "merged", "exact")
    assert info["method"] == "exact" and info["rank"] == 12
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 12

    ids = torch.tensor([[1, 504, 3458, 314, 2000, 28, 253, 1120]])
    merged = logits_with_adapter(model_dir, tmp_path / "merged", ids)
    expected = reference_logits(model_dir, adapters, [0.7, 0.3], ids)
    single = logits_with_adapter(model_dir, adapters[0], ids)
    assert torch.allclose(merged, expected, atol=2e-4), (merged - expected).abs().max()
    assert not torch.allclose(merged, single, atol=1e-2)  # the test can tell adapters apart


def test_svd_merge_is_the_optimal_truncation(adapters: list[Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    merge_adapters(adapters, [1, 1], tmp_path / "exact", "exact")
    merge_adapters(adapters, [1, 1], tmp_path / "svd", "svd", rank=6)
    exact = load_file(str(tmp_path / "exact" / "adapter_model.safetensors"))
    svd = load_file(str(tmp_path / "svd" / "adapter_model.safetensors"))
    key = next(k for k in exact if k.endswith("q_proj.lora_A.weight"))
    full = exact[key.replace("lora_A", "lora_B")] @ exact[key]
    approx = svd[key.replace("lora_A", "lora_B")] @ svd[key]
    assert svd[key].shape[0] == 6
    s = torch.linalg.svdvals(full)
    optimal = s[6:].square().sum().sqrt()
    assert torch.isclose(torch.linalg.norm(full - approx), optimal, rtol=1e-3, atol=1e-6)
    # At full rank the svd merge is the exact one.
    merge_adapters(adapters, [1, 1], tmp_path / "svd12", "svd", rank=12)
    svd12 = load_file(str(tmp_path / "svd12" / "adapter_model.safetensors"))
    assert torch.allclose(svd12[key.replace("lora_A", "lora_B")] @ svd12[key], full, atol=1e-5)


def test_weights_are_validated_and_normalized(adapters: list[Path], tmp_path: Path) -> None:
    assert normalize_weights([2, 1], 2) == pytest.approx([2 / 3, 1 / 3])
    for bad in ([1.0], [float("nan"), 1.0], [float("inf"), 1.0], [0.0, 0.0], [-1.0, 0.5]):
        with pytest.raises(MergeError):
            normalize_weights(bad, 2)
    with pytest.raises(MergeError, match="max LoRA rank"):
        merge_adapters(adapters, [1, 1], tmp_path / "m", "exact", max_rank=8)
    assert (
        merge_adapters(adapters, [1, 1], tmp_path / "auto", "auto", max_rank=8)["method"] == "svd"
    )


def test_cache_builds_once_under_concurrency_and_evicts_lru(
    adapters: list[Path], tmp_path: Path
) -> None:
    sources = [Source("one", adapters[0], "f1"), Source("two", adapters[1], "f2")]
    evicted: list[str] = []

    async def on_evict(name: str) -> None:
        evicted.append(name)

    async def scenario() -> None:
        cache = MergeCache(tmp_path / "cache", capacity=2, max_rank=64, on_evict=on_evict)
        first, second = await asyncio.gather(
            cache.get(sources, [0.5, 0.5]), cache.get(sources, [1.0, 1.0])
        )
        assert first.name == second.name and first.path == second.path
        assert cache.misses == 1 and cache.hits == 1
        assert not first.hit or not second.hit
        assert (first.path / "adapter_model.safetensors").is_file()
        again = await cache.get(sources, [0.5, 0.5])
        assert again.hit and again.build_seconds == 0.0
        other = await cache.get(sources, [0.8, 0.2])
        third = await cache.get(sources, [0.2, 0.8])
        assert evicted == [first.name] and not first.path.exists()
        assert other.path.exists() and third.path.exists()
        assert not list((tmp_path / "cache").glob(".building-*"))

    asyncio.run(scenario())
    # A restarted server finds the merges already built.
    reopened = MergeCache(tmp_path / "cache", capacity=2)
    assert len(reopened._entries) == 2
    assert merge_key(sources, [2, 1], "exact", 12) == merge_key(
        sources, [2 / 3, 1 / 3], "exact", 12
    )
    assert merge_key(sources, [2, 1], "exact", 12) != merge_key(sources[::-1], [2, 1], "exact", 12)
