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
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from retrieval.durable import fsync_tree, write_atomic
from retrieval.rwlock import RWLock
from retrieval.store_db import DatabaseError, NewRow, StoreDB
from retrieval.store_index import (
    FLAT,
    INDEX_KINDS,
    IVF,
    IndexFileError,
    IndexHeader,
    VectorIndex,
    write_index_file,
)

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- limits
# Enforced before anything is written; exceeding one raises ValidationError.
MAX_ADD = 10_000  # demonstrations in one add()
MAX_K = 100  # hits one search may ask for
MAX_EXCLUDE_TASKS = 1_000  # task names in one search's exclusion list
MAX_DELETE = 100_000  # ids in one delete_ids()
MAX_TASK_CHARS = 200
MAX_DEFINITION_CHARS = 16_000  # longest BIG-bench definition: 3,252
MAX_INPUT_CHARS = 32_000  # longest BIG-bench input among the default tasks: 9,791
MAX_OUTPUT_CHARS = 16_000
MAX_SOURCE_CHARS = 64

# Below this many demonstrations "auto" uses exact flat search; from it on, IVF.
# Measured with bench/store_search.py on the 2-core reference machine (384-d, one
# search thread, vLLM busy on the same cores): flat p50 was 0.54 ms at 10,000 vectors
# (they fit in cache) but 3.2 ms at 25,000, past the 2 ms budget; IVF stays near 0.6 ms
# at 100,000. Exact search is kept while it is cheap, since it needs no training.
AUTO_APPROX_MIN_ROWS = 20_000
AUTO_APPROX_KIND = IVF
# HNSW cannot delete in place; deleted entries are masked. Rebuild once they are this
# share of the index (and at least REBUILD_MIN_DEAD), so masking never dominates search.
REBUILD_DEAD_FRACTION = 0.2
REBUILD_MIN_DEAD = 1_000
# Persist the index after this many changed rows (or this share of the store) rather
# than on every add: rewriting 150 MB per API call would dominate writes, and the
# database already made them durable. close() always persists.
PERSIST_MIN_CHANGES = 20_000
PERSIST_FRACTION = 0.25
# Vectors must be unit length (inner product = cosine); allow float32 rounding.
_NORM_TOLERANCE = 1e-3

DB_FILE = "demos.sqlite3"
INDEX_FILE = "index.faiss"
LOCK_FILE = "LOCK"
_ID_PREFIX = "d"


class StoreError(RuntimeError):
    """The store cannot do what was asked (read-only, locked, closed, incompatible)."""


class ValidationError(StoreError, ValueError):
    """Bad input; raised before anything is written."""


@dataclass(frozen=True, slots=True)
class NewDemo:
    task: str
    input: str
    output: str
    definition: str = ""
    source: str = "api"


