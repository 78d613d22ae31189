"""serve/engine/heap_trim.py: freed heap pages go back to the OS, on a timer, once per process."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve.engine import heap_trim

ROOT = Path(__file__).resolve().parents[4]

# Fills ~200 MiB with 4 KB blocks (above pymalloc's limit, so glibc's malloc holds them),
# frees 15 in 16, and prints resident MiB at the start, after the frees and after the trim.
FRAGMENT = """
import os, sys
from serve.engine.heap_trim import malloc_trim

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

size = int(sys.argv[1])
start = rss_mib()
blocks = [b"x" * size for _ in range(50_000)]
kept = blocks[::16]
del blocks
freed = rss_mib()
released = malloc_trim()
print(start, freed, rss_mib(), released)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trim_returns_the_pages_glibc_keeps() -> None:
    out = subprocess.run(
        [sys.executable, "-c", FRAGMENT, "4000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    start, freed, trimmed = (float(x) for x in out[:3])
    if out[3] == "None":
        pytest.skip("no glibc malloc_trim here")
    # Without a trim glibc keeps the freed blocks' pages: the interleaved live blocks
    # stop it from shrinking the heap.
    assert freed - start > 150
    assert out[3] == "True"
    assert trimmed - start < 60


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, heap_trim.DEFAULT_INTERVAL),
        ("", heap_trim.DEFAULT_INTERVAL),
        ("0", 0.0),
        ("2.5", 2.5),
    ],
)
def test_interval_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str | None, expected: float
) -> None:
    if raw is None:
        monkeypatch.delenv(heap_trim.ENV_INTERVAL, raising=False)
    else:
        monkeypatch.setenv(heap_trim.ENV_INTERVAL, raw)
    assert heap_trim.trim_interval() == expected


@pytest.mark.parametrize("raw", ["soon", "-1", "nan", "inf"])
def test_a_bad_interval_is_refused(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(heap_trim.ENV_INTERVAL, raw)
    with pytest.raises(heap_trim.HeapTrimError, match=heap_trim.ENV_INTERVAL):
        heap_trim.trim_interval()


def _trimmers() -> list[heap_trim.HeapTrimmer]:
    return [t for t in threading.enumerate() if isinstance(t, heap_trim.HeapTrimmer)]


def _stop_all() -> None:
    for trimmer in _trimmers():
        trimmer.stop()
        trimmer.join(timeout=5)


@pytest.fixture(autouse=True)
def no_trimmer() -> Iterator[None]:
    # Other tests in this process load vLLM's plugins, which start the real trimmer.
    _stop_all()
    yield
    _stop_all()


def test_one_trimmer_per_process_trimming_on_its_timer() -> None:
    assert not _trimmers()
    calls: list[float] = []
    first = heap_trim.start(0.01, trim=lambda: calls.append(time.monotonic()))
    try:
        assert first is not None
        # vLLM may load its plugins twice in one process: still one thread.
        assert heap_trim.start(0.01, trim=lambda: None) is first
        assert _trimmers() == [first]
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) >= 3
    finally:
        first.stop()
        first.join(timeout=5)
    assert not first.is_alive()
    assert heap_trim.start(0, trim=lambda: None) is None
    assert not _trimmers()


def test_register_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(heap_trim.ENV_INTERVAL, "0")
    heap_trim.register()
    assert not _trimmers()

    monkeypatch.setenv(heap_trim.ENV_INTERVAL, "3600")
    heap_trim.register()
    heap_trim.register()
    if heap_trim.malloc_trim() is not None:
        [trimmer] = _trimmers()
        assert trimmer.interval == 3600
