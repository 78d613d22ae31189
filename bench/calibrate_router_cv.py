"""Choose the routing rule by leave-groups-out cross-validation on the seen tasks, never by
the dev or confirm tasks.

Protocol (the router's own fitting data is held out; the library is not retrained per
fold). The seen tasks are dealt into `--folds` folds by the library's specialist groups
(`folds_of`, as bench/calibrate_demo_gate.py). For an example of a task in fold f, every
specialist trained on any task of fold f is dropped, so the task is unseen to the
specialists that remain, as a new task is; the rules are fitted on the other folds'
examples and scored on fold f's. The generalist was trained on every seen task: it stays
(it is what a rule falls back to), and its leak is measured, not hidden: the record keeps
its margin over the base on these held-out examples, to set beside its margin on the dev
and confirm tasks (`crosstask eval --modes zero_chat,generalist`).

Each example is the held-out part of its task's split (`routing.training.data.split_task`,
never trained on), asked greedily in chat form (eval's `adapter` mode) under every option
a rule may pick:
  base        the model alone
  generalist  the generalist alone
  s1, s2      the nearest and second-nearest allowed specialist (prototype cosine)
  fuse        the generalist and s1, logits fused at every step, 0.5 / 0.5
  gen_demos   the generalist with --k demonstrations chosen by the task definition (scope
              task, the fold's tasks excluded from retrieval, gate open); the nearest
              one's score is recorded
All but gen_demos without demonstrations. The rules, replayed from those answers:
  generalist  always the generalist (the reference)
  demo_gate   gen_demos when the nearest demonstration scores >= t, else the generalist
              (the demonstration gate under the generalist); t fitted
  centroid    today's rule: s1 when its similarity >= t and it leads s2 by >= m, else the
              generalist; (t, m) fitted on a grid
  fuse_near   fuse when s1's similarity >= t, else the generalist; t fitted
  learned     ridge regressions from the query embedding, the similarities and the nearest
              demonstration's score to each
              option's gain over the generalist; the best predicted option when its gain
              is > 0, else the generalist (the small learned router of "Learning to Route
              Among Specialized Experts"); the ridge penalty fitted on a grid
  oracle      the best option per example (a ceiling, not a rule)

    .venv/bin/crosstask serve --port 8123 --adapters routing/library &
    .venv/bin/python bench/calibrate_router_cv.py --base-url http://127.0.0.1:8123 \\
        [--per-task 3] [--folds 5] [--out bench/calibration/router_seen_cv.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calibrate_demo_gate import ask, folds_of, macro
from openai import AsyncOpenAI

from retrieval.build import usable_examples
from retrieval.embedder import Embedder
from retrieval.query import query_text
from routing.adapter_meta import AdapterMeta, read_meta
from routing.router import similarity
from routing.training.data import split_task
from routing.training.recipe import RECIPE_FILE, read_recipe
from serve.evaluation.items import Item, default_task_source
from serve.evaluation.modes import GENERALIST_ADAPTER, chat_messages

REPO = Path(__file__).resolve().parent.parent
OPTIONS = ("base", "generalist", "s1", "s2", "fuse", "gen_demos")
THRESHOLDS = [round(0.2 + 0.05 * i, 2) for i in range(14)] + [2.0]  # 2.0: never
MARGINS = [0.0, 0.02, 0.05, 0.1]
PENALTIES = [1.0, 10.0, 100.0, 1000.0]


@dataclass
class Example:
    task: str
    index: int
    fold: int
    vector: np.ndarray  # the query embedding the router compares
    sims: list[float]  # s1, s2 (allowed specialists), generalist
    demo_score: float  # the nearest demonstration's score under gen_demos (-1: none)
    names: list[str]  # s1, s2
    scores: dict[str, float]  # option -> ROUGE-L


def held_out_items(names: Sequence[str], adapters: Path, per_task: int) -> list[Item]:
    recipe = read_recipe(adapters / RECIPE_FILE)
    tasks = {t.name: t for t in default_task_source(None).tasks(list(names))}
    items = []
    for name in names:
        if name not in tasks:
            continue
        task = tasks[name]
        usable = usable_examples(task)
        split = split_task(task, recipe.data.seed, recipe.data.holdout_per_task)
        for i in split.held_out[:per_task]:
            ex = usable[i]
            targets = tuple(ex.targets or [ex.output])
            items.append(Item(name, task.definition, i, ex.input, targets))
    return items


def extensions(names: list[str], held: list[str], k: int) -> dict[str, dict[str, Any]]:
    """Each option's `crosstask` extension."""
    s1, s2 = names
    none = {"k": 0}
    generalist = {"mode": "adapter", "adapters": [GENERALIST_ADAPTER]}
    return {
        "base": {"demonstrations": none, "routing": {"mode": "off"}},
        "generalist": {"demonstrations": none, "routing": generalist},
        "s1": {"demonstrations": none, "routing": {"mode": "adapter", "adapters": [s1]}},
        "s2": {"demonstrations": none, "routing": {"mode": "adapter", "adapters": [s2]}},
        "fuse": {
            "demonstrations": none,
            "routing": {
                "mode": "fuse",
                "adapters": [GENERALIST_ADAPTER, s1],
                "weights": [0.5, 0.5],
            },
        },
        "gen_demos": {
            "demonstrations": {"k": k, "min_score": 0.0, "scope": "task"},
            "routing": generalist,
            # Explicitly named adapters are served whatever is excluded; retrieval is not.
            "exclude_tasks": held,
        },
    }


