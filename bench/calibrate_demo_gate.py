"""Choose `CROSSTASK_DEMO_MIN_SCORE` (the one demonstration gate, every mode) by
cross-validation over groups of seen tasks, never by the dev or confirm tasks.

Against a running server (its default store: the seen tasks), each sampled example of a
seen task is asked twice through the public API: with no demonstrations, in the shape the
server gives a request after demonstrations (`zero_shaped`), and with `k` demonstrations
chosen by its task definition (scope `task`, gate open: min_score 0). Every task of the
example's fold is excluded from retrieval, so its demonstrations come from other groups of
tasks, as an unseen task's would. The folds are the adapter library's task groups
(routing/library/recipe.json, "grouping"), dealt into `--folds` folds; tasks in no group
join the folds round-robin.

The rule "demonstrations where the nearest scores >= t" is replayed from those answers
for a grid of t: for each fold, t is fitted on the other folds' tasks (macro ROUGE-L over
tasks, as `crosstask eval`) and scored on the fold's own. The default is the t fitted on
all folds; the record keeps the held-out scores beside "always" and "never". The server
drops demonstrations one by one (each below min_score stays out); the record says how
often that kept only part of an example's demonstrations, where the replay is exact only
for all or none.

    .venv/bin/crosstask serve --port 8123 &        # the server's defaults, any gate
    .venv/bin/python bench/calibrate_demo_gate.py --base-url http://127.0.0.1:8123 \\
        [--limit 6] [--k 6] [--folds 5] [--out bench/calibration/demo_gate_seen_cv.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openai import AsyncOpenAI

from serve.evaluation.items import Item, default_task_source, load_items
from serve.evaluation.modes import shaped_messages
from serve.evaluation.scoring import first_line, rouge_l

REPO = Path(__file__).resolve().parent.parent
GRID = [round(0.2 + 0.025 * i, 3) for i in range(21)]  # 0.2 .. 0.7


@dataclass
class Answer:
    zero: float  # ROUGE-L without demonstrations
    demos: float  # with them
    scores: list[float]  # the demonstrations' scores, best first


def folds_of(
    tasks: list[str], n_folds: int, recipe_path: Path = REPO / "routing/library/recipe.json"
) -> list[list[str]]:
    recipe = json.loads(recipe_path.read_text())
    groups = [g["tasks"] for g in recipe["grouping"]["groups"]]
    grouped = {t for g in groups for t in g}
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    # Largest groups first, each into the smallest fold: folds of similar size.
    for group in sorted(groups, key=len, reverse=True):
        min(folds, key=len).extend(t for t in group if t in tasks)
    for i, task in enumerate(t for t in tasks if t not in grouped):
        folds[i % n_folds].append(task)
    return [f for f in folds if f]


async def ask(
    client: AsyncOpenAI,
    model: str,
    item: Item,
    crosstask: dict[str, Any],
    max_tokens: int,
    messages: Callable[[str, str], list[dict[str, str]]] = shaped_messages,
) -> tuple[float, list[float]]:
    """ROUGE-L of the first line of the greedy answer, and the demonstrations' scores."""
    reply = await client.chat.completions.create(
        model=model,
        messages=messages(item.definition, item.input),  # type: ignore[arg-type]
        temperature=0.0,
        max_tokens=max_tokens,
        extra_body={"crosstask": crosstask},
    )
    text = first_line(reply.choices[0].message.content or "")
    annotation = (reply.model_extra or {}).get("crosstask", {})
    scores = [float(d["score"]) for d in annotation.get("demonstrations", [])]
    return rouge_l(text, item.targets), scores


async def collect(
    base_url: str,
    items: list[Item],
    fold_of: dict[str, list[str]],
    k: int,
    max_tokens: int,
    concurrency: int,
) -> dict[tuple[str, int], Answer]:
    client = AsyncOpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key="x", timeout=600)
    model = next(m.id for m in (await client.models.list()).data if m.id != "auto")
    gate = asyncio.Semaphore(concurrency)
    answers: dict[tuple[str, int], Answer] = {}
    done = 0

    async def one(item: Item) -> None:
        nonlocal done
        async with gate:
            exclude = fold_of[item.task]
            zero, _ = await ask(client, model, item, {"demonstrations": {"k": 0}}, max_tokens)
            demos, scores = await ask(
                client,
                model,
                item,
                {
                    "demonstrations": {"k": k, "min_score": 0.0, "scope": "task"},
                    "routing": {"mode": "off"},
                    "exclude_tasks": exclude,
                },
                max_tokens,
            )
            answers[(item.task, item.index)] = Answer(zero, demos, scores)
            done += 1
            if done % 50 == 0:
                print(f"{done}/{len(items)} examples", file=sys.stderr, flush=True)

    # Task by task, so that a task's requests meet its cached prompt prefix.
    await asyncio.gather(*(one(item) for item in items))
    await client.close()
    return answers


