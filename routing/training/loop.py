"""Training one LoRA: the base model and its fresh LoRA, the step loop (bf16 autocast
where the CPU has native bf16, logits only where there is a label, torch threads), and
checkpoints every `checkpoint_every_s` seconds and on interruption, so that a killed run
continues where it stopped and ends with the same weights.

Every speed choice here was measured with bench/adapter_train.py.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.durable import write_atomic
from retrieval.embedder import cpu_has_fast_bf16
from routing.adapter_meta import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from routing.training.data import IGNORE, TrainExample, collate, plan_batches
from routing.training.recipe import AdapterSettings, AdapterSpec, TrainConfig, TrainingError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class StepReport:
    """What one optimizer step did, handed to `RunOptions.progress` after every step."""

    adapter: str
    step: int
    steps: int
    loss: float
    tokens: int  # real (unpadded) tokens processed since the (re)start
    seconds: float
    # Where the step stands in the whole run (routing.training.library fills these in):
    # the adapter's place among those this run trains, and the run's steps so far / all.
    index: int = 1
    count: int = 1
    run_step: int = 0
    run_steps: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class TrainResult:
    name: str
    steps: int
    first_loss: float  # mean over the first tenth of the steps run (at most 10)
    last_loss: float  # and over the last tenth
    tokens: int
    seconds: float
    resumed_from: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what to train: these never change the result)."""

    threads: int | None = None
    checkpoint_every_s: float = 60.0
    progress: Callable[[StepReport], None] | None = None


def _use_autocast(setting: str) -> bool:
    if setting == "auto":
        return cpu_has_fast_bf16()
    return setting == "bfloat16"


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # Not Linux.
        return max(1, os.cpu_count() or 1)


def load_base(model_dir: Path) -> tuple[Any, Any]:
    """The base model (float32, sdpa attention) and its tokenizer, from a local folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
    )
    model.config.use_cache = False
    return model, tokenizer


def lora_model(base: Any, settings: AdapterSettings, seed: int) -> Any:
    """The base wrapped with a fresh LoRA of `settings` (initialized from `seed`)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # PEFT's hint says int; floats work
        target_modules=list(settings.target_modules),
        # No dropout: the adapters are small and trained briefly, and without randomness
        # in the forward pass a resumed run ends exactly where an unbroken one does.
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config)


def init_lora_from(model: Any, adapter_dir: Path, settings: AdapterSettings) -> int:
    """Set the fresh LoRA of `model` to the update of the adapter in `adapter_dir`,
    truncated to `settings.rank` by SVD when that is lower (routing.merge does both, and
    leaves the scaling inside B); returns how many modules were set."""
    from safetensors.torch import load_file

    from routing.merge import merge_adapters

    with tempfile.TemporaryDirectory(prefix="crosstask-init-") as tmp:
        source_rank = int(json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())["r"])
        method = "exact" if settings.rank == source_rank else "svd"
        top = max(settings.rank, source_rank)
        merge_adapters([adapter_dir], [1.0], Path(tmp), method, top, rank=settings.rank)
        factors = load_file(str(Path(tmp) / ADAPTER_WEIGHTS_FILE))
    ranks = {f.shape[0] if k.endswith("lora_A.weight") else f.shape[1] for k, f in factors.items()}
    if ranks != {settings.rank}:
        raise TrainingError(
            f"{adapter_dir.name}: rank {source_rank} cannot start rank {settings.rank}"
        )
    scaling = settings.alpha / settings.rank
    params = dict(model.named_parameters())
    done = 0
    for key, value in factors.items():
        # PEFT's saved keys drop the adapter name its parameters carry ("default").
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        if name not in params:
            continue  # a module the new adapter does not target
        tensor = value.float() / scaling if ".lora_B." in key else value.float()
        with_grad = params[name]
        with_grad.data.copy_(tensor.to(with_grad.dtype))
        done += 1
    return done // 2


