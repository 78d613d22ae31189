"""Does training work? Each specialist on held-out examples of its own training tasks.

Against a running server that serves the library: for every specialist, the examples
its recipe held out of each of its tasks (never trained on; `routing.training.data.split_task`)
are answered greedily without demonstrations by the base model, the specialist and the
generalist, and scored as `crosstask eval` scores (first line, ROUGE-L F1, 0 to 100, macro
over tasks). Target (issue 4): each specialist at least 10 ROUGE-L above the base on its
own tasks. Unseen tasks are `crosstask eval`'s job (modes zero, generalist, adapter, auto).

    python bench/adapter_quality.py --base-url http://127.0.0.1:8000 \\
        --adapters routing/library --per-task 3

Prints a table and writes bench/results/adapter_quality.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.build import usable_examples
from routing.adapter_meta import read_meta
from routing.training.data import split_task
from routing.training.recipe import RECIPE_FILE, read_recipe
from serve.evaluation.client import api_base
from serve.evaluation.items import default_task_source
from serve.evaluation.modes import GENERALIST_ADAPTER, chat_messages
from serve.evaluation.scoring import first_line, rouge_l

TARGET_GAIN = 10.0
RESULTS = Path(__file__).resolve().parent / "results" / "adapter_quality.json"


async def ask(client: Any, model: str, definition: str, text: str, routing: dict[str, Any]) -> str:
    response = await client.chat.completions.create(
        model=model,
        messages=chat_messages(definition, text),
        max_tokens=64,
        temperature=0.0,
        extra_body={"crosstask": {"demonstrations": {"k": 0}, "routing": routing}},
    )
    return response.choices[0].message.content or ""


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(base_url=api_base(args.base_url), api_key="none", timeout=600)
    recipe = read_recipe(args.adapters / RECIPE_FILE)
    metas = [
        read_meta(p)
        for p in sorted(args.adapters.iterdir())
        if p.is_dir() and (p / "crosstask_adapter.json").is_file()
    ]
    specialists = [m for m in metas if m.kind == "specialist"]
    wanted = sorted({t for m in specialists for t in m.tasks})
    tasks = {t.name: t for t in default_task_source(None).tasks(wanted)}
    semaphore = asyncio.Semaphore(args.concurrency)
    ways = {
        "base": {"mode": "off"},
        "generalist": {"mode": "adapter", "adapters": [GENERALIST_ADAPTER]},
    }

    async def score(task_name: str, index: int, way: str, routing: dict[str, Any]) -> float:
        task = tasks[task_name]
        example = usable_examples(task)[index]
        async with semaphore:
            raw = await ask(client, args.model, task.definition, example.input, routing)
        return rouge_l(first_line(raw), example.targets or [example.output])

    report: dict[str, Any] = {"per_task": args.per_task, "specialists": {}}
    started = time.perf_counter()
    for meta in specialists:
        held = {
            name: split_task(tasks[name], recipe.data.seed, recipe.data.holdout_per_task).held_out[
                : args.per_task
            ]
            for name in meta.tasks
            if name in tasks
        }
        own = {**ways, "specialist": {"mode": "adapter", "adapters": [meta.name]}}
        jobs = [(way, name, i) for way in own for name, indices in held.items() for i in indices]
        results = await asyncio.gather(*(score(name, i, way, own[way]) for way, name, i in jobs))
        entry: dict[str, float] = {}
        for way in own:
            per_task = []
            for name in held:
                scores = [
                    r for (w, n, _), r in zip(jobs, results, strict=True) if (w, n) == (way, name)
                ]
                if scores:
                    per_task.append(mean(scores))
            entry[way] = round(mean(per_task), 2)
        entry["gain"] = round(entry["specialist"] - entry["base"], 2)
        entry["tasks"] = len(held)
        entry["examples"] = sum(len(v) for v in held.values())
        report["specialists"][meta.name] = entry
        print(
            f"{meta.name:24s} tasks {entry['tasks']:3d}  base {entry['base']:5.1f}  "
            f"specialist {entry['specialist']:5.1f}  generalist {entry['generalist']:5.1f}  "
            f"gain {entry['gain']:+5.1f}",
            flush=True,
        )
    gains = [e["gain"] for e in report["specialists"].values()]
    report["mean_gain"] = round(mean(gains), 2)
    report["min_gain"] = round(min(gains), 2) if gains else None
    report["target_gain"] = TARGET_GAIN
    report["meets_target"] = bool(gains) and min(gains) >= TARGET_GAIN
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--adapters", type=Path, required=True, help="the served library")
    parser.add_argument("--per-task", type=int, default=3, help="held-out examples per task")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    print(json.dumps({k: v for k, v in report.items() if k != "specialists"}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
