"""The Python SDK (`client/`, `crosstask_client`) against the real server.

Every public method, sync and async; streaming, and leaving a stream early (the server must
abort the request); each error class from a real answer; batch lines accepted by the server;
and `pip install ./client` into a fresh virtual environment without torch.

Demonstration-store and adapter routes land in later issues: those tests carry the
`requires_retrieval` / `requires_adapters` markers.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import venv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"
try:
    import crosstask_client  # noqa: F401
except ImportError:  # the SDK not installed in this environment: use the checkout
    sys.path.insert(0, str(CLIENT_DIR))

from crosstask_client import (  # noqa: E402
    Adapter,
    APIConnectionError,
    APITimeoutError,
    AsyncCrosstask,
    AuthenticationError,
    BadRequestError,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    Crosstask,
    DemonstrationHit,
    Demonstrations,
    Health,
    ModelList,
    NotFoundError,
    PermissionDeniedError,
    Routing,
    batch_completion_line,
    batch_line,
    read_batch_output,
)

QUESTION = [{"role": "user", "content": "Name three primary colors."}]
LONG = [{"role": "user", "content": "Write a very long story about a dragon."}]
# Long enough that a stream left after a few chunks is still running on the server.
LONG_SAMPLING: dict[str, Any] = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}
TIMEOUT = 120.0


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[Crosstask]:
    with Crosstask(
        server.base_url, api_key=server.api_key, admin_key=server.admin_key, timeout=TIMEOUT
    ) as sdk:
        yield sdk


def _async_client(server: Any, **kwargs: Any) -> AsyncCrosstask:
    options: dict[str, Any] = {
        "api_key": server.api_key,
        "admin_key": server.admin_key,
        "timeout": TIMEOUT,
    }
    options.update(kwargs)
    return AsyncCrosstask(server.base_url, **options)


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.eE+-]+)$", text, re.MULTILINE)
    assert match is not None, f"metric {name} not in /metrics"
    return float(match.group(1))


def _wait_idle(client: Crosstask, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _metric(client.metrics(), "crosstask_requests_running") != 0:
        assert time.monotonic() < deadline, "the server kept running an abandoned request"
        time.sleep(0.2)


def _aborted(client: Crosstask) -> float:
    return _metric(client.metrics(), "crosstask_requests_aborted_total")


def _check_chat(reply: ChatCompletion, model: str) -> None:
    assert isinstance(reply, ChatCompletion)
    assert reply.object == "chat.completion" and reply.id and reply.created > 0
    assert reply.model == model
    choice = reply.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.crosstask is not None and reply.crosstask.routing is not None
    assert reply.crosstask.routing.mode


def _check_completion(reply: Completion, model: str, max_tokens: int) -> None:
    assert isinstance(reply, Completion)
    assert reply.object == "text_completion" and reply.model == model
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= max_tokens
    assert reply.crosstask is not None


# -- health, metrics, models -------------------------------------------------------


def test_health_metrics_models(client: Crosstask, server: Any) -> None:
    health = client.health()
    assert isinstance(health, Health) and health and health.status_code == 200
    assert "crosstask_requests_running" in client.metrics()
    models = client.models()
    assert isinstance(models, ModelList) and models.object == "list"
    assert server.model in models.ids and "auto" in models.ids
    base = next(m for m in models.data if m.id == server.model)
    assert base.root and base.parent is None
    assert all(m.parent == server.model for m in models.data if m.parent is not None)


async def test_health_metrics_models_async(server: Any) -> None:
    async with _async_client(server) as sdk:
        assert await sdk.health()
        assert "crosstask_requests_aborted_total" in await sdk.metrics()
        assert server.model in (await sdk.models()).ids


# -- chat and completions --------------------------------------------------------------


def test_chat(client: Crosstask, server: Any) -> None:
    reply = client.chat(QUESTION, server.model, max_tokens=24, temperature=0)
    _check_chat(reply, server.model)
    assert reply.crosstask is not None
    assert reply.crosstask.demonstrations == []
    assert reply.crosstask.routing is not None and reply.crosstask.routing.mode == "off"
    assert reply.text == reply.choices[0].message.content


def test_chat_auto_and_extension(client: Crosstask, server: Any) -> None:
    # The default model is the router's `auto`.
    _check_chat(client.chat(QUESTION, max_tokens=8, temperature=0), "auto")
    reply = client.chat(
        [{"role": "system", "content": "Answer briefly."}, *QUESTION],
        server.model,
        task="List colors.",
        demonstrations=Demonstrations(k=0),
        routing=Routing(mode="off"),
        exclude_tasks=["test/category"],
        max_tokens=8,
        temperature=0,
        seed=1,
    )
    _check_chat(reply, server.model)
    assert reply.crosstask is not None and reply.crosstask.demonstrations == []


def test_complete(client: Crosstask, server: Any) -> None:
    reply = client.complete(
        "The three primary colors are", server.model, max_tokens=8, temperature=0
    )
    _check_completion(reply, server.model, 8)
    assert reply.text == reply.choices[0].text
    many = client.complete(["Red is", "Blue is"], server.model, max_tokens=4, temperature=0)
    assert sorted(c.index for c in many.choices) == [0, 1]


async def test_chat_and_complete_async(server: Any) -> None:
    async with _async_client(server) as sdk:
        reply = await sdk.chat(QUESTION, server.model, max_tokens=16, temperature=0)
        _check_chat(reply, server.model)
        text = await sdk.complete(
            "1, 2, 3,", server.model, max_tokens=6, temperature=0, demonstrations={"k": 0}
        )
        _check_completion(text, server.model, 6)


# -- streaming -------------------------------------------------------------------------


def test_chat_stream_equals_whole(client: Crosstask, server: Any) -> None:
    whole = client.chat(QUESTION, server.model, max_tokens=32, temperature=0)
    with client.chat(
        QUESTION,
        server.model,
        stream=True,
        max_tokens=32,
        temperature=0,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.text
    assert chunks[-1].crosstask is not None
    assert stream.crosstask is not None and stream.crosstask.routing is not None
    assert stream.crosstask.routing.mode == "off"
    assert stream.usage is not None and whole.usage is not None
    assert stream.usage.completion_tokens == whole.usage.completion_tokens


def test_complete_stream(client: Crosstask, server: Any) -> None:
    whole = client.complete("Once upon a time", server.model, max_tokens=16, temperature=0)
    chunks = list(
        client.complete("Once upon a time", server.model, stream=True, max_tokens=16, temperature=0)
    )
    assert all(isinstance(c, CompletionChunk) for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert chunks[-1].crosstask is not None


def test_stream_break_aborts_request(client: Crosstask, server: Any) -> None:
    _wait_idle(client)
    before = _aborted(client)
    for number, _chunk in enumerate(
        client.chat(LONG, server.model, stream=True, **LONG_SAMPLING), start=1
    ):
        if number == 3:
            break
    _wait_idle(client, timeout=20)
    assert _aborted(client) == before + 1
    # Leaving a `with` block early aborts as well, and the client stays usable.
    with client.complete("Once upon a time", server.model, stream=True, **LONG_SAMPLING) as stream:
        next(iter(stream))
    _wait_idle(client, timeout=20)
    assert _aborted(client) == before + 2
    assert client.chat(QUESTION, server.model, max_tokens=4).choices


async def test_stream_async_and_break(client: Crosstask, server: Any) -> None:
    async with _async_client(server) as sdk:
        stream = await sdk.chat(QUESTION, server.model, stream=True, max_tokens=16, temperature=0)
        async with stream:
            chunks = [c async for c in stream]
        assert chunks[-1].crosstask is not None and stream.crosstask is not None
        completion_chunks = [
            c
            async for c in await sdk.complete(
                "1, 2, 3,", server.model, stream=True, max_tokens=8, temperature=0
            )
        ]
        assert completion_chunks[-1].crosstask is not None

        _wait_idle(client)
        before = _aborted(client)
        async with await sdk.chat(LONG, server.model, stream=True, **LONG_SAMPLING) as long:
            async for _chunk in long:
                break
        _wait_idle(client, timeout=20)
        # The engine frees the slot before the server counts the abort (one await apart),
        # so the counter may trail the running gauge by a moment.
        deadline = time.monotonic() + 10
        while _aborted(client) < before + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _aborted(client) == before + 1


# -- errors from real answers ----------------------------------------------------------


def test_errors(server: Any) -> None:
    with Crosstask(server.base_url, api_key="wrong-key", max_retries=0) as wrong:
        with pytest.raises(AuthenticationError) as unauthorized:
            wrong.models()
        assert unauthorized.value.status_code == 401 and unauthorized.value.message
        with pytest.raises(AuthenticationError):
            wrong.chat(QUESTION, server.model, max_tokens=2)
        assert wrong.health()  # /health needs no key
    with Crosstask(server.base_url, max_retries=0) as anonymous, pytest.raises(AuthenticationError):
        anonymous.complete("x", server.model, max_tokens=2)

    with Crosstask(server.base_url, api_key=server.api_key, max_retries=0) as sdk:
        with pytest.raises(NotFoundError) as unknown:
            sdk.chat(QUESTION, "gpt-9", max_tokens=2)
        assert unknown.value.status_code == 404 and unknown.value.code == "model_not_found"
        with pytest.raises(BadRequestError) as bad:
            sdk.chat(QUESTION, server.model, max_tokens=0)
        assert bad.value.status_code == 400 and bad.value.param == "max_tokens"
        assert bad.value.type and bad.value.message
        with pytest.raises(BadRequestError) as bad_stream:
            sdk.complete("x", server.model, stream=True, temperature=-1)
        assert bad_stream.value.param == "temperature"
        with pytest.raises(APITimeoutError):
            sdk_slow = Crosstask(
                server.base_url, api_key=server.api_key, timeout=httpx.Timeout(0.2, connect=5.0)
            )
            try:
                sdk_slow.chat(LONG, server.model, **LONG_SAMPLING)
            finally:
                sdk_slow.close()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with (
        Crosstask(f"http://127.0.0.1:{port}", max_retries=1, backoff_base=0.05) as nowhere,
        pytest.raises(APIConnectionError),
    ):
        nowhere.health()


async def test_errors_async(server: Any) -> None:
    async with _async_client(server, api_key="wrong-key", admin_key=None, max_retries=0) as sdk:
        with pytest.raises(AuthenticationError):
            await sdk.chat(QUESTION, server.model, max_tokens=2, stream=True)
    async with _async_client(server, max_retries=0) as sdk:
        with pytest.raises(NotFoundError):
            await sdk.complete("x", "no-such-model", max_tokens=2)
        with pytest.raises(BadRequestError) as bad:
            await sdk.chat(QUESTION, server.model, max_tokens=0)
        assert bad.value.param == "max_tokens"


# -- batch lines are what the server accepts -------------------------------------------


def test_batch_lines_round_trip(client: Crosstask, server: Any, tmp_path: Path) -> None:
    lines = [
        batch_line(
            "chat",
            QUESTION,
            server.model,
            demonstrations=Demonstrations(k=0),
            max_tokens=8,
            temperature=0,
        ),
        batch_completion_line("cmpl", "1, 2, 3,", server.model, max_tokens=4, temperature=0),
        batch_line("bad", QUESTION, server.model, max_tokens=0),
    ]
    out = tmp_path / "out.jsonl"
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with (
        httpx.Client(base_url=server.base_url, headers=headers, timeout=TIMEOUT) as http,
        out.open("w") as sink,
    ):
        for number, line in enumerate(lines):
            request = json.loads(line)
            answer = http.request(request["method"], request["url"], json=request["body"])
            sink.write(
                json.dumps(
                    {
                        "id": f"batch-req-{number}",
                        "custom_id": request["custom_id"],
                        "response": {"status_code": answer.status_code, "body": answer.json()},
                        "error": None,
                    }
                )
                + "\n"
            )
    results = {r.custom_id: r for r in read_batch_output(out)}
    chat, cmpl, bad = results["chat"], results["cmpl"], results["bad"]
    assert isinstance(chat.result, ChatCompletion) and chat.result.text
    assert chat.result.text == client.chat(QUESTION, server.model, max_tokens=8, temperature=0).text
    assert isinstance(cmpl.result, Completion) and cmpl.result.usage is not None
    assert not bad.ok and bad.response is not None and bad.response.status_code == 400


# -- demonstration store (retrieval issue) ---------------------------------------------


def test_demonstrations_add_search_and_chat(client: Crosstask, server: Any) -> None:
    task = f"sdk_live_{int(time.time())}"
    examples = [
        {"input": "Reverse the word: stone", "output": "enots"},
        {"input": "Reverse the word: river", "output": "revir"},
    ]
    ids = client.demonstrations.add(task, "Reverse the given word letter by letter.", examples)
    assert len(ids) == 2 and all(isinstance(i, str) and i for i in ids)
    hits = client.demonstrations.search("Reverse the word: cloud", k=5)
    assert hits and all(isinstance(h, DemonstrationHit) for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert {h.id for h in hits if h.task == task} & set(ids)
    excluded = client.demonstrations.search("Reverse the word: cloud", k=5, exclude_tasks=[task])
    assert all(h.task != task for h in excluded)

    reply = client.chat(
        [{"role": "user", "content": "Reverse the word: cloud"}],
        server.model,
        task="Reverse the given word letter by letter.",
        demonstrations=Demonstrations(k=2),
        routing=Routing(mode="off"),
        max_tokens=8,
        temperature=0,
    )
    assert reply.crosstask is not None and 0 < len(reply.crosstask.demonstrations) <= 2
    assert all(d.id and d.score is not None for d in reply.crosstask.demonstrations)
    unseen = client.chat(
        [{"role": "user", "content": "Reverse the word: cloud"}],
        server.model,
        demonstrations=Demonstrations(k=2),
        exclude_tasks=[task],
        max_tokens=8,
    )
    assert unseen.crosstask is not None
    assert all(d.task != task for d in unseen.crosstask.demonstrations)


async def test_demonstrations_async(server: Any) -> None:
    async with _async_client(server) as sdk:
        task = f"sdk_live_async_{int(time.time())}"
        ids = await sdk.demonstrations.add(
            task, "Say the color.", [{"input": "Color of the sky?", "output": "blue"}]
        )
        assert len(ids) == 1
        hits = await sdk.demonstrations.search("Color of grass?", k=3)
        assert all(isinstance(h, DemonstrationHit) for h in hits)
    async with (
        _async_client(server, admin_key=None) as user,
        _async_client(server, api_key="wrong-key", admin_key=None) as stranger,
    ):
        # A management write with the plain API key: refused when an admin key is set.
        with pytest.raises(PermissionDeniedError):
            await user.demonstrations.add("t", "d", [{"input": "a", "output": "b"}])
        with pytest.raises(AuthenticationError):
            await stranger.demonstrations.search("anything")


# -- adapters (routing issue) ----------------------------------------------------------


def _an_adapter(client: Crosstask, server: Any) -> tuple[Adapter, str]:
    adapters = client.adapters.list()
    assert adapters, "the server lists no adapter"
    assert all(isinstance(a, Adapter) and a.name for a in adapters)
    roots = {m.id: m.root for m in client.models().data if m.parent == server.model}
    adapter = next(a for a in adapters if a.path or roots.get(a.name))
    return adapter, str(adapter.path or roots[adapter.name])


@pytest.mark.requires_adapters
def test_adapters_list_load_unload_and_routing(client: Crosstask, server: Any) -> None:
    adapter, path = _an_adapter(client, server)
    assert adapter.tasks and adapter.rank
    models = client.models()
    assert next(m for m in models.data if m.id == adapter.name).parent == server.model

    name = f"sdk-copy-{int(time.time())}"
    assert isinstance(client.adapters.load(name, path), str)
    try:
        assert name in client.models().ids
        reply = client.chat(QUESTION, name, max_tokens=4, temperature=0)
        assert reply.crosstask is not None and reply.crosstask.routing is not None
        assert [a.name for a in reply.crosstask.routing.adapters] == [name]
        routed = client.chat(
            QUESTION, "auto", routing=Routing(mode="adapter", adapters=[name]), max_tokens=4
        )
        assert routed.crosstask is not None and routed.crosstask.routing is not None
        assert routed.crosstask.routing.mode == "adapter"
    finally:
        assert isinstance(client.adapters.unload(name), str)
    assert name not in client.models().ids
    with pytest.raises(NotFoundError):
        client.chat(QUESTION, name, max_tokens=2)


@pytest.mark.requires_adapters
def test_adapter_writes_need_admin_key(client: Crosstask, server: Any) -> None:
    _, path = _an_adapter(client, server)
    with Crosstask(server.base_url, api_key=server.api_key, max_retries=0) as user:
        assert user.adapters.list()
        with pytest.raises(PermissionDeniedError) as denied:
            user.adapters.load("sdk-denied", path)
        assert denied.value.status_code == 403
        with pytest.raises(PermissionDeniedError):
            user.adapters.unload("sdk-denied")


@pytest.mark.requires_adapters
async def test_adapters_async(client: Crosstask, server: Any) -> None:
    adapter, path = _an_adapter(client, server)
    async with _async_client(server) as sdk:
        assert adapter.name in [a.name for a in await sdk.adapters.list()]
        name = f"sdk-async-{int(time.time())}"
        await sdk.adapters.load(name, path)
        try:
            merged = await sdk.chat(
                QUESTION,
                "auto",
                max_tokens=4,
                routing=Routing(mode="merge", adapters=[adapter.name, name], weights=[0.5, 0.5]),
            )
            assert merged.crosstask is not None and merged.crosstask.routing is not None
            assert merged.crosstask.routing.mode == "merge"
            assert {a.name for a in merged.crosstask.routing.adapters} == {adapter.name, name}
        finally:
            await sdk.adapters.unload(name)


# -- a fresh install -------------------------------------------------------------------


def test_pip_install_into_fresh_venv(server: Any, tmp_path: Path) -> None:
    """`pip install ./client` (dependencies from the index, no torch) and call the server."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", str(CLIENT_DIR)],
        capture_output=True,
        text=True,
        timeout=600,
        env=environ,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    script = textwrap.dedent(
        """
        import importlib.util, json, sys
        from crosstask_client import Crosstask

        for heavy in ("torch", "vllm", "openai"):
            assert importlib.util.find_spec(heavy) is None, heavy + " got installed"
        base_url, api_key, model = sys.argv[1:4]
        with Crosstask(base_url, api_key=api_key) as client:
            health = client.health()
            reply = client.chat([{"role": "user", "content": "hi"}], model, max_tokens=2)
        import crosstask_client
        print(json.dumps({"ok": health.ok, "status": health.status_code,
                          "object": reply.object, "file": crosstask_client.__file__}))
        """
    )
    run = subprocess.run(
        [str(python), "-c", script, server.base_url, server.api_key, server.model],
        capture_output=True,
        text=True,
        timeout=300,
        env=environ,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(result.pop("file")).resolve().is_relative_to(env_dir.resolve())
    assert result == {"ok": True, "status": 200, "object": "chat.completion"}
    freeze = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        env=environ,
        check=True,
    ).stdout
    names = {line.split("==")[0].lower() for line in freeze.splitlines()}
    assert {"crosstask-client", "httpx", "pydantic"} <= names
    assert not names & {"torch", "vllm", "openai", "crosstask"}
