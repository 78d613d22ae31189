"""Snapshots of the store for read-only replicas: the writer's publication (consistent,
atomic, coalesced, pruned, crash-safe) and the reader's reload (new snapshots swapped
in, broken ones skipped, flat stores read as they are)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import retrieval
from retrieval import retriever as retriever_mod
from retrieval import snapshots
from retrieval.retriever import Retriever, open_replica
from retrieval.snapshots import (
    CURRENT_FILE,
    SNAPSHOTS_DIR,
    SnapshotPublisher,
    current_id,
    resolve,
    snapshot_dir,
    snapshot_metadata,
)
from retrieval.store import DB_FILE, INDEX_FILE, DemonstrationStore
from retrieval.store_index import VectorIndex
from tests.unit.retrieval.test_store import DIM, Vectors, demos


def open_snapshot(folder: Path) -> DemonstrationStore:
    return DemonstrationStore.open(folder, DIM, read_only=True, immutable=True)


@pytest.fixture
def store(tmp_path: Path, unit_vectors: Vectors) -> Iterator[DemonstrationStore]:
    with DemonstrationStore.open(tmp_path / "store", DIM) as s:
        s.add(demos(40, "a") + demos(40, "b"), unit_vectors(80, DIM))
        yield s


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ----------------------------------------------------------------------------- publication


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_a_snapshot_equals_the_store(
    tmp_path: Path, unit_vectors: Vectors, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    vectors = unit_vectors(300, DIM)
    with DemonstrationStore.open(tmp_path / "store", DIM, kind) as live:
        ids = live.add(demos(150, "a") + demos(150, "b"), vectors)
        live.delete_ids(ids[:10])
        snapshot_id = SnapshotPublisher(live).publish()
        assert current_id(live.path) == snapshot_id
        folder = snapshot_dir(live.path, snapshot_id)
        assert sorted(os.listdir(folder)) == [DB_FILE, INDEX_FILE]  # no -wal, -shm, LOCK
        # Rollback mode (file format bytes 1, 1), so readers need no -wal or -shm files.
        assert (folder / DB_FILE).read_bytes()[18:20] == b"\x01\x01"
        _, header = VectorIndex.load(folder / INDEX_FILE)
        assert header.generation == int(snapshot_metadata(folder)["generation"])
        assert snapshot_metadata(folder)["store_uid"] == live.metadata()["store_uid"]
        caplog.clear()
        with open_snapshot(folder) as copy:
            # The index file is used as it is, not rebuilt or caught up.
            assert "rebuilding" not in caplog.text and "caught up" not in caplog.text
            assert copy.index_kind == live.index_kind == kind
            assert copy.count() == live.count() == 290
            assert copy.task_counts() == live.task_counts()
            for q in vectors[::37]:
                assert copy.search(q, 8, -1.0) == live.search(q, 8, -1.0)
            assert copy.get(ids[:12]) == live.get(ids[:12])


def test_snapshots_stay_consistent_under_concurrent_writes(
    tmp_path: Path, unit_vectors: Vectors
) -> None:
    """Database and index of a snapshot are one generation even while writes go on."""
    with DemonstrationStore.open(tmp_path / "store", DIM) as live:
        publisher = SnapshotPublisher(live, grace_seconds=3600)
        stop = threading.Event()

        def write() -> None:
            n = 0
            while not stop.is_set():
                live.add(demos(5, f"w{n % 3}", n * 5), unit_vectors(5, DIM, seed=n))
                if n % 4 == 3:
                    live.delete_task(f"w{(n + 1) % 3}")
                n += 1

        writer = threading.Thread(target=write)
        writer.start()
        try:
            published = [publisher.publish() for _ in range(8)]
        finally:
            stop.set()
            writer.join()
        for snapshot_id in published:
            folder = snapshot_dir(live.path, snapshot_id)
            _, header = VectorIndex.load(folder / INDEX_FILE)
            assert header.generation == int(snapshot_metadata(folder)["generation"])
            with open_snapshot(folder) as copy:
                index_ids = np.sort(copy._index.ids())
                seqs, _ = copy._db.alive()
                assert np.array_equal(index_ids, seqs)
                assert copy.count() == len(seqs)


def test_current_always_names_a_complete_snapshot(store: DemonstrationStore) -> None:
    """A reader looking at CURRENT while the writer publishes again and again always
    finds a whole snapshot there."""
    publisher = SnapshotPublisher(store, grace_seconds=3600)
    publisher.publish()
    stop = threading.Event()
    seen: list[str] = []
    problems: list[BaseException] = []

    def read() -> None:
        while not stop.is_set():
            try:
                folder, snapshot_id = resolve(store.path)
                assert snapshot_id is not None
                with open_snapshot(folder) as copy:
                    assert copy.count() >= 80
                seen.append(snapshot_id)
            except BaseException as exc:
                problems.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(10):
            store.add(demos(2, "c", 2 * i), np.eye(DIM, dtype=np.float32)[:2])
            publisher.publish()
    finally:
        stop.set()
        reader.join()
    assert not problems, problems
    assert len(set(seen)) >= 2


def test_failed_switch_keeps_the_old_snapshot_current(
    store: DemonstrationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between writing the snapshot and switching CURRENT: the old snapshot stays
    current and readable, and the next publication works."""
    first = SnapshotPublisher(store, grace_seconds=0)
    old = first.publish()
    store.add(demos(3, "new"), np.eye(DIM, dtype=np.float32)[:3])

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(snapshots, "write_atomic", crash)
    with pytest.raises(OSError, match="power cut"):
        first.publish()
    monkeypatch.undo()
    assert current_id(store.path) == old
    orphans = [p.name for p in (store.path / SNAPSHOTS_DIR).iterdir() if p.name != old]
    assert len(orphans) == 1  # Complete, but named by nothing.
    with open_snapshot(snapshot_dir(store.path, old)) as copy:
        assert copy.count() == 80

    # After a restart the writer sees CURRENT is stale and publishes at once.
    restarted = SnapshotPublisher(store, grace_seconds=0)
    assert restarted.current == old and not restarted.up_to_date()
    new = restarted.publish()
    assert current_id(store.path) == new != old
    with open_snapshot(snapshot_dir(store.path, new)) as copy:
        assert copy.count() == 83
    # The orphan is neither current nor previous: gone once its grace period (0) passed.
    restarted.prune()
    assert sorted(p.name for p in (store.path / SNAPSHOTS_DIR).iterdir()) == sorted([old, new])


