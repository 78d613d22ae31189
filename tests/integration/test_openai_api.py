"""The OpenAI-compatible routes against the real server, through the official openai client."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server import Server

QUESTION = [{"role": "user", "content": "Name three primary colors."}]


def test_models_lists_base_and_auto(openai_client: openai.OpenAI, server: Server) -> None:
    models = {m.id: m for m in openai_client.models.list().data}
    # The base model, `auto`, and the adapters of the suite's library (test_adapters_api).
    assert {server.model, "auto"} <= set(models)
    assert all(
        m.model_extra["parent"] == server.model for k, m in models.items() if k != server.model
    )  # type: ignore[index]
    base = models[server.model]
    assert base.model_extra is not None
    assert base.model_extra["root"] == str(server.model_dir)
    assert models["auto"].model_extra["parent"] == server.model  # type: ignore[index]
    assert openai_client.models.retrieve(server.model).id == server.model


def test_chat_completion(openai_client: openai.OpenAI, server: Server, tokenizer) -> None:  # type: ignore[no-untyped-def]
    result = openai_client.chat.completions.create(
        model=server.model, messages=QUESTION, max_tokens=24, temperature=0
    )
    choice = result.choices[0]
    assert result.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    # usage matches the tokenizer: the prompt as the chat template renders it.
    prompt_ids = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert result.usage is not None
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    annotation = result.model_extra["crosstask"]  # type: ignore[index]
    # A bare question names no task: no demonstrations are considered, and it says why.
    retrieval = annotation.pop("retrieval")
    assert retrieval["considered"] == 0
    assert retrieval["reason"].startswith("no task definition"), retrieval
    assert annotation == {
        "demonstrations": [],
        "routing": {"mode": "off", "adapters": [], "scores": [], "reason": ""},
    }


def test_completion_usage_counts_generated_tokens(
    openai_client: openai.OpenAI, server: Server, tokenizer
) -> None:  # type: ignore[no-untyped-def]
    prompt = "The three primary colors are"
    result = openai_client.completions.create(
        model=server.model,
        prompt=prompt,
        max_tokens=7,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    choice = result.choices[0]
    assert choice.finish_reason == "length"
    assert result.usage is not None
    assert result.usage.completion_tokens == 7
    assert result.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert choice.logprobs is not None
    assert len(choice.logprobs.tokens or []) == 7
    assert "".join(choice.logprobs.tokens or []) == choice.text
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs or [])


def test_streaming_chat_equals_non_streaming(openai_client: openai.OpenAI, server: Server) -> None:
    whole = openai_client.chat.completions.create(
        model=server.model, messages=QUESTION, max_tokens=32, temperature=0
    )
    chunks = list(
        openai_client.chat.completions.create(
            model=server.model,
            messages=QUESTION,
            max_tokens=32,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [whole.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and whole.usage is not None
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.model_extra["crosstask"]["routing"]["mode"] == "off"  # type: ignore[index]


def test_streaming_completion(openai_client: openai.OpenAI, server: Server) -> None:
    whole = openai_client.completions.create(
        model=server.model, prompt="Once upon a time", max_tokens=20, temperature=0
    )
    chunks = list(
        openai_client.completions.create(
            model=server.model,
            prompt="Once upon a time",
            max_tokens=20,
            temperature=0,
            stream=True,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    # Without include_usage the chunk that finishes the request carries the annotation.
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].model_extra["crosstask"] is not None  # type: ignore[index]


def test_n_choices(openai_client: openai.OpenAI, server: Server) -> None:
    result = openai_client.chat.completions.create(
        model=server.model, messages=QUESTION, max_tokens=12, temperature=1.0, n=3, seed=7
    )
    assert sorted(c.index for c in result.choices) == [0, 1, 2]
    assert result.usage is not None
    assert result.usage.completion_tokens > 0
    streamed: dict[int, str] = {}
    for chunk in openai_client.chat.completions.create(
        model=server.model,
        messages=QUESTION,
        max_tokens=12,
        temperature=1.0,
        n=2,
        seed=7,
        stream=True,
    ):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert set(streamed) == {0, 1}

    prompts = openai_client.completions.create(
        model=server.model,
        prompt=["Red is", "Blue is"],
        max_tokens=4,
        n=2,
        temperature=0.7,
        seed=3,
    )
    assert sorted(c.index for c in prompts.choices) == [0, 1, 2, 3]
    single = openai_client.completions.create(
        model=server.model,
        prompt=["Red is", "Blue is"],
        max_tokens=6,
        temperature=0,
    )
    alone = openai_client.completions.create(
        model=server.model,
        prompt="Blue is",
        max_tokens=6,
        temperature=0,
    )
    # Choice i belongs to prompt i.
    assert single.choices[1].index == 1
    assert single.choices[1].text == alone.choices[0].text


def test_stop_strings(openai_client: openai.OpenAI, server: Server) -> None:
    free = (
        openai_client.completions.create(
            model=server.model, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0
        )
        .choices[0]
        .text
    )
    assert " 6" in free, free
    stopped = openai_client.completions.create(
        model=server.model, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[" 6"]
    ).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free[: free.index(" 6")]


def test_seed_reproducibility(openai_client: openai.OpenAI, server: Server) -> None:
    def sample(seed: int) -> str:
        return (
            openai_client.chat.completions.create(
                model=server.model, messages=QUESTION, max_tokens=24, temperature=1.0, seed=seed
            )
            .choices[0]
            .message.content
            or ""
        )

    first, again = sample(1234), sample(1234)
    assert first == again
    others = {sample(s) for s in (1, 2, 3)}
    assert len(others | {first}) > 1, "different seeds never changed the sample"


def test_chat_logprobs(openai_client: openai.OpenAI, server: Server) -> None:
    result = openai_client.chat.completions.create(
        model=server.model,
        messages=QUESTION,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = result.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert result.usage is not None
    assert len(content) == result.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0
        assert 1 <= len(item.top_logprobs) <= 3
        # Greedy: the chosen token is the most likely one.
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-4)


def test_auto_model_with_routing_off_serves_base(
    openai_client: openai.OpenAI, server: Server
) -> None:
    base = openai_client.chat.completions.create(
        model=server.model, messages=QUESTION, max_tokens=16, temperature=0
    )
    auto = openai_client.chat.completions.create(
        model="auto",
        messages=QUESTION,
        max_tokens=16,
        temperature=0,
        extra_body={"crosstask": {"routing": {"mode": "off"}}},
    )
    assert auto.choices[0].message.content == base.choices[0].message.content
    assert auto.model_extra["crosstask"]["routing"] == {
        "mode": "off",
        "adapters": [],
        "scores": [],
        "reason": "",
    }  # type: ignore[index]


def test_health_and_metrics(server: Server) -> None:
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in (
        "crosstask_requests_total",
        "crosstask_request_latency_seconds_bucket",
        "crosstask_time_to_first_token_seconds_bucket",
        "crosstask_prompt_tokens_total",
        "crosstask_completion_tokens_total",
        "crosstask_requests_running",
        "crosstask_requests_waiting",
        "crosstask_requests_aborted_total",
    ):
        assert name in text, name
    assert 'route="/v1/chat/completions",status="200"' in text
