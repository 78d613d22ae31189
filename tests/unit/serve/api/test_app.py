"""The HTTP layer with a fake engine: start-up, auth, validation and error shapes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from serve.api.app import create_app
from serve.runtime import Startup
from serve.settings import Settings
from tests.unit.fake_engine import BlockingStarter, FakeEngine, fake_config, fake_startup

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "a bb ccc"}]}


def _client(
    settings: Settings, starter: object = None, fatal: list[int] | None = None
) -> TestClient:
    app = create_app(
        settings,
        fake_startup(starter),
        on_fatal=fatal.append if fatal is not None else None,
    )
    return TestClient(app)


def _wait_status(client: TestClient, status: int) -> None:
    deadline = time.monotonic() + 10
    while client.get("/health").status_code != status:
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with _client(Settings()) as c:
        _wait_status(c, 200)
        yield c


def test_health_is_503_until_the_engine_is_ready() -> None:
    starter = BlockingStarter()
    with _client(Settings(), starter) as c:
        assert c.get("/health").status_code == 503
        response = c.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "starting"
        assert response.headers["retry-after"]
        starter.release.set()
        _wait_status(c, 200)
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_failed_start_is_fatal() -> None:
    fatal: list[int] = []
    starter = BlockingStarter(fail=True)
    starter.release.set()
    with _client(Settings(), starter, fatal) as c:
        deadline = time.monotonic() + 10
        while not fatal:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert fatal == [1]
        assert c.get("/health").status_code == 503
        assert c.post("/v1/chat/completions", json=CHAT).json()["error"]["code"] == "engine_dead"


def test_libraries_are_imported_before_engine_and_store_load_in_parallel() -> None:
    # The engine and the store load in two threads; both import transformers, which two
    # threads must not do at once (start-up once failed with "cannot import name").
    events: list[str] = []

    def start(config: object) -> FakeEngine:
        events.append("engine")
        return FakeEngine(config)  # type: ignore[arg-type]

    def open_retriever() -> None:
        events.append("store")

    app = create_app(
        Settings(),
        Startup(
            fake_config(),
            start_engine=start,
            open_retriever=open_retriever,
            import_libraries=lambda: events.append("import"),
        ),  # type: ignore[arg-type]
    )
    with TestClient(app) as c:
        _wait_status(c, 200)
    assert events[0] == "import"
    assert sorted(events[1:]) == ["engine", "store"]


def test_engine_death_turns_health_503_and_is_fatal() -> None:
    fatal: list[int] = []
    starter = BlockingStarter()
    starter.release.set()
    with _client(Settings(), starter, fatal) as c:
        _wait_status(c, 200)
        assert starter.engine is not None
        starter.engine.errored = True
        assert c.get("/health").status_code == 503
        deadline = time.monotonic() + 10
        while not fatal:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert fatal == [1]


def test_chat_round_trip(client: TestClient) -> None:
    body = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3}).json()
    assert body["choices"][0]["message"]["content"] == "w0 w1 w2 "
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert body["crosstask"]["routing"] == {
        "mode": "off",
        "adapters": [],
        "scores": [],
        "reason": "",
    }


def test_default_max_tokens_fills_the_context(client: TestClient) -> None:
    body = client.post("/v1/chat/completions", json=CHAT).json()
    assert body["usage"]["completion_tokens"] == 64 - 4


def test_stream_ends_with_done_and_annotation(client: TestClient) -> None:
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={**CHAT, "max_tokens": 2, "stream": True, "n": 2, "temperature": 1},
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["crosstask"]["routing"]["mode"] == "off"
    assert all(c["crosstask"] is None for c in chunks[:-1])


def test_greedy_n_is_a_400_not_a_500(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={**CHAT, "n": 2, "temperature": 0})
    assert response.status_code == 400
    assert "greedy" in response.json()["error"]["message"]


def test_limits_from_settings() -> None:
    with _client(Settings(max_n=2, max_stop=1)) as c:
        _wait_status(c, 200)
        assert c.post("/v1/chat/completions", json={**CHAT, "n": 3}).status_code == 400
        assert c.post("/v1/chat/completions", json={**CHAT, "stop": ["a", "b"]}).status_code == 400


def test_api_keys_and_admin_key() -> None:
    settings = Settings(api_keys=[SecretStr("k1")], admin_key=SecretStr("adm"))
    with _client(settings) as c:
        _wait_status(c, 200)
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer adm"}).status_code == 200
        assert c.get("/metrics").status_code == 200


def test_settings_read_comma_separated_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CROSSTASK_API_KEYS", "a, b,,c")
    monkeypatch.setenv("CROSSTASK_ADMIN_KEY", "")
    settings = Settings()
    assert [k.get_secret_value() for k in settings.api_keys] == ["a", "b", "c"]
    assert settings.admin_key is None
    assert "a" not in repr(settings.api_keys)


def test_metrics_label_route_templates(client: TestClient) -> None:
    client.get("/v1/models/some-unknown-model")
    client.get("/no/such/route")
    text = client.get("/metrics").text
    assert 'route="/v1/models/{model_id:path}",status="404"' in text
    assert 'route="unmatched",status="404"' in text
    assert "some-unknown-model" not in text


def test_metrics_read_engine_preemptions_at_scrape() -> None:
    starter = BlockingStarter()
    starter.release.set()
    with _client(Settings(), starter) as c:
        _wait_status(c, 200)
        assert "crosstask_engine_preemptions_total 0.0" in c.get("/metrics").text
        assert starter.engine is not None
        starter.engine.preemptions = 3
        assert "crosstask_engine_preemptions_total 3.0" in c.get("/metrics").text
