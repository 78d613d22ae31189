"""What one evaluation is asked to do; the defaults are those of `crosstask eval`'s flags."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from serve.evaluation.modes import MODES

DEFAULT_LIMIT = 40
DEFAULT_K = 6
DEFAULT_MAX_TOKENS = 64
DEFAULT_CONCURRENCY = 8
DEFAULT_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class EvalConfig:
    base_url: str
    tasks: Sequence[str]
    modes: Sequence[str] = MODES
    limit: int = DEFAULT_LIMIT
    seed: int = 0
    k: int = DEFAULT_K
    max_tokens: int = DEFAULT_MAX_TOKENS
    concurrency: int = DEFAULT_CONCURRENCY
    api_key: str | None = None
    model: str | None = None
    timeout: float = DEFAULT_TIMEOUT
