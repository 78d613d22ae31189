from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from payloads import chat_completion, completion

from crosstask_client import (
    Adapter,
    AsyncCrosstask,
    ChatCompletion,
    Completion,
    Crosstask,
    DemonstrationHit,
    Health,
    ModelList,
)


class Recorder:
    def __init__(self, routes: dict[tuple[str, str], Any]) -> None:
        self.routes = routes
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.routes[(request.method, request.url.path)]
        if callable(answer):
            response: httpx.Response = answer()
            return response
        return httpx.Response(200, json=answer)

    def sync(self, **kwargs: Any) -> Crosstask:
        return Crosstask(
            "http://test:8000",
            http_client=httpx.Client(transport=httpx.MockTransport(self)),
            **kwargs,
        )

    def aio(self, **kwargs: Any) -> AsyncCrosstask:
        return AsyncCrosstask(
            "http://test:8000",
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(self)),
            **kwargs,
        )


MODELS = {
    "object": "list",
    "data": [
        {
            "id": "smollm2-135m-instruct",
            "object": "model",
            "created": 1,
            "owned_by": "crosstask",
            "root": "/models/smollm2",
            "parent": None,
            "max_model_len": 2048,
        },
        {
            "id": "arith",
            "object": "model",
            "created": 1,
            "owned_by": "crosstask",
            "root": "/adapters/arith",
            "parent": "smollm2-135m-instruct",
        },
        {
            "id": "auto",
            "object": "model",
            "created": 1,
            "owned_by": "crosstask",
            "root": None,
            "parent": None,
        },
    ],
}

ROUTES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/chat/completions"): chat_completion(),
    ("POST", "/v1/completions"): completion(),
    ("GET", "/v1/models"): MODELS,
    ("GET", "/health"): lambda: httpx.Response(200, text=""),
    ("GET", "/metrics"): lambda: httpx.Response(200, text="# HELP x\nx 1\n"),
    ("GET", "/v1/adapters"): {
        "object": "list",
        "data": [
            {"name": "arith", "tasks": ["arithmetic/1_digit_addition"], "rank": 8, "alpha": 16}
        ],
    },
    ("POST", "/v1/load_lora_adapter"): lambda: httpx.Response(
        200, text="Success: LoRA adapter 'x' added successfully."
    ),
    ("POST", "/v1/unload_lora_adapter"): {"message": "unloaded x"},
    ("POST", "/v1/demonstrations"): {"ids": ["t-0", "t-1"]},
    ("POST", "/v1/demonstrations/search"): {
        "hits": [{"id": "t-0", "task": "t", "score": 0.9, "input": "a", "output": "b"}]
    },
}


def _every_method(client: Crosstask) -> None:
    reply = client.chat([{"role": "user", "content": "2+2?"}], max_tokens=2)
    assert isinstance(reply, ChatCompletion) and reply.text == "4"
    assert reply.usage is not None and reply.usage.total_tokens == 6
    assert reply.crosstask is not None and reply.crosstask.demonstrations[0].score == 0.83
    assert reply.crosstask.routing is not None
    assert reply.crosstask.routing.adapters[0].name == "arith"
    text = client.complete("2+2=", max_tokens=2)
    assert isinstance(text, Completion) and text.text == " 4"
    models = client.models()
    assert isinstance(models, ModelList)
    assert models.ids == ["smollm2-135m-instruct", "arith", "auto"]
    assert models.data[1].parent == "smollm2-135m-instruct"
    health = client.health()
    assert isinstance(health, Health) and health and health.status_code == 200
    assert "x 1" in client.metrics()
    (adapter,) = client.adapters.list()
    assert isinstance(adapter, Adapter) and adapter.name == "arith" and adapter.rank == 8
    assert adapter.model_extra == {"alpha": 16}
    assert "Success" in client.adapters.load("x", "/adapters/x")
    assert client.adapters.unload("x") == "unloaded x"
    assert client.demonstrations.add("t", "Do t.", [{"input": "a", "output": "b"}]) == [
        "t-0",
        "t-1",
    ]
    (hit,) = client.demonstrations.search("a question", k=3, exclude_tasks=["u"])
    assert isinstance(hit, DemonstrationHit) and hit.score == 0.9


def test_every_method_sync() -> None:
    recorder = Recorder(ROUTES)
    with recorder.sync(api_key="user-key", admin_key="admin-key") as client:
        _every_method(client)
    by_path = {r.url.path: r for r in recorder.requests}
    for path, request in by_path.items():
        expected = (
            "admin-key"
            if path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/demonstrations")
            else "user-key"
        )
        assert request.headers["authorization"] == f"Bearer {expected}", path
        assert request.headers["user-agent"].startswith("crosstask-client/")
    assert json.loads(by_path["/v1/load_lora_adapter"].content) == {
        "lora_name": "x",
        "lora_path": "/adapters/x",
    }
    assert json.loads(by_path["/v1/unload_lora_adapter"].content) == {"lora_name": "x"}
    assert json.loads(by_path["/v1/demonstrations/search"].content) == {
        "query": "a question",
        "k": 3,
        "exclude_tasks": ["u"],
    }
    assert str(by_path["/health"].url) == "http://test:8000/health"
    assert str(by_path["/v1/models"].url) == "http://test:8000/v1/models"


