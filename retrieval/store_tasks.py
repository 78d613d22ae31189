"""The demonstration store's in-memory map of tasks over seq space.

Searches filter by task inside FAISS through a boolean mask over seqs, so the store keeps
every live seq's task number in an array, with per-task counts, instead of asking the
database on every search.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

import numpy as np

# Exclusion masks cached at once: each takes a byte per seq, so the cache is bounded.
_MAX_CACHED_MASKS = 16


class TaskMap:
    """Task numbers and names, the task of every live seq, and counts per task.

    Not thread-safe for writes: the store calls add() and remove() under the write side
    of its readers-writer lock, and reads under the read side. The mask cache has a lock
    of its own, since concurrent searches fill it.
    """

    def __init__(self) -> None:
        # seq -> task_no (-1: no such row). Grown by doubling.
        self._task_of_seq = np.full(1024, -1, dtype=np.int64)
        self.max_seq = 0  # The highest seq added; removals do not lower it.
        self.alive = 0  # Live seqs.
        self._names: dict[int, str] = {}
        self._nos: dict[str, int] = {}
        self._counts: dict[int, int] = {}
        self._masks: dict[frozenset[int], tuple[np.ndarray, int]] = {}
        self._masks_lock = threading.Lock()

    def add(self, seqs: np.ndarray, task_nos: np.ndarray, names: Mapping[int, str]) -> None:
        """Record new rows; `names` maps (at least) their task numbers to task names."""
        for no, name in names.items():
            self._names[no] = name
            self._nos[name] = no
        if not len(seqs):
            return
        top = int(seqs.max())
        if top >= len(self._task_of_seq):
            grown = np.full(max(top + 1, 2 * len(self._task_of_seq)), -1, dtype=np.int64)
            grown[: len(self._task_of_seq)] = self._task_of_seq
            self._task_of_seq = grown
        self._task_of_seq[seqs] = task_nos
        self.max_seq = max(self.max_seq, top)
        for no, n in zip(*np.unique(task_nos, return_counts=True), strict=True):
            self._counts[int(no)] = self._counts.get(int(no), 0) + int(n)
        self.alive += len(seqs)
        self._masks.clear()

    def remove(self, seqs: np.ndarray) -> None:
        if not len(seqs):
            return
        task_nos = self._task_of_seq[seqs]
        self._task_of_seq[seqs] = -1
        for no, n in zip(*np.unique(task_nos, return_counts=True), strict=True):
            self._counts[int(no)] -= int(n)
        self.alive -= len(seqs)
        self._masks.clear()

    def numbers(self, names: Iterable[str]) -> frozenset[int]:
        """The task numbers of those of `names` that ever had a demonstration."""
        return frozenset(self._nos[t] for t in names if t in self._nos)

    def counts(self) -> dict[str, int]:
        """Demonstrations per task name, for tasks that have any."""
        return {self._names[no]: n for no, n in self._counts.items() if n > 0}

    def allowed(self, excluded: frozenset[int], entries: int) -> tuple[np.ndarray | None, int]:
        """Boolean mask over seq space of what a search may return, and its count, for an
        index holding `entries` entries.

        None when nothing needs filtering (no exclusions, no dead HNSW entries): FAISS
        then runs without a selector. Masks are cached per exclusion set until the next
        write, since clients such as the evaluator repeat the same exclusions.
        """
        if not excluded and entries == self.alive:
            return None, self.alive
        with self._masks_lock:
            cached = self._masks.get(excluded)
        if cached is not None:
            return cached
        # Lookup table over task numbers, shifted by one so that -1 (no row) is denied.
        size = max(self._names, default=0) + 2
        lut = np.ones(size, dtype=bool)
        lut[0] = False
        lut[np.fromiter(excluded, dtype=np.int64, count=len(excluded)) + 1] = False
        mask = lut[self._task_of_seq[: self.max_seq + 1] + 1]
        n_allowed = self.alive - sum(self._counts.get(no, 0) for no in excluded)
        with self._masks_lock:
            if len(self._masks) >= _MAX_CACHED_MASKS:
                self._masks.clear()
            self._masks[excluded] = (mask, n_allowed)
        return mask, n_allowed
