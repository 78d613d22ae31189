"""The FAISS side of the demonstration store (the only module that imports FAISS).

Vectors are keyed by the store's seq (IndexIDMap), so a hit maps straight to a database
row. Filtering (excluded tasks, deleted entries) takes a boolean mask over seq space:
flat search applies it inside FAISS as an IDSelectorBitmap (exact); HNSW over-fetches
and filters, then falls back to exact search. Either way a search finds k allowed hits
however many of the nearest vectors are filtered out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss as _faiss
import numpy as np

# FAISS's bundled type stubs lag the library (no SearchParametersHNSW; downcast_index is
# typed as returning the base Index), so it is used untyped here.
faiss: Any = _faiss

FLAT = "flat"
HNSW = "hnsw"
INDEX_KINDS = (FLAT, HNSW)

# HNSW parameters, chosen with bench/store_search.py (recall@10 against flat search and
# latency at 100,000 384-d vectors): M=32 links per node; efConstruction 80 keeps the
# build near 1.5 ms a vector on two cores; efSearch 64 gives recall@10 above 0.95.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64
# With a filter, HNSW results are fetched unfiltered and filtered here; when too few
# survive, the fetch widens up to this many before an exact scan takes over (at 100,000
# vectors a 1,024-wide HNSW search costs about a quarter of an exact one).
HNSW_OVERFETCH_MAX = 1024

_MAGIC = b"CTXIDX01"
_HEADER_LEN = struct.Struct("<Q")


class IndexFileError(RuntimeError):
    """The index file is missing, damaged, or belongs to something else."""


@dataclass(frozen=True, slots=True)
class IndexHeader:
    """What an index file reflects, so a stale or foreign one is caught on open."""

    kind: str
    dim: int
    store_uid: str
    generation: int
    ntotal: int
    max_seq: int


class VectorIndex:
    """An inner-product FAISS index over L2-normalized vectors, keyed by seq.

    Not thread-safe for writes: the store holds its write lock around add/remove and
    its read lock around search (FAISS searches are safe to run concurrently).
    """

    def __init__(self, kind: str, dim: int, index: Any | None = None) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, not {kind!r}")
        self.kind = kind
        self.dim = dim
        self.build_threads = len(os.sched_getaffinity(0))
        self._index = index if index is not None else _new_index(kind, dim)

    @property
    def ntotal(self) -> int:
        """Entries in the index, including HNSW entries already deleted from the store."""
        return int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)

    def add(self, seqs: np.ndarray, vectors: np.ndarray) -> None:
        if len(seqs):
            # Bulk adds (HNSW construction) do gain from every core; undo a search's
            # setting if this thread ran one before.
            faiss.omp_set_num_threads(self.build_threads)
            self._index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32),
                np.ascontiguousarray(seqs, dtype=np.int64),
            )

    def remove(self, seqs: np.ndarray) -> None:
        """Flat: drop the entries. HNSW cannot remove; its dead entries stay and are
        masked out at search time until the store rebuilds the index."""
        if self.kind == FLAT and len(seqs):
            self._index.remove_ids(np.ascontiguousarray(seqs, dtype=np.int64))

    def search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None, n_allowed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, seqs) for one query, best first, only among `allowed` seqs
        (a boolean mask over seq space; None allows everything)."""
        want = min(k, n_allowed)
        if want <= 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        # One query runs on the calling thread. An OpenMP team for a single query costs
        # more than it saves, and on a CPU shared with vLLM a 2-thread team waits for
        # scheduler slices: flat search over 20,000 vectors took 24 ms (p50) with two
        # threads, 1.1 ms with one. The setting is per calling thread (an OpenMP ICV).
        faiss.omp_set_num_threads(1)
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        if self.kind == FLAT:
            params = faiss.SearchParameters()
            if allowed is not None:
                # Both must outlive the search: FAISS holds raw pointers to them.
                bits = np.packbits(allowed, bitorder="little")
                selector = self._selector(bits)
                params.sel = selector
            scores, labels = self._index.search(q, want, params=params)
            return _valid(scores[0], labels[0])
        if allowed is None:
            return self._hnsw(q, want)
        # Filtering inside HNSW fails silently when the query sits among excluded
        # vectors (the usual case: a task excluded from its own retrieval): the bounded
        # candidate list fills with excluded neighbours and the allowed hits it returns
        # are not the nearest (recall@8 of 0.02 at efSearch 64 on 100,000 vectors). So
        # fetch unfiltered and filter here, which is right whenever enough allowed hits
        # come back; when they do not, exact search.
        # Two tries: a narrow fetch, enough unless the query's neighbourhood is filtered
        # out; then one wide enough to get past every denied row, capped. (A step
        # between them cost more than it saved at 100,000 vectors.)
        narrow = max(HNSW_EF_SEARCH, 2 * want)
        wide = min(self.ntotal - n_allowed + want, HNSW_OVERFETCH_MAX, self.ntotal)
        for fetch in [narrow] if wide <= narrow else [narrow, wide]:
            scores, seqs = self._hnsw(q, min(fetch, self.ntotal))
            inside = seqs < allowed.size
            ok = np.zeros(len(seqs), dtype=bool)
            ok[inside] = allowed[seqs[inside]]
            if int(ok.sum()) >= want:
                return scores[ok][:want], seqs[ok][:want]
        return self._exact(q[0], want, allowed)

    def _hnsw(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(HNSW_EF_SEARCH, k)
        scores, labels = self._index.search(q, k, params=params)
        return _valid(scores[0], labels[0])

    @staticmethod
    def _selector(bits: np.ndarray) -> Any:
        # n is the bitmap's size in bytes; ids beyond it are not members.
        return faiss.IDSelectorBitmap(bits.size, faiss.swig_ptr(bits))

    def _exact(
        self, query: np.ndarray, k: int, allowed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over HNSW's own flat copy of the vectors, for filters so
        restrictive that graph search cannot find k allowed neighbours. That copy is
        keyed by position, so the seq mask is translated to positions first."""
        storage = faiss.downcast_index(faiss.downcast_index(self._index.index).storage)
        ids = self.ids()
        ok = np.zeros(len(ids), dtype=bool)
        inside = ids < allowed.size
        ok[inside] = allowed[ids[inside]]
        bits = np.packbits(ok, bitorder="little")
        params = faiss.SearchParameters()
        selector = self._selector(bits)  # Kept alive: params holds a raw pointer.
        params.sel = selector
        scores, positions = storage.search(query.reshape(1, self.dim), k, params=params)
        found = positions[0] >= 0
        return scores[0][found].astype(np.float32), ids[positions[0][found]]

    # -- persistence

    def save(self, path: Path, header: IndexHeader) -> None:
        """Write atomically: temp file, fsync, rename, fsync the folder. A reader (or a
        crash) sees the old file or the new one, never a torn one."""
        payload = faiss.serialize_index(self._index).tobytes()
        fields = {name: getattr(header, name) for name in IndexHeader.__slots__}
        digest = hashlib.sha256(payload).hexdigest()
        meta = json.dumps({**fields, "sha256": digest, "payload_len": len(payload)}).encode()
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(_MAGIC + _HEADER_LEN.pack(len(meta)) + meta)
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: Path) -> tuple[VectorIndex, IndexHeader]:
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise IndexFileError("no index file") from exc
        except OSError as exc:
            raise IndexFileError(f"unreadable: {exc}") from exc
        fixed = len(_MAGIC) + _HEADER_LEN.size
        if len(data) < fixed or not data.startswith(_MAGIC):
            raise IndexFileError("not a crosstask index file")
        (meta_len,) = _HEADER_LEN.unpack_from(data, len(_MAGIC))
        try:
            meta = json.loads(data[fixed : fixed + meta_len])
            payload = memoryview(data)[fixed + meta_len :]
            if len(payload) != meta.pop("payload_len"):
                raise IndexFileError("truncated")
            if hashlib.sha256(payload).hexdigest() != meta.pop("sha256"):
                raise IndexFileError("checksum mismatch")
            header = IndexHeader(**meta)
        except (ValueError, KeyError, TypeError) as exc:
            raise IndexFileError(f"bad header: {exc}") from exc
        # Only checksummed bytes reach FAISS, whose reader trusts its input.
        try:
            index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8).copy())
        except RuntimeError as exc:
            raise IndexFileError(f"FAISS cannot read it: {exc}") from exc
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else None
        expected = faiss.IndexFlat if header.kind == FLAT else faiss.IndexHNSWFlat
        if not isinstance(inner, expected) or index.d != header.dim:
            raise IndexFileError("unexpected index structure")
        return cls(header.kind, header.dim, index), header


def _new_index(kind: str, dim: int) -> Any:
    if kind == FLAT:
        inner = faiss.IndexFlatIP(dim)
    else:
        inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        inner.hnsw.efSearch = HNSW_EF_SEARCH
    return faiss.IndexIDMap(inner)


def _valid(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = labels >= 0
    return scores[keep].astype(np.float32), labels[keep].astype(np.int64)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
