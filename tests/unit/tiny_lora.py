"""A tiny base model config and LoRA adapters for it, for unit tests of the adapter registry
and merge cache: real files in the layout PEFT writes, no model weights needed."""

from __future__ import annotations

import json
from pathlib import Path

HIDDEN, LAYERS = 16, 2
TINY_BASE: dict[str, object] = {
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "vocab_size": 32,
}


def write_tiny_base(folder: Path) -> Path:
    """A base model folder holding only the config.json that the registry reads."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_BASE), encoding="utf-8")
    return folder


def write_tiny_lora(folder: Path, rank: int = 2, seed: int = 0) -> Path:
    """A PEFT LoRA of `rank` on the q_proj of every layer of the tiny base."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        key = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, HIDDEN, generator=generator)
        tensors[f"{key}.lora_B.weight"] = torch.randn(HIDDEN, rank, generator=generator)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj"],
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder
