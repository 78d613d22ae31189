"""The demonstration store's source of truth: one SQLite file.

Every demonstration, its vector included (float32 blob), lives here; the FAISS index is a
cache that can always be rebuilt from this file. Writes commit in WAL mode with
synchronous=FULL, so a write that returned survives a crash or power cut.
"""

from __future__ import annotations

import queue
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")

SCHEMA_VERSION = 1
# SQLite caps host parameters per statement at 32766; stay far below.
_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tasks (task_no INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
-- Natural Instructions definitions run to 3 kB and repeat for thousands of examples.
CREATE TABLE IF NOT EXISTS definitions (def_no INTEGER PRIMARY KEY, text TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS demos (
    -- AUTOINCREMENT: a deleted seq is never reused, so a stale index entry can never
    -- point at a different demonstration.
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task_no INTEGER NOT NULL REFERENCES tasks(task_no),
    def_no INTEGER NOT NULL REFERENCES definitions(def_no),
    input TEXT NOT NULL,
    output TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at REAL NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS demos_task ON demos(task_no);
"""


@dataclass(frozen=True, slots=True)
class Row:
    """What a search hit needs from the database."""

    seq: int
    task: str
    definition: str
    input: str
    output: str
    source: str


@dataclass(frozen=True, slots=True)
class NewRow:
    task: str
    definition: str
    input: str
    output: str
    source: str


class DatabaseError(RuntimeError):
    pass


@dataclass
class PinnedRead:
    """The database as of one generation (see StoreDB.pin)."""

    conn: sqlite3.Connection
    generation: int

    def backup_to(self, path: Path) -> None:
        """Copy the pinned state into a new database file at `path` with SQLite's backup
        API: a consistent copy of a live WAL database, where copying its files is not."""
        dest = sqlite3.connect(path, isolation_level=None)
        try:
            # One step (pages=-1) reads everything inside the pinned transaction.
            self.conn.backup(dest, pages=-1)
            # The copy inherits WAL mode from the source's header; rollback mode makes it
            # one self-contained file that readers open without -wal or -shm files.
            dest.execute("PRAGMA journal_mode=DELETE")
        finally:
            dest.close()

    def close(self) -> None:
        self.conn.close()  # Ends the read transaction.


class StoreDB:
    """SQLite access: one writer connection (callers serialize writes) and a pool of
    read-only connections, so searches on many threads never share a connection."""

    def __init__(
        self, path: Path, dim: int, *, read_only: bool = False, immutable: bool = False
    ) -> None:
        if immutable and not read_only:
            raise DatabaseError("an immutable database can only be opened read-only")
        self.path = path
        self.dim = dim
        self.read_only = read_only
        # A published snapshot never changes: SQLite may then skip locks and the -wal and
        # -shm files, which are unreliable (or impossible, on a read-only mount) on the
        # network file systems that share snapshots between replicas.
        self.immutable = immutable
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all: list[sqlite3.Connection] = []
        if read_only:
            if not path.is_file():
                raise DatabaseError(f"no demonstration store at {path}")
            self._writer: sqlite3.Connection | None = None
        else:
            self._writer = self._connect(read_only=False)
            self._writer.execute("PRAGMA journal_mode=WAL")
            self._writer.executescript(_SCHEMA)
            self._init_meta()
        self._check_meta()

    # -- connections

    def _uri(self, *, read_only: bool) -> str:
        query = ""
        if read_only:
            query = "?mode=ro&immutable=1" if self.immutable else "?mode=ro"
        return f"{self.path.resolve().as_uri()}{query}"

    def _open(self, *, read_only: bool) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a batch is one
        # transaction and nothing is committed behind our back.
        conn = sqlite3.connect(
            self._uri(read_only=read_only),
            uri=True,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute("PRAGMA busy_timeout=10000")
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect(self, *, read_only: bool) -> sqlite3.Connection:
        """A connection of the store's own, closed by close()."""
        conn = self._open(read_only=read_only)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        self._all.append(conn)
        return conn

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = self._connect(read_only=True)
        try:
            yield conn
        finally:
            self._readers.put(conn)

    @contextmanager
    def _transaction(self, *, bump_generation: bool = True) -> Iterator[sqlite3.Connection]:
        if self._writer is None:
            raise DatabaseError("the store was opened read-only")
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            if bump_generation:
                conn.execute(
                    "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'"
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def pin(self) -> PinnedRead:
        """A read transaction on a connection of its own, begun now: what it reads (and
        copies) stays as of this moment while writers go on (WAL readers never block
        writers). Close it soon: WAL checkpoints cannot pass it."""
        conn = self._open(read_only=True)
        try:
            conn.execute("BEGIN")
            # The transaction takes its snapshot at its first read.
            generation = _generation(conn)
        except BaseException:
            conn.close()
            raise
        return PinnedRead(conn, generation)

    def close(self) -> None:
        for conn in self._all:
            conn.close()
        self._all.clear()

    # -- metadata

    def _init_meta(self) -> None:
        defaults = {
            "schema_version": str(SCHEMA_VERSION),
            "dim": str(self.dim),
            "store_uid": uuid.uuid4().hex,
            "generation": "0",
            "created_at": repr(time.time()),
        }
        # Not a write of the store's: reopening an existing store leaves its generation.
        with self._transaction(bump_generation=False) as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", defaults.items()
            )

    def _check_meta(self) -> None:
        meta = self.metadata()
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise DatabaseError(
                f"{self.path}: schema version {meta.get('schema_version')!r}, "
                f"this code reads {SCHEMA_VERSION}"
            )
        if meta.get("dim") != str(self.dim):
            raise DatabaseError(
                f"{self.path}: the store holds {meta.get('dim')}-d vectors, not {self.dim}-d"
            )

    def metadata(self) -> dict[str, str]:
        with self._reader() as conn:
            return dict(conn.execute("SELECT key, value FROM meta").fetchall())

    def set_metadata(self, values: dict[str, str]) -> None:
        with self._transaction() as conn:
            conn.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                values.items(),
            )

    def generation(self) -> int:
        """Bumped by every committed write; the index file records the one it reflects."""
        with self._reader() as conn:
            return _generation(conn)

    def last_seq(self) -> int:
        """The highest seq ever assigned (deleted ones included)."""
        with self._reader() as conn:
            return _last_seq(conn)

    # -- writes

    def insert(self, rows: Sequence[NewRow], vectors: np.ndarray) -> tuple[list[int], list[int]]:
        """Insert all rows in one durable transaction; return (seqs, task_nos)."""
        blobs = [np.ascontiguousarray(v, dtype="<f4").tobytes() for v in vectors]
        now = time.time()
        with self._transaction() as conn:
            task_nos = self._ids_for(conn, "tasks", "task_no", "name", [r.task for r in rows])
            def_nos = self._ids_for(
                conn, "definitions", "def_no", "text", [r.definition for r in rows]
            )
            # Inside BEGIN IMMEDIATE nobody else writes, so the next seqs are known before
            # the insert; AUTOINCREMENT keeps them above every seq ever used.
            start = _last_seq(conn) + 1
            seqs = list(range(start, start + len(rows)))
            conn.executemany(
                "INSERT INTO demos(seq, task_no, def_no, input, output, source, created_at, "
                "vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (seq, t, d, r.input, r.output, r.source, now, blob)
                    for seq, t, d, r, blob in zip(seqs, task_nos, def_nos, rows, blobs, strict=True)
                ],
            )
        return seqs, task_nos

    @staticmethod
    def _ids_for(
        conn: sqlite3.Connection, table: str, key: str, column: str, values: list[str]
    ) -> list[int]:
        distinct = list(dict.fromkeys(values))
        conn.executemany(
            f"INSERT OR IGNORE INTO {table}({column}) VALUES (?)", [(v,) for v in distinct]
        )
        found: dict[str, int] = {}
        for chunk in _chunks(distinct):
            marks = ",".join("?" * len(chunk))
            found.update(
                conn.execute(
                    f"SELECT {column}, {key} FROM {table} WHERE {column} IN ({marks})", chunk
                ).fetchall()
            )
        return [found[v] for v in values]

    def delete_seqs(self, seqs: Sequence[int]) -> list[int]:
        """Delete these demonstrations; return the seqs that existed."""
        deleted: list[int] = []
        with self._transaction() as conn:
            for chunk in _chunks(list(dict.fromkeys(seqs))):
                marks = ",".join("?" * len(chunk))
                deleted += [
                    r[0]
                    for r in conn.execute(
                        f"DELETE FROM demos WHERE seq IN ({marks}) RETURNING seq", chunk
                    ).fetchall()
                ]
        return deleted

    def delete_task(self, task: str) -> list[int]:
        with self._transaction() as conn:
            rows = conn.execute(
                "DELETE FROM demos WHERE task_no = (SELECT task_no FROM tasks WHERE name = ?) "
                "RETURNING seq",
                (task,),
            ).fetchall()
        return [r[0] for r in rows]

    # -- reads

    def task_names(self) -> dict[int, str]:
        with self._reader() as conn:
            return dict(conn.execute("SELECT task_no, name FROM tasks").fetchall())

    def alive(self) -> tuple[np.ndarray, np.ndarray]:
        """(seqs, task_nos) of every stored demonstration, in seq order."""
        with self._reader() as conn:
            rows = conn.execute("SELECT seq, task_no FROM demos ORDER BY seq").fetchall()
        data = np.array(rows, dtype=np.int64).reshape(-1, 2)
        return data[:, 0].copy(), data[:, 1].copy()

    def vectors(self, seqs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(seqs, vectors) for the given seqs (all when None), in seq order."""
        with self._reader() as conn:
            if seqs is None:
                rows = conn.execute("SELECT seq, vector FROM demos ORDER BY seq").fetchall()
            else:
                rows = []
                for chunk in _chunks(sorted(int(s) for s in seqs)):
                    marks = ",".join("?" * len(chunk))
                    rows += conn.execute(
                        f"SELECT seq, vector FROM demos WHERE seq IN ({marks}) ORDER BY seq",
                        chunk,
                    ).fetchall()
        out_seqs = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        flat = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4")
        if flat.size != len(rows) * self.dim:
            raise DatabaseError(f"{self.path}: a stored vector does not have {self.dim} floats")
        return out_seqs, flat.reshape(len(rows), self.dim).astype(np.float32, copy=False)

    def fetch(self, seqs: Sequence[int]) -> dict[int, Row]:
        out: dict[int, Row] = {}
        with self._reader() as conn:
            for chunk in _chunks(list(seqs)):
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    "SELECT d.seq, t.name, f.text, d.input, d.output, d.source FROM demos d "
                    "JOIN tasks t ON t.task_no = d.task_no "
                    "JOIN definitions f ON f.def_no = d.def_no "
                    f"WHERE d.seq IN ({marks})",
                    chunk,
                ).fetchall()
                out.update((r[0], Row(*r)) for r in rows)
        return out


def _generation(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    return int(row[0])


def _last_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'demos'").fetchone()
    return int(row[0]) if row else 0


def _chunks(items: list[T], size: int = _CHUNK) -> Iterator[list[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def read_metadata(db: Path, *, immutable: bool = False) -> dict[str, str]:
    """The `meta` table of the database at `db` (store_uid, generation, the embedder...),
    read before a store is opened (opening one needs the embedder's width); empty when
    there is no readable database there (opening the store reports a damaged one
    properly). `immutable`: a published snapshot, which no one writes again."""
    if not db.is_file():
        return {}
    query = "mode=ro&immutable=1" if immutable else "mode=ro"
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?{query}", uri=True)
        try:
            return dict(conn.execute("SELECT key, value FROM meta").fetchall())
        finally:
            conn.close()
    except sqlite3.Error:
        return {}


def demo_count(db: Path) -> int:
    """How many demonstrations the database at `db` holds, read without opening the
    store; 0 when there is no readable database there."""
    if not db.is_file():
        return 0
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM demos").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def make_self_contained(db: Path) -> None:
    """Fold the write-ahead log into the database file and switch it to rollback mode: one
    self-contained file, which a reader opens without -wal or -shm files even in a folder
    it cannot write (an image's baked store, a read-only mount). A writer that opens it
    later turns WAL mode back on."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode=DELETE")
    finally:
        conn.close()
