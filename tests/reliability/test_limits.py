"""Every documented limit (docs/api.md, "Limits"), exceeded, is a 4xx with an OpenAI error body;
hostile encodings (invalid UTF-8, lone surrogates, deep nesting, huge numbers, NaN and
Infinity) are 400s, never a 500. Cases that test_bad_input.py covers are not repeated."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.server import Server

MODEL = "smollm2-135m-instruct"
HI = [{"role": "user", "content": "hi"}]
MAX_BODY = 8 * 1024 * 1024  # CROSSTASK_MAX_BODY_BYTES's default


def _post(server: Server, path: str, content: bytes | str | Iterator[bytes]) -> httpx.Response:
    return httpx.post(
        f"{server.v1}{path}",
        content=content,
        headers={"Content-Type": "application/json", **server.headers()},
        timeout=60,
    )


def _error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text[:500]
    error: dict[str, object] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return error


def _chat(**fields: object) -> str:
    return json.dumps({"model": MODEL, "messages": HI, "max_tokens": 1, **fields})


# -- body size -------------------------------------------------------------------------


def _oversized() -> bytes:
    return _chat(user="a" * (MAX_BODY + 1)).encode()


def test_body_over_the_limit_is_413_before_reading_it(server: Server) -> None:
    error = _error(_post(server, "/chat/completions", _oversized()), 413)
    assert error["code"] == "request_too_large"


def test_chunked_body_over_the_limit_is_413_as_it_arrives(server: Server) -> None:
    body = _oversized()

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies as it arrives
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    error = _error(_post(server, "/completions", chunks()), 413)
    assert error["code"] == "request_too_large"


def test_body_just_under_the_limit_is_parsed(server: Server) -> None:
    # Big but allowed: it reaches the route (the unknown field is ignored) and is served.
    body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 1, "pad": "a" * 1_000_000})
    assert _post(server, "/completions", body).status_code == 200


# -- sizes of fields ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/chat/completions", {"messages": HI * 1025}, "messages"),
        ("/chat/completions", {"n": 17, "temperature": 1}, "n"),
        ("/completions", {"prompt": ["x"] * 65}, "prompt"),
        ("/completions", {"prompt": "x", "stop": ["a"] * 17}, "stop"),
        ("/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("/chat/completions", {"crosstask": {"demonstrations": {"k": 33}}}, None),
        ("/chat/completions", {"crosstask": {"routing": {"adapters": ["a"] * 9}}}, None),
        ("/chat/completions", {"crosstask": {"routing": {"top_k": 9}}}, None),
        ("/chat/completions", {"crosstask": {"exclude_tasks": ["t"] * 1025}}, None),
        ("/chat/completions", {"crosstask": {"task": "t" * 8193}}, None),
        ("/completions", {"prompt": "a" * 1_000_001}, "prompt"),
    ],
)
def test_field_limits(
    server: Server, path: str, body: dict[str, object], param: str | None
) -> None:
    full = {"model": MODEL, "max_tokens": 1, **({"messages": HI} if "chat" in path else {}), **body}
    error = _error(_post(server, path, json.dumps(full)), 400)
    if param is not None:
        assert error["param"] == param, error
    else:
        assert str(error["param"]).startswith("crosstask"), error


@pytest.mark.parametrize("max_tokens", [2048, 10**6, 10**30])
def test_max_tokens_beyond_the_context(server: Server, max_tokens: int) -> None:
    error = _error(_post(server, "/chat/completions", _chat(max_tokens=max_tokens)), 400)
    assert error["code"] == "context_length_exceeded"


def test_long_conversation_is_context_length_exceeded(server: Server) -> None:
    messages = [{"role": "user", "content": "tell me more " * 10}] * 500
    error = _error(_post(server, "/chat/completions", _chat(messages=messages)), 400)
    assert error["code"] == "context_length_exceeded"


def test_search_limits(server: Server) -> None:
    for body in (
        {"query": "x", "k": 101},
        {"query": "x", "exclude_tasks": ["t"] * 1001},
        {"query": "x" * 32_001},
    ):
        _error(_post(server, "/demonstrations/search", json.dumps(body)), 400)


# -- hostile encodings -----------------------------------------------------------------


def _raw_chat(extra: str) -> bytes:
    return (
        f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}]{extra}}}'.encode()
    )


@pytest.mark.parametrize(
    "body",
    [
        # Invalid UTF-8 inside a string, and a truncated multi-byte sequence.
        b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"model": "m", "messages": [{"role": "user", "content": "\xe2\x82"}]}',
        # Overlong encoding of "/".
        b'{"model": "m", "messages": [{"role": "user", "content": "\xc0\xaf"}]}',
    ],
)
def test_invalid_utf8_is_400(server: Server, body: bytes) -> None:
    assert _error(_post(server, "/chat/completions", body), 400)["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
        ),
        ("/chat/completions", {"messages": HI, "stop": ["\ud83d"]}),
        ("/chat/completions", {"messages": HI, "crosstask": {"task": "\udc00"}}),
        ("/completions", {"prompt": "\ud800"}),
        ("/completions", {"prompt": ["ok", "\ud800"]}),
        ("/completions", {"prompt": "x", "user": "\ud800"}),
    ],
)
def test_lone_surrogates_are_400(server: Server, path: str, body: dict[str, object]) -> None:
    full = {"model": MODEL, "max_tokens": 1, **body}
    # json.dumps escapes the surrogate as \\udXXX, which is valid JSON.
    error = _error(_post(server, path, json.dumps(full)), 400)
    assert "Unicode" in str(error["message"]) or "unicode" in str(error["message"])


@pytest.mark.parametrize("depth", [50, 500, 990, 1_000, 5_000, 200_000])
def test_deep_nesting_is_never_a_5xx(server: Server, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    for body in (
        f'{{"model": "{MODEL}", "messages": {nested}}}'.encode(),
        _raw_chat(f', "max_tokens": 1, "extra": {nested}'),
        ('{"a":' * depth + "1" + "}" * depth).encode(),
    ):
        response = _post(server, "/chat/completions", body)
        assert response.status_code < 500, response.text[:300]
        if response.status_code != 200:
            _error(response, 400)


@pytest.mark.parametrize(
    "extra",
    [
        ', "max_tokens": ' + "9" * 5000,  # past Python's int-parsing limit
        ', "max_tokens": ' + "9" * 400,
        ', "max_tokens": 1e400',  # parses as Infinity
        ', "max_tokens": -1e400',
        ', "max_tokens": 1.5',
        ', "n": ' + "9" * 40,
        ', "seed": ' + "9" * 30,
        ', "seed": 1e300',
        ', "temperature": 1e400',
        ', "temperature": NaN',
        ', "temperature": Infinity',
        ', "top_p": -Infinity',
        ', "presence_penalty": NaN',
        ', "frequency_penalty": 1e999',
        ', "logprobs": true, "top_logprobs": ' + "9" * 100,
        ', "crosstask": {"routing": {"mode": "merge", "adapters": ["a"], "weights": [NaN]}}',
        ', "crosstask": {"routing": {"weights": [Infinity]}}',
        ', "crosstask": {"demonstrations": {"k": 1, "min_score": NaN}}',
        ', "crosstask": {"demonstrations": {"k": 1e400}}',
    ],
)
def test_huge_numbers_and_non_finite_values_are_400(server: Server, extra: str) -> None:
    _error(_post(server, "/chat/completions", _raw_chat(extra)), 400)


@pytest.mark.parametrize(
    "body",
    [
        '{"query": "x", "min_score": NaN}',
        '{"query": "x", "k": ' + "9" * 5000 + "}",
        '{"query": "x", "k": Infinity}',
    ],
)
def test_demonstration_search_numbers_are_400(server: Server, body: str) -> None:
    _error(_post(server, "/demonstrations/search", body), 400)
