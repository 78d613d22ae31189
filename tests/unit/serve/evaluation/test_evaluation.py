"""`crosstask eval`: scoring, sampling, report shape, and a whole run against a stub server.

The stub is a tiny FastAPI app served by uvicorn on 127.0.0.1 in a thread, so requests
really go through the openai client and HTTP; tasks come from an in-memory fake source, so
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from retrieval.sources import Example, Task, UnknownTaskError
from serve.cli.eval import add_eval_parser, cmd_eval
from serve.evaluation.client import Outcome, VariantRun, api_base
from serve.evaluation.items import Item, sample_items
from serve.evaluation.modes import Variant, parse_modes, variants_for
from serve.evaluation.report import pick_zero, summarize
from serve.evaluation.scoring import exact_match, first_line, normalize_answer, rouge_l

BASE_MODEL = "base-model"

# --------------------------------------------------------------------------- fakes


def _alpha() -> Task:
    # Ten examples; the target carries an article and punctuation to exercise normalisation.
    examples = [Example(f"alpha {i}", f"The Answer {i}.", [f"The Answer {i}."]) for i in range(10)]
    return Task("alpha", "Answer alpha questions.", examples)


def _beta() -> Task:
    # Only the second accepted target matches what the stub answers: max over targets.
    examples = [Example(f"beta {i}", "yes", ["yes", "yes indeed"]) for i in range(4)]
    return Task("natural_instructions/beta", "Answer beta questions.", examples)


class FakeSource:
    """Stands in for BigBenchSource; yields in reverse order, as an archive order might."""

    def __init__(self, tasks: Iterable[Task]) -> None:
        self._tasks = {t.name: t for t in tasks}
        self.asked: list[list[str]] = []

    def check_names(self, names: Iterable[str]) -> None:
        unknown = [n for n in names if n not in self._tasks]
        if unknown:
            raise UnknownTaskError(f"unknown task(s): {', '.join(unknown)}")

    def tasks(self, names: Sequence[str]) -> Iterator[Task]:
        self.asked.append(list(names))
        return (self._tasks[n] for n in reversed(names))


def _stub_answer(text: str, endpoint: str, ext: dict[str, Any]) -> str:
    """Right for some inputs only, wrapped in noise that post-processing must remove."""
    kind, number = text.split("Input: ")[-1].split()
    i = int(number)
    if kind == "beta":
        return "yes indeed"
    # Without a `k` the server's default applies: the stub's is 2.
    helped = ext.get("demonstrations", {}).get("k", 2) > 0
    # Chat beats plain: plain is right for i % 4 == 0, chat for even i, k > 0 for all.
    right = helped or (i % 2 == 0 if endpoint == "chat" else i % 4 == 0)
    answer = f"the answer {i}" if right else "no idea"
    return f"\n  {answer}\nNot part of the answer.\n\nInput: invented"


@dataclass
class StubState:
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def _error(message: str) -> JSONResponse:
    body = {"message": message, "type": "BadRequestError", "param": "crosstask.routing.mode"}
    return JSONResponse({"error": {**body, "code": "unsupported_value"}}, status_code=400)


def _stub_app(state: StubState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        # `auto` and an adapter come first: the client must still pick the base model.
        cards = [("auto", BASE_MODEL), ("some-lora", BASE_MODEL), (BASE_MODEL, None)]
        data = [
            {"id": i, "object": "model", "created": 0, "owned_by": "x", "parent": p}
            for i, p in cards
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> dict[str, Any] | JSONResponse:
        body = await request.json()
        state.requests.append(("completions", body))
        ext = body.get("crosstask", {})
        if ext.get("routing", {}).get("mode") == "fuse":
            return _error("fuse is not supported here")
        match = re.search(r"Input: (.*)\nOutput:$", body["prompt"], re.DOTALL)
        assert match is not None
        text = _stub_answer(match.group(1), "completions", ext)
        for stop in body.get("stop") or []:
            text = text.split(stop, 1)[0]
        choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
        return {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [choice]}  # fmt: skip

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> dict[str, Any] | JSONResponse:
        body = await request.json()
        state.requests.append(("chat", body))
        ext = body.get("crosstask", {})
        if ext.get("routing", {}).get("mode") == "fuse":
            return _error("fuse is not supported here")
        text = _stub_answer(body["messages"][-1]["content"], "chat", ext)
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [choice]}  # fmt: skip

    return app


@dataclass
class Stub:
    url: str
    state: StubState


@pytest.fixture
def stub() -> Iterator[Stub]:
    state = StubState()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(_stub_app(state), log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "stub server did not start"
        time.sleep(0.01)
    try:
        yield Stub(f"http://127.0.0.1:{port}", state)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="crosstask")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def _task_file(tmp_path: Path) -> Path:
    path = tmp_path / "tasks.txt"
    path.write_text("# unseen tasks\nalpha\n\nnatural_instructions/beta  # a subtask\n")
    return path


# --------------------------------------------------------------------------- scoring


def test_first_line_keeps_the_first_non_empty_line() -> None:
    assert first_line("\n\n  Paris  \nFrance\n") == "Paris"
    assert first_line("one line") == "one line"
    assert first_line("   \n \n") == ""
    assert first_line("") == ""


def test_normalize_answer_is_squad_style() -> None:
    assert normalize_answer("  The  Cat, sat!  ") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # Articles only as whole words.


def test_exact_match_is_the_best_over_targets() -> None:
    assert exact_match("the answer.", ["Answer"]) == 100.0
    assert exact_match("yes indeed", ["yes", "Yes, indeed!"]) == 100.0
    assert exact_match("no", ["yes", "yes indeed"]) == 0.0


def test_rouge_l_is_f1_with_stemming_best_over_targets() -> None:
    assert rouge_l("the cat is running", ["The cat is running."]) == pytest.approx(100.0)
    assert rouge_l("cats run", ["cat running"]) == pytest.approx(100.0)  # Porter stemmer.
    assert rouge_l("dog", ["cat"]) == 0.0
    # "cat sat" vs "the cat sat": P = 1, R = 2/3, F1 = 0.8; the exact target wins.
    assert rouge_l("cat sat", ["the cat sat"]) == pytest.approx(80.0)
    assert rouge_l("cat sat", ["the cat sat", "cat sat"]) == pytest.approx(100.0)
    assert rouge_l("", ["x"]) == 0.0


# --------------------------------------------------------------------------- sampling


def test_sample_is_seeded_sorted_and_per_task() -> None:
    alpha = _alpha()
    first = sample_items(alpha, 4, seed=0)
    assert [i.index for i in first] == sorted(i.index for i in first)
    assert len(first) == 4
    assert sample_items(alpha, 4, seed=0) == first
    others = {tuple(i.index for i in sample_items(alpha, 4, seed=s)) for s in range(1, 6)}
    assert len(others | {tuple(i.index for i in first)}) > 1  # The seed matters.
    item = first[0]
    assert item.task == "alpha" and item.definition == alpha.definition
    assert item.targets == (f"The Answer {item.index}.",)


def test_sample_takes_everything_when_the_limit_allows() -> None:
    alpha = _alpha()
    assert [i.index for i in sample_items(alpha, 0, seed=3)] == list(range(10))
    assert [i.index for i in sample_items(alpha, 50, seed=3)] == list(range(10))


def test_sample_does_not_depend_on_the_hash_seed() -> None:
    code = (
        "from tests.unit.serve.evaluation.test_evaluation import _alpha;"
        "from serve.evaluation.items import sample_items;"
        "print([i.index for i in sample_items(_alpha(), 3, 7)])"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    expected = str([i.index for i in sample_items(_alpha(), 3, 7)]) + "\n"
    assert outputs == {expected}


# --------------------------------------------------------------------------- modes


def test_modes_parse_and_expand() -> None:
    assert parse_modes("zero, retrieval,zero") == ["zero", "retrieval"]
    with pytest.raises(ValueError, match="unknown mode"):
        parse_modes("zero,magic")
    with pytest.raises(ValueError):
        parse_modes(" , ")
    variants = {v.name: v for v in variants_for(["zero", "auto", "fusion", "defaults"], k=3)}
    assert list(variants) == [
        "zero_plain",
        "zero_chat",
        "zero_shaped",
        "auto",
        "fusion",
        "defaults",
    ]
    assert variants["zero_plain"].endpoint == "completions"
    assert variants["zero_shaped"].endpoint == "shaped"
    # auto: the server decides the demonstrations too; defaults: nothing but the exclusion.
    assert variants["auto"].extension("t") == {"routing": {"mode": "auto"}, "exclude_tasks": ["t"]}
    assert variants["defaults"].extension("t") == {"exclude_tasks": ["t"]}
    retrieval = variants_for(parse_modes("retrieval,retrieval_task"), k=3)
    assert [v.extension("t")["demonstrations"] for v in retrieval] == [
        {"k": 3, "scope": "input"},
        {"k": 3, "scope": "task"},
    ]
    assert variants["fusion"].extension("t")["routing"] == {"mode": "fuse"}
    generalist = variants_for(parse_modes("generalist"), k=3)[0]
    assert generalist.extension("t") == {
        "demonstrations": {"k": 0},
        "routing": {"mode": "adapter", "adapters": ["generalist"]},
        "exclude_tasks": ["t"],
    }
    assert api_base("http://h:1/") == "http://h:1/v1"
    assert api_base("http://h:1/v1") == "http://h:1/v1"


# --------------------------------------------------------------------------- report


def _outcome(task: str, index: int, rouge: float, em: float, ok: bool = True) -> Outcome:
    item = Item(task, "d", index, "x", ("y",))
    if not ok:
        return Outcome(item=item, error="boom", status=500)
    return Outcome(item=item, raw="y", prediction="y", rouge_l=rouge, exact_match=em)


def test_summarize_macro_averages_over_tasks() -> None:
    run = VariantRun(Variant("retrieval", "chat", 4, "off"))
    # Task a: 3 examples, means 50 / 0 (one failed request scores 0); task b: 1 example, 100.
    run.outcomes = [
        _outcome("a", 0, 100.0, 0.0),
        _outcome("a", 1, 50.0, 0.0),
        _outcome("a", 2, 0.0, 0.0, ok=False),
        _outcome("b", 0, 100.0, 100.0),
    ]
    entry = summarize(run, ["b", "a"])
    assert entry["tasks"] == {
        "b": {"rougeL": 100.0, "exact_match": 100.0, "n": 1},
        "a": {"rougeL": 50.0, "exact_match": 0.0, "n": 3},
    }
    assert entry["rougeL"] == 75.0  # Macro: (100 + 50) / 2, not 250 / 4.
    assert entry["exact_match"] == 50.0
    assert entry["errors"] == 1
    run.error = "400: nope"
    assert summarize(run, ["a"]) == {"error": "400: nope"}


def test_pick_zero_prefers_the_better_format_and_plain_on_a_tie() -> None:
    plain = {"rougeL": 40.0, "exact_match": 1.0, "tasks": {}}
    chat = {"rougeL": 41.0, "exact_match": 0.0, "tasks": {}}
    assert pick_zero({"zero_plain": plain, "zero_chat": chat}) == {"format": "chat", **chat}
    assert pick_zero({"zero_plain": chat, "zero_chat": chat}) == {"format": "plain", **chat}
    assert pick_zero({"zero_plain": {"error": "x"}, "zero_chat": plain}) == {
        "format": "chat",
        **plain,
    }
    assert pick_zero({"zero_plain": {"error": "x"}, "zero_chat": {"error": "y"}}) == {
        "error": "x; y"
    }
    assert pick_zero({}) is None


# --------------------------------------------------------------------------- end to end


def test_eval_against_a_stub_server(
    stub: Stub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, plot, preds = tmp_path / "r" / "REPORT.json", tmp_path / "R.png", tmp_path / "p.jsonl"
    args = _parse(
        ["--base-url", stub.url, "--tasks", str(_task_file(tmp_path)), "--out", str(out),
         "--plot", str(plot), "--predictions", str(preds), "--limit", "6", "--k", "2",
         "--modes", "zero,retrieval,adapter,auto,fusion", "--max-tokens", "16"]
    )  # fmt: skip
    assert args.func is cmd_eval
    source = FakeSource([_alpha(), _beta()])
    assert cmd_eval(args, source=source) == 0
    assert source.asked == [["alpha", "natural_instructions/beta"]]

    report = json.loads(out.read_text())
    results, meta = report["results"], report["meta"]
    zeros = ["zero_plain", "zero_chat", "zero_shaped"]
    modes = ["zero", "retrieval", "adapter", "auto", "fusion", *zeros]
    assert list(results) == modes
    assert results["fusion"] == {"error": "400: fuse is not supported here"}
    assert "fusion" in capsys.readouterr().err  # The warning names the failed mode.

    alpha_indices = [i.index for i in sample_items(_alpha(), 6, 0)]
    even = 100.0 * sum(i % 2 == 0 for i in alpha_indices) / 6
    by_four = 100.0 * sum(i % 4 == 0 for i in alpha_indices) / 6
    chat = results["zero_chat"]
    assert chat["tasks"] == {
        "alpha": {"rougeL": round(even, 4), "exact_match": round(even, 4), "n": 6},
        "natural_instructions/beta": {"rougeL": 100.0, "exact_match": 100.0, "n": 4},
    }
    assert chat["rougeL"] == pytest.approx((even + 100.0) / 2, abs=1e-3)
    assert chat["errors"] == 0
    assert results["zero_plain"]["tasks"]["alpha"]["rougeL"] == pytest.approx(by_four, abs=1e-3)
    assert even > by_four  # The seeded sample holds more even indices than multiples of 4,
    assert results["zero_shaped"] == chat  # The stub answers the shaped turn as the chat one,
    assert results["zero"] == {"format": "chat", **chat}  # so chat is the best (first) format.
    assert results["retrieval"]["rougeL"] == 100.0
    assert results["auto"]["exact_match"] == 100.0
    assert results["adapter"] == chat  # The stub ignores routing: k = 0 answers as zero_chat.

    assert meta["model"] == BASE_MODEL
    assert (meta["limit"], meta["seed"], meta["k"], meta["base_url"]) == (6, 0, 2, stub.url)
    assert meta["tasks"] == ["alpha", "natural_instructions/beta"]
    assert set(meta["timings"]) == set(modes[1:])
    assert set(meta["requests_per_second"]) == set(meta["timings"]) - {"fusion"}
    assert meta["requests"]["fusion"] == 1  # Refused on the probe: nothing more was sent.
    assert meta["date"]

    # What went over the wire: greedy, the base model, the task always excluded, and the
    # same sampled inputs for every mode.
    inputs_by_mode: dict[str, set[str]] = {}
    for endpoint, body in stub.state.requests:
        assert body["temperature"] == 0 and body["max_tokens"] == 16
        assert body["model"] == BASE_MODEL
        ext = body["crosstask"]
        text = body["prompt"] if endpoint == "completions" else body["messages"][-1]["content"]
        task = "alpha" if "alpha" in text else "natural_instructions/beta"
        assert ext["exclude_tasks"] == [task]
        shaped = endpoint == "chat" and text.startswith("Definition: ")
        k = ext.get("demonstrations", {}).get("k")
        mode = (endpoint, shaped, k, ext["routing"]["mode"])
        inputs_by_mode.setdefault(str(mode), set()).add(text.split("Input: ")[-1].split("\n")[0])
        definition = _alpha().definition if task == "alpha" else _beta().definition
        if endpoint == "chat":
            assert body["messages"][0] == {"role": "system", "content": definition}
        else:
            assert "stop" not in body and body["prompt"].startswith("Definition: ")
    full = [v for k, v in inputs_by_mode.items() if "fuse" not in k]
    assert len(full) == 6 and all(v == full[0] for v in full) and len(full[0]) == 10

    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(lines) == 6 * 10 + 1
    first = next(x for x in lines if x["mode"] == "retrieval")
    assert first["prediction"] == first["raw"].strip().splitlines()[0]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("**/.*.tmp"))  # Atomic writes leave no temporaries.


def test_exit_code_is_1_when_every_mode_fails(stub: Stub, tmp_path: Path) -> None:
    out = tmp_path / "REPORT.json"
    args = _parse(
        ["--base-url", f"{stub.url}/v1", "--tasks", str(_task_file(tmp_path)),
         "--out", str(out), "--modes", "fusion", "--limit", "2"]
    )  # fmt: skip
    assert cmd_eval(args, source=FakeSource([_alpha(), _beta()])) == 1
    assert "error" in json.loads(out.read_text())["results"]["fusion"]


def test_unknown_mode_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _parse(["--base-url", "x", "--tasks", "t", "--out", "o", "--modes", "zero,nope"])
