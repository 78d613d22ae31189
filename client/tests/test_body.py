from __future__ import annotations

import json
from typing import Any

import httpx
import pydantic
import pytest
from payloads import chat_completion, completion

from crosstask_client import (
    ChatMessage,
    Crosstask,
    Demonstrations,
    Example,
    Routing,
    batch_completion_line,
    batch_line,
)
from crosstask_client._body import chat_body, completion_body, crosstask_extension

MESSAGES = [{"role": "system", "content": "Count."}, {"role": "user", "content": "3 cats?"}]


def test_minimal_chat_body_has_no_extension() -> None:
    assert chat_body(MESSAGES) == {"model": "auto", "messages": MESSAGES}


def test_full_extension() -> None:
    body = chat_body(
        MESSAGES,
        "smollm2-135m-instruct",
        task="Count the objects.",
        demonstrations=Demonstrations(k=4, min_score=0.2),
        routing=Routing(mode="merge", adapters=["a", "b"], weights=[0.7, 0.3], top_k=2),
        exclude_tasks=("object_counting",),
        sampling={"max_tokens": 8, "temperature": 0.0, "seed": 1, "stop": ["\n"], "top_p": None},
    )
    assert body == {
        "model": "smollm2-135m-instruct",
        "messages": MESSAGES,
        "max_tokens": 8,
        "temperature": 0.0,
        "seed": 1,
        "stop": ["\n"],
        "crosstask": {
            "task": "Count the objects.",
            "demonstrations": {"k": 4, "min_score": 0.2},
            "routing": {"mode": "merge", "adapters": ["a", "b"], "weights": [0.7, 0.3], "top_k": 2},
            "exclude_tasks": ["object_counting"],
        },
    }


def test_partial_options_leave_server_defaults() -> None:
    ext = crosstask_extension(demonstrations=Demonstrations(k=0), routing=Routing(mode="off"))
    assert ext == {"demonstrations": {"k": 0}, "routing": {"mode": "off"}}
    assert crosstask_extension() is None


def test_dict_options_are_validated() -> None:
    ext = crosstask_extension(demonstrations={"k": 2}, routing={"mode": "auto", "top_k": 3})
    assert ext == {"demonstrations": {"k": 2}, "routing": {"mode": "auto", "top_k": 3}}
    with pytest.raises(pydantic.ValidationError):
        crosstask_extension(demonstrations={"k": -1})
    with pytest.raises(pydantic.ValidationError):
        crosstask_extension(routing={"weights": "heavy"})
    with pytest.raises(pydantic.ValidationError):
        Demonstrations(k=-1)


def test_new_server_fields_pass_through() -> None:
    ext = crosstask_extension(routing=Routing(mode="fuse", fusion="mean"))  # type: ignore[call-arg]
    assert ext == {"routing": {"mode": "fuse", "fusion": "mean"}}


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="exclude_tasks"):
        chat_body(MESSAGES, exclude_tasks="object_counting")
    with pytest.raises(TypeError, match="crosstask"):
        chat_body(MESSAGES, sampling={"crosstask": {"task": "x"}})
    with pytest.raises(TypeError, match="messages"):
        chat_body("hello")  # type: ignore[arg-type]


def test_messages_accept_models() -> None:
    reply = ChatMessage(role="assistant", content="4")
    body = chat_body([*MESSAGES, reply, {"role": "user", "content": "and 4?"}])
    assert body["messages"][2] == {"role": "assistant", "content": "4"}


def test_stream_flag() -> None:
    assert chat_body(MESSAGES, stream=True)["stream"] is True
    assert "stream" not in chat_body(MESSAGES, stream=False)


def test_completion_body() -> None:
    assert completion_body("2+2=", "m", sampling={"max_tokens": 2}) == {
        "model": "m",
        "prompt": "2+2=",
        "max_tokens": 2,
    }
    assert completion_body(["a", "b"])["prompt"] == ["a", "b"]
    assert completion_body([[1, 2], [3]])["prompt"] == [[1, 2], [3]]
    body = completion_body("x", demonstrations={"k": 1}, exclude_tasks=["t"])
    assert body["crosstask"] == {"demonstrations": {"k": 1}, "exclude_tasks": ["t"]}


def _capture(reply: dict[str, Any]) -> tuple[list[httpx.Request], httpx.Client]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=reply)

    return seen, httpx.Client(transport=httpx.MockTransport(handler))


def test_client_sends_the_shared_body() -> None:
    seen, http = _capture(chat_completion())
    client = Crosstask("http://test", http_client=http)
    kwargs: dict[str, Any] = {
        "task": "Count.",
        "demonstrations": Demonstrations(k=2),
        "routing": Routing(mode="adapter", adapters=["arith"]),
        "exclude_tasks": ["object_counting"],
        "max_tokens": 4,
        "seed": 7,
    }
    client.chat(MESSAGES, "auto", **kwargs)
    sent = json.loads(seen[0].content)
    sampling = {"max_tokens": 4, "seed": 7}
    options = {k: v for k, v in kwargs.items() if k not in sampling}
    assert sent == chat_body(MESSAGES, "auto", sampling=sampling, **options)
    assert seen[0].url == "http://test/v1/chat/completions"
    line = json.loads(batch_line("c1", MESSAGES, "auto", **kwargs))
    assert line == {
        "custom_id": "c1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": sent,
    }


def test_completion_client_and_batch_line_agree() -> None:
    seen, http = _capture(completion())
    client = Crosstask("http://test", http_client=http)
    client.complete("2+2=", "base", demonstrations={"k": 0}, max_tokens=3)
    sent = json.loads(seen[0].content)
    line = json.loads(
        batch_completion_line("c2", "2+2=", "base", demonstrations={"k": 0}, max_tokens=3)
    )
    assert line["url"] == "/v1/completions"
    assert (
        line["body"]
        == sent
        == {
            "model": "base",
            "prompt": "2+2=",
            "max_tokens": 3,
            "crosstask": {"demonstrations": {"k": 0}},
        }
    )


def test_examples_validated() -> None:
    seen, http = _capture({"ids": ["x1", "x2"]})
    client = Crosstask("http://test", http_client=http)
    ids = client.demonstrations.add(
        "t", "Do t.", [Example(input="a", output="b"), {"input": "c", "output": "d"}]
    )
    assert ids == ["x1", "x2"]
    assert json.loads(seen[0].content) == {
        "task": "t",
        "definition": "Do t.",
        "examples": [{"input": "a", "output": "b"}, {"input": "c", "output": "d"}],
    }
    with pytest.raises(pydantic.ValidationError):
        client.demonstrations.add("t", "Do t.", [{"input": "only"}])
    assert len(seen) == 1
