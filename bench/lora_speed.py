"""LoRA serving speed on vLLM's CPU path: vLLM's own torch ops against serve/engine/lora_cpu.py.

One run, three engines, each in its own process and one at a time (serve.engine.Engine, the
same settings apart from LoRA):
  base       LoRA off: the model alone (vLLM then also compiles, unless --eager)
  lora-orig  LoRA on, CROSSTASK_FAST_LORA=0: vLLM's CPU punica wrapper and torch ops
  lora-fast  LoRA on, serve/engine/lora_cpu.py's wrapper (the default)
and on each, the workloads:
  prefill    --prefill-prompts prompts of --prompt-tokens random tokens, max_tokens=1, all
             submitted at once: prompt tokens/s; base requests, then every prompt with one
             adapter (on the LoRA engines; lora-orig uses --orig-prefill-prompts, fewer,
             or its one-adapter prefill alone would take most of an hour)
  decode     --concurrency requests of 64-token prompts, --decode-tokens tokens each
             (ignore_eos), all at once: output tokens/s; base requests, then the same with
             --adapters distinct adapters mixed (request i uses adapter i mod n)
The adapters are random PEFT LoRAs (tests/integration/lora_fixtures.py) of --rank on all
linear layers, or with --library DIR that library's own adapters (all of them in the mix,
the generalist the one-adapter prefill's). Prompts are random token ids, distinct per
request, so prefix caching never hits. Targets, against base requests on the same engine:
random adapters (issue 4) one-adapter prefill >= 0.65x, 8 mixed at 64 concurrent >= 0.6x
output tokens/s; the library's own (issue 18) >= 0.9x and >= 0.75x;
the JSON also has the ratios against the LoRA-free engine.

    flock /tmp/crosstask-cpu.lock .venv/bin/python bench/lora_speed.py [--skip-orig] [...]

Prints each figure as it comes, then the ratios; writes bench/results/lora_speed.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "lora_speed.json"
# (prefill, decode) targets: random adapters, and the library's own (trained, real ranks).
TARGETS = {"random": (0.65, 0.6), "library": (0.9, 0.75)}
DECODE_PROMPT_TOKENS = 64


@dataclass
class EngineRun:
    """What the parent asks one child process to do."""

    name: str
    model_dir: str
    lora: bool
    fast: bool
    adapters: list[str]
    eager: bool
    kv_cache_gb: float
    max_lora_rank: int
    prefill_prompts: int
    prompt_tokens: int
    concurrency: int
    decode_tokens: int
    seed: int


@dataclass
class Measure:
    workload: str
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float


@dataclass
class EngineResult:
    name: str
    start_s: float
    measures: list[Measure] = field(default_factory=list)

    def rate(self, workload: str) -> float | None:
        for m in self.measures:
            if m.workload == workload:
                return m.tokens_per_s
        return None


# -- child: one engine, every workload ----------------------------------------------------


def _random_prompts(rng: random.Random, count: int, length: int) -> list[list[int]]:
    # Ids above the special tokens and below the vocabulary's end (49152 for SmolLM2).
    return [[rng.randrange(100, 49000) for _ in range(length)] for _ in range(count)]


async def _run_batch(
    engine: Any,
    prompts: list[list[int]],
    loras: list[Any],
    max_tokens: int,
    tag: str,
) -> tuple[float, int]:
    """Submit every prompt at once; (wall seconds, output tokens)."""
    from serve.engine.types import GenerationParams

    params = GenerationParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> int:
        produced = 0
        async for deltas in engine.generate(prompts[i], params, f"{tag}-{i}", lora=loras[i]):
            produced += sum(len(d.token_ids) for d in deltas)
        return produced

    started = time.perf_counter()
    produced = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return time.perf_counter() - started, sum(produced)


async def _workloads(engine: Any, run: EngineRun) -> list[Measure]:
    from serve.engine.types import LoraTarget

    rng = random.Random(run.seed)
    targets = [LoraTarget(f"bench-{i}", Path(p)) for i, p in enumerate(run.adapters)]
    measures: list[Measure] = []

    # Warm-up: every adapter loaded into vLLM, the allocator and caches warm.
    warm = _random_prompts(rng, max(2, len(targets)), 256)
    warm_loras: list[Any] = list(targets) if run.lora else [None] * len(warm)
    await _run_batch(engine, warm, [None] * len(warm), 2, "warm-base")
    if run.lora:
        await _run_batch(engine, warm[: len(warm_loras)], warm_loras, 2, "warm-lora")

    prefill_cases: list[tuple[str, Any]] = [("prefill_base", None)]
    if run.lora:
        prefill_cases.append(("prefill_one_lora", targets[0]))
    for workload, lora in prefill_cases:
        prompts = _random_prompts(rng, run.prefill_prompts, run.prompt_tokens)
        seconds, _ = await _run_batch(engine, prompts, [lora] * len(prompts), 1, workload)
        tokens = run.prefill_prompts * run.prompt_tokens
        measures.append(Measure(workload, len(prompts), tokens, seconds, tokens / seconds))
        print(f"  {run.name} {workload}: {tokens / seconds:.0f} prompt tok/s", flush=True)

    decode_cases: list[tuple[str, list[Any]]] = [("decode_base", [None] * run.concurrency)]
    if run.lora:
        mixed = [targets[i % len(targets)] for i in range(run.concurrency)]
        decode_cases.append((f"decode_{len(targets)}_loras_mixed", mixed))
    for workload, loras in decode_cases:
        prompts = _random_prompts(rng, run.concurrency, DECODE_PROMPT_TOKENS)
        seconds, produced = await _run_batch(engine, prompts, loras, run.decode_tokens, workload)
        measures.append(Measure(workload, len(prompts), produced, seconds, produced / seconds))
        print(f"  {run.name} {workload}: {produced / seconds:.0f} output tok/s", flush=True)
    return measures


def child(run: EngineRun, out: Path) -> None:
    from serve.engine.engine import Engine
    from serve.engine.types import EngineConfig

    config = EngineConfig(
        model_dir=Path(run.model_dir),
        served_name="bench",
        max_model_len=run.prompt_tokens + 64 if run.prompt_tokens + 64 > 512 else 512,
        kv_cache_gb=run.kv_cache_gb,
        enforce_eager=run.eager,
        enable_lora=run.lora,
        max_loras=max(1, len(run.adapters)),
        max_cpu_loras=max(1, len(run.adapters)),
        max_lora_rank=run.max_lora_rank,
    )
    started = time.perf_counter()
    engine = Engine.start(config)
    result = EngineResult(run.name, time.perf_counter() - started)
    try:
        result.measures = asyncio.run(_workloads(engine, run))
    finally:
        engine.shutdown()
    out.write_text(json.dumps(asdict(result)))


# -- parent ---------------------------------------------------------------------------


def _make_adapters(model_dir: Path, root: Path, count: int, rank: int) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM

    from tests.integration.lora_fixtures import make_random_lora

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return [
        str(make_random_lora(model_dir, root / f"a{i}", rank=rank, seed=i, base_model=model))
        for i in range(count)
    ]


def _library_adapters(library: Path) -> list[str]:
    """The library's adapter folders, the generalist first (the one-adapter prefill's)."""
    from routing.adapter_meta import ADAPTER_CONFIG_FILE

    found = sorted(p for p in library.resolve().iterdir() if (p / ADAPTER_CONFIG_FILE).is_file())
    if not found:
        raise SystemExit(f"--library {library}: no adapter folders in it")
    found.sort(key=lambda p: p.name != "generalist")
    return [str(p) for p in found]


def _run_child(run: EngineRun, workdir: Path, log_dir: Path) -> EngineResult:
    out = workdir / f"{run.name}.json"
    env = dict(os.environ, CROSSTASK_FAST_LORA="1" if run.fast else "0")
    log_path = log_dir / f"{run.name}.log"
    print(f"[{run.name}] starting (log {log_path})", flush=True)
    with open(log_path, "wb") as log:
        process = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(asdict(run)), "--child-out", str(out)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        )
    if process.returncode != 0 or not out.exists():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{run.name} failed ({process.returncode}):\n{tail}")
    data = json.loads(out.read_text())
    result = EngineResult(data["name"], data["start_s"], [Measure(**m) for m in data["measures"]])
    for m in result.measures:
        print(f"[{run.name}] {m.workload}: {m.tokens_per_s:.0f} tok/s ({m.seconds:.1f} s)")
    return result


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=None, help="model folder")
    parser.add_argument("--prefill-prompts", type=int, default=64)
    parser.add_argument(
        "--orig-prefill-prompts",
        type=int,
        default=8,
        help="prompts per prefill workload on lora-orig (its one-adapter prefill runs at "
        "~25 tok/s here: 64 prompts would take 45 minutes; 8 still keep its 2048-token "
        "steps full)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8, help="rank of the random adapters")
    parser.add_argument(
        "--library",
        type=Path,
        default=None,
        help="serve this adapter library's own adapters instead of random ones",
    )
    parser.add_argument("--max-lora-rank", type=int, default=None, help="engine slot rank")
    parser.add_argument("--kv-cache-gb", type=float, default=1.0)
    parser.add_argument("--eager", action="store_true", help="no torch.compile for base")
    parser.add_argument("--skip-orig", action="store_true", help="no vLLM-ops engine")
    parser.add_argument("--skip-base-engine", action="store_true", help="no LoRA-free engine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        child(EngineRun(**json.loads(args.child)), args.child_out)
        return

    from serve.engine.types import EngineConfig

    model_dir = args.model
    if model_dir is None:
        from serve.default_model import ensure_default_model

        home = Path(os.environ.get("CROSSTASK_HOME", "~/.cache/crosstask")).expanduser()
        model_dir = ensure_default_model(home)
    max_lora_rank = args.max_lora_rank or EngineConfig(Path(), "").max_lora_rank

    with tempfile.TemporaryDirectory(prefix="lora-speed-") as tmp:
        workdir = Path(tmp)
        if args.library is not None:
            adapters = _library_adapters(args.library)
            args.adapters = len(adapters)
        else:
            adapters = _make_adapters(model_dir, workdir / "adapters", args.adapters, args.rank)

        def run(name: str, lora: bool, fast: bool, prefill_prompts: int) -> EngineRun:
            return EngineRun(
                name=name,
                model_dir=str(model_dir),
                lora=lora,
                fast=fast,
                adapters=adapters if lora else [],
                eager=args.eager,
                kv_cache_gb=args.kv_cache_gb,
                max_lora_rank=max_lora_rank,
                prefill_prompts=prefill_prompts,
                prompt_tokens=args.prompt_tokens,
                concurrency=args.concurrency,
                decode_tokens=args.decode_tokens,
                seed=args.seed,
            )

        plan = []
        if not args.skip_base_engine:
            plan.append(run("base", lora=False, fast=True, prefill_prompts=args.prefill_prompts))
        if not args.skip_orig:
            plan.append(
                run("lora-orig", lora=True, fast=False, prefill_prompts=args.orig_prefill_prompts)
            )
        plan.append(run("lora-fast", lora=True, fast=True, prefill_prompts=args.prefill_prompts))
        results = {r.name: _run_child(r, workdir, workdir) for r in plan}
        logs = {name: (workdir / f"{name}.log").read_text(errors="replace") for name in results}

    mixed = f"decode_{args.adapters}_loras_mixed"
    prefill_target, decode_target = TARGETS["library" if args.library else "random"]
    ratios: dict[str, dict[str, float | None]] = {}
    for name, result in results.items():
        if name == "base":
            continue
        ratios[name] = {
            "prefill_one_lora_vs_base_same_engine": _ratio(
                result.rate("prefill_one_lora"), result.rate("prefill_base")
            ),
            "decode_mixed_vs_base_same_engine": _ratio(
                result.rate(mixed), result.rate("decode_base")
            ),
        }
        if "base" in results:
            ratios[name]["prefill_one_lora_vs_lora_free_engine"] = _ratio(
                result.rate("prefill_one_lora"), results["base"].rate("prefill_base")
            )
            ratios[name]["decode_mixed_vs_lora_free_engine"] = _ratio(
                result.rate(mixed), results["base"].rate("decode_base")
            )
    fast = ratios.get("lora-fast", {})
    prefill_ratio = fast.get("prefill_one_lora_vs_base_same_engine")
    decode_ratio = fast.get("decode_mixed_vs_base_same_engine")
    speedup: dict[str, float | None] = {}
    if "lora-orig" in results:
        for workload in ("prefill_one_lora", mixed):
            speedup[workload] = _ratio(
                results["lora-fast"].rate(workload), results["lora-orig"].rate(workload)
            )
    report = {
        "settings": {
            **{
                k: str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()
                if k not in ("child", "child_out", "out")
            },
            "model": str(model_dir),
            "max_lora_rank": max_lora_rank,
            "model_dir": str(model_dir),
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "engines": {name: asdict(r) for name, r in results.items()},
        "ratios": ratios,
        "fast_vs_orig_speedup": speedup,
        "targets": {
            "prefill_one_lora_vs_base": {
                "target": prefill_target,
                "measured": prefill_ratio,
                "met": prefill_ratio is not None and prefill_ratio >= prefill_target,
            },
            "decode_mixed_vs_base": {
                "target": decode_target,
                "measured": decode_ratio,
                "met": decode_ratio is not None and decode_ratio >= decode_target,
            },
        },
        "fast_path_seen_in_worker": {
            name: "crosstask fast CPU LoRA path active" in text for name, text in logs.items()
        },
    }
    print(
        json.dumps({"ratios": ratios, "speedup": speedup, "targets": report["targets"]}, indent=2)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
