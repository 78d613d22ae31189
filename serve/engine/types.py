"""What the rest of crosstask says to the engine, and hears back: plain dataclasses and
errors, free of vLLM, so that the pipeline, the API and the tests import them without it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

_GIB = 1 << 30


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path
    served_name: str
    dtype: str = "auto"
    max_model_len: int | None = None
    kv_cache_gb: float = 4.0
    enforce_eager: bool = False
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    # LoRA through vLLM's multi-LoRA support. Every slot is zero-padded to max_lora_rank
    # (memory per slot: docs/configuration.md, CROSSTASK_MAX_LORA_RANK), and
    # vLLM's own CPU ops compute at that padded rank; serve/engine/lora_cpu.py computes at each
    # adapter's real rank, so the padding costs memory only.
    enable_lora: bool = False
    # Distinct adapters in one batch: the router's specialists plus a merge or two mixed at
    # 64 concurrent requests (the target mixes 8).
    max_loras: int = 8
    # Adapters kept loaded in worker memory (LRU); beyond it vLLM reloads from disk. The
    # default library (6-10 specialists and a generalist) plus cached merges fit.
    max_cpu_loras: int = 32
    # One of vLLM's allowed values (8, 16, 32, 64, ...). 32: an exact merge (concatenated
    # factors) of up to four rank-8 adapters fits without truncation.
    max_lora_rank: int = 32
    # Logit fusion: installs the fusion logits processor and the group-aware scheduler.
    # Only with LoRA on: a group fuses adapters with the base.
    enable_fusion: bool = True

    @property
    def fusion_on(self) -> bool:
        return self.enable_lora and self.enable_fusion


@dataclass(frozen=True)
class LoraTarget:
    """A LoRA adapter to generate with: the name clients use and its PEFT folder."""

    name: str
    path: Path


@dataclass
class FusionTarget:
    """A fusion group: the adapters whose logits are fused with the base model's, and the
    weights (None: dynamic weights per step, `prior` weighting the adapters)."""

    adapters: list[LoraTarget]
    alphas: list[float] | None
    prior: list[float]


def fusion_members(fusion: FusionTarget) -> int:
    """How many sequences the group decodes: its adapters, and the base when needed."""
    from routing.fusion.spec import needs_base

    return len(fusion.adapters) + int(needs_base(fusion.alphas))


@dataclass
class GenerationParams:
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # None: no logprobs; k >= 0: the sampled token's logprob plus the top k alternatives.
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class OutputDelta:
    """What one choice produced since the previous delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None


class EngineDeadError(RuntimeError):
    pass


class FusionError(RuntimeError):
    """A fusion group that could not be kept in lockstep (the request fails; a retry may
    succeed) or cannot be served by this engine."""


class InvalidParamsError(ValueError):
    """Sampling settings the engine refuses."""


class LoraLoadError(ValueError):
    """vLLM would not load an adapter: LoRA off, missing or broken files, a rank above
    max_lora_rank, modules the base model lacks, or unloaded while being loaded."""
