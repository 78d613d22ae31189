"""How fast LoRA training runs on the CPU, one speed choice at a time.

Every variant trains the same fresh LoRA (rank 8, all linear layers, as the default
generalist) on the same real examples: seen BIG-bench tasks, prompts built by the
training code (chat template, half of them with 4 retrieved demonstrations from the
default store), so lengths are those the library build sees. Variants, cumulative
unless named otherwise:

- `peft-baseline`: plain PEFT as a first prototype would write it: batches of 2 in
  random order padded to their longest, `model(labels=...)` (LM head over every token),
  float32.
- `sorted`: length-sorted batches under a token budget (routing.training.data.plan_batches).
- `answer-head`: the LM head only where there is a label.
- `no-mask`: no attention mask for the right-padded batch (causal attention already
  keeps padding unseen): routing.training.loop.answer_loss.
- `bf16-autocast`: bfloat16 autocast (native on AVX512-BF16 / AMX CPUs).
- `packed`: instead of padded batches, one row of concatenated examples with restarting
  position ids (transformers builds the block-diagonal mask).
- `compiled`: torch.compile of the decoder (compile time reported apart).
- `threads=1` / `threads=2` of the chosen setting.
- `train_adapter`: the production path itself, for the record.

Each variant runs in its own process (so its peak memory is its own, and nothing one
variant compiled or cached helps the next). Wall-clock tokens/s on a shared machine moves
with whatever else runs; CPU-seconds move less, so both are reported (tokens per
CPU-second is meaningful at one thread), with the load average. Run it under
`flock /tmp/crosstask-cpu.lock`.

    flock /tmp/crosstask-cpu.lock python bench/adapter_train.py
    python bench/adapter_train.py --variants sorted,answer-head --tasks-every 20

Writes bench/results/adapter_train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from retrieval.embedder import cpu_has_fast_bf16
from retrieval.sources import default_seen_tasks, open_bigbench
from routing.training.data import (
    StoreDemoSource,
    TrainExample,
    collate,
    examples_from_records,
    examples_to_records,
    plan_batches,
    task_examples,
)
from routing.training.loop import RunOptions, answer_loss, load_base, lora_model, train_adapter
from routing.training.recipe import AdapterSettings, AdapterSpec, DataConfig, TrainConfig
from serve.defaults import bigbench_cache, default_store_dir
from serve.settings import Settings

VARIANTS = (
    "peft-baseline",
    "sorted",
    "answer-head",
    "no-mask",
    "bf16-autocast",
    "packed",
    "compiled",
    "train_adapter",
)
RANK = 8
# Activations kept for the backward pass cost about 45 kB per token in float32 (30
# layers): 4096-token batches peaked near 7 GB, too much beside other work.
BATCH_TOKENS = 2048
BASELINE_BATCH = 2


@dataclass
class Measured:
    variant: str
    threads: int
    steps: int
    tokens: int  # real tokens (no padding)
    padded_tokens: int
    seconds: float
    cpu_seconds: float
    setup_seconds: float
    first_loss: float
    last_loss: float

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "threads": self.threads,
            "steps": self.steps,
            "tokens": self.tokens,
            "padding_share": round(1 - self.tokens / max(1, self.padded_tokens), 3),
            "seconds": round(self.seconds, 2),
            "tokens_per_s": round(self.tokens / self.seconds, 1),
            "tokens_per_cpu_s": round(self.tokens / max(1e-9, self.cpu_seconds), 1),
            "setup_seconds": round(self.setup_seconds, 2),
            "first_loss": round(self.first_loss, 4),
            "last_loss": round(self.last_loss, 4),
        }


def real_examples(every: int, per_task: int, max_seq_len: int) -> list[TrainExample]:
    settings = Settings()
    source = open_bigbench(settings.bigbench, bigbench_cache(settings.home_dir))
    names = default_seen_tasks()[::every]
    demos = StoreDemoSource(default_store_dir(settings.home_dir))
    data = DataConfig(max_seq_len=max_seq_len)
    tokenizer = load_base_tokenizer()
    examples: list[TrainExample] = []
    for task in source.tasks(names):
        found, _ = task_examples(task, per_task, data, tokenizer, demos)
        examples += found
    demos.close()
    return examples


def load_base_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


def model_dir() -> Path:
    return Settings().home_dir / "models" / "smollm2-135m-instruct"


def baseline_batches(n: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i : i + BASELINE_BATCH] for i in range(0, n, BASELINE_BATCH)]


def packed_rows(lengths: Sequence[int], budget: int, seed: int) -> list[list[int]]:
    """Examples concatenated into rows of at most `budget` tokens (first fit, shuffled)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    sizes: list[int] = []
    for i in order:
        for r, size in enumerate(sizes):
            if size + lengths[i] <= budget:
                rows[r].append(i)
                sizes[r] += lengths[i]
                break
        else:
            rows.append([i])
            sizes.append(lengths[i])
    return rows