async def collect(
    base_url: str,
    items: list[Item],
    fold_index: dict[str, int],
    folds: list[list[str]],
    metas: list[AdapterMeta],
    k: int,
    max_tokens: int,
    concurrency: int,
) -> list[Example]:
    embedder = Embedder()
    vectors = embedder.encode([query_text(it.definition, it.input) for it in items])
    specialists = [m for m in metas if m.kind == "specialist"]
    generalist = next(m for m in metas if m.name == GENERALIST_ADAPTER)
    client = AsyncOpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key="x", timeout=600)
    model = next(m.id for m in (await client.models.list()).data if m.id != "auto")
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def ask_one(item: Item, extension: dict[str, Any]) -> tuple[float, float]:
        async with gate:
            rouge, scores = await ask(client, model, item, extension, max_tokens, chat_messages)
        return rouge, max(scores, default=-1.0)

    async def one(item: Item, vector: np.ndarray) -> Example:
        nonlocal done
        fold = fold_index[item.task]
        held = set(folds[fold])
        allowed = sorted(
            ((similarity(vector, m), m.name) for m in specialists if not held & set(m.tasks)),
            reverse=True,
        )
        names = [allowed[0][1], allowed[1][1]]
        ways = extensions(names, sorted(held), k)
        results = await asyncio.gather(*(ask_one(item, ways[o]) for o in OPTIONS))
        done += 1
        if done % 50 == 0:
            print(f"{done}/{len(items)} examples", file=sys.stderr, flush=True)
        return Example(
            task=item.task,
            index=item.index,
            fold=fold,
            vector=vector,
            sims=[allowed[0][0], allowed[1][0], similarity(vector, generalist)],
            demo_score=results[OPTIONS.index("gen_demos")][1],
            names=names,
            scores={o: r[0] for o, r in zip(OPTIONS, results, strict=True)},
        )

    examples = await asyncio.gather(*(one(it, v) for it, v in zip(items, vectors, strict=True)))
    await client.close()
    return list(examples)


# A rule, once fitted, maps an example to the option it picks.
Rule = Callable[[Example], str]


def score(examples: Sequence[Example], rule: Rule) -> float:
    by_task: dict[str, list[float]] = defaultdict(list)
    for ex in examples:
        by_task[ex.task].append(ex.scores[rule(ex)])
    return macro(by_task)


def always(option: str) -> Rule:
    return lambda ex: option


def fit_generalist(_: Sequence[Example]) -> tuple[Rule, dict[str, Any]]:
    return always("generalist"), {}


