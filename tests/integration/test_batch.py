"""`crosstask batch` with the real engine: the same file through `vllm run-batch` and
through crosstask gives the same lines, ids, schema and greedy texts; a run killed with
SIGKILL and rerun ends with exactly one line per input line.

vLLM 0.32's run-batch serves only /v1/chat/completions and stops at a line it cannot parse,
so the shared file's bad lines are the ones it answers with an error line (unknown url,
unknown model, stream, a prompt over the context); the unparseable kinds are covered in
tests/unit/serve/test_batch.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

MODEL = "smollm2-135m-instruct"
TIMEOUT = 900
ENGINE_FLAGS = ["--enforce-eager", "--max-model-len", "2048", "--kv-cache-gb", "1"]
QUESTIONS = [
    "Name a colour.",
    "What is {a} plus {b}? Answer with a number.",
    "Write one word that rhymes with 'cat'.",
    "Is {a} bigger than {b}? Answer yes or no.",
    "Translate 'good morning' into French.",
    "Give the next number: {a}, {b}, ...",
]
BAD_LINES = {"bad-url", "bad-model", "bad-stream", "bad-long"}


def batch_lines(count: int) -> list[dict[str, Any]]:
    params = {"temperature": 0, "max_tokens": 10}
    lines: list[dict[str, Any]] = []
    for i in range(count):
        question = QUESTIONS[i % len(QUESTIONS)].format(a=i, b=3 * i + 7)
        messages = [{"role": "user", "content": question}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You answer briefly."})
        body = {"model": MODEL, "messages": messages, **params}
        lines.append(
            {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **params}
    bad = [
        {"custom_id": "bad-url", "method": "POST", "url": "/v1/nope", "body": chat},
        {"custom_id": "bad-model", "url": "/v1/chat/completions", "body": {**chat, "model": "x"}},
        {
            "custom_id": "bad-stream",
            "url": "/v1/chat/completions",
            "body": {**chat, "stream": True},
        },
        {
            "custom_id": "bad-long",
            "url": "/v1/chat/completions",
            "body": {**chat, "messages": [{"role": "user", "content": "word " * 3000}]},
        },
    ]
    for n, line in enumerate(bad):
        line.setdefault("method", "POST")
        lines.insert(17 + 41 * n, line)
    return lines


def write_jsonl(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def crosstask_batch(source: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "serve.cli",
        "batch",
        str(source),
        str(out),
        "--default-k",
        "0",
        "--no-adapters",
        "--no-progress",
        *ENGINE_FLAGS,
        *extra,
    ]


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def texts(line: dict[str, Any]) -> list[str]:
    body = (line.get("response") or {}).get("body") or {}
    return [c["message"]["content"] for c in body.get("choices", [])]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("batch") / "input.jsonl", batch_lines(200))


@pytest.fixture(scope="module")
def crosstask_output(source: Path, model_dir: Path) -> tuple[Path, dict[str, Any]]:
    out = source.with_name("crosstask.jsonl")
    proc = run(crosstask_batch(source, out))
    return out, json.loads(proc.stdout)


def test_same_results_as_vllm_run_batch(
    source: Path, model_dir: Path, crosstask_output: tuple[Path, dict[str, Any]]
) -> None:
    vllm_out = source.with_name("vllm.jsonl")
    run(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.run_batch",
            "-i",
            str(source),
            "-o",
            str(vllm_out),
            "--model",
            str(model_dir),
            "--served-model-name",
            MODEL,
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "2048",
            "--kv-cache-memory-bytes",
            str(1 << 30),
        ]
    )
    ours, summary = crosstask_output
    theirs_lines, our_lines = read_jsonl(vllm_out), read_jsonl(ours)
    inputs = read_jsonl(source)

    assert len(our_lines) == len(theirs_lines) == len(inputs)
    assert [x["custom_id"] for x in our_lines] == [x["custom_id"] for x in inputs]
    assert sorted(x["custom_id"] for x in theirs_lines) == sorted(x["custom_id"] for x in inputs)

    theirs = {x["custom_id"]: x for x in theirs_lines}
    for line in our_lines:
        other = theirs[line["custom_id"]]
        # The schema of vLLM's lines, plus our `line`.
        assert set(other) <= set(line) and set(line["response"]) >= {"status_code", "body"}
        failed = line["custom_id"] in BAD_LINES
        assert (line["error"] is not None) == failed == (other["error"] is not None), line
        assert (line["response"]["status_code"] >= 400) == failed
        assert (other["response"]["status_code"] >= 400) == failed
        if not failed:
            assert line["response"]["body"]["object"] == other["response"]["body"]["object"]
            assert texts(line) == texts(other), line["custom_id"]
            counts = ("prompt_tokens", "completion_tokens", "total_tokens")
            ours_usage, their_usage = (
                line["response"]["body"]["usage"],
                other["response"]["body"]["usage"],
            )
            assert {k: ours_usage[k] for k in counts} == {k: their_usage[k] for k in counts}
    assert summary["lines"] == len(inputs) and summary["failed"] == len(BAD_LINES)
    assert summary["completion_tokens"] > 0


def test_sigkill_then_rerun_leaves_one_line_per_input(
    source: Path, crosstask_output: tuple[Path, dict[str, Any]]
) -> None:
    out = source.with_name("killed.jsonl")
    # A narrow in-flight window makes the run long enough to be killed in the middle.
    proc = subprocess.Popen(
        crosstask_batch(source, out, "--max-in-flight", "2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not out.exists() or len(out.read_bytes().splitlines()) < 20:
            assert proc.poll() is None, "the batch finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        # The whole process group: the engine's worker processes die with it.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = read_jsonl(out)
    assert 20 <= len(partial) < len(read_jsonl(source))
    # The worst a kill can leave: half a line at the end.
    with out.open("ab") as fh:
        fh.write(b'{"id": "batch_req_torn", "custom_id": "req-1')

    proc2 = run(crosstask_batch(source, out))
    summary = json.loads(proc2.stdout)
    assert summary["skipped_already_done"] == len(partial)

    final = read_jsonl(out)
    inputs = read_jsonl(source)
    assert [x["custom_id"] for x in final] == [x["custom_id"] for x in inputs]
    reference = {x["custom_id"]: texts(x) for x in read_jsonl(crosstask_output[0])}
    assert {x["custom_id"]: texts(x) for x in final} == reference
    before = {x["custom_id"]: x["id"] for x in partial}
    assert all(x["id"] == before[x["custom_id"]] for x in final if x["custom_id"] in before)