def packed_loss(model: Any, batch: Sequence[TrainExample]) -> tuple[Any, int]:
    seq: list[int] = []
    pos: list[int] = []
    labels: list[int] = []
    for ex in batch:
        seq += [*ex.prompt_ids, *ex.target_ids]
        pos += list(range(ex.length))
        labels += [-100] * len(ex.prompt_ids) + list(ex.target_ids)
    ids = torch.tensor([seq])
    causal = model.get_base_model()
    hidden = causal.model(input_ids=ids, position_ids=torch.tensor([pos])).last_hidden_state
    target = torch.tensor([labels])[:, 1:]
    where = target != -100
    logits = causal.lm_head(hidden[:, :-1][where]).float()
    return torch.nn.functional.cross_entropy(logits, target[where]), len(seq)


def run_variant(name: str, examples: Sequence[TrainExample], threads: int, seed: int) -> Measured:
    torch.set_num_threads(threads)
    setup = time.perf_counter()
    base, tokenizer = load_base(model_dir())
    model = lora_model(base, AdapterSettings(rank=RANK, alpha=2.0 * RANK), seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    pad = int(tokenizer.pad_token_id)
    level = VARIANTS.index(name) if name in VARIANTS else len(VARIANTS)
    lengths = [ex.length for ex in examples]
    autocast = level >= VARIANTS.index("bf16-autocast") and cpu_has_fast_bf16()
    if name == "peft-baseline":
        plan = baseline_batches(len(examples), seed)
    elif name == "packed":
        plan = packed_rows(lengths, BATCH_TOKENS, seed)
    else:
        plan = plan_batches(lengths, 1.0, BATCH_TOKENS, seed)

    step_fn: Callable[[Sequence[TrainExample]], tuple[Any, int]]

    def padded_step(batch: Sequence[TrainExample]) -> tuple[Any, int]:
        ids, mask, labels = collate(batch, pad)
        if name in ("peft-baseline", "sorted"):
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            return out.loss, int(ids.numel())
        if name == "answer-head":
            causal = model.get_base_model()
            hidden = causal.model(input_ids=ids, attention_mask=mask).last_hidden_state
            target = labels[:, 1:]
            where = target != -100
            logits = causal.lm_head(hidden[:, :-1][where]).float()
            return torch.nn.functional.cross_entropy(logits, target[where]), int(ids.numel())
        return answer_loss(model, ids, labels), int(ids.numel())

    step_fn = padded_step
    if name == "packed":

        def packed(batch: Sequence[TrainExample]) -> tuple[Any, int]:
            return packed_loss(model, batch)

        step_fn = packed
    if name == "compiled":
        causal = model.get_base_model()
        causal.model = torch.compile(causal.model, dynamic=True)

    def step(batch_ids: Sequence[int]) -> tuple[float, int]:
        batch = [examples[i] for i in batch_ids]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, padded = step_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), padded

    # The first step pays one-off costs (oneDNN primitive creation; compilation).
    first_loss, _ = step(plan[0])
    setup_seconds = time.perf_counter() - setup
    tokens = padded_tokens = 0
    last_loss = first_loss
    wall = time.perf_counter()
    cpu = time.process_time()
    for batch_ids in plan[1:]:
        last_loss, padded = step(batch_ids)
        tokens += sum(lengths[i] for i in batch_ids)
        padded_tokens += padded
    return Measured(
        variant=name,
        threads=threads,
        steps=len(plan) - 1,
        tokens=tokens,
        padded_tokens=padded_tokens,
        seconds=time.perf_counter() - wall,
        cpu_seconds=time.process_time() - cpu,
        setup_seconds=setup_seconds,
        first_loss=first_loss,
        last_loss=last_loss,
    )