def fit_centroid(train: Sequence[Example]) -> tuple[Rule, dict[str, Any]]:
    def rule_for(t: float, m: float) -> Rule:
        return lambda ex: "s1" if ex.sims[0] >= t and ex.sims[0] - ex.sims[1] >= m else "generalist"

    # Ties go to the higher threshold: fewer specialist calls, the generalist's behaviour.
    t, m = max(
        ((t, m) for t in reversed(THRESHOLDS) for m in reversed(MARGINS)),
        key=lambda p: score(train, rule_for(*p)),
    )
    return rule_for(t, m), {"single_min": t, "single_margin": m}


def fit_fuse_near(train: Sequence[Example]) -> tuple[Rule, dict[str, Any]]:
    def rule_for(t: float) -> Rule:
        return lambda ex: "fuse" if ex.sims[0] >= t else "generalist"

    t = max(reversed(THRESHOLDS), key=lambda t: score(train, rule_for(t)))
    return rule_for(t), {"min_similarity": t}


def fit_demo_gate(train: Sequence[Example]) -> tuple[Rule, dict[str, Any]]:
    def rule_for(t: float) -> Rule:
        return lambda ex: "gen_demos" if ex.demo_score >= t else "generalist"

    t = max(reversed(THRESHOLDS), key=lambda t: score(train, rule_for(t)))
    return rule_for(t), {"min_score": t}


def features(ex: Example) -> np.ndarray:
    s1, s2, g = ex.sims
    extra = [s1, s2, s1 - s2, g, ex.demo_score, 1.0]
    return np.concatenate([ex.vector, extra]).astype(np.float64)


def ridge(x: np.ndarray, y: np.ndarray, penalty: float) -> np.ndarray:
    eye = np.eye(x.shape[1])
    eye[-1, -1] = 0.0  # the intercept is not shrunk
    return np.asarray(np.linalg.solve(x.T @ x + penalty * eye, x.T @ y))


def fit_learned(train: Sequence[Example]) -> tuple[Rule, dict[str, Any]]:
    others = [o for o in OPTIONS if o != "generalist"]

    def fitted(rows: Sequence[Example], penalty: float) -> Rule:
        x = np.stack([features(ex) for ex in rows])
        y = np.array([[ex.scores[o] - ex.scores["generalist"] for o in others] for ex in rows])
        w = ridge(x, y, penalty)

        def rule(ex: Example) -> str:
            gains = features(ex) @ w
            best = int(np.argmax(gains))
            return others[best] if gains[best] > 0 else "generalist"

        return rule

    # The penalty by an inner split of the training folds, whole folds at a time.
    folds = sorted({ex.fold for ex in train})

    def inner(penalty: float) -> float:
        total = 0.0
        for f in folds:
            fit_rows = [ex for ex in train if ex.fold != f]
            total += score([ex for ex in train if ex.fold == f], fitted(fit_rows, penalty))
        return total

    penalty = max(reversed(PENALTIES), key=inner) if len(folds) > 1 else PENALTIES[-1]
    return fitted(train, penalty), {"penalty": penalty}


def oracle(_: Sequence[Example]) -> tuple[Rule, dict[str, Any]]:
    return (lambda ex: max(OPTIONS, key=lambda o: ex.scores[o])), {}


RULES: dict[str, Callable[[Sequence[Example]], tuple[Rule, dict[str, Any]]]] = {
    "generalist": fit_generalist,
    "centroid": fit_centroid,
    "fuse_near": fit_fuse_near,
    "demo_gate": fit_demo_gate,
    "learned": fit_learned,
    "oracle": oracle,
}


