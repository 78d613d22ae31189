"""The FAISS side of the demonstration store (the only module that imports FAISS).

Vectors are keyed by the store's seq (FAISS ids), so a hit maps straight to a database
row. Filtering (excluded tasks, deleted entries) takes a boolean mask over seq space:
flat and IVF search apply it inside FAISS as an IDSelectorBitmap; HNSW over-fetches and
filters. Each falls back to exact search when too few allowed hits come back, so a search
finds k allowed hits however many of the nearest vectors are filtered out.

Kinds: `flat` (exact; IndexIDMap over IndexFlatIP), `ivf` (IndexIVFFlat, the default past
the size threshold) and `hnsw` (IndexIDMap over IndexHNSWFlat). IVF was chosen over HNSW
for this workload by bench/store_search.py at 100,000 vectors: with the query's own task
excluded (leave-one-task-out evaluation) HNSW misses many of the true nearest and is
slower, while IVF finds them all, builds far faster and deletes in place (figures in
docs/retrieval.md, "The index").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import faiss as _faiss
import numpy as np

from retrieval.durable import write_atomic

# FAISS's bundled type stubs lag the library (no SearchParametersHNSW; downcast_index is
# typed as returning the base Index), so it is used untyped here.
faiss: Any = _faiss

FLAT = "flat"
IVF = "ivf"
HNSW = "hnsw"
INDEX_KINDS = (FLAT, IVF, HNSW)

# IVF: about 4*sqrt(N) lists (a power of two; 1,024 at 100,000 vectors), never fewer
# than IVF_MIN_POINTS_PER_LIST training points a list (k-means needs them); probe 1/16
# of the lists (64 of 1,024), which found every true neighbour on the benchmark, with and
# without an own-task exclusion (docs/retrieval.md, "The index").
IVF_MIN_POINTS_PER_LIST = 39
IVF_MAX_LISTS = 16_384
IVF_PROBE_FRACTION = 16
IVF_MIN_PROBES = 8
# k-means on 64 points a list for 10 rounds: quick to train; more points or rounds did
# not change recall on the benchmark (docs/retrieval.md, "The index").
IVF_TRAIN_POINTS_PER_LIST = 64
IVF_TRAIN_ITERATIONS = 10

# HNSW parameters (bench/store_search.py, 100,000 384-d vectors): M=32 links a node,
# efConstruction 80, efSearch 64: near-exact recall unfiltered at a fast search, for a
# slow build (docs/retrieval.md, "The index"). Kept as an explicit choice; "auto" picks
# IVF (see the module docstring).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64
# With a filter, HNSW results are fetched unfiltered and filtered here; when too few
# survive, the fetch widens up to this many before an exact scan takes over (a fetch this
# wide still costs well under an exact search: docs/retrieval.md, "The index").
HNSW_OVERFETCH_MAX = 1024

# OpenMP threads for bulk work (IVF training, HNSW construction). One: these rebuilds run
# inside the server, beside vLLM, and a 2-thread OpenMP team on a CPU vLLM keeps busy
# trained IVF lists several times slower than one thread (docs/retrieval.md, "The
# index"). Raise it on a machine with cores to spare.
BUILD_THREADS = 1

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
        self.build_threads = BUILD_THREADS
        # IVF is created on its first add, when there are vectors to train it on.
        self._index: Any = index if index is not None or kind == IVF else _new_index(kind, dim)

    @classmethod
    def build(cls, kind: str, dim: int, seqs: np.ndarray, vectors: np.ndarray) -> VectorIndex:
        index = cls(kind, dim)
        index.add(seqs, vectors)
        return index

    @property
    def ntotal(self) -> int:
        """Entries in the index, including HNSW entries already deleted from the store."""
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def nlist(self) -> int:
        return int(self._index.nlist) if self.kind == IVF and self._index is not None else 0

    def needs_retrain(self, count: int) -> bool:
        """IVF trained when the store was a quarter of this size or less: its lists
        are too few and too long now."""
        return self.kind == IVF and ivf_lists(count) >= 2 * max(self.nlist, 1)

    def ids(self) -> np.ndarray:
        if self._index is None:
            return np.empty(0, np.int64)
        if self.kind != IVF:
            return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)
        lists = self._index.invlists
        parts = [
            faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
            for i in range(lists.nlist)
            if lists.list_size(i)
        ]
        return np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64)

    def add(self, seqs: np.ndarray, vectors: np.ndarray) -> None:
        if not len(seqs):
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        # Per calling thread (an OpenMP ICV): searches on this thread are unaffected.
        faiss.omp_set_num_threads(self.build_threads)
        if self._index is None:
            self._index = _new_ivf(self.dim, vectors)
        self._index.add_with_ids(vectors, np.ascontiguousarray(seqs, dtype=np.int64))

    def remove(self, seqs: np.ndarray) -> None:
        """Flat and IVF: drop the entries. HNSW cannot remove; its dead entries stay and
        are masked out at search time until the store rebuilds the index."""
        if self.kind != HNSW and len(seqs) and self._index is not None:
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
        # scheduler slices, an order of magnitude slower than one thread (docs/retrieval.md,
        # "The index"). The setting is per calling thread (an OpenMP ICV).
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
        if self.kind == IVF:
            return self._ivf(q, want, allowed)
        if allowed is None:
            return self._hnsw(q, want)
        # Filtering inside HNSW fails silently when the query sits among excluded
        # vectors (the usual case: a task excluded from its own retrieval): the bounded
        # candidate list fills with excluded neighbours and the allowed hits it returns
        # are almost never the nearest (docs/retrieval.md, "The index"). So
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

    def _ivf(
        self, q: np.ndarray, want: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Probe the nearest lists with the filter applied while scanning them; if they
        hold too few allowed vectors, probe every list (exact)."""
        bits = None if allowed is None else np.packbits(allowed, bitorder="little")
        selector = None if bits is None else self._selector(bits)  # Outlives the search.
        nlist = self.nlist
        probes = min(nlist, max(IVF_MIN_PROBES, nlist // IVF_PROBE_FRACTION))
        for nprobe in [probes] if probes == nlist else [probes, nlist]:
            params = faiss.SearchParametersIVF()
            params.nprobe = nprobe
            if selector is not None:
                params.sel = selector
            scores, labels = self._index.search(q, want, params=params)
            found = _valid(scores[0], labels[0])
            if len(found[1]) >= want:
                break
        return found

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
        write_index(path, header, self.payload())

    def payload(self) -> memoryview | None:
        """The FAISS serialization; None for an IVF index that never saw a vector."""
        if self._index is None:
            return None
        return memoryview(faiss.serialize_index(self._index))

    def copy(self) -> VectorIndex:
        """An independent copy. FAISS copies an index several times faster than it
        serializes one (deploy/README.md, "The demonstration store with several
        replicas"), so a snapshot copies under the store's writer lock and serializes
        after it."""
        return VectorIndex(
            self.kind, self.dim, None if self._index is None else faiss.clone_index(self._index)
        )

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
        if header.kind == IVF:
            ok = isinstance(index, faiss.IndexIVFFlat)
        else:
            inner = (
                faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else None
            )
            ok = isinstance(inner, faiss.IndexFlat if header.kind == FLAT else faiss.IndexHNSWFlat)
        if not ok or index.d != header.dim:
            raise IndexFileError("unexpected index structure")
        return cls(header.kind, header.dim, index), header


def write_index(path: Path, header: IndexHeader, payload: memoryview | None) -> None:
    """Write the index file for `payload` (VectorIndex.payload()) atomically: temp file,
    fsync, rename, fsync the folder. A reader (or a crash) sees the old file or the new
    one, never a torn one. Separate from VectorIndex.save so that a caller holding a
    copy of the index can free it before writing."""
    if payload is None:  # An IVF index that never saw a vector: nothing to keep.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    write_atomic(path, lambda fh: _write_index_file(fh, header, payload))


def _write_index_file(fh: BinaryIO, header: IndexHeader, payload: memoryview) -> None:
    """An index file: magic, header length, header (with the payload's checksum), payload."""
    digest = hashlib.sha256(payload).hexdigest()
    meta = json.dumps({**_fields(header), "sha256": digest, "payload_len": len(payload)})
    encoded = meta.encode()
    fh.write(_MAGIC + _HEADER_LEN.pack(len(encoded)) + encoded)
    fh.write(payload)


def ivf_lists(n: int) -> int:
    """How many IVF lists suit `n` vectors (a power of two)."""
    target = min(4 * np.sqrt(max(n, 1)), n / IVF_MIN_POINTS_PER_LIST, IVF_MAX_LISTS)
    return 1 << max(0, int(np.floor(np.log2(max(target, 1)))))


def _new_ivf(dim: int, vectors: np.ndarray) -> Any:
    """An IVF index trained on (a deterministic sample of) `vectors`."""
    nlist = ivf_lists(len(vectors))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = IVF_TRAIN_ITERATIONS
    index.cp.seed = 1234  # Same vectors, same lists: rebuilds are reproducible.
    sample = vectors
    if len(vectors) > IVF_TRAIN_POINTS_PER_LIST * nlist:
        pick = np.random.default_rng(0).choice(
            len(vectors), IVF_TRAIN_POINTS_PER_LIST * nlist, replace=False
        )
        sample = vectors[np.sort(pick)]
    index.train(sample)
    return index


def _fields(header: IndexHeader) -> dict[str, Any]:
    return {name: getattr(header, name) for name in IndexHeader.__slots__}


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
