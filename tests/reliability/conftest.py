"""Servers for the reliability suite: the suite's session server (API keys on, the test
store and adapter library) and fresh, dedicated servers for tests that flood, drain or kill
one.

The session server comes from the integration suite's conftest. Pytest keeps fixtures per
directory, so importing its fixtures here makes a second instance for tests/reliability
(one more server start). Moving those fixtures up to tests/conftest.py shares one server
between both suites; the import below then finds nothing to import and steps aside.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

try:
    # Every fixture, so that the session server's whole chain comes along (see above).
    from tests.integration.conftest import *  # noqa: F403
    from tests.integration.conftest import MODEL, Server, _free_port
except ModuleNotFoundError:  # the fixtures live in tests/conftest.py: inherited as they are
    from tests.conftest import MODEL, Server, _free_port  # type: ignore[no-redef]

STARTUP_TIMEOUT_S = 300
# Ends the spare server: runs after every other test that uses it (marker in pyproject).
ENDS_SPARE_SERVER = "ends_spare_server"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The spare server is started once for the overload test and then drained by the drain
    # test: one server start instead of two. The drain test must come last of its users.
    enders = [item for item in items if item.get_closest_marker(ENDS_SPARE_SERVER)]
    if not enders:
        return
    others = [item for item in items if not item.get_closest_marker(ENDS_SPARE_SERVER)]
    users = [
        i for i, item in enumerate(others) if "spare_server" in getattr(item, "fixturenames", ())
    ]
    at = (users[-1] + 1) if users else len(others)
    items[:] = [*others[:at], *enders, *others[at:]]


def launch(
    model_dir: Path,
    log_path: Path,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
) -> Server:
    """Start `crosstask serve` on a free port with the given CROSSTASK_* settings and wait
    until /health is 200. No store (a temporary CROSSTASK_HOME without one), no keys unless
    `env` sets them; eager mode and a small KV cache keep the start short."""
    port = _free_port()
    home = log_path.parent / "home"
    home.mkdir(exist_ok=True)
    full_env = dict(os.environ)
    for name in list(full_env):
        if name.startswith("CROSSTASK_"):
            del full_env[name]
    full_env.update(CROSSTASK_HOME=str(home), HF_HUB_OFFLINE="1", **(env or {}))
    command = [
        sys.executable,
        "-m",
        "serve.cli",
        "serve",
        "--port",
        str(port),
        "--model",
        str(model_dir),
        "--served-model-name",
        MODEL,
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--kv-cache-gb",
        "0.25",
        *(args or []),
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
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
        api_key="",
        admin_key="",
        model=MODEL,
        model_dir=model_dir,
        process=process,
        log_path=log_path,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# The spare server's limits: two sequences run at once and two more may wait, so a burst
# of a dozen requests overflows it; a drain period long enough for a short stream on a
# busy CI machine.
SPARE_MAX_NUM_SEQS = 2
SPARE_MAX_WAITING = 2
SPARE_DRAIN_SECONDS = 60


@pytest.fixture(scope="session")
def spare_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("spare") / "server.log"
    started = launch(
        model_dir,
        log_path,
        env={
            "CROSSTASK_MAX_WAITING": str(SPARE_MAX_WAITING),
            "CROSSTASK_DRAIN_SECONDS": str(SPARE_DRAIN_SECONDS),
            "CROSSTASK_RETRY_AFTER_SECONDS": "2",
        },
        args=["--max-num-seqs", str(SPARE_MAX_NUM_SEQS)],
    )
    try:
        yield started
    finally:
        stop(started.process)
