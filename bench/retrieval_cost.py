"""What cross-task demonstrations cost at the server's defaults, side by side with the same
prompt format without them, on one server (started here, the default store and library):

1. `crosstask eval`'s client over the given tasks (default: the dev and confirm tasks),
   `--concurrency` clients: `zero_shaped` (the "Definition / Input" turn, k = 0) against
   `defaults` (no `k`, no routing: the server's scope, k and gate), each with its
   requests per second and ROUGE-L; run in alternating order over `--rounds`.
2. The plain request "What is the capital of France?" with no `crosstask` field against
   the same with `k: 0`: prompt tokens and text at temperature 0.
3. Latency of one request with the defaults, sent right after another input of the same
   task (warm prefix), against zero-shot's: p50 over the tasks' examples, one at a time.
4. `crosstask batch` on a file of `--batch-lines` requests of one task, each line with
   no `k` against the same file with `k: 0` (same engine settings).

Targets (issue 19): 1 and 4 >= 0.5x zero-shot's throughput; 2 at most 1.2x the tokens and
the same text; 3 within 1.3x.

    .venv/bin/python bench/retrieval_cost.py [--tasks FILE ...] [--limit 30] [--rounds 1]
        [--batch-lines 1000] [--out bench/results/retrieval_cost.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from serve.evaluation.client import RequestSettings, make_client, run_variant  # noqa: E402
from serve.evaluation.config import EvalConfig  # noqa: E402
from serve.evaluation.items import Item, default_task_source, load_items  # noqa: E402
from serve.evaluation.modes import chat_messages, shaped_messages, variants_for  # noqa: E402
from serve.evaluation.report import summarize  # noqa: E402

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def start_server(port: int, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "serve.cli", "serve", "--host", "127.0.0.1",
        "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    with log.open("wb") as fh:
        proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(2)
    proc.kill()
    raise SystemExit(f"the server did not start; see {log}")


def read_tasks(paths: list[Path]) -> list[str]:
    names: list[str] = []
    for path in paths:
        for line in path.read_text().splitlines():
            name = line.split("#")[0].strip()
            if name and name not in names:
                names.append(name)
    return names


async def eval_round(
    base_url: str, order: list[str], items: list[Item], concurrency: int, names: list[str]
) -> dict[str, Any]:
    config = EvalConfig(base_url=base_url, tasks=order, concurrency=concurrency, max_tokens=24)
    client = make_client(config)
    model = next(m.id for m in (await client.models.list()).data if m.id != "auto")
    out: dict[str, Any] = {}
    for variant in variants_for(names, k=6):
        settings = RequestSettings(model=model, max_tokens=24, concurrency=concurrency)
        run = await run_variant(client, settings, variant, items)
        summary = summarize(run, order)
        out[variant.name] = {
            "requests_per_second": round(len(run.outcomes) / run.seconds, 3),
            "seconds": round(run.seconds, 1),
            "rougeL": summary["rougeL"],
            "exact_match": summary["exact_match"],
            "errors": summary["errors"],
            "tasks": summary["tasks"],
        }
    await client.close()
    return out


def france(base_url: str) -> dict[str, Any]:
    answers = {}
    for name, extension in (("defaults", None), ("k0", {"demonstrations": {"k": 0}})):
        body: dict[str, Any] = {
            "model": "smollm2-135m-instruct",
            "messages": FRANCE,
            "max_tokens": 24,
            "temperature": 0,
        }
        if extension:
            body["crosstask"] = extension
        reply = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=300).json()
        answers[name] = {
            "prompt_tokens": reply["usage"]["prompt_tokens"],
            "text": reply["choices"][0]["message"]["content"],
            "crosstask": reply["crosstask"],
        }
    answers["token_ratio"] = round(
        answers["defaults"]["prompt_tokens"] / answers["k0"]["prompt_tokens"], 3
    )
    answers["same_text"] = answers["defaults"]["text"] == answers["k0"]["text"]
    return answers


def chat_body(mode: str, item: Item) -> dict[str, Any]:
    """One chat request of `item`: zero_shaped (the "Definition / Input" turn, `k: 0`) or
    defaults (the chat messages, nothing asked of retrieval), the task excluded."""
    body: dict[str, Any] = {
        "model": "smollm2-135m-instruct",
        "max_tokens": 24,
        "temperature": 0,
        "crosstask": {"exclude_tasks": [item.task]},
    }
    if mode == "zero_shaped":
        body["messages"] = shaped_messages(item.definition, item.input)
        body["crosstask"]["demonstrations"] = {"k": 0}
    else:
        body["messages"] = chat_messages(item.definition, item.input)
    return body


def warm_latency(base_url: str, items: list[Item], per_task: int) -> dict[str, Any]:
    """Per task: one request to warm its prefix, then `per_task` timed ones, one at a
    time; zero-shot (k = 0, shaped) and the defaults, in alternating task order."""
    by_task: dict[str, list[Item]] = {}
    for item in items:
        by_task.setdefault(item.task, []).append(item)
    timings: dict[str, list[float]] = {"zero_shaped": [], "defaults": []}
    with httpx.Client(timeout=300) as http:
        for n, (_task, task_items) in enumerate(by_task.items()):
            if len(task_items) < per_task + 1:
                continue
            modes = ["zero_shaped", "defaults"] if n % 2 == 0 else ["defaults", "zero_shaped"]
            for mode in modes:
                for i, item in enumerate(task_items[: per_task + 1]):
                    body = chat_body(mode, item)
                    started = time.perf_counter()
                    http.post(f"{base_url}/v1/chat/completions", json=body).raise_for_status()
                    if i > 0:  # the first one warmed the task's prefix
                        timings[mode].append(time.perf_counter() - started)
    p50 = {mode: statistics.median(t) for mode, t in timings.items() if t}
    return {
        "requests": {mode: len(t) for mode, t in timings.items()},
        "p50_seconds": {mode: round(v, 4) for mode, v in p50.items()},
        "ratio": round(p50["defaults"] / p50["zero_shaped"], 3) if len(p50) == 2 else None,
    }


def batch_run(items: list[Item], lines: int, folder: Path) -> dict[str, Any]:
    """One task's inputs, repeated to `lines`, with and without `k: 0` per line."""
    task_items = [i for i in items if i.task == items[0].task]
    results: dict[str, Any] = {"task": task_items[0].task, "lines": lines}
    for mode in ("zero_shaped", "defaults"):
        source = folder / f"batch-{mode}.jsonl"
        with source.open("w") as fh:
            for n in range(lines):
                item = task_items[n % len(task_items)]
                body = chat_body(mode, item)
                line = {"custom_id": str(n), "method": "POST", "url": "/v1/chat/completions"}
                fh.write(json.dumps({**line, "body": body}) + "\n")
        out = folder / f"batch-{mode}.out.jsonl"
        summary = out.with_suffix(".summary.json")
        command = [
            sys.executable, "-m", "serve.cli", "batch", str(source), str(out),
            "--no-progress", "--summary", str(summary),
        ]  # fmt: skip
        started = time.monotonic()
        with (folder / f"batch-{mode}.log").open("w") as log:
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=REPO)
        wall = time.monotonic() - started
        recorded = json.loads(summary.read_text())
        results[mode] = {"wall_seconds": round(wall, 1), "summary": recorded}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tasks",
        type=Path,
        nargs="+",
        default=[REPO / "retrieval/data/dev_tasks.txt", REPO / "retrieval/data/confirm_tasks.txt"],
    )
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--latency-per-task", type=int, default=4)
    parser.add_argument("--batch-lines", type=int, default=1000)
    parser.add_argument("--port", type=int, default=8131)
    parser.add_argument("--skip", nargs="*", default=[], choices=["eval", "latency", "batch"])
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/retrieval_cost.json")
    args = parser.parse_args()

    names = read_tasks(args.tasks)
    order, items = load_items(default_task_source(None), names, args.limit, args.seed)
    report: dict[str, Any] = {
        "command": "bench/retrieval_cost.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip(),
        "tasks": order,
        "examples": len(items),
    }
    base_url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        server = start_server(args.port, folder / "server.log")
        try:
            report["france"] = france(base_url)
            print(json.dumps({"france": report["france"]}, indent=2), flush=True)
            if "eval" not in args.skip:
                rounds = []
                for r in range(args.rounds):
                    modes = ["zero_shaped", "defaults"]
                    if r % 2:
                        modes.reverse()
                    result = asyncio.run(
                        eval_round(base_url, order, items, args.concurrency, modes)
                    )
                    rounds.append(result)
                    brief = {
                        m: {k: v for k, v in x.items() if k != "tasks"} for m, x in result.items()
                    }
                    print(json.dumps({"eval_round": r, **brief}), flush=True)
                rates = {
                    m: statistics.median(r[m]["requests_per_second"] for r in rounds)
                    for m in ("zero_shaped", "defaults")
                }
                # Macro ROUGE-L and exact match per task list (dev, confirm), first round.
                by_list = {
                    path.name: {
                        mode: {
                            metric: round(
                                statistics.mean(
                                    rounds[0][mode]["tasks"][t][metric]
                                    for t in read_tasks([path])
                                    if t in rounds[0][mode]["tasks"]
                                ),
                                2,
                            )
                            for metric in ("rougeL", "exact_match")
                        }
                        for mode in ("zero_shaped", "defaults")
                    }
                    for path in args.tasks
                }
                report["eval"] = {
                    "by_task_list": by_list,
                    "rounds": rounds,
                    "requests_per_second": rates,
                    "throughput_ratio": round(rates["defaults"] / rates["zero_shaped"], 3),
                }
            if "latency" not in args.skip:
                report["warm_latency"] = warm_latency(base_url, items, args.latency_per_task)
                print(json.dumps({"warm_latency": report["warm_latency"]}), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=120)
        if "batch" not in args.skip:
            batch = batch_run(items, args.batch_lines, folder)
            # The run itself (the summary's seconds), without the engine's start-up.
            zero = batch["zero_shaped"]["summary"]["seconds"]
            batch["throughput_ratio"] = round(zero / batch["defaults"]["summary"]["seconds"], 3)
            report["batch"] = batch
    print(json.dumps({k: v for k, v in report.items() if k != "tasks"}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    raise SystemExit(main())
