"""Cross-task demonstrations through the real server: retrieval in requests, the
annotation, and the store's add and search routes."""

from __future__ import annotations

import json
import uuid

import httpx
import openai
import pytest

from tests.conftest import TEST_DEMONSTRATIONS
from tests.server import Server

# The test store's task nearest to QUESTION (tests/data/demonstrations.jsonl).
SCIENCE = "test/science_answer"
DEFINITION = "Given a science question, write its correct answer."
QUESTION = [
    {"role": "system", "content": DEFINITION},
    {"role": "user", "content": "What do plants need for photosynthesis?"},
]


def _post(server: Server, path: str, body: object, key: str | None = None) -> httpx.Response:
    return httpx.post(f"{server.v1}{path}", json=body, headers=server.headers(key), timeout=300)


def _store_size(server: Server) -> float:
    return server.metric("crosstask_store_size")


def test_chat_with_demonstrations(openai_client: openai.OpenAI, server: Server) -> None:
    plain = openai_client.chat.completions.create(
        model=server.model,
        messages=QUESTION,
        max_tokens=16,
        temperature=0,  # type: ignore[arg-type]
    )
    result = openai_client.chat.completions.create(
        model=server.model,
        messages=QUESTION,
        max_tokens=16,
        temperature=0,  # type: ignore[arg-type]
        extra_body={"crosstask": {"demonstrations": {"k": 3}, "exclude_tasks": [SCIENCE]}},
    )
    demos = result.model_extra["crosstask"]["demonstrations"]  # type: ignore[index]
    assert len(demos) == 3
    assert all(d["task"] != SCIENCE for d in demos)
    # Unexcluded, the science task is what this question finds first.
    query = f"{DEFINITION}\n{QUESTION[1]['content']}"
    nearest = _post(server, "/demonstrations/search", {"query": query, "k": 1}).json()["data"]
    assert nearest[0]["task"] == SCIENCE, nearest
    scores = [d["score"] for d in demos]
    assert scores == sorted(scores, reverse=True)
    assert all(0 < s <= 1.0001 for s in scores)
    assert result.usage is not None and plain.usage is not None
    # The demonstrations are in the prompt.
    assert result.usage.prompt_tokens > plain.usage.prompt_tokens + 30
    assert plain.model_extra["crosstask"]["demonstrations"] == []  # type: ignore[index]


def test_exclusion_still_returns_k(server: Server) -> None:
    body = {
        "model": server.model,
        "messages": QUESTION,
        "max_tokens": 1,
        "crosstask": {"demonstrations": {"k": 4}},
    }
    first = _post(server, "/chat/completions", body).json()["crosstask"]["demonstrations"]
    nearest_tasks = sorted({d["task"] for d in first})
    body["crosstask"]["exclude_tasks"] = [*nearest_tasks, "no/such/task"]  # type: ignore[index]
    again = _post(server, "/chat/completions", body).json()["crosstask"]["demonstrations"]
    assert len(again) == 4
    assert not {d["task"] for d in again} & set(nearest_tasks)


def test_streaming_annotation_names_demonstrations(
    openai_client: openai.OpenAI, server: Server
) -> None:
    chunks = list(
        openai_client.chat.completions.create(
            model=server.model,
            messages=QUESTION,
            max_tokens=8,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
            extra_body={"crosstask": {"demonstrations": {"k": 2}}},
        )
    )
    annotated = [c.model_extra["crosstask"] for c in chunks if c.model_extra.get("crosstask")]  # type: ignore[union-attr]
    assert len(annotated) == 1
    assert len(annotated[0]["demonstrations"]) == 2


def test_completion_with_task_field(server: Server) -> None:
    response = _post(
        server,
        "/completions",
        {
            "model": server.model,
            "prompt": "Input: 2 + 2\nOutput:",
            "max_tokens": 4,
            "temperature": 0,
            "crosstask": {"task": "Add the two numbers.", "demonstrations": {"k": 2}},
        },
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["crosstask"]["demonstrations"]) == 2


def test_min_score_filters(server: Server) -> None:
    body = {
        "model": server.model,
        "messages": QUESTION,
        "max_tokens": 1,
        "crosstask": {"demonstrations": {"k": 4, "min_score": 0.99}},
    }
    assert _post(server, "/chat/completions", body).json()["crosstask"]["demonstrations"] == []


