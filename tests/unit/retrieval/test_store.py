from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval import store as store_mod
from retrieval import store_limits
from retrieval.store import DB_FILE, INDEX_FILE, DemonstrationStore
from retrieval.store_types import NewDemo, StoreError, ValidationError

DIM = 16
Vectors = Callable[..., np.ndarray]


def demos(n: int, task: str = "t", start: int = 0) -> list[NewDemo]:
    return [
        NewDemo(task=task, input=f"{task} input {i}", output=f"out {i}", definition=f"def {task}")
        for i in range(start, start + n)
    ]


def rows_in_db(path: Path) -> int:
    with sqlite3.connect(path / DB_FILE) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM demos").fetchone()[0])


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    return list(np.argsort(-(vectors @ query), kind="stable")[:k])


@pytest.fixture(params=["flat", "ivf", "hnsw"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ----------------------------------------------------------------------------- basics


def test_add_search_get_count(tmp_path: Path, unit_vectors: Vectors, kind: str) -> None:
    vectors = unit_vectors(60, DIM)
    with DemonstrationStore.open(tmp_path, DIM, kind) as store:
        assert store.index_kind == kind
        ids = store.add(demos(30, "a") + demos(30, "b"), vectors)
        assert len(set(ids)) == 60
        assert store.count() == 60
        assert store.tasks() == ["a", "b"]
        assert store.task_counts() == {"a": 30, "b": 30}
        hits = store.search(vectors[7], 5, min_score=-1.0)
        assert hits[0].id == ids[7]
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert (hits[0].task, hits[0].input, hits[0].output) == ("a", "a input 7", "out 7")
        assert hits[0].definition == "def a"
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert [d.id for d in store.get([ids[3], "nope", ids[40]])] == [ids[3], ids[40]]


def test_flat_search_is_exact(tmp_path: Path, unit_vectors: Vectors) -> None:
    vectors = unit_vectors(500, DIM)
    query = unit_vectors(1, DIM, seed=9)[0]
    with DemonstrationStore.open(tmp_path, DIM, "flat") as store:
        ids = store.add(demos(500), vectors)
        hits = store.search(query, 10, min_score=-1.0)
    assert [h.id for h in hits] == [ids[i] for i in brute_force(vectors, query, 10)]


def test_k_zero_and_empty_store(tmp_path: Path, unit_vectors: Vectors) -> None:
    with DemonstrationStore.open(tmp_path, DIM) as store:
        assert store.search(unit_vectors(1, DIM)[0], 5) == []
        store.add(demos(3), unit_vectors(3, DIM))
        assert store.search(unit_vectors(1, DIM)[0], 0) == []
        assert len(store.search(unit_vectors(1, DIM)[0], 50, min_score=-1)) == 3


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "bad",
    [
        NewDemo(task="t", input="x", output=""),
        NewDemo(task="t", input="x", output="   "),
        NewDemo(task="t", input="", output="y"),
        NewDemo(task="", input="x", output="y"),
        NewDemo(task="t", input="x" * (store_limits.MAX_INPUT_CHARS + 1), output="y"),
        NewDemo(task="t", input="x", output="y", definition="d" * 20_000),
        NewDemo(task="t", input="x\x00", output="y"),
        NewDemo(task="t", input="x", output=None),  # type: ignore[arg-type]
    ],
)
def test_a_bad_record_writes_nothing(tmp_path: Path, unit_vectors: Vectors, bad: NewDemo) -> None:
    with DemonstrationStore.open(tmp_path, DIM) as store:
        store.add(demos(2), unit_vectors(2, DIM))
        batch = [*demos(5, start=10), bad, *demos(5, start=20)]
        with pytest.raises(ValidationError):
            store.add(batch, unit_vectors(len(batch), DIM, seed=1))
        assert store.count() == 2
    assert rows_in_db(tmp_path) == 2


def test_bad_vectors_write_nothing(tmp_path: Path, unit_vectors: Vectors) -> None:
    with DemonstrationStore.open(tmp_path, DIM) as store:
        with pytest.raises(ValidationError, match="shape"):
            store.add(demos(3), unit_vectors(2, DIM))
        with pytest.raises(ValidationError, match="shape"):
            store.add(demos(3), unit_vectors(3, DIM + 1))
        not_unit = unit_vectors(3, DIM) * 2
        with pytest.raises(ValidationError, match="normalized"):
            store.add(demos(3), not_unit)
        nan = unit_vectors(3, DIM)
        nan[1, 0] = np.nan
        with pytest.raises(ValidationError, match="NaN"):
            store.add(demos(3), nan)
        assert store.count() == 0
    assert rows_in_db(tmp_path) == 0


def test_over_the_add_limit(
    tmp_path: Path, unit_vectors: Vectors, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_limits, "MAX_ADD", 4)
    with DemonstrationStore.open(tmp_path, DIM) as store:
        with pytest.raises(ValidationError, match="at most 4"):
            store.add(demos(5), unit_vectors(5, DIM))
        assert store.count() == 0


class _FailingConnection:
    """Wraps the writer connection and fails the demos insert, mid-transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def executemany(self, sql: str, params: Any) -> Any:
        if sql.startswith("INSERT INTO demos"):
            # Let the first rows in, so the rollback has something to undo.
            self._conn.executemany(sql, list(params)[:3])
            raise sqlite3.OperationalError("disk I/O error (simulated)")
        return self._conn.executemany(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_a_failing_commit_writes_nothing(tmp_path: Path, unit_vectors: Vectors) -> None:
    with DemonstrationStore.open(tmp_path, DIM) as store:
        store.add(demos(2), unit_vectors(2, DIM))
        real = store._db._writer
        assert real is not None
        store._db._writer = _FailingConnection(real)  # type: ignore[assignment]
        with pytest.raises(StoreError, match="simulated"):
            store.add(demos(10, "new", start=5), unit_vectors(10, DIM, seed=3))
        store._db._writer = real
        assert store.count() == 2
        assert store.tasks() == ["t"]
        ids = store.add(demos(1, "later"), unit_vectors(1, DIM, seed=4))
        assert store.get(ids)[0].task == "later"
    assert rows_in_db(tmp_path) == 3


def test_search_argument_checks(tmp_path: Path, unit_vectors: Vectors) -> None:
    q = unit_vectors(1, DIM)[0]
    with DemonstrationStore.open(tmp_path, DIM) as store:
        for bad_k in (-1, store_limits.MAX_K + 1, 2.5, True):
            with pytest.raises(ValidationError):
                store.search(q, bad_k)  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            store.search(np.zeros(DIM, np.float32), 3)
        with pytest.raises(ValidationError):
            store.search(unit_vectors(1, DIM + 1)[0], 3)
        with pytest.raises(ValidationError):
            store.search(q, 3, min_score=2.0)
        with pytest.raises(ValidationError):
            store.search(q, 3, exclude_tasks="t")
        # Unnormalized queries are fine: cosine is what is compared.
        store.add(demos(1), q[None, :])
        assert store.search(q * 5, 1)[0].score == pytest.approx(1.0, abs=1e-4)


def test_open_argument_checks(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        DemonstrationStore.open(tmp_path, DIM, "pq")
    with pytest.raises(ValidationError):
        DemonstrationStore.open(tmp_path, 0)


# ----------------------------------------------------------------------------- filtering


def _clustered(unit_vectors: Vectors, near: int, far: int) -> tuple[np.ndarray, np.ndarray]:
    """`near` vectors close to a query, then `far` random ones."""
    query = unit_vectors(1, DIM, seed=42)[0]
    noise = unit_vectors(near, DIM, seed=43) * 0.1
    close = query + noise
    close /= np.linalg.norm(close, axis=1, keepdims=True)
    return query, np.vstack([close, unit_vectors(far, DIM, seed=44)])


def test_exclusion_still_returns_k_hits(tmp_path: Path, unit_vectors: Vectors, kind: str) -> None:
    query, vectors = _clustered(unit_vectors, near=50, far=300)
    records = demos(50, "hot") + demos(150, "b") + demos(150, "c")
    with DemonstrationStore.open(tmp_path, DIM, kind) as store:
        ids = store.add(records, vectors)
        assert {h.task for h in store.search(query, 5)} == {"hot"}
        hits = store.search(query, 5, min_score=-1.0, exclude_tasks=["hot", "unknown"])
    assert len(hits) == 5
    assert all(h.task != "hot" for h in hits)
    expected = [ids[50 + i] for i in brute_force(vectors[50:], query, 5)]
    assert [h.id for h in hits] == expected


@pytest.mark.parametrize("approx", ["ivf", "hnsw"])
def test_restrictive_filter_falls_back_to_exact(
    tmp_path: Path, unit_vectors: Vectors, approx: str
) -> None:
    # 4,000 neighbours from the excluded task, 8 allowed rows far away: neither the
    # probed IVF lists nor an HNSW over-fetch reach them; the exact fallback must.
    query, vectors = _clustered(unit_vectors, near=4000, far=8)
    with DemonstrationStore.open(tmp_path, DIM, approx) as store:
        ids = store.add(demos(4000, "hot") + demos(8, "rare"), vectors)
        if approx == "ivf":
            assert store._index.nlist > 8  # Probing is partial, so the fallback is real.
        hits = store.search(query, 10, min_score=-1.0, exclude_tasks=["hot"])
    assert sorted(h.id for h in hits) == sorted(ids[4000:])


def test_ivf_retrains_as_the_store_grows(tmp_path: Path, unit_vectors: Vectors) -> None:
    vectors = unit_vectors(2000, DIM)
    with DemonstrationStore.open(tmp_path, DIM, "ivf") as store:
        ids = store.add(demos(100), vectors[:100])
        small = store._index.nlist
        ids += store.add(demos(1900, start=100), vectors[100:])
        assert store._index.nlist >= 4 * small
        assert store.search(vectors[1500], 1)[0].id == ids[1500]


def test_empty_ivf_store_reopens(tmp_path: Path, unit_vectors: Vectors) -> None:
    with DemonstrationStore.open(tmp_path, DIM, "ivf") as store:
        assert store.search(unit_vectors(1, DIM)[0], 3) == []
    with DemonstrationStore.open(tmp_path, DIM, "ivf") as store:
        ids = store.add(demos(3), unit_vectors(3, DIM))
        assert store.search(unit_vectors(3, DIM)[1], 1)[0].id == ids[1]


def test_excluding_everything(tmp_path: Path, unit_vectors: Vectors, kind: str) -> None:
    with DemonstrationStore.open(tmp_path, DIM, kind) as store:
        store.add(demos(5, "a") + demos(5, "b"), unit_vectors(10, DIM))
        assert store.search(unit_vectors(1, DIM)[0], 5, exclude_tasks=["a", "b"]) == []


def test_min_score(tmp_path: Path, unit_vectors: Vectors, kind: str) -> None:
    vectors = unit_vectors(200, DIM)
    query = unit_vectors(1, DIM, seed=5)[0]
    with DemonstrationStore.open(tmp_path, DIM, kind) as store:
        store.add(demos(200), vectors)
        assert len(store.search(query, 20, min_score=-1.0)) == 20
        hits = store.search(query, 20, min_score=0.5)
        assert all(h.score >= 0.5 for h in hits)
        assert len(hits) == int(np.sum(vectors @ query >= 0.5).clip(max=20))
        assert store.search(query, 20, min_score=1.0) == []


# ----------------------------------------------------------------------------- deletes


def test_delete_ids_and_task(tmp_path: Path, unit_vectors: Vectors, kind: str) -> None:
    vectors = unit_vectors(40, DIM)
    with DemonstrationStore.open(tmp_path, DIM, kind) as store:
        ids = store.add(demos(20, "a") + demos(20, "b"), vectors)
        assert store.delete_ids([ids[0], ids[0], "bogus", "d999999"]) == 1
        assert store.search(vectors[0], 1, min_score=-1)[0].id != ids[0]
        assert store.get([ids[0]]) == []
        assert store.delete_task("b") == 20
        assert store.delete_task("b") == 0
        assert store.count() == 19
        assert store.tasks() == ["a"]
        hits = store.search(vectors[25], 40, min_score=-1)
        assert len(hits) == 19 and {h.task for h in hits} == {"a"}
    with DemonstrationStore.open(tmp_path, DIM, kind) as store:
        assert store.count() == 19
        assert {h.task for h in store.search(vectors[25], 40, min_score=-1)} == {"a"}
        new = store.add(demos(1, "b"), vectors[25:26])
        assert store.search(vectors[25], 1)[0].id == new[0]
        assert new[0] not in ids  # Ids are never reused.


def test_hnsw_compacts_after_many_deletes(
    tmp_path: Path, unit_vectors: Vectors, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "REBUILD_MIN_DEAD", 10)
    vectors = unit_vectors(100, DIM)
    with DemonstrationStore.open(tmp_path, DIM, "hnsw") as store:
        ids = store.add(demos(100), vectors)
        store.delete_ids(ids[:5])
        assert store._index.ntotal == 100  # Masked, not yet removed.
        store.delete_ids(ids[5:30])
        assert store._index.ntotal == 70
        assert store.search(vectors[0], 1)[0].id not in ids[:30]


# ----------------------------------------------------------------------------- reopening


def _build(path: Path, unit_vectors: Vectors, kind: str = "flat") -> tuple[list[str], np.ndarray]:
    vectors = unit_vectors(120, DIM)
    with DemonstrationStore.open(path, DIM, kind) as store:
        ids = store.add(demos(60, "a") + demos(60, "b"), vectors)
    return ids, vectors


def _assert_intact(path: Path, ids: list[str], vectors: np.ndarray, kind: str = "flat") -> None:
    with DemonstrationStore.open(path, DIM, kind) as store:
        assert store.count() == len(ids)
        for i in (0, 59, 119):
            assert store.search(vectors[i], 1)[0].id == ids[i]
        assert store.search(vectors[0], 3, exclude_tasks=["a"])[0].task == "b"


def test_reopen_uses_the_index_file(
    tmp_path: Path, unit_vectors: Vectors, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, vectors = _build(tmp_path, unit_vectors)
    monkeypatch.setattr(
        DemonstrationStore, "_build_from_db", lambda *a: pytest.fail("index was rebuilt")
    )
    _assert_intact(tmp_path, ids, vectors)


def test_reopen_after_the_index_file_is_deleted(tmp_path: Path, unit_vectors: Vectors) -> None:
    ids, vectors = _build(tmp_path, unit_vectors)
    (tmp_path / INDEX_FILE).unlink()
    _assert_intact(tmp_path, ids, vectors)
    assert (tmp_path / INDEX_FILE).is_file()  # Rebuilt and persisted.


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_reopen_after_the_index_file_is_corrupted(
    tmp_path: Path, unit_vectors: Vectors, damage: str
) -> None:
    ids, vectors = _build(tmp_path, unit_vectors)
    path = tmp_path / INDEX_FILE
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "garbage":
        data = bytearray(b"\x00garbage" * 100)
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    _assert_intact(tmp_path, ids, vectors)


def test_reopen_with_a_stale_index_catches_up(
    tmp_path: Path, unit_vectors: Vectors, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, vectors = _build(tmp_path, unit_vectors, kind)
    old_index = (tmp_path / INDEX_FILE).read_bytes()
    more = unit_vectors(10, DIM, seed=7)
    with DemonstrationStore.open(tmp_path, DIM, kind) as store:
        new_ids = store.add(demos(10, "c"), more)
        store.delete_ids(ids[:5])
    (tmp_path / INDEX_FILE).write_bytes(old_index)  # As if the last persist never happened.
    monkeypatch.setattr(
        DemonstrationStore, "_build_from_db", lambda *a: pytest.fail("index was rebuilt")
    )
    with DemonstrationStore.open(tmp_path, DIM, kind) as store:
        assert store.count() == 125
        assert store.search(more[3], 1)[0].id == new_ids[3]
        assert ids[0] not in {h.id for h in store.search(vectors[0], 10, min_score=-1)}


def test_an_index_from_another_store_is_rebuilt(tmp_path: Path, unit_vectors: Vectors) -> None:
    ids, vectors = _build(tmp_path / "one", unit_vectors)
    _build(tmp_path / "two", lambda n, d, seed=0: unit_vectors(n, d, seed + 100))
    (tmp_path / "one" / INDEX_FILE).write_bytes((tmp_path / "two" / INDEX_FILE).read_bytes())
    _assert_intact(tmp_path / "one", ids, vectors)


def test_reopen_with_another_index_kind_rebuilds(tmp_path: Path, unit_vectors: Vectors) -> None:
    ids, vectors = _build(tmp_path, unit_vectors, "flat")
    _assert_intact(tmp_path, ids, vectors, "hnsw")
    with DemonstrationStore.open(tmp_path, DIM, "hnsw") as store:
        assert store.index_kind == "hnsw"


def test_auto_switches_to_ivf_past_the_threshold(
    tmp_path: Path, unit_vectors: Vectors, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "AUTO_APPROX_MIN_ROWS", 50)
    vectors = unit_vectors(80, DIM)
    with DemonstrationStore.open(tmp_path, DIM) as store:
        ids = store.add(demos(40), vectors[:40])
        assert store.index_kind == "flat"
        ids += store.add(demos(40, start=40), vectors[40:])
        assert store.index_kind == "ivf"
        assert store.search(vectors[70], 1)[0].id == ids[70]
    with DemonstrationStore.open(tmp_path, DIM) as store:
        assert store.index_kind == "ivf"


def test_dimension_mismatch(tmp_path: Path, unit_vectors: Vectors) -> None:
    _build(tmp_path, unit_vectors)
    with pytest.raises(StoreError, match="16-d"):
        DemonstrationStore.open(tmp_path, DIM * 2)


def test_metadata(tmp_path: Path) -> None:
    with DemonstrationStore.open(tmp_path, DIM) as store:
        store.set_metadata(embedder="all-MiniLM-L6-v2", query_text_version="1")
    with DemonstrationStore.open(tmp_path, DIM, read_only=True) as store:
        meta = store.metadata()
    assert meta["embedder"] == "all-MiniLM-L6-v2"
    assert meta["dim"] == str(DIM)


# ----------------------------------------------------------------------------- processes


def test_one_writer_at_a_time_readers_welcome(tmp_path: Path, unit_vectors: Vectors) -> None:
    vectors = unit_vectors(10, DIM)
    with DemonstrationStore.open(tmp_path, DIM) as writer:
        ids = writer.add(demos(10), vectors)
        with pytest.raises(StoreError, match="another process"):
            DemonstrationStore.open(tmp_path, DIM)
        with DemonstrationStore.open(tmp_path, DIM, read_only=True) as reader:
            assert reader.search(vectors[4], 1)[0].id == ids[4]
            with pytest.raises(StoreError, match="read-only"):
                reader.add(demos(1), vectors[:1])
            with pytest.raises(StoreError, match="read-only"):
                reader.delete_ids(ids[:1])
    with DemonstrationStore.open(tmp_path, DIM) as again:  # The lock went with close().
        assert again.count() == 10


def test_read_only_needs_an_existing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        DemonstrationStore.open(tmp_path / "nothing", DIM, read_only=True)


def test_closed_store_refuses_work(tmp_path: Path, unit_vectors: Vectors) -> None:
    store = DemonstrationStore.open(tmp_path, DIM)
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.search(unit_vectors(1, DIM)[0], 1)
    with pytest.raises(StoreError, match="closed"):
        store.add(demos(1), unit_vectors(1, DIM))


def test_concurrent_searches_while_writing(
    tmp_path: Path, unit_vectors: Vectors, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "PERSIST_MIN_CHANGES", 100)  # Persist during the run too.
    vectors = unit_vectors(600, DIM)
    errors: list[BaseException] = []
    stop = threading.Event()
    with DemonstrationStore.open(tmp_path, DIM, kind) as store:
        store.add(demos(100, "base"), vectors[:100])

        def search() -> None:
            try:
                while not stop.is_set():
                    hits = store.search(vectors[3], 10, min_score=-1, exclude_tasks=["gone"])
                    assert len(hits) == 10
                    assert all(h.task != "gone" for h in hits)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=search) for _ in range(4)]
        for t in threads:
            t.start()
        for i in range(1, 6):
            batch = slice(i * 100, (i + 1) * 100)
            store.add(
                demos(50, "gone", start=i * 100) + demos(50, "kept", start=i * 100), vectors[batch]
            )
            store.delete_task("gone")
        stop.set()
        for t in threads:
            t.join()
        assert store.count() == 100 + 5 * 50
    assert not errors


def test_ids_that_are_not_ours_are_ignored_not_errors() -> None:
    from retrieval.store_types import demo_id, parse_id

    assert parse_id(demo_id(12)) == 12
    for value in ("d²", "d\u0661\u0662", "d", "x12", "d-1", "d 1", 12, None):
        assert parse_id(value) is None, value
