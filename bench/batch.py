"""`crosstask batch` against `vllm run-batch` on the same request file.

Writes one file of N chat requests (seeded, varied short questions, greedy, fixed
max_tokens), then runs, alternating for several rounds:
- `python -m vllm.entrypoints.openai.run_batch` (vLLM's own batch runner),
- `crosstask batch` with retrieval and routing off (`--default-k 0`),
- `crosstask batch` with retrieval on (k=4 from the default store), to price retrieval,
each with the same engine settings, each timed end to end (process start to exit) and,
separately, by its generation phase: wall time minus the start-up measured on a one-line
file in the same round. Prints and writes JSON: requests/s and output tokens/s per round,
the medians, and the ratios. Target: crosstask >= 0.9x vLLM's throughput (retrieval off).

    .venv/bin/python bench/batch.py [--requests 1000] [--rounds 2] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NAME = "smollm2-135m-instruct"
TOPICS = [
    "the moon",
    "a river",
    "bread",
    "a violin",
    "winter",
    "a train station",
    "bees",
    "a library",
    "the ocean",
    "a mountain",
]
TEMPLATES = [
    "Write one sentence about {t}.",
    "Give three words that describe {t}.",
    "What is {a} times {b}? Answer with a number.",
    "Is {t} alive? Answer yes or no, then explain briefly.",
    "Summarize in a few words why people like {t}.",
]


def write_requests(path: Path, count: int, max_tokens: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(count):
            text = rng.choice(TEMPLATES).format(
                t=rng.choice(TOPICS), a=rng.randint(2, 99), b=rng.randint(2, 99)
            )
            body = {
                "model": NAME,
                "messages": [{"role": "user", "content": text}],
                "temperature": 0,
                "max_tokens": max_tokens,
                # Every request generates exactly max_tokens, so both runners do the same
                # amount of decoding whatever they answer.
                "ignore_eos": True,
            }
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
            fh.write(json.dumps({**line, "body": body}) + "\n")


def vllm_cmd(source: Path, out: Path, model_dir: Path, engine: dict[str, Any]) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.run_batch",
        "-i",
        str(source),
        "-o",
        str(out),
        "--model",
        str(model_dir),
        "--served-model-name",
        NAME,
        "--dtype",
        "float32",
        "--kv-cache-memory-bytes",
        str(int(engine["kv_cache_gb"] * (1 << 30))),
        "--max-num-seqs",
        str(engine["max_num_seqs"]),
        "--max-num-batched-tokens",
        str(engine["max_num_batched_tokens"]),
    ]
    return cmd + (["--enforce-eager"] if engine["enforce_eager"] else [])


def crosstask_cmd(source: Path, out: Path, engine: dict[str, Any], k: int) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "serve.cli",
        "batch",
        str(source),
        str(out),
        "--no-progress",
        "--summary",
        str(out.with_suffix(".summary.json")),
        "--default-k",
        str(k),
        # Routing off: the base model alone, as vLLM's run-batch serves it.
        "--no-adapters",
        "--kv-cache-gb",
        str(engine["kv_cache_gb"]),
        "--max-num-seqs",
        str(engine["max_num_seqs"]),
        "--max-num-batched-tokens",
        str(engine["max_num_batched_tokens"]),
    ]
    return cmd + (["--enforce-eager"] if engine["enforce_eager"] else [])


def timed(cmd: list[str], log: Path) -> float:
    started = time.monotonic()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=7200)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:5]} failed; see {log}")
    return time.monotonic() - started


def output_tokens(path: Path) -> tuple[int, int]:
    tokens = ok = 0
    for raw in path.read_text().splitlines():
        line = json.loads(raw)
        body = (line.get("response") or {}).get("body") or {}
        if line.get("error") is None and "usage" in body:
            ok += 1
            tokens += int(body["usage"]["completion_tokens"])
    return ok, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache-gb", type=float, default=4.0)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--skip-retrieval", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/batch.json"))
    args = parser.parse_args()

    from serve.default_model import ensure_default_model

    home = Path(os.environ.get("CROSSTASK_HOME", "~/.cache/crosstask")).expanduser()
    model_dir = ensure_default_model(home)
    engine = {
        "kv_cache_gb": args.kv_cache_gb,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "enforce_eager": args.enforce_eager,
    }
    runners = {
        "vllm_run_batch": lambda s, o: vllm_cmd(s, o, model_dir, engine),
        "crosstask": lambda s, o: crosstask_cmd(s, o, engine, 0),
    }
    if not args.skip_retrieval:
        runners["crosstask_retrieval"] = lambda s, o: crosstask_cmd(s, o, engine, 4)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="crosstask-bench-batch-") as tmp:
        work = Path(tmp)
        source, tiny = work / "requests.jsonl", work / "one.jsonl"
        write_requests(source, args.requests, args.max_tokens)
        write_requests(tiny, 1, args.max_tokens)
        for round_ in range(args.rounds):
            for name, cmd in runners.items():
                startup = timed(cmd(tiny, work / f"{name}-tiny.jsonl"), work / f"{name}.log")
                out = work / f"{name}-{round_}.jsonl"
                wall = timed(cmd(source, out), work / f"{name}.log")
                ok, tokens = output_tokens(out)
                summary_file = out.with_suffix(".summary.json")
                retrieval_ms = (
                    json.loads(summary_file.read_text()).get("retrieval_ms_per_request")
                    if summary_file.exists()
                    else None
                )
                generation = max(wall - startup, 1e-9)
                row = {
                    "runner": name,
                    "round": round_,
                    "wall_s": round(wall, 2),
                    "startup_s": round(startup, 2),
                    "succeeded": ok,
                    "output_tokens": tokens,
                    "requests_per_s": round(ok / generation, 3),
                    "output_tok_per_s": round(tokens / generation, 2),
                    "output_tok_per_s_wall": round(tokens / wall, 2),
                    "retrieval_ms_per_request": retrieval_ms,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)

    def median(runner: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["runner"] == runner)

    summary: dict[str, Any] = {
        name: {
            "output_tok_per_s": median(name, "output_tok_per_s"),
            "output_tok_per_s_wall": median(name, "output_tok_per_s_wall"),
            "requests_per_s": median(name, "requests_per_s"),
            "startup_s": median(name, "startup_s"),
        }
        for name in runners
    }
    base = summary["vllm_run_batch"]["output_tok_per_s"]
    summary["ratio_crosstask_vs_vllm"] = round(summary["crosstask"]["output_tok_per_s"] / base, 3)
    summary["ratio_wall_crosstask_vs_vllm"] = round(
        summary["crosstask"]["output_tok_per_s_wall"]
        / summary["vllm_run_batch"]["output_tok_per_s_wall"],
        3,
    )
    if "crosstask_retrieval" in summary:
        off = summary["crosstask"]["requests_per_s"]
        on = summary["crosstask_retrieval"]["requests_per_s"]
        # Two prices: the embedding and search alone, and everything retrieval adds to a
        # request's share of the run (mostly prefilling the demonstrations).
        summary["retrieval_search_ms_per_request"] = statistics.median(
            r["retrieval_ms_per_request"] or 0.0
            for r in rows
            if r["runner"] == "crosstask_retrieval"
        )
        summary["retrieval_total_ms_per_request"] = round(1000 * (1 / on - 1 / off), 2)
    report = {"config": vars(args) | {"out": str(args.out)}, "rounds": rows, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
