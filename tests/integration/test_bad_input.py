"""Bad input gets an OpenAI-style 4xx error body, never a 500 or a hang."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server import Server

HI = [{"role": "user", "content": "hi"}]


def _post(
    server: Server,
    path: str,
    content: bytes | str,
    key: str | None = None,
    content_type: str = "application/json",
) -> httpx.Response:
    headers = {"Content-Type": content_type, **server.headers(key)}
    return httpx.post(f"{server.v1}{path}", content=content, headers=headers, timeout=30)


def _assert_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    return error  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "M"}, "messages"),
        ({"model": "M", "messages": []}, "messages"),
        ({"model": "M", "messages": "hello"}, "messages"),
        ({"model": "M", "messages": [{"role": "user"}, 3]}, "messages.1"),
        ({"model": "M", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": "M", "messages": HI, "max_tokens": 0}, "max_tokens"),
        ({"model": "M", "messages": HI, "max_tokens": -5}, "max_tokens"),
        ({"model": "M", "messages": HI, "max_tokens": "ten"}, "max_tokens"),
        ({"model": "M", "messages": HI, "temperature": -1}, "temperature"),
        ({"model": "M", "messages": HI, "top_p": 0}, "top_p"),
        ({"model": "M", "messages": HI, "n": 0}, "n"),
        ({"model": "M", "messages": HI, "n": 1000}, "n"),
        ({"model": "M", "messages": HI, "top_logprobs": 3}, "top_logprobs"),
        ({"model": "M", "messages": HI, "n": 2, "temperature": 0}, None),
        ({"model": "M", "messages": HI, "seed": 2**70}, "seed"),
        ({"model": 5, "messages": HI}, "model"),
        (
            {"model": "M", "messages": HI, "crosstask": {"routing": {"mode": "merge"}}},
            "crosstask.routing.adapters",
        ),
        (
            {"model": "M", "messages": HI, "crosstask": {"routing": {"mode": "teleport"}}},
            "crosstask.routing.mode",
        ),
    ],
)
def test_bad_chat_requests(server: Server, body: dict[str, object], param: str) -> None:
    if body.get("model") == "M":
        body["model"] = server.model
    error = _assert_error(_post(server, "/chat/completions", json.dumps(body)), 400)
    assert error["param"] == param, error


def test_prompt_longer_than_context(server: Server) -> None:
    long_text = "word " * 3000
    error = _assert_error(
        _post(
            server,
            "/completions",
            json.dumps({"model": server.model, "prompt": long_text, "max_tokens": 4}),
        ),
        400,
    )
    assert error["code"] == "context_length_exceeded"
    # Fits alone, but not with the completion asked for.
    error = _assert_error(
        _post(
            server,
            "/chat/completions",
            json.dumps(
                {
                    "model": server.model,
                    "messages": [{"role": "user", "content": "word " * 1500}],
                    "max_tokens": 1000,
                }
            ),
        ),
        400,
    )
    assert error["code"] == "context_length_exceeded"


def test_unknown_model(server: Server) -> None:
    error = _assert_error(
        _post(server, "/chat/completions", json.dumps({"model": "gpt-9", "messages": HI})), 404
    )
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        ('{"model": "x", "messages": [', "application/json"),
        ("not json at all", "application/json"),
        ("model=x&messages=hi", "application/x-www-form-urlencoded"),
        ("[1, 2, 3]", "application/json"),
        ("", "application/json"),
        (b"\xff\xfe\x00garbage", "application/json"),
    ],
)
def test_malformed_bodies(server: Server, content: str | bytes, content_type: str) -> None:
    for path in ("/chat/completions", "/completions"):
        _assert_error(_post(server, path, content, content_type=content_type), 400)


def test_bad_completion_prompts(server: Server) -> None:
    for prompt in ([], [[]], [-1, 5], [10**9]):
        _assert_error(
            _post(server, "/completions", json.dumps({"model": server.model, "prompt": prompt})),
            400,
        )


def test_api_keys(server: Server) -> None:
    body = json.dumps({"model": server.model, "messages": HI, "max_tokens": 1})
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer"},
    ):
        response = httpx.post(
            f"{server.v1}/chat/completions",
            content=body,
            headers={"Content-Type": "application/json", **headers},
        )
        assert _assert_error(response, 401)["code"] == "invalid_api_key"
    assert httpx.get(f"{server.v1}/models").status_code == 401
    for key in ("test-key-2", server.admin_key):
        assert _post(server, "/chat/completions", body, key=key).status_code == 200
    # Health and metrics stay open for probes and scrapers.
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_openai_client_raises_typed_errors(server: Server) -> None:
    client = openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model, messages=[], max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HI)  # type: ignore[arg-type]
    wrong = openai.OpenAI(base_url=server.v1, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
