from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.build import BuildProgress, build_store, sample_examples
from retrieval.query import QUERY_TEXT_VERSION, query_text
from retrieval.sources import BigBenchSource, Example, Task, UnknownTaskError
from retrieval.store import DemonstrationStore


class FakeSource:
    def __init__(self, tasks: list[Task]) -> None:
        self._tasks = {t.name: t for t in tasks}

    def check_names(self, names: Iterable[str]) -> None:
        unknown = [n for n in names if n not in self._tasks]
        if unknown:
            raise UnknownTaskError(f"unknown: {unknown}")

    def tasks(self, names: Sequence[str]) -> Iterator[Task]:
        self.check_names(names)
        for name in dict.fromkeys(names):
            yield self._tasks[name]


class HashEncoder:
    """Deterministic stand-in for the embedder: a unit vector from the text's hash."""

    dim = 8
    name = "hash-encoder"

    def __init__(self) -> None:
        self.texts: list[str] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.texts += texts
        rows = [
            np.frombuffer(hashlib.sha256(t.encode()).digest()[:32], dtype=np.uint8)[: self.dim]
            for t in texts
        ]
        v = np.array(rows, dtype=np.float32) + 1.0
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_task(name: str, n: int) -> Task:
    return Task(
        name=name,
        definition=f"Definition of {name}.",
        examples=[
            Example(f"{name} question {i}", f"answer {i}", [f"answer {i}"]) for i in range(n)
        ],
    )


@pytest.fixture
def source() -> FakeSource:
    return FakeSource([make_task("alpha", 30), make_task("beta", 5), make_task("gamma/sub", 12)])


def test_builds_every_task_with_per_task_cap(tmp_path: Path, source: FakeSource) -> None:
    encoder = HashEncoder()
    events: list[BuildProgress] = []
    report = build_store(
        tmp_path / "store", source, ["alpha", "beta", "gamma/sub"], encoder, 10,
        progress=events.append, chunk=7,
    )  # fmt: skip
    assert (report.tasks, report.examples, report.skipped_examples) == (3, 25, 0)
    assert [e.tasks_done for e in events] == [1, 2, 3]
    assert events[-1].tasks_total == 3
    assert events[-1].examples_per_s >= 0
    with DemonstrationStore.open(tmp_path / "store", encoder.dim, read_only=True) as store:
        assert store.task_counts() == {"alpha": 10, "beta": 5, "gamma/sub": 10}
        meta = store.metadata()
    assert meta["embedder"] == "hash-encoder"
    assert meta["query_text_version"] == str(QUERY_TEXT_VERSION)
    assert meta["tasks"].split("\n") == ["alpha", "beta", "gamma/sub"]
    # What was embedded is the query text the server will embed for a request.
    assert query_text("Definition of beta.", "beta question 0") in encoder.texts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # No temp folder left.


def test_sampling_is_deterministic_and_seeded() -> None:
    task = make_task("alpha", 100)
    first = sample_examples(task, 10, seed=0)
    assert first == sample_examples(task, 10, seed=0)
    assert first != sample_examples(task, 10, seed=1)
    assert sample_examples(task, None, seed=0) == task.examples
    assert sample_examples(make_task("beta", 3), 10, seed=0) == make_task("beta", 3).examples


def test_duplicates_and_unusable_examples_are_skipped(tmp_path: Path) -> None:
    task = make_task("alpha", 3)
    task.examples += [task.examples[0], Example("x" * 40_000, "too long input", ["a"])]
    report = build_store(tmp_path / "s", FakeSource([task]), ["alpha"], HashEncoder(), None)
    assert (report.examples, report.skipped_examples) == (3, 2)


def test_excluded_tasks_are_left_out(tmp_path: Path, source: FakeSource) -> None:
    report = build_store(
        tmp_path / "s", source, ["alpha", "beta"], HashEncoder(), None, exclude_tasks=["alpha"]
    )
    assert report.tasks == 1
    with DemonstrationStore.open(tmp_path / "s", HashEncoder.dim, read_only=True) as store:
        assert store.tasks() == ["beta"]


def test_unknown_task_fails_before_any_work(tmp_path: Path, source: FakeSource) -> None:
    with pytest.raises(UnknownTaskError):
        build_store(tmp_path / "s", source, ["alpha", "nope"], HashEncoder(), None)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path: Path, source: FakeSource) -> None:
    out = tmp_path / "s"
    build_store(out, source, ["beta"], HashEncoder(), None)
    with pytest.raises(FileExistsError):
        build_store(out, source, ["alpha"], HashEncoder(), None)
    build_store(out, source, ["alpha"], HashEncoder(), 4, overwrite=True)
    with DemonstrationStore.open(out, HashEncoder.dim, read_only=True) as store:
        assert store.task_counts() == {"alpha": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_a_failed_build_leaves_nothing(tmp_path: Path, source: FakeSource) -> None:
    class Broken(HashEncoder):
        def encode(self, texts: Sequence[str]) -> np.ndarray:
            raise RuntimeError("encoder died")

    out = tmp_path / "s"
    build_store(out, source, ["beta"], HashEncoder(), None)
    with pytest.raises(RuntimeError, match="encoder died"):
        build_store(out, source, ["alpha"], Broken(), None, overwrite=True)
    with DemonstrationStore.open(out, HashEncoder.dim, read_only=True) as store:
        assert store.tasks() == ["beta"]  # The old store is untouched.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_end_to_end_with_the_real_embedder(tmp_path: Path, fake_sdist: Path, embedder: Any) -> None:
    src = BigBenchSource(fake_sdist)
    names = [
        "object_counting",
        "date_understanding",
        "natural_instructions/subtask046_miscellaenous_question_typing",
    ]
    report = build_store(tmp_path / "s", src, names, embedder, None)
    assert report.examples == 6
    with DemonstrationStore.open(tmp_path / "s", embedder.dim, read_only=True) as store:
        query = embedder.encode_one(
            query_text("Count the objects.", "I have a piano and two drums. How many?")
        )
        hits = store.search(query, 2)
        assert hits[0].task == "object_counting"
        others = store.search(query, 2, exclude_tasks=["object_counting"])
        assert len(others) == 2 and all(h.task != "object_counting" for h in others)


def test_a_built_store_is_one_self_contained_file(tmp_path: Path) -> None:
    """No write-ahead log beside the database and rollback mode: a reader that cannot
    write the folder (an image's baked store, a read-only mount) opens it as it is."""
    import sqlite3

    from retrieval.store import DB_FILE

    task = Task(
        "alpha", "Say it.", [Example(f"in {i}", f"out {i}", [f"out {i}"]) for i in range(5)]
    )
    build_store(tmp_path / "s", FakeSource([task]), ["alpha"], HashEncoder(), None)
    assert not (tmp_path / "s" / f"{DB_FILE}-wal").exists()
    conn = sqlite3.connect(f"{(tmp_path / 's' / DB_FILE).as_uri()}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    finally:
        conn.close()
