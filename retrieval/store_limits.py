"""What the demonstration store accepts: its input limits and the checks that enforce them.

Every check runs before anything is written and raises ValidationError. The API's request
models and the store builder read these limits too, to refuse or skip oversized input
before it reaches the store.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from retrieval.store_db import NewRow
from retrieval.store_types import NewDemo, ValidationError, parse_id

MAX_ADD = 10_000  # demonstrations in one add()
MAX_K = 100  # hits one search may ask for
MAX_EXCLUDE_TASKS = 1_000  # task names in one search's exclusion list
MAX_IDS = 100_000  # ids in one delete_ids() or get()
MAX_TASK_CHARS = 200
MAX_DEFINITION_CHARS = 16_000  # longest BIG-bench definition: 3,252
MAX_INPUT_CHARS = 32_000  # longest BIG-bench input among the default tasks: 9,791
MAX_OUTPUT_CHARS = 16_000
MAX_SOURCE_CHARS = 64
# Vectors must be unit length (inner product = cosine); allow float32 rounding.
_NORM_TOLERANCE = 1e-3


def validate_records(records: Sequence[NewDemo]) -> list[NewRow]:
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


def validate_vectors(vectors: np.ndarray, n: int, dim: int) -> np.ndarray:
    """`n` vectors of `dim` floats, unit length, as a contiguous float32 array."""
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


def validate_query(vector: np.ndarray, dim: int) -> np.ndarray:
    """A query vector, normalized here: unlike stored vectors, any length is accepted."""
    arr = np.asarray(vector, dtype=np.float32)
    if arr.shape not in ((dim,), (1, dim)):
        raise ValidationError(f"query vector must have shape ({dim},), got {arr.shape}")
    arr = arr.reshape(dim)
    norm = float(np.linalg.norm(arr))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValidationError("query vector is zero or not finite")
    return arr / norm


def validate_search(k: object, min_score: object) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_K:
        raise ValidationError(f"k must be an integer from 0 to {MAX_K}, got {k!r}")
    if not isinstance(min_score, (int, float)) or not -1.0 <= min_score <= 1.0:
        raise ValidationError(f"min_score must be within [-1, 1], got {min_score!r}")


def validate_task_names(names: Iterable[str]) -> list[str]:
    if isinstance(names, str):
        raise ValidationError("exclude_tasks must be a list of task names, not one string")
    out = list(names)
    if len(out) > MAX_EXCLUDE_TASKS:
        raise ValidationError(f"at most {MAX_EXCLUDE_TASKS} excluded tasks, got {len(out)}")
    for name in out:
        if not isinstance(name, str):
            raise ValidationError("exclude_tasks must hold strings")
    return out


def validate_ids(ids: Iterable[str], operation: str) -> list[int]:
    """The seqs that `ids` name, in order. Strings that are not ids are dropped, not
    refused: like unknown ids, they name no demonstration."""
    id_list = list(ids)
    if len(id_list) > MAX_IDS:
        raise ValidationError(f"at most {MAX_IDS} ids per {operation}, got {len(id_list)}")
    return [s for s in map(parse_id, id_list) if s is not None]


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
