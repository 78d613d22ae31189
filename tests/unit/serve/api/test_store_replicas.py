"""The store with several replicas, through the HTTP layer (fake engine, hash embedder):
a read-only replica refuses writes with a 403, and picks up what the writer publishes."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from retrieval import retriever as retriever_mod
from retrieval.retriever import Retriever, open_replica
from retrieval.snapshots import current_id
from retrieval.store import DemonstrationStore
from serve.api.app import create_app
from serve.settings import Settings
from tests.unit.fake_engine import fake_startup

DIM = 16
ADD = {
    "task": "echo",
    "definition": "Repeat the input.",
    "examples": [{"input": "the quick brown fox", "output": "the quick brown fox"}],
}
SEARCH = {"query": "the quick brown fox", "k": 1}


class HashEmbedder:
    """Deterministic unit vectors from a hash of the text: no model needed. Accepts the
    real Embedder's arguments, so open_replica can load it."""

    name = "hash-embedder"
    dim = DIM
    backend = "torch"
    quantize = "none"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def encode(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            digest = hashlib.sha256(text.encode()).digest()
            v = np.frombuffer(digest[: DIM * 2], dtype=np.uint16).astype(np.float32) + 1.0
            rows.append(v / np.linalg.norm(v))
        return np.stack(rows) if rows else np.empty((0, DIM), dtype=np.float32)


@pytest.fixture(autouse=True)
def hash_embedder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retriever_mod, "Embedder", HashEmbedder)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    with DemonstrationStore.open(root, DIM) as store:
        store.set_metadata(embedder=HashEmbedder.name)
    return root


def _client(settings: Settings, open_retriever: Callable[[], Retriever]) -> TestClient:
    app = create_app(
        settings,
        fake_startup(open_retriever=open_retriever),
    )
    return TestClient(app)


def _ready(client: TestClient) -> TestClient:
    deadline = time.monotonic() + 10
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return client


def _replica(store_dir: Path, settings: Settings) -> Callable[[], Retriever]:
    return lambda: open_replica(
        store_dir,
        read_only=settings.store_readonly,
        publish=settings.store_publish_snapshots,
        reload_seconds=settings.store_reload_seconds,
        grace_seconds=settings.store_snapshot_grace_seconds,
    )


def _store_size(client: TestClient) -> float:
    text = client.get("/metrics").text
    match = re.search(r"^crosstask_store_size ([0-9.eE+-]+)$", text, re.MULTILINE)
    assert match is not None
    return float(match.group(1))


@pytest.fixture
def reader(store_dir: Path) -> Iterator[TestClient]:
    settings = Settings(store_readonly=True, store_reload_seconds=0.05)
    with _client(settings, _replica(store_dir, settings)) as client:
        yield _ready(client)


def test_a_read_only_replica_refuses_writes(reader: TestClient) -> None:
    response = reader.post("/v1/demonstrations", json=ADD)
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "store_read_only"
    assert error["type"] == "invalid_request_error"
    assert "crosstask-store-writer" in error["message"]
    # Reads go on.
    assert reader.post("/v1/demonstrations/search", json=SEARCH).status_code == 200
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "a b"}],
        "max_tokens": 2,
        "crosstask": {"demonstrations": {"k": 1}},
    }
    assert reader.post("/v1/chat/completions", json=body).status_code == 200


def test_auth_comes_before_the_read_only_refusal(store_dir: Path) -> None:
    settings = Settings(
        store_readonly=True,
        api_keys=[SecretStr("user")],
        admin_key=SecretStr("admin"),
    )
    with _client(settings, _replica(store_dir, settings)) as client:
        _ready(client)
        user = client.post("/v1/demonstrations", json=ADD, headers={"Authorization": "Bearer user"})
        assert user.status_code == 403 and user.json()["error"]["code"] == "admin_key_required"
        admin = client.post(
            "/v1/demonstrations", json=ADD, headers={"Authorization": "Bearer admin"}
        )
        assert admin.status_code == 403 and admin.json()["error"]["code"] == "store_read_only"


def test_the_reader_serves_what_the_writer_publishes(store_dir: Path, reader: TestClient) -> None:
    assert reader.post("/v1/demonstrations/search", json=SEARCH).json()["data"] == []
    settings = Settings(store_publish_snapshots=True)
    with _client(settings, _replica(store_dir, settings)) as writer:
        _ready(writer)
        added = writer.post("/v1/demonstrations", json=ADD)
        assert added.status_code == 200, added.text
        deadline = time.monotonic() + 20
        while not (hits := reader.post("/v1/demonstrations/search", json=SEARCH).json()["data"]):
            assert time.monotonic() < deadline, "the reader never picked up the snapshot"
            time.sleep(0.05)
        assert hits[0]["id"] == added.json()["ids"][0]
        assert _store_size(reader) == 1.0
    # The writer's shutdown left CURRENT naming a snapshot of everything it acknowledged.
    assert current_id(store_dir) is not None


def test_a_lone_writer_publishes_nothing(store_dir: Path) -> None:
    lone = open_replica(store_dir, read_only=False, publish=False)
    try:
        assert lone.publisher is None
    finally:
        asyncio.run(lone.close())
    assert current_id(store_dir) is None


def test_serve_flags_set_the_storesettings_from_args(monkeypatch: pytest.MonkeyPatch) -> None:
    from serve.cli.common import SERVE_FIELDS, settings_from_args
    from serve.cli.main import build_parser

    monkeypatch.delenv("CROSSTASK_STORE_READONLY", raising=False)
    monkeypatch.delenv("CROSSTASK_STORE_RELOAD_SECONDS", raising=False)

    args = build_parser().parse_args(["serve", "--store-readonly", "--store-reload-seconds", "2"])
    settings = settings_from_args(args, SERVE_FIELDS)
    assert settings.store_readonly is True and settings.store_reload_seconds == 2.0
    plain = settings_from_args(build_parser().parse_args(["serve"]), SERVE_FIELDS)
    assert plain.store_readonly is False and plain.store_reload_seconds == 30.0
