"""The demonstration store: SQLite holds the demonstrations, FAISS finds the nearest.

Layout of a store folder:
- `demos.sqlite3`: the source of truth (rows and their float32 vectors).
- `index.faiss`: a cache of the vectors as a FAISS index (exact flat while small, IVF
  from AUTO_APPROX_MIN_ROWS; see store_index.py), with a header naming the store and the
  database generation it reflects. Missing, damaged, foreign or stale, it is rebuilt or
  caught up from the database on open.
- `LOCK`: held (flock) by the one process that opened the store for writing.
- `CURRENT`, `snapshots/`: immutable copies that read-only replicas open (snapshots.py).

Concurrency: any number of threads may search while one thread writes. Writes are
serialized by a mutex; the database commit happens first (durable), then the in-memory
index is updated under the write side of a readers-writer lock.

Beside this module: store_types.py (records, ids, errors), store_limits.py (input limits
and validation), store_db.py (SQLite), store_index.py (FAISS and the index file),
store_tasks.py (the in-memory task of every seq, for search filters).
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from retrieval.durable import fsync_tree
from retrieval.rwlock import RWLock
from retrieval.store_db import DatabaseError, StoreDB
from retrieval.store_index import (
    FLAT,
    INDEX_KINDS,
    IVF,
    IndexFileError,
    IndexHeader,
    VectorIndex,
    write_index,
)
from retrieval.store_limits import (
    validate_ids,
    validate_query,
    validate_records,
    validate_search,
    validate_task_names,
    validate_vectors,
)
from retrieval.store_tasks import TaskMap
from retrieval.store_types import (
    Demo,
    Hit,
    NewDemo,
    StoreError,
    ValidationError,
    demo_id,
)

log = logging.getLogger(__name__)

# Below this many demonstrations "auto" uses exact flat search; from it on, IVF.
# Measured with bench/store_search.py on the 2-core reference machine (docs/retrieval.md,
# "The index"): flat search is well inside the 2 ms budget while the vectors fit in
# cache and past it soon after this size; IVF stays under it far beyond. Exact search is
# kept while it is cheap, since it needs no training.
AUTO_APPROX_MIN_ROWS = 20_000
AUTO_APPROX_KIND = IVF
# HNSW cannot delete in place; deleted entries are masked. Rebuild once they are this
# share of the index (and at least REBUILD_MIN_DEAD), so masking never dominates search.
REBUILD_DEAD_FRACTION = 0.2
REBUILD_MIN_DEAD = 1_000
# Persist the index after this many changed rows (or this share of the store) rather
# than on every add: the file is rewritten whole (docs/retrieval.md, "The default
# store"), which per API call would dominate writes, and the database already made them
# durable. close() always persists.
PERSIST_MIN_CHANGES = 20_000
PERSIST_FRACTION = 0.25

DB_FILE = "demos.sqlite3"
INDEX_FILE = "index.faiss"
LOCK_FILE = "LOCK"


class DemonstrationStore:
    """Open with `DemonstrationStore.open(path, dim)`; close (or use `with`) to persist."""

    def __init__(
        self,
        path: Path,
        db: StoreDB,
        index: VectorIndex,
        index_kind: str,
        lock_file: IO[bytes] | None,
    ) -> None:
        self.path = path
        self.dim = db.dim
        self.read_only = db.read_only
        self._db = db
        self._index = index
        self._index_kind = index_kind
        self._lock_file = lock_file
        self._rw = RWLock()
        self._writer = threading.Lock()
        self._closed = False
        self._store_uid = db.metadata()["store_uid"]
        self._tasks = TaskMap()  # Mutated only by the writer, under the write side.
        self._unpersisted = 0
        self._listeners: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(
        cls,
        path: Path | str,
        dim: int,
        index_kind: str = "auto",
        *,
        read_only: bool = False,
        immutable: bool = False,
    ) -> DemonstrationStore:
        """Open (creating if needed) the store in folder `path` for `dim`-d vectors.

        `index_kind`: "flat" (exact), "ivf" or "hnsw" (approximate, fast at scale) or
        "auto" (flat below AUTO_APPROX_MIN_ROWS, IVF from there on). A read-only store takes no
        lock and never writes, so it can be opened beside a running server. `immutable`
        (read-only only) promises that nothing changes the files while they are open,
        as for a published snapshot: SQLite then takes no locks at all.
        """
        if index_kind not in ("auto", *INDEX_KINDS):
            raise ValidationError(f"index_kind must be auto, flat, ivf or hnsw, not {index_kind!r}")
        if not isinstance(dim, int) or dim <= 0:
            raise ValidationError(f"dim must be a positive integer, not {dim!r}")
        path = Path(path)
        lock_file = None
        if not read_only:
            path.mkdir(parents=True, exist_ok=True)
            lock_file = _take_lock(path / LOCK_FILE)
        try:
            db = StoreDB(path / DB_FILE, dim, read_only=read_only, immutable=immutable)
        except (DatabaseError, OSError) as exc:
            if lock_file is not None:
                lock_file.close()
            raise StoreError(str(exc)) from exc
        store = cls(path, db, VectorIndex(FLAT, dim), index_kind, lock_file)
        try:
            store._load()
        except BaseException:
            store.close()
            raise
        return store

    def __enter__(self) -> DemonstrationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Persist the index if it changed, release the lock. Idempotent."""
        with self._writer:
            if self._closed:
                return
            try:
                if self._unpersisted and not self.read_only:
                    self._persist()
            finally:
                with self._rw.write():  # Let running searches finish with the database.
                    self._closed = True
                    self._db.close()
                if self._lock_file is not None:
                    self._lock_file.close()

    def flush(self) -> None:
        """Write the index file now (the database is always durable already)."""
        with self._writer:
            self._check_open()
            if not self.read_only:
                self._persist()

    def snapshot(self, folder: Path) -> int:
        """Write a consistent copy of the store (database and index as of one generation)
        into the existing empty `folder`, fsynced; return that generation.

        Writes wait only while the in-memory index is copied (in memory); the index is
        serialized and the database copied (from a read transaction pinned at the same
        generation) while they go on. Searches never wait.
        """
        with self._writer:  # No write between pinning the database and copying the index.
            self._check_open()
            pinned = self._db.pin()
            try:
                with self._rw.read():
                    header = self._header(pinned.generation)
                    index = self._index.copy()
            except BaseException:
                pinned.close()
                raise
        try:
            pinned.backup_to(folder / DB_FILE)
        finally:
            pinned.close()
        payload = index.payload()
        del index  # Its memory goes before the file is written.
        # No payload (an untrained IVF index): no file, and opening the copy builds it.
        write_index(folder / INDEX_FILE, header, payload)
        fsync_tree(folder)
        return pinned.generation

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every committed write, once it is durable (e.g. to
        publish a snapshot). It runs on the writing thread: keep it quick."""
        self._listeners.append(listener)

    # ------------------------------------------------------------------ writes

    def add(self, records: Sequence[NewDemo], vectors: np.ndarray) -> list[str]:
        """Add demonstrations with their embeddings (`vectors[i]` for `records[i]`).

        All or nothing: every record is validated first, then all are committed in one
        durable transaction. Returns their ids, in order, once committed.
        """
        rows = validate_records(records)
        vecs = validate_vectors(vectors, len(rows), self.dim)
        if not rows:
            return []
        with self._writer:
            self._check_writable()
            try:
                seqs, task_nos = self._db.insert(rows, vecs)
            except Exception as exc:
                raise StoreError(f"could not add demonstrations: {exc}") from exc
            names = {no: row.task for row, no in zip(rows, task_nos, strict=True)}
            seq_arr = np.asarray(seqs, dtype=np.int64)
            with self._rw.write():
                self._tasks.add(seq_arr, np.asarray(task_nos, dtype=np.int64), names)
                try:
                    self._index.add(seq_arr, vecs)
                except Exception:
                    # The rows are durable; make the index match them again.
                    log.exception("index add failed; rebuilding from the database")
                    self._index = self._build_from_db(self._index.kind)
            self._unpersisted += len(seqs)
            self._after_write()
        self._notify()
        return [demo_id(s) for s in seqs]

    def delete_ids(self, ids: Iterable[str]) -> int:
        """Delete by id; unknown ids are ignored. Returns how many were deleted."""
        seqs = validate_ids(ids, "delete")
        return self._delete(lambda: self._db.delete_seqs(seqs)) if seqs else 0

    def delete_task(self, task: str) -> int:
        """Delete every demonstration of `task`. Returns how many were deleted."""
        return self._delete(lambda: self._db.delete_task(task))

    def _delete(self, run: Callable[[], list[int]]) -> int:
        with self._writer:
            self._check_writable()
            # The commit happens under the write lock so that no search can see an
            # index entry whose row is already gone.
            with self._rw.write():
                try:
                    deleted = np.asarray(run(), dtype=np.int64)
                except DatabaseError as exc:
                    raise StoreError(str(exc)) from exc
                self._tasks.remove(deleted)
                self._index.remove(deleted)
            self._unpersisted += len(deleted)
            self._after_write()
        self._notify()  # Even for none: the commit bumped the generation.
        return len(deleted)

    def set_metadata(self, **values: str) -> None:
        """Record facts about the store (embedder model, query-text version, ...)."""
        with self._writer:
            self._check_writable()
            self._db.set_metadata({k: str(v) for k, v in values.items()})
        self._notify()

    # ------------------------------------------------------------------ reads

    def search(
        self,
        vector: np.ndarray,
        k: int,
        min_score: float = 0.0,
        exclude_tasks: Iterable[str] = (),
    ) -> list[Hit]:
        """The k demonstrations nearest to `vector` (cosine), best first.

        Excluded tasks are filtered inside FAISS, so k hits come back whenever k allowed
        demonstrations exist; `min_score` can leave fewer.
        """
        query = validate_query(vector, self.dim)
        validate_search(k, min_score)
        excluded = validate_task_names(exclude_tasks)
        if k == 0:
            return []
        with self._rw.read():
            self._check_open()
            excluded_nos = self._tasks.numbers(excluded)
            allowed, n_allowed = self._tasks.allowed(excluded_nos, self._index.ntotal)
            scores, seqs = self._index.search(query, k, allowed, n_allowed)
            keep = scores >= min_score
            scores, seqs = scores[keep], seqs[keep]
            rows = self._db.fetch([int(s) for s in seqs]) if len(seqs) else {}
        return [
            Hit(
                id=demo_id(int(seq)),
                task=row.task,
                definition=row.definition,
                input=row.input,
                output=row.output,
                score=float(score),
                source=row.source,
            )
            for score, seq in zip(scores, seqs, strict=True)
            if (row := rows.get(int(seq))) is not None
        ]

    def get(self, ids: Iterable[str]) -> list[Demo]:
        """The stored demonstrations with these ids, in the order asked; unknown ids are
        left out."""
        seqs = validate_ids(ids, "get")
        with self._rw.read():
            self._check_open()
            rows = self._db.fetch(seqs) if seqs else {}
        return [
            Demo(
                id=demo_id(seq),
                task=row.task,
                definition=row.definition,
                input=row.input,
                output=row.output,
                source=row.source,
            )
            for seq in seqs
            if (row := rows.get(seq)) is not None
        ]

    def count(self) -> int:
        return self._tasks.alive

    def tasks(self) -> list[str]:
        """Names of the tasks that have at least one demonstration, sorted."""
        return sorted(self.task_counts())

    def task_counts(self) -> dict[str, int]:
        with self._rw.read():
            return self._tasks.counts()

    @property
    def index_kind(self) -> str:
        """The index in use now: "flat", "ivf" or "hnsw"."""
        return self._index.kind

    def metadata(self) -> dict[str, str]:
        return self._db.metadata()

    # ------------------------------------------------------------------ internals

    def _notify(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:  # The write is durable and acknowledged regardless.
                log.exception("store listener failed")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise StoreError("the store was opened read-only")

    def _resolve_kind(self, count: int) -> str:
        if self._index_kind != "auto":
            return self._index_kind
        return AUTO_APPROX_KIND if count >= AUTO_APPROX_MIN_ROWS else FLAT

    def _load(self) -> None:
        """Bring the index in line with the database: load the file, then catch up on
        rows added or deleted since it was written; rebuild if it cannot be used."""
        seqs, task_nos = self._db.alive()
        self._tasks.add(seqs, task_nos, self._db.task_names())
        kind = self._resolve_kind(len(seqs))
        index, reason = self._load_index_file(kind)
        changed = 0
        if index is None:
            log.info("demonstration index %s: %s; rebuilding", self.path / INDEX_FILE, reason)
            index = self._build_from_db(kind)
            changed = max(len(seqs), 1)
        else:
            in_index = index.ids()
            missing = np.setdiff1d(seqs, in_index, assume_unique=True)
            gone = np.setdiff1d(in_index, seqs, assume_unique=True)
            if len(missing):
                index.add(*self._db.vectors(missing))
            index.remove(gone)
            changed = len(missing) + len(gone)
            if changed:
                log.info("demonstration index caught up: +%d -%d", len(missing), len(gone))
        self._index = index
        self._unpersisted = changed
        self._after_write(persist_threshold=1)

    def _load_index_file(self, kind: str) -> tuple[VectorIndex | None, str]:
        try:
            index, header = VectorIndex.load(self.path / INDEX_FILE)
        except IndexFileError as exc:
            return None, str(exc)
        if header.store_uid != self._store_uid:
            return None, "it belongs to another store"
        # A reader takes the kind its writer chose ("auto" may have chosen another at a
        # different size): rebuilding would cost it seconds of CPU for nothing.
        any_kind = self.read_only and self._index_kind == "auto"
        if header.dim != self.dim or (header.kind != kind and not any_kind):
            return None, f"it is a {header.dim}-d {header.kind} index, {kind} wanted"
        if header.generation > self._db.generation() or header.max_seq > self._db.last_seq():
            return None, "it is newer than the database"
        return index, ""

    def _build_from_db(self, kind: str) -> VectorIndex:
        return VectorIndex.build(kind, self.dim, *self._db.vectors())

    def _after_write(self, persist_threshold: int | None = None) -> None:
        """Called under the writer mutex: switch or compact the index when due, and
        persist it when enough has changed."""
        if self.read_only:
            return  # A reader serves the index as its writer left it, and persists nothing.
        alive = self._tasks.alive
        want = self._resolve_kind(alive)
        dead = self._index.ntotal - alive
        grow = self._index.kind == FLAT and want != FLAT
        compact = dead >= max(REBUILD_MIN_DEAD, REBUILD_DEAD_FRACTION * self._index.ntotal)
        retrain = self._index.needs_retrain(alive)
        if grow or compact or retrain:
            # Built beside the live index; searches go on meanwhile.
            fresh = self._build_from_db(want if grow else self._index.kind)
            with self._rw.write():
                self._index = fresh
            self._unpersisted = max(self._unpersisted, 1)
        if not self._unpersisted:
            return
        threshold = persist_threshold or max(
            PERSIST_MIN_CHANGES, math.ceil(PERSIST_FRACTION * alive)
        )
        if self._unpersisted >= threshold:
            self._persist()

    def _persist(self) -> None:
        with self._rw.read():
            self._index.save(self.path / INDEX_FILE, self._header(self._db.generation()))
        self._unpersisted = 0

    def _header(self, generation: int) -> IndexHeader:
        """What the in-memory index reflects (caller holds the writer mutex)."""
        return IndexHeader(
            kind=self._index.kind,
            dim=self.dim,
            store_uid=self._store_uid,
            generation=generation,
            ntotal=self._index.ntotal,
            max_seq=self._tasks.max_seq,
        )


# ----------------------------------------------------------------------------- helpers


def _take_lock(path: Path) -> IO[bytes]:
    fh = open(path, "a+b")  # noqa: SIM115 - held open for the store's lifetime
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        fh.close()
        raise StoreError(
            f"{path.parent} is open for writing in another process; "
            "open it read_only=True to search it"
        ) from exc
    fh.truncate(0)
    fh.write(f"{os.getpid()}\n".encode())
    fh.flush()
    return fh
