"""Calibrate the router's thresholds on the dev tasks (and nothing else).

For a fixed sample of each dev task's examples (the eval harness's sample, the task
itself always excluded), against a running server with the adapter library:

1. one cheap `auto` request per example records the router's view: every allowed
   specialist's similarity (the `crosstask.routing.scores` extension);
2. each example is answered, greedily and with K retrieved demonstrations (the `auto`
   setting), in every way the router could serve it: the base model (`off`), the
   generalist, the nearest specialist alone, and the softmax merge of the two nearest;
3. every threshold setting of a small grid is replayed offline with
   `routing.router.decide` on the recorded similarities, each example scoring what its
   chosen action scored; the best macro-averaged ROUGE-L wins (ties: the simpler rule).

Prints a table and writes JSON (every action's score, the grid's best settings and the
chosen one). The chosen values become `RouterConfig`'s defaults by hand, with the JSON
committed next to them.

    python bench/calibrate_router.py --base-url http://127.0.0.1:8000 \\
        --tasks retrieval/data/dev_tasks.txt --limit 20 \\
        --out bench/calibration/router_dev_tasks.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from retrieval.sources import read_task_list  # noqa: E402
from routing.router import RouterConfig, Scored, decide, softmax_weights  # noqa: E402
from serve.evaluation.client import api_base  # noqa: E402
from serve.evaluation.items import Item, default_task_source, load_items  # noqa: E402
from serve.evaluation.modes import GENERALIST_ADAPTER, chat_messages  # noqa: E402
from serve.evaluation.scoring import first_line, rouge_l  # noqa: E402

ACTIONS = ("off", "generalist", "top1", "merge2")

GRID = {
    "single_min": [0.3, 0.4, 0.5, 0.6, 0.7, 1.01],
    "single_margin": [0.0, 0.03, 0.06, 0.1],
    "merge_min": [0.2, 0.3, 0.4, 0.5, 1.01],
    "fallback": ["generalist", "off"],
}


def action_routing(action: str, scores: list[Scored], config: RouterConfig) -> dict[str, Any]:
    if action == "off":
        return {"mode": "off"}
    if action == "generalist":
        return {"mode": "adapter", "adapters": [GENERALIST_ADAPTER]}
    if action == "top1":
        return {"mode": "adapter", "adapters": [scores[0].name]}
    top = scores[:2]
    weights = softmax_weights([s.similarity for s in top], config.temperature, config.weight_step)
    if min(weights) <= 0:  # the grid rounds the runner-up away: the router serves top1
        return {"mode": "adapter", "adapters": [top[0].name]}
    return {"mode": "merge", "adapters": [s.name for s in top], "weights": weights}


def chosen_action(route_mode: str, adapters: list[tuple[str, float]], scores: list[Scored]) -> str:
    if route_mode == "off":
        return "off"
    if route_mode == "merge":
        return "merge2"
    name = adapters[0][0]
    return "generalist" if name == GENERALIST_ADAPTER else "top1"


async def probe(client: Any, model: str, item: Item) -> list[Scored]:
    response = await client.chat.completions.create(
        model=model,
        messages=chat_messages(item.definition, item.input),
        max_tokens=1,
        temperature=0.0,
        extra_body={
            "crosstask": {
                "demonstrations": {"k": 0},
                "routing": {"mode": "auto"},
                "exclude_tasks": [item.task],
            }
        },
    )
    scores = response.model_extra["crosstask"]["routing"]["scores"]
    return [Scored(s["name"], float(s["similarity"])) for s in scores]


async def answer(
    client: Any, model: str, item: Item, routing: dict[str, Any], k: int, max_tokens: int
) -> float:
    response = await client.chat.completions.create(
        model=model,
        messages=chat_messages(item.definition, item.input),
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body={
            "crosstask": {
                "demonstrations": {"k": k},
                "routing": routing,
                "exclude_tasks": [item.task],
            }
        },
    )
    return rouge_l(first_line(response.choices[0].message.content or ""), item.targets)


def macro(values: dict[str, list[float]]) -> float:
    means = [sum(v) / len(v) for v in values.values() if v]
    return sum(means) / len(means) if means else 0.0


def replay(
    items: list[Item], scores: list[list[Scored]], results: list[dict[str, float]], c: RouterConfig
) -> tuple[float, dict[str, int]]:
    by_task: dict[str, list[float]] = {}
    counts = dict.fromkeys(ACTIONS, 0)
    for item, item_scores, item_results in zip(items, scores, results, strict=True):
        decision = decide(item_scores, GENERALIST_ADAPTER, c)
        action = chosen_action(decision.mode, decision.adapters, item_scores)
        counts[action] += 1
        by_task.setdefault(item.task, []).append(item_results[action])
    return macro(by_task), counts


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(
        base_url=api_base(args.base_url), api_key=args.api_key or "none", timeout=600
    )
    tasks, items = load_items(
        default_task_source(None), read_task_list(args.tasks), args.limit, args.seed
    )
    model = args.model
    base_config = RouterConfig()
    semaphore = asyncio.Semaphore(args.concurrency)

    async def bounded(coro: Any) -> Any:
        async with semaphore:
            return await coro

    started = time.perf_counter()
    scores = await asyncio.gather(*(bounded(probe(client, model, it)) for it in items))
    results: list[dict[str, float]] = [{} for _ in items]

    async def one(i: int, action: str) -> None:
        routing = action_routing(action, scores[i], base_config)
        results[i][action] = await answer(client, model, items[i], routing, args.k, args.max_tokens)

    # Action by action, so each pass reuses few LoRA slots (merges differ per example).
    for action in ACTIONS:
        t0 = time.perf_counter()
        await asyncio.gather(*(bounded(one(i, action)) for i in range(len(items))))
        print(f"{action}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    per_action = {}
    for action in ACTIONS:
        by_task: dict[str, list[float]] = {}
        for item, r in zip(items, results, strict=True):
            by_task.setdefault(item.task, []).append(r[action])
        per_action[action] = round(macro(by_task), 2)
    oracle_by_task: dict[str, list[float]] = {}
    for item, r in zip(items, results, strict=True):
        oracle_by_task.setdefault(item.task, []).append(max(r.values()))

    grid = []
    for single_min, margin, merge_min, fallback in itertools.product(*GRID.values()):
        config = replace(
            base_config,
            single_min=single_min,
            single_margin=margin,
            merge_min=merge_min,
            fallback=fallback,
        )
        score, counts = replay(items, scores, results, config)
        grid.append({"config": asdict(config), "rougeL": round(score, 2), "actions": counts})
    # Best score first; among equals, the rule that uses adapters least often (simplest).
    grid.sort(key=lambda g: (-g["rougeL"], g["actions"]["top1"] + g["actions"]["merge2"]))
    current, current_counts = replay(items, scores, results, base_config)
    return {
        "tasks": tasks,
        "examples": len(items),
        "limit": args.limit,
        "k": args.k,
        "seconds": round(time.perf_counter() - started, 1),
        "per_action_rougeL": per_action,
        "oracle_rougeL": round(macro(oracle_by_task), 2),
        "current_config": {
            "config": asdict(base_config),
            "rougeL": round(current, 2),
            "actions": current_counts,
        },
        "best": grid[:10],
        "similarity_range": [
            round(min(s[0].similarity for s in scores if s), 3),
            round(max(s[0].similarity for s in scores if s), 3),
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--tasks", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--api-key")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    print(json.dumps({k: v for k, v in report.items() if k != "best"}, indent=2))
    for row in report["best"][:5]:
        print(row["rougeL"], row["config"], row["actions"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