@dataclass(frozen=True, slots=True)
class Demo:
    id: str
    task: str
    definition: str
    input: str
    output: str
    source: str


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    task: str
    definition: str
    input: str
    output: str
    score: float
    source: str


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
        # seq -> task_no (-1: no such row). Grown by doubling; only the writer mutates.
        self._task_of_seq = np.full(1024, -1, dtype=np.int64)
        self._max_seq = 0
        self._task_names: dict[int, str] = {}
        self._task_nos: dict[str, int] = {}
        self._task_counts: dict[int, int] = {}
        self._alive = 0
        self._unpersisted = 0
        self._masks: dict[frozenset[int], tuple[np.ndarray, int]] = {}
        self._masks_lock = threading.Lock()
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
        if payload is not None:  # Else an untrained IVF index: opening builds it.
            write_atomic(folder / INDEX_FILE, lambda fh: write_index_file(fh, header, payload))
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
        rows = _validate_records(records)
        vecs = _validate_vectors(vectors, len(rows), self.dim)
        if not rows:
            return []
        with self._writer:
            self._check_writable()
            try:
                seqs, task_nos = self._db.insert(rows, vecs)
            except Exception as exc:
                raise StoreError(f"could not add demonstrations: {exc}") from exc
            names = {row.task: no for row, no in zip(rows, task_nos, strict=True)}
            seq_arr = np.asarray(seqs, dtype=np.int64)
            with self._rw.write():
                for name, no in names.items():
                    self._task_names[no] = name
                    self._task_nos[name] = no
                self._track(seq_arr, np.asarray(task_nos, dtype=np.int64))
                try:
                    self._index.add(seq_arr, vecs)
                except Exception:
                    # The rows are durable; make the index match them again.
                    log.exception("index add failed; rebuilding from the database")
                    self._index = self._build_from_db(self._index.kind)
            self._unpersisted += len(seqs)
            self._after_write()
        self._notify()
        return [_ID_PREFIX + str(s) for s in seqs]

    def delete_ids(self, ids: Iterable[str]) -> int:
        """Delete by id; unknown ids are ignored. Returns how many were deleted."""
        id_list = list(ids)
        if len(id_list) > MAX_DELETE:
            raise ValidationError(f"at most {MAX_DELETE} ids per delete, got {len(id_list)}")
        seqs = [s for s in map(_parse_id, id_list) if s is not None]
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
                self._untrack(deleted)
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
        query = _validate_query(vector, self.dim)
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_K:
            raise ValidationError(f"k must be an integer from 0 to {MAX_K}, got {k!r}")
        if not isinstance(min_score, (int, float)) or not -1.0 <= min_score <= 1.0:
            raise ValidationError(f"min_score must be within [-1, 1], got {min_score!r}")
        excluded = _validate_task_names(exclude_tasks)
        if k == 0:
            return []
        with self._rw.read():
            self._check_open()
            excluded_nos = frozenset(self._task_nos[t] for t in excluded if t in self._task_nos)
            allowed, n_allowed = self._allowed(excluded_nos)
            scores, seqs = self._index.search(query, k, allowed, n_allowed)
            keep = scores >= min_score
            scores, seqs = scores[keep], seqs[keep]
            rows = self._db.fetch([int(s) for s in seqs]) if len(seqs) else {}
        return [
            Hit(
                id=_ID_PREFIX + str(int(seq)),
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
        id_list = list(ids)
        if len(id_list) > MAX_DELETE:
            raise ValidationError(f"at most {MAX_DELETE} ids per get, got {len(id_list)}")
        seqs = [s for s in map(_parse_id, id_list) if s is not None]
        with self._rw.read():
            self._check_open()
            rows = self._db.fetch(seqs) if seqs else {}
        return [
            Demo(
                id=_ID_PREFIX + str(seq),
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
        return self._alive

    def tasks(self) -> list[str]:
        """Names of the tasks that have at least one demonstration, sorted."""
        return sorted(self.task_counts())

    def task_counts(self) -> dict[str, int]:
        with self._rw.read():
            return {self._task_names[no]: n for no, n in self._task_counts.items() if n > 0}

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
        self._task_names = self._db.task_names()
        self._task_nos = {name: no for no, name in self._task_names.items()}
        self._track(seqs, task_nos)
        self._max_seq = int(seqs.max()) if len(seqs) else 0
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
        want = self._resolve_kind(self._alive)
        dead = self._index.ntotal - self._alive
        grow = self._index.kind == FLAT and want != FLAT
        compact = dead >= max(REBUILD_MIN_DEAD, REBUILD_DEAD_FRACTION * self._index.ntotal)
        retrain = self._index.needs_retrain(self._alive)
        if grow or compact or retrain:
            # Built beside the live index; searches go on meanwhile.
            fresh = self._build_from_db(want if grow else self._index.kind)
            with self._rw.write():
                self._index = fresh
            self._unpersisted = max(self._unpersisted, 1)
        if not self._unpersisted:
            return
        threshold = persist_threshold or max(
            PERSIST_MIN_CHANGES, math.ceil(PERSIST_FRACTION * self._alive)
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
            max_seq=self._max_seq,
        )

    def _track(self, seqs: np.ndarray, task_nos: np.ndarray) -> None:
        """Record new rows in the in-memory task map (caller holds the write side)."""
        if not len(seqs):
            return
        top = int(seqs.max())
        if top >= len(self._task_of_seq):
            grown = np.full(max(top + 1, 2 * len(self._task_of_seq)), -1, dtype=np.int64)
            grown[: len(self._task_of_seq)] = self._task_of_seq
            self._task_of_seq = grown
        self._task_of_seq[seqs] = task_nos
        self._max_seq = max(self._max_seq, top)
        for no, n in zip(*np.unique(task_nos, return_counts=True), strict=True):
            self._task_counts[int(no)] = self._task_counts.get(int(no), 0) + int(n)
        self._alive += len(seqs)
        self._masks.clear()

    def _untrack(self, seqs: np.ndarray) -> None:
        if not len(seqs):
            return
        task_nos = self._task_of_seq[seqs]
        self._task_of_seq[seqs] = -1
        for no, n in zip(*np.unique(task_nos, return_counts=True), strict=True):
            self._task_counts[int(no)] -= int(n)
        self._alive -= len(seqs)
        self._masks.clear()

    def _allowed(self, excluded: frozenset[int]) -> tuple[np.ndarray | None, int]:
        """Boolean mask over seq space of what a search may return, and its count.

        None when nothing needs filtering (no exclusions, no dead HNSW entries): FAISS
        then runs without a selector. Masks are cached per exclusion set until the next
        write, since clients such as the evaluator repeat the same exclusions.
        """
        if not excluded and self._index.ntotal == self._alive:
            return None, self._alive
        with self._masks_lock:
            cached = self._masks.get(excluded)
        if cached is not None:
            return cached
        # Lookup table over task numbers, shifted by one so that -1 (no row) is denied.
        size = max(self._task_names, default=0) + 2
        lut = np.ones(size, dtype=bool)
        lut[0] = False
        lut[np.fromiter(excluded, dtype=np.int64, count=len(excluded)) + 1] = False
        mask = lut[self._task_of_seq[: self._max_seq + 1] + 1]
        n_allowed = self._alive - sum(self._task_counts.get(no, 0) for no in excluded)
        with self._masks_lock:
            if len(self._masks) >= 16:
                self._masks.clear()
            self._masks[excluded] = (mask, n_allowed)
        return mask, n_allowed


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


def _parse_id(value: object) -> int | None:
    if isinstance(value, str) and value.startswith(_ID_PREFIX) and value[1:].isdigit():
        return int(value[1:])
    return None


def _check_text(value: object, what: str, limit: int, *, required: bool) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValidationError(f"{what} is empty")
    if len(value) > limit:
        raise ValidationError(f"{what} is {len(value)} characters; the limit is {limit}")
    if "\x00" in value:
        raise ValidationError(f"{what} contains a NUL character")
    return value


def _validate_records(records: Sequence[NewDemo]) -> list[NewRow]:
    if len(records) > MAX_ADD:
        raise ValidationError(f"at most {MAX_ADD} demonstrations per add, got {len(records)}")
    rows = []
    for i, r in enumerate(records):
        if not isinstance(r, NewDemo):
            raise ValidationError(f"records[{i}] is not a NewDemo")
        rows.append(
            NewRow(
                task=_check_text(r.task, f"records[{i}].task", MAX_TASK_CHARS, required=True),
                definition=_check_text(
                    r.definition, f"records[{i}].definition", MAX_DEFINITION_CHARS, required=False
                ),
                input=_check_text(r.input, f"records[{i}].input", MAX_INPUT_CHARS, required=True),
                output=_check_text(
                    r.output, f"records[{i}].output", MAX_OUTPUT_CHARS, required=True
                ),
                source=_check_text(
                    r.source, f"records[{i}].source", MAX_SOURCE_CHARS, required=True
                ),
            )
        )
    return rows


def _validate_vectors(vectors: np.ndarray, n: int, dim: int) -> np.ndarray:
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.shape != (n, dim) and not (n == 0 and arr.size == 0):
        raise ValidationError(f"vectors must have shape ({n}, {dim}), got {arr.shape}")
    if n == 0:
        return np.empty((0, dim), dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValidationError("vectors contain NaN or infinity")
    norms = np.linalg.norm(arr, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > _NORM_TOLERANCE)
    if len(bad):
        raise ValidationError(
            f"vectors must be L2-normalized; row {int(bad[0])} has norm {norms[bad[0]]:.4f}"
        )
    return np.ascontiguousarray(arr / norms[:, None])


def _validate_query(vector: np.ndarray, dim: int) -> np.ndarray:
    arr = np.asarray(vector, dtype=np.float32)
    if arr.shape not in ((dim,), (1, dim)):
        raise ValidationError(f"query vector must have shape ({dim},), got {arr.shape}")
    arr = arr.reshape(dim)
    norm = float(np.linalg.norm(arr))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValidationError("query vector is zero or not finite")
    return arr / norm


def _validate_task_names(names: Iterable[str]) -> list[str]:
    if isinstance(names, str):
        raise ValidationError("exclude_tasks must be a list of task names, not one string")
    out = list(names)
    if len(out) > MAX_EXCLUDE_TASKS:
        raise ValidationError(f"at most {MAX_EXCLUDE_TASKS} excluded tasks, got {len(out)}")
    for name in out:
        if not isinstance(name, str):
            raise ValidationError("exclude_tasks must hold strings")
    return out