def cross_validate(examples: list[Example], n_folds: int) -> dict[str, Any]:
    per_fold = []
    for f in range(n_folds):
        test = [ex for ex in examples if ex.fold == f]
        train = [ex for ex in examples if ex.fold != f]
        if not test:
            continue
        entry: dict[str, Any] = {"fold": f, "tasks": len({ex.task for ex in test})}
        for name, fit in RULES.items():
            rule, params = fit(train)
            picks: dict[str, int] = defaultdict(int)
            for ex in test:
                picks[rule(ex)] += 1
            entry[name] = {"rouge_l": round(score(test, rule), 2), "fitted": params}
            entry[name]["picks"] = dict(picks)
        per_fold.append(entry)
    tasks = sum(e["tasks"] for e in per_fold)
    overall = {
        name: round(sum(e[name]["rouge_l"] * e["tasks"] for e in per_fold) / tasks, 2)
        for name in RULES
    }
    return {"folds": per_fold, "cross_validated": overall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--adapters", type=Path, default=REPO / "routing/library")
    parser.add_argument("--per-task", type=int, default=3, help="held-out examples per task")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--k", type=int, default=6, help="demonstrations under gen_demos")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--records", type=Path, help="reuse (or write) the answers here")
    parser.add_argument("--out", type=Path, default=REPO / "bench/calibration/router_seen_cv.json")
    args = parser.parse_args()

    recipe = read_recipe(args.adapters / RECIPE_FILE)
    names = list(recipe.tasks)
    folds = folds_of(names, args.folds, args.adapters / RECIPE_FILE)
    fold_index = {t: i for i, fold in enumerate(folds) for t in fold}
    metas = [
        read_meta(p)
        for p in sorted(args.adapters.iterdir())
        if p.is_dir() and (p / "crosstask_adapter.json").is_file()
    ]
    started = time.perf_counter()
    if args.records is not None and args.records.is_file():
        examples = [load_example(r) for r in json.loads(args.records.read_text())]
    else:
        items = held_out_items(names, args.adapters, args.per_task)
        examples = asyncio.run(
            collect(
                args.base_url,
                items,
                fold_index,
                folds,
                metas,
                args.k,
                args.max_tokens,
                args.concurrency,
            )
        )
        if args.records is not None:
            args.records.write_text(json.dumps([dump_example(ex) for ex in examples]))
    seconds = time.perf_counter() - started
    cv = cross_validate(examples, len(folds))
    base = score(examples, always("base"))
    general = score(examples, always("generalist"))
    rules = {k: v for k, v in cv["cross_validated"].items() if k != "oracle"}
    chosen = max(rules, key=lambda k: (rules[k], k == "generalist"))
    report = {
        "command": "bench/calibrate_router_cv.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "library": str(args.adapters),
        "tasks": len({ex.task for ex in examples}),
        "examples": len(examples),
        "seconds": round(seconds, 1),
        "folds": [sorted(f) for f in folds],
        **cv,
        "chosen": chosen,
        # The settings each rule takes when fitted on every fold: the default's.
        "fitted_on_all_folds": {
            name: {"rouge_l": round(score(examples, rule), 2), "fitted": params}
            for name, (rule, params) in ((n, fit(examples)) for n, fit in RULES.items())
        },
        # The generalist saw these tasks (not these examples) in training.
        "generalist_leak": {
            "base_rouge_l": round(base, 2),
            "generalist_rouge_l": round(general, 2),
            "generalist_minus_base": round(general - base, 2),
        },
        "option_means": {o: round(score(examples, always(o)), 2) for o in OPTIONS},
    }
    print(json.dumps({k: v for k, v in report.items() if k not in ("folds",)}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def dump_example(ex: Example) -> dict[str, Any]:
    return {
        "task": ex.task,
        "index": ex.index,
        "fold": ex.fold,
        "vector": [round(float(v), 6) for v in ex.vector],
        "sims": [round(s, 5) for s in ex.sims],
        "demo_score": round(ex.demo_score, 5),
        "names": ex.names,
        "scores": {k: round(v, 3) for k, v in ex.scores.items()},
    }


def load_example(raw: dict[str, Any]) -> Example:
    return Example(
        task=raw["task"],
        index=raw["index"],
        fold=raw["fold"],
        vector=np.asarray(raw["vector"], dtype=np.float32),
        sims=raw["sims"],
        demo_score=raw["demo_score"],
        names=raw["names"],
        scores=raw["scores"],
    )


if __name__ == "__main__":
    raise SystemExit(main())
