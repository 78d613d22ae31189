"""Property tests of the request models and the routes in front of them, on the HTTP layer
with the fake engine and a real demonstration store behind a fake embedder: any JSON is
either a valid request or a validation error that the server turns into a 400 with an
OpenAI error body; never a 500, never a response that breaks its own schema."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from retrieval.retriever import Retriever
from retrieval.store import DemonstrationStore
from serve.api.app import create_app
from serve.api.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
from serve.api.completion.protocol import CompletionRequest, CompletionResponse
from serve.api.demonstrations.protocol import (
    AddDemonstrationsRequest,
    AddDemonstrationsResponse,
    SearchRequest,
    SearchResponse,
)
from serve.api.protocol import ErrorResponse
from serve.settings import Settings
from tests.unit.fake_engine import fake_startup

MODEL = "fake-model"
DIM = 8

PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# -- strategies ----------------------------------------------------------------------------

# Text from all of Unicode, lone surrogates included (JSON can carry them as \udXXX).
any_text = st.text(st.characters(exclude_categories=()), max_size=20)
numbers = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, 1, 2, 16, 17, 32, 33, 64, 65, 2**63, -1])
)
scalars = st.none() | st.booleans() | numbers | any_text
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=12,
)

# Valid values of each field; `_broken` then spoils one field (or drops a required one)
# with hostile JSON, so that both the acceptance path and every field's validation run.
text = st.text(max_size=30)
valid_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "developer"])},
        optional={
            "content": text
            | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=2),
            "name": text,
        },
    ),
    min_size=1,
    max_size=4,
)
valid_crosstask = st.fixed_dictionaries(
    {},
    optional={
        "task": text,
        "demonstrations": st.fixed_dictionaries(
            {}, optional={"k": st.integers(0, 4), "min_score": st.floats(0, 1)}
        ),
        "routing": st.fixed_dictionaries({}, optional={"mode": st.just("off")}),
        "exclude_tasks": st.lists(text, max_size=3),
    },
)
sampling = {
    "max_tokens": st.integers(1, 8),
    "n": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "stop": text | st.lists(text, max_size=3),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "user": text,
    "crosstask": valid_crosstask,
    "unknown_field": json_values,
}
valid_chat = st.fixed_dictionaries(
    {"model": st.just(MODEL), "messages": valid_messages},
    optional={
        **sampling,
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 5),
        "max_completion_tokens": st.integers(1, 8),
    },
)
valid_completion = st.fixed_dictionaries(
    {
        "model": st.just(MODEL),
        "prompt": text.filter(str.strip)
        | st.lists(text.filter(str.strip), min_size=1, max_size=3)
        | st.lists(st.integers(0, 999), min_size=1, max_size=8)
        | st.lists(st.lists(st.integers(0, 999), min_size=1, max_size=4), min_size=1, max_size=3),
    },
    optional={**sampling, "logprobs": st.integers(0, 5), "echo": st.booleans()},
)
valid_add = st.fixed_dictionaries(
    {
        "task": text.filter(str.strip),
        "examples": st.lists(
            st.fixed_dictionaries(
                {"input": text.filter(str.strip), "output": text.filter(str.strip)}
            ),
            min_size=1,
            max_size=3,
        ),
    },
    optional={"definition": text, "extra": json_values},
)
valid_search = st.fixed_dictionaries(
    {"query": text.filter(str.strip)},
    optional={
        "k": st.integers(1, 10),
        "min_score": st.floats(0, 1),
        "exclude_tasks": st.lists(text, max_size=3),
    },
)
hostile = json_values | numbers | any_text


def _broken(valid: st.SearchStrategy[dict[str, Any]], keys: list[str]) -> st.SearchStrategy[Any]:
    """A valid body with one field replaced by hostile JSON, or dropped."""

    @st.composite
    def spoil(draw: st.DrawFn) -> dict[str, Any]:
        body = dict(draw(valid))
        key = draw(st.sampled_from(keys))
        if draw(st.booleans()):
            body[key] = draw(hostile)
        else:
            body.pop(key, None)
        return body

    return spoil()


def _bodies(valid: st.SearchStrategy[dict[str, Any]], keys: list[str]) -> st.SearchStrategy[Any]:
    return valid | _broken(valid, keys) | _broken(_broken(valid, keys), keys)


chat_bodies = _bodies(
    valid_chat,
    ["model", "messages", *sampling, "logprobs", "top_logprobs", "max_completion_tokens"],
)
completion_bodies = _bodies(valid_completion, ["model", "prompt", *sampling, "logprobs", "echo"])
add_bodies = _bodies(valid_add, ["task", "examples", "definition"])
search_bodies = _bodies(valid_search, ["query", "k", "min_score", "exclude_tasks"])


def _keep_cheap(body: Any) -> Any:
    """Small max_tokens and n: the fake engine's cost grows with both."""
    if isinstance(body, dict):
        for name, cap in (("max_tokens", 8), ("max_completion_tokens", 8), ("n", 3)):
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and 8 < value < 10**6:
                body[name] = cap
    return body


