"""Access control and what must never happen: every /v1 route needs a key (the admin key
for writes), keys are compared in constant time and never logged, CORS is off unless
configured, and nothing is loaded with remote code or pickle."""

from __future__ import annotations

import ast
import hmac
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import SecretStr

from serve.api.app import create_app
from serve.settings import Settings
from tests.server import Server
from tests.unit.fake_engine import fake_startup

ROOT = Path(__file__).resolve().parents[2]
# Management writes: the admin key only (CONTRACT.md). Those not yet served are skipped.
ADMIN_ROUTES = {
    ("POST", "/v1/demonstrations"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
}
WRONG_KEY = "sk-wrong-0123456789abcdef"


def _operations(server: Server) -> list[tuple[str, str, dict[str, Any]]]:
    doc = httpx.get(f"{server.base_url}/openapi.json", timeout=10).json()
    return [
        (method.upper(), path, operation)
        for path, operations in doc["paths"].items()
        for method, operation in operations.items()
        if path.startswith("/v1/")
    ]


def _request(
    server: Server, method: str, path: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    concrete = re.sub(r"\{[^}]+\}", "anything", path)
    return httpx.request(
        method,
        f"{server.base_url}{concrete}",
        json={} if method == "POST" else None,
        headers=headers or {},
        timeout=30,
    )


def test_every_v1_operation_requires_a_key(server: Server) -> None:
    operations = _operations(server)
    assert len(operations) >= 6
    for method, path, operation in operations:
        # The document says so (clients and generators rely on it) ...
        assert operation.get("security"), f"{method} {path} declares no security"
        # ... and the server enforces it: no key, a wrong one, a malformed header.
        for headers in (
            {},
            {"Authorization": f"Bearer {WRONG_KEY}"},
            {"Authorization": server.api_key},
            {"Authorization": f"Basic {server.api_key}"},
        ):
            response = _request(server, method, path, headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"


def test_management_writes_need_the_admin_key(server: Server) -> None:
    served = {(m, p) for m, p, _ in _operations(server)}
    checked = 0
    for method, path in sorted(ADMIN_ROUTES & served):
        for key in ("test-key-1", "test-key-2"):
            response = _request(server, method, path, server.headers(key))
            assert response.status_code == 403, (method, path, response.text)
            assert response.json()["error"]["code"] == "admin_key_required"
        checked += 1
    assert checked >= 1


def test_api_keys_never_reach_the_log(server: Server) -> None:
    body = {"model": server.model, "messages": [{"role": "user", "content": "hi"}]}
    for key in ("test-key-1", "test-key-2", "test-admin-key", WRONG_KEY):
        httpx.post(
            f"{server.v1}/chat/completions",
            json={**body, "max_tokens": 1},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        httpx.post(
            f"{server.v1}/demonstrations",
            json={"task": "t"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
    time.sleep(0.5)  # the log is written by another process
    log = server.log_path.read_text(errors="replace")
    assert "API keys required" in log  # the server does log that keys are on ...
    for secret in ("test-key-1", "test-key-2", "test-admin-key", WRONG_KEY):
        assert secret not in log, f"{secret!r} appears in the server log"  # ... never them


def test_cors_is_off_by_default(server: Server) -> None:
    origin = {"Origin": "https://elsewhere.example"}
    preflight = httpx.options(
        f"{server.v1}/chat/completions",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
        timeout=10,
    )
    assert "access-control-allow-origin" not in preflight.headers
    simple = httpx.get(f"{server.v1}/models", headers={**origin, **server.headers()}, timeout=10)
    assert simple.status_code == 200
    assert "access-control-allow-origin" not in simple.headers


# -- the same, at the level of the app (every route, documented or not) -------------------


def _keyed_app(**settings: Any) -> TestClient:
    app = create_app(
        Settings(
            api_keys=[SecretStr("k1"), SecretStr("k2")], admin_key=SecretStr("adm"), **settings
        ),
        fake_startup(),
    )
    return TestClient(app)


def _wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 10
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_every_v1_route_of_the_app_requires_a_key() -> None:
    with _keyed_app() as client:
        _wait_ready(client)
        routes = [r for r in client.app.routes if isinstance(r, APIRoute)]  # type: ignore[attr-defined]
        v1 = [r for r in routes if r.path.startswith("/v1/")]
        assert v1
        for route in v1:
            path = re.sub(r"\{[^}]+\}", "anything", route.path)
            for method in route.methods:
                response = client.request(method, path, json={})
                assert response.status_code == 401, (method, route.path, response.text)
        # Everything outside /v1 is a probe, a scrape or the API's own description.
        others = {r.path for r in routes if not r.path.startswith("/v1/")}
        assert others <= {"/health", "/metrics"}, others


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    with _keyed_app() as client:
        _wait_ready(client)
        response = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert response.status_code == 401
        # Against every key (two API keys and the admin key), not stopping at a mismatch.
        assert len(calls) == 3
        calls.clear()
        assert client.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert len(calls) == 3


def test_cors_when_configured_allows_only_the_listed_origins() -> None:
    with _keyed_app(cors_origins=["https://app.example"]) as client:
        _wait_ready(client)
        allowed = client.options(
            "/v1/models",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"},
        )
        assert allowed.headers.get("access-control-allow-origin") == "https://app.example"
        other = client.options(
            "/v1/models",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        )
        assert "access-control-allow-origin" not in other.headers


# -- no remote code, no pickle -------------------------------------------------------------


def _sources() -> list[Path]:
    return [p for pkg in ("serve", "retrieval", "routing") for p in (ROOT / pkg).rglob("*.py")]


def _call_name(node: ast.Call) -> str:
    func = node.func
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_no_remote_code_or_pickle_loading() -> None:
    """trust_remote_code is never on, and nothing unpickles: a model or adapter folder
    from elsewhere cannot run code in the server. (Weights load as safetensors.)"""
    problems: list[str] = []
    engine_sets_it_off = False
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            for keyword in node.keywords:
                if keyword.arg == "trust_remote_code":
                    if isinstance(keyword.value, ast.Constant) and keyword.value.value is False:
                        if name.endswith("AsyncEngineArgs"):
                            engine_sets_it_off = True
                    else:
                        problems.append(f"{where}: trust_remote_code not literally False")
                if keyword.arg == "weights_only" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is True
                ):
                    problems.append(f"{where}: weights_only not literally True")
            if name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"):
                problems.append(f"{where}: {name}")
            if name == "torch.load" and not any(
                k.arg == "weights_only"
                and isinstance(k.value, ast.Constant)
                and k.value.value is True
                for k in node.keywords
            ):
                problems.append(f"{where}: torch.load without weights_only=True")
    assert not problems, problems
    # vLLM's default is off too, but the engine says so explicitly.
    assert engine_sets_it_off


def test_server_runs_with_trust_remote_code_off(server: Server) -> None:
    log = server.log_path.read_text(errors="replace")
    assert "trust_remote_code=False" in log
    assert "trust_remote_code=True" not in log
