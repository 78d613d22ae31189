"""Tiny random PEFT LoRA adapters for tests and benchmarks: built in a second or two, no
training. PEFT initialises B to zero (an adapter that changes nothing), so B is filled with
random values here to make every adapter change the model's output, and visibly differently
from any other seed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve.engine.types import LoraTarget

if TYPE_CHECKING:
    import torch

# Every linear layer of a Llama block: what vLLM's LoRA layers cover (qkv, o, gate_up, down).
LLAMA_LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_random_lora(
    model_dir: Path,
    out_dir: Path,
    *,
    rank: int = 4,
    alpha: int | None = None,
    seed: int = 0,
    std: float = 0.05,
    base_model: torch.nn.Module | None = None,
) -> Path:
    """Save a PEFT LoRA adapter of `rank` on all linear layers of the model in `model_dir`,
    with random A and B (normal, `std`), into `out_dir`; return `out_dir`.

    `base_model` (a transformers model loaded from `model_dir`) saves re-loading the base
    when building several adapters; it is left unchanged (PEFT's adapter is unloaded)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model: torch.nn.Module = (
        base_model
        if base_model is not None
        else AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=list(LLAMA_LINEAR_MODULES),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir))
    peft_model.unload()  # strip the LoRA layers so a shared base_model stays clean
    return out_dir


def load_reference_model(model_dir: Path) -> tuple[Any, Any]:
    """(tokenizer, model): the base model in transformers, float32, in eval mode; what the
    engine tests check vLLM against, and the base their random adapters are built on."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return tokenizer, model


def random_lora_targets(
    model_dir: Path, base_model: Any, root: Path, seeds: dict[str, int]
) -> dict[str, LoraTarget]:
    """One random adapter per name (its seed given), under `root`, as engine targets."""
    return {
        name: LoraTarget(
            name, make_random_lora(model_dir, root / name, seed=seed, base_model=base_model)
        )
        for name, seed in seeds.items()
    }


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids of a one-message chat prompt, generation prompt appended."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
    )
    return list(ids["input_ids"])
