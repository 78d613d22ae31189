"""One writer, one read-only replica on the same store folder (deploy/README.md, "The
demonstration store with several replicas"): the suite's server is the writer, and this
module starts the one reader."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import MODEL, Server, _crosstask_home, _free_port

READER_STARTUP_TIMEOUT_S = 300
# The writer publishes at most every 5 s (retrieval/snapshots.py) and the reader checks
# every second; the rest is margin for a CPU busy with two engines.
PICKUP_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def reader(
    server: Server, store_dir: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A read-only replica of the session server's store, reloading every second. Eager
    mode and a small KV cache keep its start short; no adapters (no LoRA)."""
    log_path = tmp_path_factory.mktemp("reader") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSTASK_")}
    env.update(
        CROSSTASK_HOME=str(_crosstask_home()),
        CROSSTASK_STORE=str(store_dir),
        CROSSTASK_STORE_READONLY="true",
        CROSSTASK_STORE_RELOAD_SECONDS="1",
        CROSSTASK_API_KEYS=server.api_key,
        CROSSTASK_ADMIN_KEY=server.admin_key,
        CROSSTASK_DEFAULT_K="0",
    )
    port = _free_port()
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
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READER_STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"reader exited with {process.returncode}:\n{log_path.read_text()[-4000:]}"
                )
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"reader not ready:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield Server(
            base_url=base_url,
            api_key=server.api_key,
            admin_key=server.admin_key,
            model=MODEL,
            model_dir=model_dir,
            process=process,
            log_path=log_path,
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _search(server: Server, query: str) -> list[dict[str, object]]:
    response = httpx.post(
        f"{server.v1}/demonstrations/search",
        json={"query": query, "k": 1},
        headers=server.headers(),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    data: list[dict[str, object]] = response.json()["data"]
    return data


def test_the_reader_serves_what_the_writer_adds(server: Server, reader: Server) -> None:
    marker = uuid.uuid4().hex
    example = {"input": f"Spell the code word {marker} backwards.", "output": marker[::-1]}
    added = httpx.post(
        f"{server.v1}/demonstrations",
        json={"task": f"replica_{marker}", "definition": "Reverse it.", "examples": [example]},
        headers=server.headers(server.admin_key),
        timeout=120,
    )
    assert added.status_code == 200, added.text
    (demo_id,) = added.json()["ids"]
    started = time.monotonic()
    while True:
        hits = _search(reader, example["input"])
        if hits and hits[0]["id"] == demo_id:
            break
        assert time.monotonic() - started < PICKUP_TIMEOUT_S, (
            f"the reader did not pick up {demo_id}:\n{reader.log_path.read_text()[-3000:]}"
        )
        time.sleep(0.5)
    print(f"picked up by the reader {time.monotonic() - started:.1f} s after the add")
    assert "swapped in" in reader.log_path.read_text()
    # Both pods export their store size; the reader now counts what the writer had.
    assert reader.metric("crosstask_store_size") >= added.json()["store_size"]

    refused = httpx.post(
        f"{reader.v1}/demonstrations",
        json={"task": "nope", "examples": [{"input": "a", "output": "b"}]},
        headers=reader.headers(reader.admin_key),
        timeout=60,
    )
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "store_read_only"