def learning_rate(step: int, steps: int, peak: float, train: TrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr_fraction` of the peak: a function of
    the step alone, so a resumed run needs no scheduler state."""
    warmup = max(1, round(steps * train.warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    floor = train.min_lr_fraction
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def answer_loss(model: Any, ids: torch.Tensor, labels: torch.Tensor) -> Any:
    """Mean cross-entropy over the labelled (answer) tokens of a right-padded batch.

    Two savings, both measured (bench/adapter_train.py): the LM head (49k words x 576)
    runs only at the positions that predict a label, not over the whole prompt; and no
    attention mask is passed. Padding sits after every real token, so causal attention
    alone keeps real tokens from seeing it (only the unscored pad positions see garbage),
    and without a mask SDPA takes its causal kernel instead of materializing masks.
    """
    import torch

    causal = model.get_base_model()
    hidden = causal.model(input_ids=ids).last_hidden_state
    targets = labels[:, 1:]
    where = targets != IGNORE
    logits = causal.lm_head(hidden[:, :-1][where]).float()
    return torch.nn.functional.cross_entropy(logits, targets[where])


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_adapter(
    base: Any,
    tokenizer: Any,
    spec: AdapterSpec,
    examples: Sequence[TrainExample],
    train: TrainConfig,
    work_dir: Path,
    fingerprint: str,
    options: RunOptions,
    init_from: Path | None = None,
) -> tuple[Any, TrainResult]:
    """Train one LoRA on `examples`; resumes from `work_dir/checkpoint.pt` when it holds
    a checkpoint of the same training (same fingerprint). Returns the PEFT model (its
    LoRA freshly trained) and what happened. The caller unloads the LoRA afterwards."""
    import torch

    if not examples:
        raise TrainingError(f"{spec.name}: no training examples")
    torch.set_num_threads(options.threads or default_threads())
    model = lora_model(base, spec.settings, train.seed)
    if init_from is not None:
        # Before the checkpoint: a resumed run overwrites these with its own weights.
        modules = init_lora_from(model, init_from, spec.settings)
        log.info("%s: starts from %s (%d modules)", spec.name, init_from.name, modules)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=spec.settings.learning_rate, weight_decay=train.weight_decay
    )
    plan = plan_batches(
        [ex.length for ex in examples], spec.settings.epochs, train.batch_tokens, train.seed
    )
    steps = len(plan)
    checkpoint = work_dir / CHECKPOINT_FILE
    start = _load_checkpoint(checkpoint, fingerprint, model, optimizer)
    if start:
        log.info("%s: resuming at step %d of %d", spec.name, start, steps)
    autocast = _use_autocast(train.autocast)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    started = time.perf_counter()
    last_save = started
    tokens = 0
    losses: list[float] = []
    completed = start
    try:
        for step in range(start, steps):
            batch = [examples[i] for i in plan[step]]
            ids, mask, labels = collate(batch, pad_id)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps, spec.settings.learning_rate, train)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = answer_loss(model, ids, labels)
            loss.backward()
            if train.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            optimizer.step()
            completed = step + 1
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            tokens += int(mask.sum())
            now = time.perf_counter()
            if options.progress is not None:
                options.progress(
                    StepReport(spec.name, step + 1, steps, losses[-1], tokens, now - started)
                )
            if now - last_save >= options.checkpoint_every_s and step + 1 < steps:
                _save_checkpoint(checkpoint, fingerprint, step + 1, model, optimizer)
                last_save = time.perf_counter()
    except BaseException:
        # Interrupted (Ctrl-C, an error): keep what was done, unless the interruption
        # fell inside an optimizer update (its step counter ahead of the finished steps),
        # where the weights may be half-updated; the periodic checkpoint stands then.
        if completed > start and _optimizer_steps(optimizer) == completed:
            _save_checkpoint(checkpoint, fingerprint, completed, model, optimizer)
        raise
    seconds = time.perf_counter() - started
    return model, TrainResult(
        name=spec.name,
        steps=steps,
        first_loss=_mean(losses[: _tenth(len(losses))]),
        last_loss=_mean(losses[-_tenth(len(losses)) :]),
        tokens=tokens,
        seconds=seconds,
        resumed_from=start,
    )


def _tenth(n: int) -> int:
    return max(1, min(10, n // 10))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _optimizer_steps(optimizer: Any) -> int:
    """How many updates the optimizer has begun (AdamW counts them per parameter)."""
    return max((int(s["step"]) for s in optimizer.state.values() if "step" in s), default=0)


def _save_checkpoint(path: Path, fingerprint: str, step: int, model: Any, optimizer: Any) -> None:
    import torch

    payload = {
        "fingerprint": fingerprint,
        "step": step,
        "lora": trainable_state(model),
        "optimizer": optimizer.state_dict(),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, lambda fh: fh.write(buffer.getvalue()))


def _load_checkpoint(path: Path, fingerprint: str, model: Any, optimizer: Any) -> int:
    """The step to start from: that of a matching checkpoint (loaded into the model and
    optimizer), else 0. A checkpoint of another training is ignored, not trusted."""
    import torch

    if not path.is_file():
        return 0
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # A torn or foreign file: start over rather than fail.
        log.warning("ignoring unreadable checkpoint %s: %s", path, exc)
        return 0
    if payload.get("fingerprint") != fingerprint:
        log.info("ignoring checkpoint %s of a different training", path)
        return 0
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in payload["lora"].items():
            named[name].copy_(value)
    optimizer.load_state_dict(payload["optimizer"])
    return int(payload["step"])