def test_demonstrations_dropped_to_fit_the_context(server: Server) -> None:
    # ~1,500 prompt tokens plus 400 to generate leaves no room for 8 demonstrations in
    # the test server's 2,048-token context; the request still succeeds with fewer.
    long_input = "The quick brown fox jumps over the lazy dog. " * 150
    response = _post(
        server,
        "/chat/completions",
        {
            "model": server.model,
            "max_tokens": 400,
            "temperature": 0,
            # The context is planned for 400 tokens; generating them all adds nothing.
            "stop": [".", "\n"],
            "messages": [
                {"role": "system", "content": DEFINITION},
                {"role": "user", "content": long_input},
            ],
            "crosstask": {"demonstrations": {"k": 8}},
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["crosstask"]["demonstrations"]) < 8
    assert body["usage"]["prompt_tokens"] + 400 <= 2048


@pytest.mark.parametrize(
    ("extension", "param"),
    [
        ({"demonstrations": {"k": 33}}, "crosstask.demonstrations.k"),
        ({"demonstrations": {"k": -1}}, "crosstask.demonstrations.k"),
        ({"demonstrations": {"min_score": -0.5}}, "crosstask.demonstrations.min_score"),
        ({"exclude_tasks": "object_counting"}, "crosstask.exclude_tasks"),
    ],
)
def test_bad_retrieval_options(server: Server, extension: dict[str, object], param: str) -> None:
    response = _post(
        server,
        "/chat/completions",
        {"model": server.model, "messages": QUESTION, "crosstask": extension},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_add_then_search(server: Server) -> None:
    before = _store_size(server)
    examples = [
        {"input": "zebra giraffe okapi", "output": "okapi"},
        {"input": "lion tiger cheetah", "output": "cheetah"},
    ]
    added = _post(
        server,
        "/demonstrations",
        {
            "task": "test/pick_the_last_animal",
            "definition": "Name the last animal.",
            "examples": examples,
        },
        key=server.admin_key,
    )
    assert added.status_code == 200, added.text
    ids = added.json()["ids"]
    assert len(ids) == 2
    assert _store_size(server) == before + 2

    hits = _post(
        server,
        "/demonstrations/search",
        {"query": "Name the last animal.\nzebra giraffe okapi", "k": 3},
    ).json()["data"]
    assert hits[0]["id"] == ids[0]
    assert hits[0]["score"] > 0.95
    assert hits[0]["output"] == "okapi"
    excluded = _post(
        server,
        "/demonstrations/search",
        {
            "query": "Name the last animal.\nzebra giraffe okapi",
            "k": 3,
            "exclude_tasks": ["test/pick_the_last_animal"],
        },
    ).json()["data"]
    assert len(excluded) == 3
    assert not {h["id"] for h in excluded} & set(ids)


@pytest.mark.parametrize(
    "body",
    [
        {"task": "t", "definition": "d", "examples": []},
        {"task": "t", "definition": "d", "examples": [{"input": "x"}]},
        {"task": "t", "definition": "d", "examples": [{"input": "x", "output": ""}]},
        {"task": "t", "definition": "d", "examples": [{"input": "   ", "output": "y"}]},
        {"task": "", "definition": "d", "examples": [{"input": "x", "output": "y"}]},
        {"task": "t", "examples": [{"input": "x", "output": "y"}, {"input": "z"}]},
        {"task": "t", "examples": [{"input": "x", "output": "y"}] * 10_001},
        {"task": "t", "examples": "not a list"},
    ],
)
def test_bad_adds_write_nothing(server: Server, body: dict[str, object]) -> None:
    before = _store_size(server)
    response = _post(server, "/demonstrations", body, key=server.admin_key)
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error"]["message"]
    assert _store_size(server) == before


def test_adds_need_the_admin_key(server: Server) -> None:
    body = {"task": "t", "examples": [{"input": "x", "output": "y"}]}
    response = _post(server, "/demonstrations", body)  # a plain API key
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "admin_key_required"
    assert httpx.post(f"{server.v1}/demonstrations", json=body).status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        {"query": ""},
        {"query": "   "},
        {"query": "x", "k": 0},
        {"query": "x", "k": 101},
        {"query": "x", "min_score": -1},
        {"k": 3},
        {"query": "x", "exclude_tasks": [1, 2]},
    ],
)
def test_bad_searches(server: Server, body: dict[str, object]) -> None:
    response = _post(server, "/demonstrations/search", body)
    assert response.status_code == 400, response.text
    json.dumps(response.json()["error"])


