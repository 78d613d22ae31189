"""What `crosstask serve` checks before the engine starts, and how it leaves when it cannot
serve (serve/cli/preflight.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from collections import namedtuple
from pathlib import Path

import pytest

from serve.cli import preflight
from serve.errors import StartupError

Usage = namedtuple("Usage", "total used free")
MIB = 1 << 20


def _shm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, free_mb: int) -> str:
    monkeypatch.setattr(
        preflight.shutil, "disk_usage", lambda path: Usage(free_mb * MIB, 0, free_mb * MIB)
    )
    return str(tmp_path)


def test_a_roomy_shm_passes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(preflight.MQ_CHUNK_ENV, raising=False)
    preflight.check_shared_memory(_shm(monkeypatch, tmp_path, 1024))


def test_dockers_default_shm_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(preflight.MQ_CHUNK_ENV, raising=False)
    with pytest.raises(StartupError, match=r"has 64 MiB free .* about 416 MiB.*--shm-size=1g"):
        preflight.check_shared_memory(_shm(monkeypatch, tmp_path, 64))


def test_the_operators_chunk_size_counts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(preflight.MQ_CHUNK_ENV, "4")
    preflight.check_shared_memory(_shm(monkeypatch, tmp_path, 300))
    monkeypatch.setenv(preflight.MQ_CHUNK_ENV, "16")
    with pytest.raises(StartupError, match="about 416 MiB"):
        preflight.check_shared_memory(_shm(monkeypatch, tmp_path, 300))


def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}"):
            preflight.listen("127.0.0.1", port)
    sock = preflight.listen("127.0.0.1", 0)
    sock.close()


def test_exit_now_stops_the_children_and_says_why_last(tmp_path: Path) -> None:
    """A process with a child (as vLLM's engine is) and a thread that would hold it open
    at exit leaves at once, child stopped, with the cause as its last line."""
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(
        f"""
        import multiprocessing, threading, time
        from serve.cli.preflight import exit_now

        def sleep():
            time.sleep(600)

        if __name__ == "__main__":
            child = multiprocessing.get_context("spawn").Process(target=sleep)
            child.start()
            open({str(pid_file)!r}, "w").write(str(child.pid))
            threading.Thread(target=sleep).start()  # not a daemon: would block the exit
            print("something else first", flush=True)
            exit_now(3, "the engine could not start:\\n  max_model_len too long\\n")
        """
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert time.monotonic() - started < 30
    assert result.returncode == 3
    assert result.stderr.strip().splitlines()[-1] == (
        "crosstask serve: error: the engine could not start: max_model_len too long"
    )
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and "Z" not in _state(child):
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"
