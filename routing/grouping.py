"""Grouping tasks for specialists, by measurement: spherical k-means on each task's mean
query embedding (queries embedded exactly as requests are, so tasks that requests would
confuse end up under one specialist).

Numpy only, seeded, with several restarts: the same inputs give the same groups on any
machine with the same embeddings. The chosen grouping is recorded in the library's
recipe, so a rebuild elsewhere trains the same groups even if its embeddings differ in
the last bits.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

METHOD = "spherical-kmeans on L2-normalized mean query embeddings per task"
DEFAULT_RESTARTS = 16
DEFAULT_ITERATIONS = 100
DEFAULT_MIN_TASKS = 3
# Words in task names that say nothing about what a group is about.
_NAME_STOPWORDS = frozenset(
    {
        *("natural", "instructions", "subtask", "task", "generation", "answer", "answers"),
        *("question", "questions", "identifying", "identify", "the", "of", "to", "and"),
        *("or", "for", "with", "full", "one", "two", "three", "based", "write", "correct"),
        *("incorrect", "wrong"),
    }
)


@dataclass(frozen=True)
class KMeansResult:
    assignment: np.ndarray  # (n,) cluster index of each row
    centroids: np.ndarray  # (k, dim), unit rows
    counts: list[int]
    inertia: float  # sum over rows of (1 - cosine to its centroid)


@dataclass(frozen=True)
class Group:
    name: str
    tasks: list[str]


@dataclass(frozen=True)
class Grouping:
    method: str
    seed: int
    restarts: int
    inertia: float
    groups: list[Group] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "method": self.method,
            "seed": self.seed,
            "restarts": self.restarts,
            "inertia": round(self.inertia, 6),
            "groups": [{"name": g.name, "tasks": list(g.tasks)} for g in self.groups],
        }


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("cannot normalize a zero vector")
    return x / norms


def spherical_kmeans(
    vectors: np.ndarray,
    k: int,
    seed: int,
    restarts: int = DEFAULT_RESTARTS,
    iterations: int = DEFAULT_ITERATIONS,
) -> KMeansResult:
    """k clusters of the rows of `vectors` by cosine similarity; the best of `restarts`
    k-means++ starts drawn from one seeded generator (so: deterministic)."""
    x = normalize_rows(vectors)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of vectors ({n}), not {k}")
    rng = np.random.default_rng(seed)
    best: KMeansResult | None = None
    for _ in range(max(1, restarts)):
        result = _kmeans_once(x, k, rng, iterations)
        # Strictly better only: ties keep the earlier start, so the order of starts
        # (fixed by the seed) decides, not floating-point noise between equal optima.
        if best is None or result.inertia < best.inertia - 1e-9:
            best = result
    assert best is not None
    return best


def _kmeans_once(x: np.ndarray, k: int, rng: np.random.Generator, iterations: int) -> KMeansResult:
    n = len(x)
    # k-means++ seeding with cosine distance.
    chosen = [int(rng.integers(n))]
    distance = 1.0 - x @ x[chosen[0]]
    for _ in range(1, k):
        weights = np.clip(distance, 0.0, None)
        total = weights.sum()
        pick = int(rng.choice(n, p=weights / total)) if total > 0 else int(rng.integers(n))
        chosen.append(pick)
        distance = np.minimum(distance, 1.0 - x @ x[pick])
    centroids = x[chosen].copy()
    assignment = np.full(n, -1)
    for _ in range(iterations):
        similarity = x @ centroids.T
        new_assignment = similarity.argmax(axis=1)
        if np.array_equal(new_assignment, assignment):
            break
        assignment = new_assignment
        for c in range(k):
            members = x[assignment == c]
            if len(members) == 0:
                # An empty cluster takes the row worst served by its own centroid.
                worst = int((1.0 - similarity[np.arange(n), assignment]).argmax())
                centroids[c] = x[worst]
                assignment[worst] = c
            else:
                mean = members.sum(axis=0)
                centroids[c] = mean / np.linalg.norm(mean)
    similarity = x @ centroids.T
    assignment = similarity.argmax(axis=1)
    inertia = float((1.0 - similarity[np.arange(n), assignment]).sum())
    counts = [int((assignment == c).sum()) for c in range(k)]
    return KMeansResult(assignment, centroids, counts, inertia)


def task_means(task_of_row: Sequence[str], vectors: np.ndarray) -> dict[str, np.ndarray]:
    """Each task's normalized mean embedding, from rows labelled with their task."""
    if len(task_of_row) != len(vectors):
        raise ValueError("one task name per embedding row is needed")
    means: dict[str, np.ndarray] = {}
    for task in dict.fromkeys(task_of_row):
        rows = vectors[[i for i, t in enumerate(task_of_row) if t == task]]
        mean = rows.astype(np.float64).sum(axis=0)
        means[task] = mean / np.linalg.norm(mean)
    return means


