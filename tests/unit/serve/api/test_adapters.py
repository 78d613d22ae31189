"""POST /v1/load_lora_adapter with paths the file system refuses, through the app with a
fake engine: each is an OpenAI-style 4xx error body, never a 500."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from routing.merge import MergeCache
from routing.registry import AdapterRegistry
from routing.router import RouterConfig
from routing.service import RoutingService
from serve.api.app import create_app
from serve.engine.engine import Engine
from serve.runtime import Startup
from serve.settings import Settings
from tests.unit.fake_engine import FakeEngine, fake_config
from tests.unit.tiny_lora import write_tiny_base, write_tiny_lora


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    root = tmp_path / "adapters"
    root.mkdir()
    write_tiny_lora(tmp_path / "elsewhere" / "outside")
    (root / "plain-file").write_text("not a folder")
    os.symlink("loop-b", root / "loop-a")
    os.symlink("loop-a", root / "loop-b")
    base = write_tiny_base(tmp_path / "base")

    def open_routing(engine: Engine, retriever: object) -> RoutingService:
        registry = AdapterRegistry(root, base, max_rank=8)
        merges = MergeCache(tmp_path / "merges", capacity=2, max_rank=8)
        return RoutingService(registry, merges, RouterConfig(), "fake-model")

    startup = Startup(
        fake_config(),
        start_engine=lambda config: FakeEngine(config),  # type: ignore[arg-type,return-value]
        open_routing=open_routing,
        import_libraries=lambda: None,
    )
    # A server exception must show as the 500 a client would get, not as a raise here.
    with TestClient(create_app(Settings(), startup), raise_server_exceptions=False) as c:
        deadline = time.monotonic() + 10
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        yield c


def load(client: TestClient, path: str) -> tuple[int, dict[str, object]]:
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return response.status_code, error


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("a" * 4000, 400, "invalid_adapter_path"),  # what schemathesis found
        # Every name within NAME_MAX, the whole (below the root) past PATH_MAX.
        ("/".join(["b" * 255] * 16), 400, "invalid_adapter_path"),
        ("nul\x00byte", 400, "invalid_adapter_path"),
        ("nothing-here", 404, "adapter_not_found"),
        ("plain-file/below", 404, "adapter_not_found"),
        ("plain-file", 400, "invalid_adapter"),
        ("loop-a", 403, "adapter_path_forbidden"),
        ("../elsewhere/outside", 403, "adapter_path_forbidden"),
    ],
)
def test_bad_adapter_paths_are_openai_4xx(
    client: TestClient, path: str, status: int, code: str
) -> None:
    got, error = load(client, path)
    assert (got, error["code"], error["param"]) == (status, code, "lora_path")
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("err", "status"),
    [(errno.EACCES, 403), (errno.EPERM, 403), (errno.ELOOP, 400), (errno.EIO, 400)],
)
def test_file_system_refusals_are_openai_4xx(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, err: int, status: int
) -> None:
    # Tests may run as root, which no permission bit stops: the refusal is simulated at the
    # existence check.
    def refuse(path: Path) -> bool:
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(Path, "exists", refuse)
    got, error = load(client, "some-adapter")
    assert (got, error["param"], error["type"]) == (status, "lora_path", "invalid_request_error")
