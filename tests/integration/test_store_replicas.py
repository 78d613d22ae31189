"""One writer, one read-only replica on the same store folder (deploy/README.md, "The
demonstration store with several replicas"): the suite's server is the writer, and this
module starts the one reader."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server import (
    MODEL,
    SMALL_ENGINE,
    Server,
    clean_environment,
    crosstask_home,
    launch,
    stop,
)

READER_STARTUP_TIMEOUT_S = 300
# The writer publishes at most every 5 s (retrieval/snapshots.py) and the reader checks
# every second; the rest is margin for a CPU busy with two engines.
PICKUP_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def reader(
    server: Server, store_dir: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A read-only replica of the session server's store, reloading every second; no
    adapters (no LoRA)."""
    started = launch(
        tmp_path_factory.mktemp("reader") / "server.log",
        clean_environment(
            CROSSTASK_HOME=str(crosstask_home()),
            CROSSTASK_STORE=str(store_dir),
            CROSSTASK_STORE_READONLY="true",
            CROSSTASK_STORE_RELOAD_SECONDS="1",
            CROSSTASK_API_KEYS=server.api_key,
            CROSSTASK_ADMIN_KEY=server.admin_key,
            CROSSTASK_DEFAULT_K="0",
        ),
        ["--model", str(model_dir), "--served-model-name", MODEL, *SMALL_ENGINE],
        model_dir,
        api_key=server.api_key,
        admin_key=server.admin_key,
    )
    try:
        yield started
    finally:
        stop(started.process)


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
