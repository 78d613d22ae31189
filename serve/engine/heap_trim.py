"""Hand freed heap memory back to the OS every so often, in every crosstask process.

Why: under bench/load.py the vLLM worker's resident memory kept rising with free heap
while the memory it had in use stayed flat (glibc's `mallinfo2`; figures in
docs/memory.md, "What was found"). Each engine step allocates and frees tensors of new
sizes, and glibc keeps the freed pages inside its arenas, between live blocks where its
own trimming (top of the heap only) never reaches. `malloc_trim(0)` walks
every arena and returns each whole free page; run every `CROSSTASK_HEAP_TRIM_SECONDS`
(default 30, 0 turns it off) it keeps resident memory near what is in use, at the price of
one page fault when a returned page is used again.

How it gets into the engine's processes: like serve/engine/lora_cpu.py, `register()` is a
`vllm.general_plugins` entry point, which vLLM runs in the API process, the EngineCore and
each worker. The interval is read from the environment in each process (set it before the
engine starts). Without glibc (musl, macOS) there is no `malloc_trim` and nothing runs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable

# Under "vllm." so that vLLM's logging setup also shows this line from its own processes.
log = logging.getLogger(f"vllm.{__name__}")

ENV_INTERVAL = "CROSSTASK_HEAP_TRIM_SECONDS"
DEFAULT_INTERVAL = 30.0
THREAD_NAME = "crosstask-heap-trim"


class HeapTrimError(ValueError):
    pass


def trim_interval() -> float:
    """Seconds between trims from CROSSTASK_HEAP_TRIM_SECONDS; 0 means never."""
    raw = os.environ.get(ENV_INTERVAL, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):  # Also rejects NaN.
        raise HeapTrimError(f"{ENV_INTERVAL} must be a number of seconds >= 0, not {raw!r}")
    return value


def malloc_trim() -> bool | None:
    """Return free heap pages to the OS now: True if some were, None without glibc."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))  # ctypes lets go of the GIL for the call.


class HeapTrimmer(threading.Thread):
    """A daemon thread that calls `trim` every `interval` seconds until `stop()`."""

    def __init__(self, interval: float, trim: Callable[[], object] = malloc_trim) -> None:
        super().__init__(name=THREAD_NAME, daemon=True)
        self.interval = interval
        self.trims = 0
        self._trim = trim
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            started = time.perf_counter()
            self._trim()
            self.trims += 1
            log.debug("heap trim took %.1f ms", (time.perf_counter() - started) * 1000)

    def stop(self) -> None:
        self._stopped.set()


def start(interval: float, trim: Callable[[], object] = malloc_trim) -> HeapTrimmer | None:
    """The process's trimmer, started if not yet running; None when `interval` is 0.
    Idempotent: vLLM may load its plugins more than once in a process."""
    if interval <= 0:
        return None
    for thread in threading.enumerate():
        if isinstance(thread, HeapTrimmer) and thread.is_alive():
            return thread
    trimmer = HeapTrimmer(interval, trim)
    trimmer.start()
    return trimmer


def register() -> None:
    """vLLM `general_plugins` entry point: start trimming in this process."""
    interval = trim_interval()
    if interval <= 0:
        log.info("crosstask heap trim off (%s=0)", ENV_INTERVAL)
        return
    if malloc_trim() is None:
        log.info("crosstask heap trim unavailable: no glibc malloc_trim in this process")
        return
    if start(interval) is not None:
        log.info("crosstask heap trim: every %g s (%s)", interval, ENV_INTERVAL)
