"""When a request is tried again, and after how long.

Every request belongs to one of three kinds:

``READ``
    GET routes and ``demonstrations.search``: no effect on the server. Retried on any
    connection failure or timeout (also after the request was sent), on 429 and on 503.
``GENERATE``
    ``chat`` and ``complete`` (streaming or not): they change nothing on the server, but a
    request the server has started on costs it work, so they are retried only when the
    server refused them (429, 503) or the connection failed before the request was sent
    (connection refused, connect timeout, no free pooled connection). A read timeout or a
    connection dropped mid-answer is raised, not retried. A stream is never retried once its
    response has started: every retry case above happens before the first event.
``WRITE``
    ``demonstrations.add``, ``adapters.load``, ``adapters.unload``: never retried, except
    when the connection failed before anything was sent (refused, connect timeout).
    A 429 or 503 is raised, since the server may have acted on part of the request.

``health()`` is a ``READ`` whose status codes are all answers (503 means "not ready"), so
only its connection failures are retried.

Delays grow exponentially with "equal jitter": attempt ``n`` (from 0) waits a random time
between half and all of ``min(backoff_max, backoff_base * 2**n)``. A ``Retry-After`` header
(seconds, or an HTTP date) on a 429/503 is honoured instead, capped at ``retry_after_max``.
"""

from __future__ import annotations

import enum
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Optional

import httpx

__all__ = ["Kind", "RetryPolicy"]

RETRY_STATUSES = frozenset({429, 503})

# Failures that happen before a single byte of the request went out.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# Failures worth trying again for a request without effects.
_TRANSIENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


class Kind(enum.Enum):
    """What a request is, for the retry rules (see the module docstring)."""

    READ = "read"
    PROBE = "probe"
    GENERATE = "generate"
    WRITE = "write"


@dataclass(frozen=True)
class RetryPolicy:
    """How many times and how long to wait; see the module docstring for the rules."""

    max_retries: int = 2
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    retry_after_max: float = 60.0

    def retry_exception(self, kind: Kind, exc: BaseException, attempt: int) -> bool:
        """Whether the transport failure ``exc`` of try ``attempt`` (from 0) is retried."""
        if attempt >= self.max_retries:
            return False
        if kind in (Kind.READ, Kind.PROBE):
            return isinstance(exc, _TRANSIENT)
        return isinstance(exc, _NOT_SENT)

    def retry_status(self, kind: Kind, status_code: int, attempt: int) -> bool:
        """Whether an answer with ``status_code`` to try ``attempt`` (from 0) is retried."""
        if attempt >= self.max_retries:
            return False
        return kind in (Kind.READ, Kind.GENERATE) and status_code in RETRY_STATUSES

    def delay(self, attempt: int, retry_after: Optional[str] = None) -> float:
        """Seconds to wait before try ``attempt + 1``."""
        seconds = parse_retry_after(retry_after)
        if seconds is not None:
            return min(seconds, self.retry_after_max)
        ceiling = min(self.backoff_max, self.backoff_base * (2.0**attempt))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date), else ``None``."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)
