"""`routing.mode: "fuse"` through the real server and the official openai client: fusing
one adapter at weight 1 is that adapter, streaming gives the non-streaming text, fused and
unfused requests sent together each give what they give alone, the annotation names the
members and weights, the metrics count fused requests and steps, and every refusal is a
4xx. The adapters are tests/conftest.py's random LoRAs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.server import MODEL, Server

QUESTION = [{"role": "user", "content": "Name three fruits."}]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 16}


def _fuse(adapters: list[str], weights: list[float] | None = None, **more: Any) -> dict[str, Any]:
    routing: dict[str, Any] = {"mode": "fuse", "adapters": adapters, **more}
    if weights is not None:
        routing["weights"] = weights
    return {"crosstask": {"routing": routing}}


def _ask(client: Any, extra: dict[str, Any] | None, stream: bool = False, **kw: Any) -> Any:
    body = {"model": MODEL, "messages": QUESTION, **GREEDY, **kw}
    if stream:
        text, last = "", None
        for chunk in client.chat.completions.create(**body, stream=True, extra_body=extra):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            last = chunk
        return text, (last.model_extra or {}).get("crosstask")
    response = client.chat.completions.create(**body, extra_body=extra)
    return response.choices[0].message.content, (response.model_extra or {}).get("crosstask")


def test_one_adapter_at_weight_one_is_that_adapter(openai_client: Any) -> None:
    alone, _ = _ask(
        openai_client, {"crosstask": {"routing": {"mode": "adapter", "adapters": ["alpha"]}}}
    )
    base, _ = _ask(openai_client, None)
    assert alone != base
    fused, annotation = _ask(openai_client, _fuse(["alpha"], [1.0]))
    assert fused == alone
    assert annotation["routing"]["mode"] == "fuse"
    assert annotation["routing"]["adapters"] == [{"name": "alpha", "weight": 1.0}]
    assert _ask(openai_client, _fuse(["alpha"], [0.0]))[0] == base
    assert _ask(openai_client, _fuse(["alpha", "alpha"], [0.5, 0.5]))[0] == alone


def test_streaming_equals_non_streaming_and_metrics_count(
    openai_client: Any, server: Server
) -> None:
    requests = server.metric("crosstask_fused_requests_total")
    steps = server.metric("crosstask_fused_steps_total")
    extra = _fuse(["alpha", "beta"], alpha="dynamic")
    text, annotation = _ask(openai_client, extra)
    streamed, last = _ask(openai_client, extra, stream=True)
    assert streamed == text and last["routing"]["mode"] == "fuse"
    assert [a["name"] for a in annotation["routing"]["adapters"]] == ["alpha", "beta"]
    assert "dynamic" in annotation["routing"]["reason"]
    assert server.metric("crosstask_fused_requests_total") == requests + 2
    assert server.metric("crosstask_fused_steps_total") >= steps + 2


def test_fused_and_unfused_at_once_equal_alone(openai_client: Any) -> None:
    kinds: list[tuple[dict[str, Any] | None, bool]] = [
        (None, False),
        ({"crosstask": {"routing": {"mode": "adapter", "adapters": ["beta"]}}}, True),
        (_fuse(["alpha", "beta"], [0.7, 0.5]), False),
        (_fuse(["alpha", "beta"], [0.7, 0.5]), True),
        (_fuse(["beta", "general"], alpha="dynamic"), True),
        (_fuse(["alpha"], [0.5]), False),
    ]
    jobs = kinds * 2
    alone = [_ask(openai_client, extra, stream)[0] for extra, stream in kinds]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _ask(openai_client, job[0], job[1])[0], jobs))
    assert together == alone * 2


@pytest.mark.parametrize(
    ("extra", "more", "status"),
    [
        (_fuse(["alpha"]), {"logprobs": True}, 400),
        (_fuse(["alpha"]), {"n": 2, "temperature": 1.0}, 400),
        (_fuse(["nope"]), {}, 404),
        (_fuse(["alpha", "beta"], [1.0]), {}, 400),
        (_fuse(["alpha"], [4.5]), {}, 400),
        (_fuse(["alpha"], [-1.0], alpha="dynamic"), {}, 400),
    ],
)
def test_refusals_are_4xx(
    server: Server, extra: dict[str, Any], more: dict[str, Any], status: int
) -> None:
    body = {"model": MODEL, "messages": QUESTION, **GREEDY, **more, **extra}
    response = httpx.post(
        f"{server.v1}/chat/completions", json=body, headers=server.headers(), timeout=120
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


def test_long_prompt_is_refused_with_the_limit(server: Server) -> None:
    # ~1,200 tokens: within the context (2,048), beyond what three members prefill in a step.
    long = [{"role": "user", "content": "word " * 1200}]
    body = {"model": MODEL, "messages": long, **GREEDY, **_fuse(["alpha", "beta"])}
    response = httpx.post(
        f"{server.v1}/chat/completions", json=body, headers=server.headers(), timeout=120
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "fusion group" in error["message"]
