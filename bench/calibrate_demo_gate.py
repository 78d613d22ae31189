"""Calibrate `CROSSTASK_ROUTER_DEMO_MIN_SCORE`: under `auto`, should the demonstrations go in?

Replays recorded answers rather than asking the server again: `crosstask eval --modes
adapter,auto --predictions P.jsonl` on the dev tasks gives, for every example, the answer
with the router's adapter alone (`adapter`) and with four demonstrations too (`auto`). This
script finds each example's demonstrations again (the same store, embedder and query text
as the server, the example's own task excluded), and scores the rule "demonstrations iff
the nearest scores >= t" for a grid of t: macro ROUGE-L over tasks, as `crosstask eval`.

    .venv/bin/python bench/calibrate_demo_gate.py --predictions P.jsonl \
        [--tasks retrieval/data/dev_tasks.txt] [--limit 40] [--seed 0] \
        [--out bench/calibration/demo_gate_dev_tasks.json]

Dev tasks only: every other task is for judging the product.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retrieval.query import query_text
from retrieval.retriever import open_retriever
from serve.evaluation.items import default_task_source, load_items
from serve.settings import Settings

GRID = [round(0.3 + 0.05 * i, 2) for i in range(11)]


async def nearest_scores(items: list[Any], store: Path) -> dict[tuple[str, int], float]:
    retriever = open_retriever(store, read_only=True)
    scores: dict[tuple[str, int], float] = {}
    try:
        for item in items:
            vector = await retriever.embed(query_text(item.definition, item.input))
            hits = await retriever.search(vector, 4, 0.0, [item.task])
            scores[(item.task, item.index)] = max((h.score for h in hits), default=-1.0)
    finally:
        await retriever.close()
    return scores


def macro(per_example: dict[tuple[str, int], float]) -> float:
    by_task: dict[str, list[float]] = defaultdict(list)
    for (task, _), value in per_example.items():
        by_task[task].append(value)
    return sum(sum(v) / len(v) for v in by_task.values()) / len(by_task)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--tasks", type=Path, default=Path("retrieval/data/dev_tasks.txt"))
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument(
        "--out", type=Path, default=Path("bench/calibration/demo_gate_dev_tasks.json")
    )
    args = parser.parse_args()

    names = [
        line.strip()
        for line in args.tasks.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    _, items = load_items(default_task_source(None), names, args.limit, args.seed)
    store = args.store or Settings().home_dir / "store"
    nearest = asyncio.run(nearest_scores(items, store))
    answers: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for line in args.predictions.read_text().splitlines():
        row = json.loads(line)
        answers[(row["task"], row["index"])][row["mode"]] = float(row["rougeL"])
    keys = [k for k in nearest if {"adapter", "auto"} <= set(answers[k])]
    if len(keys) < len(nearest):
        print(
            f"{len(nearest) - len(keys)} examples lack an adapter or auto answer", file=sys.stderr
        )

    def rule(t: float) -> dict[tuple[str, int], float]:
        return {k: answers[k]["auto" if nearest[k] >= t else "adapter"] for k in keys}

    rows = [
        {
            "min_score": t,
            "rouge_l": round(macro(rule(t)), 2),
            "share_with_demonstrations": round(sum(nearest[k] >= t for k in keys) / len(keys), 3),
        }
        for t in GRID
    ]
    report = {
        "examples": len(keys),
        "always": round(macro({k: answers[k]["auto"] for k in keys}), 2),
        "never": round(macro({k: answers[k]["adapter"] for k in keys}), 2),
        "oracle": round(macro({k: max(answers[k].values()) for k in keys}), 2),
        "grid": rows,
        "best": max(rows, key=lambda r: r["rouge_l"]),
        "nearest_score_by_task": {
            task: round(
                sum(nearest[k] for k in keys if k[0] == task)
                / sum(1 for k in keys if k[0] == task),
                3,
            )
            for task in sorted({k[0] for k in keys})
        },
    }
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