def group_tasks(
    vectors_by_task: Mapping[str, np.ndarray],
    n_groups: int,
    seed: int,
    restarts: int = DEFAULT_RESTARTS,
    min_tasks: int = DEFAULT_MIN_TASKS,
) -> Grouping:
    """Cluster tasks by their mean query embedding into `n_groups` named groups.

    Tasks are taken in sorted order and groups are listed by their first task, so the
    result does not depend on the order the caller happened to build the mapping in.
    A cluster of fewer than `min_tasks` tasks (an outlier task or two) would make a
    specialist of a handful of examples that only its own task routes to: its tasks join
    the nearest remaining cluster instead, so there may be fewer than `n_groups` groups.
    """
    names = sorted(vectors_by_task)
    if not names:
        raise ValueError("no tasks to group")
    matrix = np.stack([np.asarray(vectors_by_task[n], dtype=np.float64) for n in names])
    result = spherical_kmeans(matrix, min(n_groups, len(names)), seed, restarts)
    assignment = _fold_small_clusters(matrix, result, min_tasks)
    members = [
        [n for n, c in zip(names, assignment, strict=True) if c == cluster]
        for cluster in range(len(result.counts))
    ]
    members = sorted((m for m in members if m), key=lambda m: m[0])
    groups = group_names(members)
    return Grouping(
        method=METHOD,
        seed=seed,
        restarts=restarts,
        inertia=result.inertia,
        groups=[Group(name, tasks) for name, tasks in zip(groups, members, strict=True)],
    )


def _fold_small_clusters(matrix: np.ndarray, result: KMeansResult, min_tasks: int) -> np.ndarray:
    """The assignment with every row of a too-small cluster moved to the nearest centroid
    among the clusters that are big enough (unchanged when none is)."""
    counts = np.asarray(result.counts)
    kept = np.flatnonzero(counts >= min_tasks)
    if len(kept) == 0 or len(kept) == len(counts):
        return result.assignment
    assignment = result.assignment.copy()
    for row in np.flatnonzero(counts[assignment] < min_tasks):
        similarities = result.centroids[kept] @ matrix[row]
        assignment[row] = kept[int(np.argmax(similarities))]
    return assignment


def group_names(members: Sequence[Sequence[str]]) -> list[str]:
    """`spec-<i>-<word>`: the word of the group's task names that is both common in the
    group and rare elsewhere (count in group x share of all its uses), e.g. `mctaco`;
    a word already naming an earlier group is not reused."""
    words_of = [_name_words(tasks) for tasks in members]
    total: Counter[str] = Counter()
    for words in words_of:
        total.update(words)
    names: list[str] = []
    used: set[str] = set()
    for i, words in enumerate(words_of):
        ranked = sorted(
            (w for w in words if w not in used),
            key=lambda w: (-(words[w] * words[w] / total[w]), -words[w], w),
        )
        label = ranked[0] if ranked else "tasks"
        used.add(label)
        names.append(f"spec-{i}-{label}")
    return names


def _name_words(tasks: Sequence[str]) -> Counter[str]:
    """How many of the tasks' names contain each meaningful word."""
    words: Counter[str] = Counter()
    for task in tasks:
        parts = re.split(r"[^a-z]+", task.lower())
        words.update({w for w in parts if len(w) > 2 and w not in _NAME_STOPWORDS})
    return words
