"""Does training work? Each specialist on held-out examples of its own training tasks.

Against a running server that serves the library: for every specialist, the examples
its recipe held out of each of its tasks (never trained on; `routing.training.data.split_task`)
are answered greedily without demonstrations by the specialist, the generalist and (unless
--no-base) the base model, and scored as `crosstask eval` scores (first line, ROUGE-L F1,
0 to 100, macro over tasks). The figure that says a specialist earns its place is its
margin over the generalist: the per-task differences, their mean, standard deviation and
a seeded bootstrap 95% interval over tasks. Unseen tasks are `crosstask eval`'s job.

    python bench/adapter_quality.py --base-url http://127.0.0.1:8000 \\
        --adapters routing/library --per-task 20 --tasks-per-specialist 6

Prints a table and writes bench/results/adapter_quality.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
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

RESULTS = Path(__file__).resolve().parent / "results" / "adapter_quality.json"


async def ask(
    client: Any,
    model: str,
    definition: str,
    text: str,
    routing: dict[str, Any],
    max_tokens: int,
) -> str:
    response = await client.chat.completions.create(
        model=model,
        messages=chat_messages(definition, text),
        max_tokens=max_tokens,
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
    ways: dict[str, dict[str, Any]] = {
        "generalist": {"mode": "adapter", "adapters": [GENERALIST_ADAPTER]}
    }
    if args.base:
        ways["base"] = {"mode": "off"}

    async def score(task_name: str, index: int, routing: dict[str, Any]) -> float:
        task = tasks[task_name]
        example = usable_examples(task)[index]
        async with semaphore:
            raw = await ask(
                client, args.model, task.definition, example.input, routing, args.max_tokens
            )
        return rouge_l(first_line(raw), example.targets or [example.output])

    report: dict[str, Any] = {
        "per_task": args.per_task,
        "tasks_per_specialist": args.tasks_per_specialist,
        "max_tokens": args.max_tokens,
        "specialists": {},
    }
    started = time.perf_counter()
    rng = random.Random(args.seed)
    for meta in specialists:
        names = [n for n in meta.tasks if n in tasks]
        if args.tasks_per_specialist and len(names) > args.tasks_per_specialist:
            names = sorted(rng.sample(names, args.tasks_per_specialist))
        held = {
            name: split_task(tasks[name], recipe.data.seed, recipe.data.holdout_per_task).held_out[
                : args.per_task
            ]
            for name in names
        }
        own = {**ways, "specialist": {"mode": "adapter", "adapters": [meta.name]}}
        jobs = [(way, name, i) for way in own for name, indices in held.items() for i in indices]
        results = await asyncio.gather(*(score(name, i, own[way]) for way, name, i in jobs))
        per_task: dict[str, dict[str, float]] = {name: {} for name in held}
        for way in own:
            for name in held:
                scores = [
                    r for (w, n, _), r in zip(jobs, results, strict=True) if (w, n) == (way, name)
                ]
                per_task[name][way] = mean(scores)
        margins = [v["specialist"] - v["generalist"] for v in per_task.values()]
        low, high = bootstrap_interval(margins, args.seed)
        entry: dict[str, Any] = {
            way: round(mean([v[way] for v in per_task.values()]), 2) for way in own
        }
        entry.update(
            margin=round(mean(margins), 2),
            margin_sd=round(statistics.pstdev(margins), 2) if margins else 0.0,
            margin_ci95=[round(low, 2), round(high, 2)],
            tasks_better=sum(m > 0 for m in margins),
            tasks=len(held),
            examples=sum(len(v) for v in held.values()),
            per_task={n: {w: round(x, 2) for w, x in v.items()} for n, v in per_task.items()},
        )
        report["specialists"][meta.name] = entry
        base = f"base {entry['base']:5.1f}  " if "base" in entry else ""
        print(
            f"{meta.name:24s} tasks {entry['tasks']:3d}  {base}"
            f"specialist {entry['specialist']:5.1f}  generalist {entry['generalist']:5.1f}  "
            f"margin {entry['margin']:+5.1f} (sd {entry['margin_sd']:.1f}, 95% "
            f"[{low:+.1f}, {high:+.1f}], better on {entry['tasks_better']}/{entry['tasks']})",
            flush=True,
        )
    margins = [e["margin"] for e in report["specialists"].values()]
    report["mean_margin"] = round(mean(margins), 2)
    report["min_margin"] = round(min(margins), 2) if margins else None
    report["every_specialist_better"] = bool(margins) and min(margins) > 0
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def bootstrap_interval(values: list[float], seed: int, rounds: int = 2000) -> tuple[float, float]:
    """A percentile bootstrap 95% interval of the mean, resampling tasks."""
    if not values:
        return 0.0, 0.0
    rng = random.Random(seed)
    means = sorted(mean(rng.choices(values, k=len(values))) for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--adapters", type=Path, required=True, help="the served library")
    parser.add_argument("--per-task", type=int, default=20, help="held-out examples per task")
    parser.add_argument(
        "--tasks-per-specialist",
        type=int,
        default=0,
        help="score a seeded sample of this many of each specialist's tasks (0: all)",
    )
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--no-base", dest="base", action="store_false", help="skip the base")
    parser.add_argument("--seed", type=int, default=0)
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
