"""The suite's one way to run a real server: `crosstask serve` as a subprocess (the real
vLLM engine, the embedded default model), reached over HTTP only. The session server's
fixtures (tests/conftest.py), the reliability suite's dedicated servers and the store
replica test all start theirs here."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

MODEL = "smollm2-135m-instruct"
STARTUP_TIMEOUT_S = 300
# Eager mode starts in a fraction of the compiled start and a small KV cache fits several
# servers in memory; speed is measured in bench/, not here.
SMALL_ENGINE = ["--enforce-eager", "--max-model-len", "1024", "--kv-cache-gb", "0.25"]


@dataclass
class Server:
    base_url: str
    api_key: str
    admin_key: str
    model: str
    model_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.api_key}"}

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric sample from /metrics."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        match = re.search(rf"^{re.escape(name)} ([0-9.eE+-]+)$", text, re.MULTILINE)
        if match is None:
            raise AssertionError(f"metric {name} not in /metrics")
        return float(match.group(1))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def crosstask_home() -> Path:
    return Path(os.environ.get("CROSSTASK_HOME", "~/.cache/crosstask")).expanduser()


def clean_environment(**settings: str) -> dict[str, str]:
    """This process's environment without any CROSSTASK_* setting, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSTASK_")}
    env.update(settings)
    return env


def launch(
    log_path: Path,
    env: Mapping[str, str],
    args: Sequence[str],
    model_dir: Path,
    api_key: str = "",
    admin_key: str = "",
    timeout: float = STARTUP_TIMEOUT_S,
) -> Server:
    """Start `crosstask serve --port <free> *args` with exactly `env`, and return once
    /health answers 200. A server that exits, or is not ready in `timeout` seconds, is
    stopped and reported with the end of its log."""
    port = free_port()
    command = [sys.executable, "-m", "serve.cli", "serve", "--port", str(port), *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(env))
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}"
            )
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop(process)
            raise RuntimeError(f"server not ready:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)
    return Server(
        base_url=base_url,
        api_key=api_key,
        admin_key=admin_key,
        model=MODEL,
        model_dir=model_dir,
        process=process,
        log_path=log_path,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not exited within a minute."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