def run_production(examples: Sequence[TrainExample], threads: int, seed: int) -> Measured:
    base, tokenizer = load_base(model_dir())
    spec = AdapterSpec(
        "bench", "generalist", ("bench",), AdapterSettings(rank=RANK, alpha=2.0 * RANK)
    )
    cpu = time.process_time()
    with tempfile.TemporaryDirectory() as work:
        _, result = train_adapter(
            base,
            tokenizer,
            spec,
            examples,
            TrainConfig(seed=seed, batch_tokens=BATCH_TOKENS),
            Path(work),
            "bench",
            RunOptions(threads=threads, checkpoint_every_s=1e9),
        )
    return Measured(
        variant="train_adapter",
        threads=threads,
        steps=result.steps,
        tokens=result.tokens,
        padded_tokens=result.tokens,
        seconds=result.seconds,
        cpu_seconds=time.process_time() - cpu,
        setup_seconds=0.0,
        first_loss=result.first_loss,
        last_loss=result.last_loss,
    )


def run_one(variant: str, threads: int, examples_file: Path, seed: int) -> None:
    """Child process: one variant, its result as one JSON line on stdout."""
    examples = examples_from_records(json.loads(examples_file.read_text()))
    if variant == "train_adapter":
        measured = run_production(examples, threads, seed)
    else:
        measured = run_variant(variant, examples, threads, seed)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({**measured.to_json(), "peak_rss_mb": round(peak_mb)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", default="1,2", help="Thread counts to try (comma list).")
    parser.add_argument("--tasks-every", type=int, default=10, help="Every Nth seen task.")
    parser.add_argument("--per-task", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/adapter_train.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--examples-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one, int(args.threads), args.examples_file, args.seed)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    thread_counts = [int(t) for t in args.threads.split(",")]
    started = time.perf_counter()
    examples = real_examples(args.tasks_every, args.per_task, args.max_seq_len)
    prep = time.perf_counter() - started
    lengths = [ex.length for ex in examples]
    print(
        f"{len(examples)} examples, {sum(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f},"
        f" max {max(lengths)}), {sum(bool(e.demo_tasks) for e in examples)} with demonstrations;"
        f" prepared in {prep:.0f} s",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        examples_file = Path(tmp) / "examples.json"
        examples_file.write_text(json.dumps(examples_to_records(examples)))
        for threads in thread_counts:
            for variant in variants:
                load = os.getloadavg()[0]
                child = subprocess.run(
                    [sys.executable, __file__, "--one", variant, "--threads", str(threads),
                     "--examples-file", str(examples_file), "--seed", str(args.seed)],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                lines = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
                if child.returncode != 0 or not lines:
                    tail = child.stderr.strip().splitlines()[-3:]
                    row = {"variant": variant, "threads": threads, "error": " | ".join(tail)}
                else:
                    row = json.loads(lines[-1].removeprefix("RESULT "))
                row["load_before"] = round(load, 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "bf16_native": cpu_has_fast_bf16(),
            "torch": torch.__version__,
        },
        "examples": len(examples),
        "tokens": sum(lengths),
        "with_demonstrations": sum(bool(e.demo_tasks) for e in examples),
        "rank": RANK,
        "batch_tokens": BATCH_TOKENS,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
