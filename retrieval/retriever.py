"""What the request path needs of retrieval: one embedding per request (shared with the
router) and a search of the store, without blocking the event loop.

Concurrent requests' queries are embedded together: a request that arrives while a batch
is being encoded waits for the next batch instead of taking the embedder's lock alone,
so 64 concurrent requests cost a few batched encodes rather than 64 single ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Sequence
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
from retrieval.store import DB_FILE, DemonstrationStore, Hit, StoreError


@dataclass
class _Pending:
    text: str
    future: asyncio.Future[np.ndarray]


@dataclass
class Retriever:
    embedder: Embedder
    store: DemonstrationStore
    max_batch: int = 64
    _queue: asyncio.Queue[_Pending] | None = field(default=None, init=False)
    _worker: asyncio.Task[None] | None = field(default=None, init=False)

    async def embed(self, text: str) -> np.ndarray:
        """The unit-length embedding of `text`, batched with concurrent callers."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._encode_batches(self._queue))
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(text, future))
        return await future

    async def _encode_batches(self, queue: asyncio.Queue[_Pending]) -> None:
        while True:
            batch = [await queue.get()]
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            live = [p for p in batch if not p.future.done()]
            if not live:
                continue
            try:
                vectors = await asyncio.to_thread(self.embedder.encode, [p.text for p in live])
            except Exception as exc:
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, vector in zip(live, vectors, strict=True):
                if not p.future.done():
                    p.future.set_result(vector)

    async def search(
        self, vector: np.ndarray, k: int, min_score: float, exclude_tasks: Sequence[str]
    ) -> list[Hit]:
        return await asyncio.to_thread(self.store.search, vector, k, min_score, exclude_tasks)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        await asyncio.to_thread(self.store.close)


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
    recorded_backend, recorded_quantize = store_backend(recorded_metadata(store_dir))
    backend = backend or recorded_backend
    if quantize is None:
        quantize = recorded_quantize if backend == recorded_backend else "none"
    # One thread: the server's CPU belongs to vLLM; more threads that keep losing their
    # core to it ran slower than one (see bench/store_build.py).
    embedder = Embedder(embedder_dir, num_threads=1, backend=backend, quantize=quantize)
    store = DemonstrationStore.open(store_dir, embedder.dim, read_only=read_only)
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
    return Retriever(embedder, store)


def recorded_metadata(store_dir: Path) -> dict[str, str]:
    """The store's metadata, read before its embedder exists (opening the store needs the
    embedder's width); empty if there is no store there yet."""
    db = Path(store_dir) / DB_FILE
    if not db.is_file():
        return {}
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return dict(conn.execute("SELECT key, value FROM meta").fetchall())
        finally:
            conn.close()
    except sqlite3.Error:
        return {}  # DemonstrationStore.open reports a damaged database properly.
