"""Which examples are sent: a seeded sample of each task, the same for every mode."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from retrieval.sources import Task, TaskSource
from serve.evaluation.console import warn


@dataclass(frozen=True, slots=True)
class Item:
    """One example to send: `index` is its position in the task, for the predictions file."""

    task: str
    definition: str
    index: int
    input: str
    targets: tuple[str, ...]


def sample_items(task: Task, limit: int, seed: int) -> list[Item]:
    """A fixed sample of `limit` examples (all of them when `limit` <= 0 or the task is
    smaller), in task order.

    The generator is seeded from (seed, task name) alone, so the sample is the same for
    every mode, every run, and whatever other tasks are evaluated alongside it. Python
    seeds `random.Random` from a str through SHA-512, not `hash()`, so PYTHONHASHSEED
    does not change it.
    """
    usable = [i for i, ex in enumerate(task.examples) if ex.targets and ex.input.strip()]
    if 0 < limit < len(usable):
        usable = sorted(random.Random(f"{seed}:{task.name}").sample(usable, limit))
    return [
        Item(
            task=task.name,
            definition=task.definition,
            index=i,
            input=task.examples[i].input,
            targets=tuple(task.examples[i].targets),
        )
        for i in usable
    ]


def load_items(
    source: TaskSource, names: Sequence[str], limit: int, seed: int
) -> tuple[list[str], list[Item]]:
    """The sampled items, task by task in the order asked (the source may read them in
    another order); tasks without a usable example are dropped with a warning."""
    tasks = {task.name: task for task in source.tasks(names)}
    order: list[str] = []
    items: list[Item] = []
    for name in names:
        sampled = sample_items(tasks[name], limit, seed) if name in tasks else []
        if not sampled:
            warn(f"task {name!r} has no usable example; skipped")
            continue
        order.append(name)
        items.extend(sampled)
    return order, items


def default_task_source(bigbench: Path | None, home: Path) -> TaskSource:
    """BIG-bench from `bigbench` (the sdist or a checkout), else the cached sdist."""
    from retrieval.sources import open_bigbench
    from serve.defaults import bigbench_cache

    return open_bigbench(bigbench, bigbench_cache(home))