async def test_every_method_async() -> None:
    recorder = Recorder(ROUTES)
    async with recorder.aio(api_key="user-key") as client:
        reply = await client.chat([{"role": "user", "content": "2+2?"}], max_tokens=2)
        assert reply.text == "4" and reply.crosstask is not None
        assert (await client.complete("2+2=")).text == " 4"
        assert (await client.models()).ids[-1] == "auto"
        assert await client.health()
        assert "x 1" in await client.metrics()
        assert (await client.adapters.list())[0].tasks == ["arithmetic/1_digit_addition"]
        assert "Success" in await client.adapters.load("x", "/adapters/x")
        assert await client.adapters.unload("x") == "unloaded x"
        assert await client.demonstrations.add("t", "d", [{"input": "a", "output": "b"}]) == [
            "t-0",
            "t-1",
        ]
        assert (await client.demonstrations.search("q"))[0].id == "t-0"
    # Only an API key: management writes fall back to it.
    assert {r.headers["authorization"] for r in recorder.requests} == {"Bearer user-key"}
    assert json.loads(recorder.requests[-1].content) == {"query": "q"}


def test_keys_absent_or_admin_only() -> None:
    recorder = Recorder(ROUTES)
    recorder.sync().models()
    assert "authorization" not in recorder.requests[-1].headers
    client = recorder.sync(admin_key="adm")
    client.models()
    client.adapters.unload("x")
    assert [r.headers["authorization"] for r in recorder.requests[1:]] == ["Bearer adm"] * 2


def test_health_not_ready_is_an_answer() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(503, json={"status": "starting"})

    client = Crosstask(
        "http://test", http_client=httpx.Client(transport=httpx.MockTransport(handler))
    )
    health = client.health()
    assert not health and health.status_code == 503 and health.body == {"status": "starting"}
    assert len(calls) == 1  # 503 from /health is not retried


def test_tolerant_shapes() -> None:
    minimal_chat = {
        "id": "c",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "finish_reason": "stop",
                "new_field": True,
            }
        ],
        "system_fingerprint": "fp",
    }
    routes: dict[tuple[str, str], Any] = {
        ("POST", "/v1/chat/completions"): minimal_chat,
        ("GET", "/v1/adapters"): [{"id": "a1"}, {"lora_name": "a2", "lora_path": "/p"}],
        ("POST", "/v1/demonstrations"): {"data": [{"id": "n1"}, {"id": 2}]},
        ("POST", "/v1/demonstrations/search"): [{"id": "h", "score": 1}],
        ("GET", "/health"): {"status": "ok"},
    }
    client = Recorder(routes).sync()
    reply = client.chat([{"role": "user", "content": "x"}])
    assert reply.crosstask is None and reply.usage is None and reply.object == "chat.completion"
    assert reply.model_extra == {"system_fingerprint": "fp"}
    assert reply.choices[0].model_extra == {"new_field": True}
    assert [a.name for a in client.adapters.list()] == ["a1", "a2"]
    assert client.adapters.list()[1].path == "/p"
    assert client.demonstrations.add("t", "d", []) == ["n1", "2"]
    assert client.demonstrations.search("q")[0].score == 1.0
    assert client.health().body == {"status": "ok"}


@pytest.mark.parametrize("base", ["http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/"])
def test_base_url_forms(base: str) -> None:
    assert Crosstask(base).base_url == "http://h:1"


def test_bad_base_url() -> None:
    with pytest.raises(ValueError):
        Crosstask("127.0.0.1:8000")
    with pytest.raises(ValueError):
        Crosstask("http://h", max_retries=-1)


def test_passed_http_client_is_not_closed() -> None:
    http = httpx.Client(transport=httpx.MockTransport(Recorder(ROUTES)))
    with Crosstask("http://test", http_client=http) as client:
        client.models()
    assert not http.is_closed
    http.close()


def test_timeout_is_sent() -> None:
    recorder = Recorder(ROUTES)
    recorder.sync(timeout=3.0).models()
    assert recorder.requests[-1].extensions["timeout"]["read"] == 3.0
    recorder.sync().models()  # an http_client of our own and no timeout: its own applies
    assert recorder.requests[-1].extensions["timeout"]["read"] == 5.0
    assert Crosstask("http://test")._config.timeout == httpx.Timeout(300.0, connect=10.0)