def macro(values: dict[str, list[float]]) -> float:
    # ROUGE-L is already 0 to 100.
    return sum(sum(v) / len(v) for v in values.values()) / len(values) if values else 0.0


def score(answers: dict[tuple[str, int], Answer], tasks: set[str], t: float) -> float:
    """Macro ROUGE-L over `tasks` with demonstrations where the nearest scores >= t."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for (task, _), a in answers.items():
        if task in tasks:
            nearest = a.scores[0] if a.scores else -1.0
            by_task[task].append(a.demos if nearest >= t else a.zero)
    return macro(by_task)


def best_threshold(answers: dict[tuple[str, int], Answer], tasks: set[str]) -> float:
    # Ties go to the higher threshold: fewer demonstrations, shorter prompts.
    return max(reversed(GRID), key=lambda t: score(answers, tasks, t))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--tasks", type=Path, default=REPO / "retrieval/data/seen_tasks.txt")
    parser.add_argument("--limit", type=int, default=6, help="examples per task")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench/calibration/demo_gate_seen_cv.json"
    )
    args = parser.parse_args()

    names = [
        line.split("#")[0].strip()
        for line in args.tasks.read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    folds = folds_of(names, args.folds)
    fold_of = {t: fold for fold in folds for t in fold}
    order, items = load_items(default_task_source(None), names, args.limit, args.seed)
    started = time.perf_counter()
    answers = asyncio.run(
        collect(args.base_url, items, fold_of, args.k, args.max_tokens, args.concurrency)
    )
    seconds = time.perf_counter() - started

    held_out = []
    for i, fold in enumerate(folds):
        inside = set(fold) & set(order)
        outside = set(order) - inside
        t = best_threshold(answers, outside)
        held_out.append(
            {
                "fold": i,
                "tasks": len(inside),
                "fitted_min_score": t,
                "rouge_l": round(score(answers, inside, t), 2),
                "always": round(score(answers, inside, -2.0), 2),
                "never": round(score(answers, inside, 2.0), 2),
            }
        )
    everything = set(order)
    chosen = best_threshold(answers, everything)
    partial = sum(1 for a in answers.values() if a.scores and a.scores[0] >= chosen > a.scores[-1])
    with_any = sum(1 for a in answers.values() if a.scores and a.scores[0] >= chosen)
    report = {
        "command": "bench/calibrate_demo_gate.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "tasks": len(order),
        "examples": len(answers),
        "k": args.k,
        "seconds": round(seconds, 1),
        "folds": [sorted(f) for f in folds],
        "cross_validation": held_out,
        "cross_validated": {
            key: round(sum(f[key] * f["tasks"] for f in held_out) / len(order), 2)
            for key in ("rouge_l", "always", "never")
        },
        "chosen_min_score": chosen,
        "grid_all_tasks": [
            {"min_score": t, "rouge_l": round(score(answers, everything, t), 2)} for t in GRID
        ],
        "share_with_demonstrations_at_chosen": round(with_any / len(answers), 3),
        "share_partly_kept_at_chosen": round(partial / len(answers), 3),
        # Every example's two answers and its demonstrations' scores, for replaying
        # other rules without asking the server again.
        "answers": [
            {
                "task": task,
                "index": index,
                "zero": round(a.zero, 2),
                "demos": round(a.demos, 2),
                "scores": [round(x, 4) for x in a.scores],
            }
            for (task, index), a in sorted(answers.items())
        ],
        "nearest_by_task": {
            task: round(
                max(
                    (a.scores[0] for (t, _), a in answers.items() if t == task and a.scores),
                    default=-1.0,
                ),
                3,
            )
            for task in order
        },
    }
    print(
        json.dumps(
            {k: v for k, v in report.items() if k not in ("folds", "nearest_by_task")}, indent=2
        )
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
