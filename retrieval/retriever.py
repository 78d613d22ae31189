"""What the request path needs of retrieval: one embedding per request (shared with the
router) and a search of the store, without blocking the event loop.

Concurrent requests' queries are embedded together: a request that arrives while a batch
is being encoded waits for the next batch instead of taking the embedder's lock alone,
so 64 concurrent requests cost a few batched encodes rather than 64 single ones.

Embeddings are cached by their text (bounded, least recently used first out): a task's
definition, embedded for task-level retrieval, is embedded once, and a repeated request
costs no encode. Two concurrent requests for one text share one encode.

On a read-only replica the store can be replaced while serving (a newer snapshot, see
snapshots.py): the embedder stays (the router shares it), searches in flight finish on
the store they started with, and that store is closed once the last of them is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval.embedder import (
    Embedder,
    EmbedderMismatchError,
    check_store_metadata,
    store_backend,
)
from retrieval.query import QUERY_TEXT_VERSION
from retrieval.snapshots import (
    DEFAULT_GRACE_SECONDS,
    SnapshotFollower,
    SnapshotPublisher,
    resolve,
    snapshot_metadata,
)
from retrieval.store import DB_FILE, DemonstrationStore
from retrieval.store_db import read_metadata
from retrieval.store_types import Hit, StoreError


@dataclass
class _Pending:
    text: str
    future: asyncio.Future[np.ndarray]


@dataclass
class EmbeddingCache:
    """Unit-length embeddings by text, at most `size` of them (0: no cache). The vectors
    are read-only arrays, shared by every request that asks for their text."""

    size: int = 4096
    hits: int = 0
    misses: int = 0
    _vectors: OrderedDict[str, np.ndarray] = field(default_factory=OrderedDict, repr=False)

    def get(self, text: str) -> np.ndarray | None:
        vector = self._vectors.get(text)
        if vector is None:
            self.misses += 1
            return None
        self._vectors.move_to_end(text)
        self.hits += 1
        return vector

    def put(self, text: str, vector: np.ndarray) -> None:
        if self.size <= 0:
            return
        vector.flags.writeable = False
        self._vectors[text] = vector
        self._vectors.move_to_end(text)
        while len(self._vectors) > self.size:
            self._vectors.popitem(last=False)

    def __len__(self) -> int:
        return len(self._vectors)


@dataclass
class Retriever:
    embedder: Embedder
    store: DemonstrationStore
    max_batch: int = 64
    cache: EmbeddingCache = field(default_factory=EmbeddingCache)
    # The writer publishes snapshots of its store; a reader follows them.
    publisher: SnapshotPublisher | None = None
    follower: SnapshotFollower | None = None
    _queue: asyncio.Queue[_Pending] | None = field(default=None, init=False)
    _worker: asyncio.Task[None] | None = field(default=None, init=False)
    _following: asyncio.Task[None] | None = field(default=None, init=False)
    _started: bool = field(default=False, init=False)
    # Every encode runs on this one thread. torch keeps its compiled matmul primitives per
    # thread (ideep's cache, one primitive per input shape) and glibc a heap arena per
    # thread: encodes spread over the default executor's threads multiplied both, and the
    # API process kept growing under load.
    _embed_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="crosstask-embed"),
        init=False,
        repr=False,
    )
    # Searches running on each store (all on the event loop, so no lock): a replaced
    # store is closed when its count drops to zero.
    _searches: dict[DemonstrationStore, int] = field(default_factory=dict, init=False)
    # Texts being encoded now, so that a second request for one waits for the first.
    _inflight: dict[str, asyncio.Future[np.ndarray]] = field(default_factory=dict, init=False)

    def start(self) -> None:
        """Start the background work, on the running event loop: publishing snapshots
        (writer) or following them (reader). Idempotent."""
        if self._started:
            return
        self._started = True
        if self.publisher is not None:
            self.publisher.start()
        if self.follower is not None:
            self._following = asyncio.create_task(self.follower.run(self.replace_store))

    def replace_store(self, store: DemonstrationStore) -> None:
        """Serve `store` from now on (call on the event loop, between requests). The old
        store is closed at once if no search uses it, else by the last one."""
        old, self.store = self.store, store
        if old is not store and old not in self._searches:
            old.close()  # A read-only store: this closes its SQLite connections, quickly.

    async def embed(self, text: str) -> np.ndarray:
        """The unit-length embedding of `text` (read-only): from the cache, or batched with
        concurrent callers."""
        cached = self.cache.get(text)
        if cached is not None:
            return cached
        pending = self._inflight.get(text)
        if pending is not None:
            # shield: one caller giving up must not cancel the encode the others wait for.
            return await asyncio.shield(pending)
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._encode_batches(self._queue))
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._inflight[text] = future
        await self._queue.put(_Pending(text, future))
        return await asyncio.shield(future)

    async def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length embeddings of `texts`, one batch, on the embedder's own thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._embed_thread, self.embedder.encode, texts)

    async def _encode_batches(self, queue: asyncio.Queue[_Pending]) -> None:
        # The futures are never cancelled (callers wait through asyncio.shield): what is
        # encoded for a caller that gave up still fills the cache.
        while True:
            batch = [await queue.get()]
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                vectors = await self.encode([p.text for p in batch])
            except Exception as exc:
                for p in batch:
                    self._inflight.pop(p.text, None)
                    p.future.set_exception(exc)
                    # Retrieved or not, the exception is the callers' to see, not the loop's.
                    p.future.exception()
                continue
            for p, vector in zip(batch, vectors, strict=True):
                self.cache.put(p.text, vector)
                self._inflight.pop(p.text, None)
                p.future.set_result(vector)

    async def search(
        self, vector: np.ndarray, k: int, min_score: float, exclude_tasks: Sequence[str]
    ) -> list[Hit]:
        store = self.store  # Kept for the whole search, even if a newer one is swapped in.
        self._searches[store] = self._searches.get(store, 0) + 1
        try:
            return await asyncio.to_thread(store.search, vector, k, min_score, exclude_tasks)
        finally:
            left = self._searches.pop(store) - 1
            if left:
                self._searches[store] = left
            elif store is not self.store:
                store.close()

    async def close(self) -> None:
        for task in (self._worker, self._following):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.publisher is not None:
            # Publishes what readers have not got yet: every acknowledged write.
            await asyncio.to_thread(self.publisher.close)
        # Replaced stores still searched are closed too: close() waits for the searches.
        for store in {self.store, *self._searches}:
            await asyncio.to_thread(store.close)
        self._embed_thread.shutdown(wait=False, cancel_futures=True)


def open_retriever(
    store_dir: Path,
    embedder_dir: Path | None = None,
    *,
    read_only: bool = False,
    backend: str | None = None,
    quantize: str | None = None,
) -> Retriever:
    """Load the embedder and open the store, refusing a store embedded by another model
    or with other weights (its vectors would not be comparable with the requests').
    `read_only` searches a store that a server (its one writer) may hold open.

    The embedder runs the backend and quantization the store records (`backend` and
    `quantize` None); given explicitly, a conflicting pair is refused."""
    embedder = load_embedder(
        recorded_metadata(store_dir), embedder_dir, backend=backend, quantize=quantize
    )
    return Retriever(embedder, open_store(store_dir, embedder, read_only=read_only))


def open_replica(
    root: Path,
    embedder_dir: Path | None = None,
    *,
    read_only: bool,
    publish: bool = True,
    reload_seconds: float = 0.0,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
) -> Retriever:
    """The store as a server holds it (deploy/README.md: one writer, many readers).

    Writer (`read_only` False): the live store at `root`, publishing a snapshot of it
    after writes when `publish` (a lone server need not). Reader: the snapshot
    `root/CURRENT` names, or `root` itself when there is no CURRENT (a flat store),
    read-only; with `reload_seconds` > 0 it follows CURRENT to newer snapshots. The
    background work starts with Retriever.start()."""
    if not read_only:
        retriever = open_retriever(root, embedder_dir)
        if publish:
            retriever.publisher = SnapshotPublisher(
                retriever.store, root, grace_seconds=grace_seconds
            )
        return retriever
    folder, snapshot = resolve(root)
    recorded = recorded_metadata(folder) if snapshot is None else snapshot_metadata(folder)
    embedder = load_embedder(recorded, embedder_dir)
    store = open_store(folder, embedder, read_only=True, immutable=_immutable(folder, snapshot))
    retriever = Retriever(embedder, store)
    if reload_seconds > 0:
        retriever.follower = SnapshotFollower(
            root,
            snapshot,
            # The reader's one embedder serves every snapshot (and the router).
            lambda path: open_store(path, embedder, read_only=True, immutable=True),
            reload_seconds,
        )
    return retriever


def _immutable(folder: Path, snapshot: str | None) -> bool:
    """Read without locks or -wal/-shm files: a published snapshot, or a flat store in a
    folder this process cannot write (SQLite could not open a WAL database there any other
    way) that no writer has open (no write-ahead log beside it), such as one baked into an image."""
    if snapshot is not None:
        return True
    wal = folder / f"{DB_FILE}-wal"
    return not os.access(folder, os.W_OK) and (not wal.exists() or wal.stat().st_size == 0)


def load_embedder(
    recorded: dict[str, str],
    embedder_dir: Path | None = None,
    *,
    backend: str | None = None,
    quantize: str | None = None,
) -> Embedder:
    """The embedder for a store with metadata `recorded`, with the backend and
    quantization it records (unless given)."""
    recorded_backend, recorded_quantize = store_backend(recorded)
    backend = backend or recorded_backend
    if quantize is None:
        quantize = recorded_quantize if backend == recorded_backend else "none"
    # One thread: the server's CPU belongs to vLLM; more threads that keep losing their
    # core to it ran slower than one (docs/retrieval.md, "The embedder").
    return Embedder(embedder_dir, num_threads=1, backend=backend, quantize=quantize)


def open_store(
    store_dir: Path, embedder: Embedder, *, read_only: bool = False, immutable: bool = False
) -> DemonstrationStore:
    """Open the store at `store_dir` if `embedder` embeds like it (same model, weights
    and query text version), else StoreError."""
    store = DemonstrationStore.open(
        store_dir, embedder.dim, read_only=read_only, immutable=immutable
    )
    try:
        check_store_metadata(store.metadata(), embedder, str(store_dir))
    except EmbedderMismatchError as exc:
        store.close()
        raise StoreError(str(exc)) from exc
    version = store.metadata().get("query_text_version")
    if version and version != str(QUERY_TEXT_VERSION):
        store.close()
        raise StoreError(
            f"The store {store_dir} embeds query text version {version}; this build uses "
            f"{QUERY_TEXT_VERSION}. Rebuild it with `crosstask store build`."
        )
    return store


def recorded_metadata(store_dir: Path) -> dict[str, str]:
    """A live store's metadata; empty if there is no store there yet."""
    return read_metadata(Path(store_dir) / DB_FILE)