def test_the_gate_is_one_for_every_mode(server: Server) -> None:
    """A request that sends no `k` gets the server's, gated by the server's min_score (shut
    on the test server) or its own; a request's own `k` is used as given, in every mode."""
    gibberish = [{"role": "user", "content": "zqxv plork 7731 vbnm ghtrr"}]

    def annotation(messages: list[dict[str, str]], **crosstask: object) -> dict[str, object]:
        body = {"model": "auto", "messages": messages, "max_tokens": 1, "crosstask": crosstask}
        response = _post(server, "/chat/completions", body)
        assert response.status_code == 200, response.text
        return dict(response.json()["crosstask"])

    shut = annotation(QUESTION)
    assert shut["demonstrations"] == []
    assert shut["retrieval"]["scope"] == "task" and shut["retrieval"]["considered"] == 6
    assert shut["retrieval"]["reason"].endswith("below min_score 1.000")
    opened = annotation(QUESTION, demonstrations={"min_score": 0.5})
    assert opened["demonstrations"] and all(d["score"] >= 0.5 for d in opened["demonstrations"])
    far = annotation(gibberish, demonstrations={"min_score": 0.5})
    assert far["demonstrations"] == [] and far["retrieval"]["scope"] == "input"
    for mode in ("auto", "off"):
        asked = annotation(gibberish, demonstrations={"k": 2}, routing={"mode": mode})
        assert len(asked["demonstrations"]) == 2, asked
        assert asked["demonstrations"][0]["score"] < 0.5 and asked["retrieval"]["min_score"] == 0


def test_a_tasks_requests_share_their_prompt_prefix(server: Server) -> None:
    """Task scope: the second request of a task gets the first one's demonstrations, in
    the same order, and the engine serves their prompt from its prefix cache; the
    definition is embedded once."""
    before = {
        name: server.metric(name)
        for name in (
            "crosstask_prefix_cache_hits_total",
            "crosstask_prefix_cache_queries_total",
            "crosstask_embedding_cache_hits_total",
            "crosstask_demonstration_prompt_tokens_count",
        )
    }
    definition = f"Name the largest planet mentioned, with care {uuid.uuid4().hex[:6]}."
    answers = []
    for question in ("Jupiter or Mars?", "Saturn, Venus or Earth?"):
        body = {
            "model": server.model,
            "messages": [
                {"role": "system", "content": definition},
                {"role": "user", "content": question},
            ],
            "max_tokens": 1,
            "crosstask": {"demonstrations": {"k": 4, "scope": "task"}},
        }
        response = _post(server, "/chat/completions", body)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    first, second = (a["crosstask"]["demonstrations"] for a in answers)
    assert len(first) == 4 and [d["id"] for d in first] == [d["id"] for d in second]
    hits = (
        server.metric("crosstask_prefix_cache_hits_total")
        - before["crosstask_prefix_cache_hits_total"]
    )
    # The second prompt's demonstrations (hundreds of tokens) came from the cache.
    assert hits >= answers[1]["usage"]["prompt_tokens"] // 2, hits
    assert (
        server.metric("crosstask_prefix_cache_queries_total")
        > before["crosstask_prefix_cache_queries_total"]
    )
    assert server.metric("crosstask_embedding_cache_hits_total") >= (
        before["crosstask_embedding_cache_hits_total"] + 1
    )
    assert server.metric("crosstask_demonstration_prompt_tokens_count") == (
        before["crosstask_demonstration_prompt_tokens_count"] + 2
    )


def test_retrieval_metrics(server: Server) -> None:
    text = httpx.get(f"{server.base_url}/metrics").text
    assert "crosstask_retrieval_latency_seconds_count" in text
    assert "crosstask_demonstrations_per_request_bucket" in text
    # The store holds the test demonstrations it was built from, and what tests added.
    built = sum(len(json.loads(line)["examples"]) for line in TEST_DEMONSTRATIONS.open())
    assert server.metric("crosstask_store_size") >= built