_KILLED_PUBLISHER = """
import sys
import numpy as np
from retrieval.snapshots import SnapshotPublisher
from retrieval.store import DemonstrationStore
from retrieval.store_types import NewDemo

path, dim = sys.argv[1], int(sys.argv[2])
store = DemonstrationStore.open(path, dim)
publisher = SnapshotPublisher(store, grace_seconds=0)
rng = np.random.default_rng(0)
n = 0
while True:
    v = rng.standard_normal((20, dim)).astype("float32")
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    store.add([NewDemo(task=f"t{n % 3}", input=f"b{n} i{i}", output="o") for i in range(20)], v)
    print("published", publisher.publish(), flush=True)
    n += 1
"""


def test_a_killed_publisher_leaves_a_readable_current(tmp_path: Path) -> None:
    """SIGKILL at a random moment of publishing: CURRENT names a whole snapshot, and the
    restarted writer publishes again and clears the debris."""
    path = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(Path(retrieval.__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_PUBLISHER, str(path), str(DIM)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    published = 0
    for line in proc.stdout:  # Let it publish a few times first.
        published += line.startswith("published")
        if published >= 3:
            break
    assert published >= 3, proc.stderr.read() if proc.stderr else ""
    time.sleep(random.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""

    folder, snapshot_id = resolve(path)
    assert snapshot_id is not None
    with open_snapshot(folder) as copy:
        assert copy.count() > 0 and copy.count() % 20 == 0
    with DemonstrationStore.open(path, DIM) as live:
        publisher = SnapshotPublisher(live, grace_seconds=0)
        new = publisher.publish()
        publisher.prune()
        with open_snapshot(snapshot_dir(path, new)) as copy:
            assert copy.count() == live.count()
        left = sorted(os.listdir(path / SNAPSHOTS_DIR))
        assert new in left and len(left) <= 2  # current (+ previous); no .tmp-* leftovers


def test_publication_is_coalesced_and_ends_at_the_latest_state(
    store: DemonstrationStore,
) -> None:
    publisher = SnapshotPublisher(store, min_interval=0.5, grace_seconds=3600)
    publisher.start()  # Publishes at once: the store has no snapshot yet.
    wait_for(lambda: publisher.published == 1)
    started = time.monotonic()
    for i in range(30):
        store.add(demos(1, "burst", i), np.eye(DIM, dtype=np.float32)[:1])
        time.sleep(0.02)
    spent = time.monotonic() - started
    wait_for(publisher.up_to_date)
    time.sleep(0.7)  # Nothing left to publish: no further publication.
    publisher.close()
    # 30 writes over `spent` seconds; at most one publication per 0.5 s (+ the first).
    assert 2 <= publisher.published <= 2 + int(spent / 0.5) + 1
    with open_snapshot(snapshot_dir(store.path, current_id(store.path) or "")) as copy:
        assert copy.count() == store.count() == 110


def test_close_publishes_what_is_pending(store: DemonstrationStore) -> None:
    publisher = SnapshotPublisher(store, min_interval=3600, grace_seconds=3600)
    publisher.start()
    wait_for(lambda: publisher.published == 1)
    store.add(demos(2, "late"), np.eye(DIM, dtype=np.float32)[:2])
    publisher.close(timeout=30)  # Does not wait for the hour-long interval.
    assert publisher.published == 2 and publisher.up_to_date()


def test_start_publishes_only_when_current_is_stale(store: DemonstrationStore) -> None:
    first = SnapshotPublisher(store)
    assert not first.up_to_date()  # No CURRENT yet (a freshly seeded flat store).
    first.publish()
    again = SnapshotPublisher(store, min_interval=0)
    again.start()
    time.sleep(0.3)
    again.close()
    assert again.published == 0


def test_old_snapshots_are_removed_after_the_grace_period(store: DemonstrationStore) -> None:
    now = [0.0]
    publisher = SnapshotPublisher(store, grace_seconds=100, clock=lambda: now[0])
    published = []
    for i in range(4):
        store.add(demos(1, "g", i), np.eye(DIM, dtype=np.float32)[:1])
        published.append(publisher.publish())
        now[0] += 1
    # Replaced (neither current nor previous) since the publications at t=2 and t=3.
    folder = store.path / SNAPSHOTS_DIR
    (folder / ".tmp-crashed").mkdir()  # A publication that died half-way.
    publisher.prune()
    # Within the grace period every snapshot stays; debris goes at once.
    assert sorted(os.listdir(folder)) == sorted(published)
    now[0] = 101.0
    assert publisher.prune() == []
    now[0] = 102.5
    assert publisher.prune() == published[:1]
    now[0] = 103.5
    assert publisher.prune() == published[1:2]
    # The current and the previous one always stay.
    now[0] += 10_000
    assert publisher.prune() == []
    assert sorted(os.listdir(folder)) == sorted(published[-2:])


def test_the_publisher_removes_old_snapshots_without_further_writes(
    store: DemonstrationStore,
) -> None:
    publisher = SnapshotPublisher(store, min_interval=0, grace_seconds=0.3)

    def published(n: int) -> Callable[[], bool]:
        return lambda: publisher.published == n

    publisher.start()
    for i in range(3):
        wait_for(published(i + 1))
        store.add(demos(1, "p", i), np.eye(DIM, dtype=np.float32)[:1])
    wait_for(published(4))
    folder = store.path / SNAPSHOTS_DIR
    assert len(os.listdir(folder)) > 2
    # No write comes, yet the grace period's end is enough.
    wait_for(lambda: len(os.listdir(folder)) == 2)
    publisher.close()
    assert current_id(store.path) in os.listdir(folder)


# ----------------------------------------------------------------------------- reader


class FakeEmbedder:
    """Stands in for the sentence-transformers model: open_replica only needs its width,
    name and weights to match the store's (which records none)."""

    loads = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        FakeEmbedder.loads += 1
        self.dim = DIM
        self.name = "fake"
        self.backend = "torch"
        self.quantize = "none"


@pytest.fixture
def fake_embedder(monkeypatch: pytest.MonkeyPatch) -> type[FakeEmbedder]:
    FakeEmbedder.loads = 0
    monkeypatch.setattr(retriever_mod, "Embedder", FakeEmbedder)
    return FakeEmbedder


def test_a_flat_store_is_read_as_it_is(
    store: DemonstrationStore, fake_embedder: type[FakeEmbedder]
) -> None:
    reader = open_replica(store.path, read_only=True, reload_seconds=1)
    try:
        assert reader.store.path == store.path and reader.store.read_only
        assert reader.store.count() == 80
        assert reader.follower is not None and reader.follower.serving is None
        assert not (store.path / CURRENT_FILE).exists()  # Reading never publishes.
    finally:
        reader.store.close()


def test_the_writer_publishes_and_the_reader_opens_current(
    store: DemonstrationStore, fake_embedder: type[FakeEmbedder]
) -> None:
    root = store.path
    store.close()  # open_replica's writer takes the store's lock.
    writer = open_replica(root, read_only=False, grace_seconds=60)

    async def run() -> Retriever:
        writer.start()
        assert writer.publisher is not None
        await asyncio.to_thread(wait_for, writer.publisher.up_to_date)
        reader = open_replica(root, read_only=True, reload_seconds=0)
        await writer.close()
        return reader

    reader = asyncio.run(run())
    try:
        assert reader.follower is None  # reload 0: never follows.
        assert reader.store.path == snapshot_dir(root, current_id(root) or "")
        assert reader.store.count() == 80
    finally:
        reader.store.close()


def _publish(store: DemonstrationStore) -> str:
    return SnapshotPublisher(store, grace_seconds=3600).publish()


def test_the_reader_swaps_in_new_snapshots(
    store: DemonstrationStore, fake_embedder: type[FakeEmbedder]
) -> None:
    first = _publish(store)
    reader = open_replica(store.path, read_only=True, reload_seconds=0.05)
    assert reader.follower is not None and reader.follower.serving == first
    embedder = reader.embedder
    query = np.eye(DIM, dtype=np.float32)[2]  # The third "fresh" demonstration's vector.

    async def run() -> None:
        reader.start()
        old = reader.store
        store.add(demos(5, "fresh"), np.eye(DIM, dtype=np.float32)[:5])
        second = _publish(store)
        for _ in range(200):
            if reader.store is not old:
                break
            await asyncio.sleep(0.02)
        assert reader.follower is not None and reader.follower.serving == second
        assert reader.store.count() == 85
        assert (await reader.search(query, 1, -1.0, []))[0].task == "fresh"
        assert reader.embedder is embedder  # Never loaded again (the router shares it).
        assert old._closed  # No search used it: closed at once.
        await reader.close()

    asyncio.run(run())
    assert fake_embedder.loads == 1
    assert reader.store._closed


def test_a_broken_snapshot_is_skipped(
    store: DemonstrationStore,
    fake_embedder: type[FakeEmbedder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = _publish(store)
    reader = open_replica(store.path, read_only=True, reload_seconds=3600)
    follower = reader.follower
    assert follower is not None

    async def run() -> None:
        # A snapshot folder whose database is garbage, named by CURRENT.
        broken = snapshot_dir(store.path, "broken")
        broken.mkdir()
        (broken / DB_FILE).write_bytes(b"not a database" * 100)
        (store.path / CURRENT_FILE).write_text("broken\n")
        assert not await follower.check(reader.replace_store)
        assert follower.serving == first and reader.store.count() == 80
        assert "Cannot open store snapshot broken" in caplog.text
        assert not await follower.check(reader.replace_store)  # Not retried.
        # CURRENT naming nothing sensible: logged, still serving.
        (store.path / CURRENT_FILE).write_text("../../etc\n")
        assert not await follower.check(reader.replace_store)
        assert follower.serving == first
        # The next good snapshot is taken.
        store.add(demos(1, "later"), np.eye(DIM, dtype=np.float32)[:1])
        good = _publish(store)
        assert await follower.check(reader.replace_store)
        assert follower.serving == good and reader.store.count() == 81
        await reader.close()

    asyncio.run(run())


def test_a_flat_reader_moves_to_snapshots_when_they_appear(
    store: DemonstrationStore, fake_embedder: type[FakeEmbedder]
) -> None:
    reader = open_replica(store.path, read_only=True, reload_seconds=3600)
    follower = reader.follower
    assert follower is not None and follower.serving is None

    async def run() -> None:
        assert not await follower.check(reader.replace_store)  # No CURRENT: stays flat.
        store.add(demos(4, "more"), np.eye(DIM, dtype=np.float32)[:4])
        snapshot_id = _publish(store)
        assert await follower.check(reader.replace_store)
        assert reader.store.path == snapshot_dir(store.path, snapshot_id)
        assert reader.store.count() == 84
        await reader.close()

    asyncio.run(run())


def test_a_replaced_store_is_closed_after_its_last_search(store: DemonstrationStore) -> None:
    _publish(store)
    folder, _ = resolve(store.path)
    old, new = open_snapshot(folder), open_snapshot(folder)
    reader = Retriever(FakeEmbedder(), old)  # type: ignore[arg-type]
    release = threading.Event()
    real_search = old.search

    def slow_search(*args: Any) -> Any:
        release.wait(10)
        return real_search(*args)

    old.search = slow_search  # type: ignore[method-assign,assignment]

    async def run() -> None:
        query = np.eye(DIM, dtype=np.float32)[0]
        running = asyncio.create_task(reader.search(query, 2, -1.0, []))
        await asyncio.sleep(0.05)
        reader.replace_store(new)
        assert not old._closed  # A search still runs on it.
        release.set()
        assert len(await running) == 2  # Finished on the store it started with.
        assert old._closed
        assert len(await reader.search(query, 2, -1.0, [])) == 2
        await reader.close()

    asyncio.run(run())
    assert new._closed