def _encode(body: Any) -> bytes:
    # allow_nan: NaN and Infinity literals, which Python's JSON (and so FastAPI) accepts.
    return json.dumps(body, allow_nan=True).encode()


# -- the app -------------------------------------------------------------------------------


class HashEmbedder:
    """Deterministic unit vectors from a hash of the text: no model needed."""

    name = "hash-embedder"
    dim = DIM

    def encode(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
            v = np.frombuffer(digest[: DIM * 4], dtype=np.uint32).astype(np.float32) + 1.0
            rows.append(v / np.linalg.norm(v))
        return np.stack(rows) if rows else np.empty((0, DIM), dtype=np.float32)

    def encode_one(self, text: str) -> np.ndarray:
        return self.encode([text])[0]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    store_dir: Path = tmp_path_factory.mktemp("props") / "store"

    def open_retriever() -> Retriever:
        store = DemonstrationStore.open(store_dir, DIM)
        return Retriever(HashEmbedder(), store)  # type: ignore[arg-type]

    app = create_app(
        Settings(default_k=2),
        fake_startup(open_retriever=open_retriever),
    )
    with TestClient(app) as c:
        deadline = time.monotonic() + 10
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # A few demonstrations, so that retrieval returns something.
        added = c.post(
            "/v1/demonstrations",
            json={
                "task": "seed",
                "definition": "Repeat the input.",
                "examples": [{"input": f"in {i}", "output": f"out {i}"} for i in range(4)],
            },
        )
        assert added.status_code == 200, added.text
        yield c


def _check(
    client: TestClient,
    path: str,
    body: Any,
    request_model: type[BaseModel],
    response_model: type[BaseModel],
    allowed: tuple[int, ...] = (200, 400, 404),
) -> None:
    # The model alone: validates or raises ValidationError, nothing else.
    try:
        request_model.model_validate(body)
        valid = True
    except ValidationError:
        valid = False
    response = client.post(
        path, content=_encode(body), headers={"Content-Type": "application/json"}
    )
    assert response.status_code in allowed, (response.status_code, response.text[:500], body)
    if response.status_code == 200:
        assert valid, f"the server accepted what the model refuses: {body!r}"
        if response.headers["content-type"].startswith("text/event-stream"):
            _check_stream(response.text)
        else:
            response_model.model_validate(response.json())
    else:
        ErrorResponse.model_validate(response.json())
        if not valid:
            # A body the model refuses is the client's error: 400, never another status.
            assert response.status_code == 400, (response.status_code, response.text[:300])


def _check_stream(text: str) -> None:
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-300:]
    for event in events[:-1]:
        payload = json.loads(event)
        assert "error" not in payload, payload


@PROPERTY_SETTINGS
@given(body=chat_bodies)
def test_chat_requests(client: TestClient, body: dict[str, Any]) -> None:
    _check(
        client,
        "/v1/chat/completions",
        _keep_cheap(body),
        ChatCompletionRequest,
        ChatCompletionResponse,
    )


@PROPERTY_SETTINGS
@given(body=completion_bodies)
def test_completion_requests(client: TestClient, body: dict[str, Any]) -> None:
    _check(client, "/v1/completions", _keep_cheap(body), CompletionRequest, CompletionResponse)


@PROPERTY_SETTINGS
@given(body=json_values)
def test_arbitrary_json_on_every_post_route(client: TestClient, body: Any) -> None:
    for path, request_model, response_model in (
        ("/v1/chat/completions", ChatCompletionRequest, ChatCompletionResponse),
        ("/v1/completions", CompletionRequest, CompletionResponse),
        ("/v1/demonstrations/search", SearchRequest, SearchResponse),
        ("/v1/demonstrations", AddDemonstrationsRequest, AddDemonstrationsResponse),
    ):
        _check(client, path, body, request_model, response_model)


@settings(PROPERTY_SETTINGS, max_examples=60)
@given(body=add_bodies)
def test_adding_demonstrations(client: TestClient, body: dict[str, Any]) -> None:
    _check(client, "/v1/demonstrations", body, AddDemonstrationsRequest, AddDemonstrationsResponse)


@PROPERTY_SETTINGS
@given(body=search_bodies)
def test_searching_demonstrations(client: TestClient, body: dict[str, Any]) -> None:
    _check(client, "/v1/demonstrations/search", body, SearchRequest, SearchResponse)


@PROPERTY_SETTINGS
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes(client: TestClient, raw: bytes) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/demonstrations/search"):
        response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code in (200, 400, 404), (response.status_code, response.text)
        if response.status_code != 200:
            ErrorResponse.model_validate(response.json())


def test_numbers_json_cannot_represent_as_python_floats() -> None:
    # A sanity check of the strategies: NaN and Infinity survive the encoding.
    assert _encode({"x": math.nan}) == b'{"x": NaN}'
    assert _encode({"x": -math.inf}) == b'{"x": -Infinity}'
