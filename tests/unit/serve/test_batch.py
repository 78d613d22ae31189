"""The batch job's own logic with a fake engine behind the real serving objects: parsing,
error lines, resuming, sharding, merging and bounded memory. The real engine runs in
tests/integration/test_batch.py."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from serve.api.chat_completion.serving import ChatServing
from serve.api.completion.serving import CompletionServing
from serve.batch import (
    BatchError,
    BatchLine,
    BatchRunner,
    BatchSummary,
    Shard,
    merge_outputs,
    parse_line,
)
from serve.errors import unavailable
from serve.metrics import Metrics
from serve.pipeline import Pipeline
from serve.settings import Settings
from tests.unit.fake_engine import FakeEngine, fake_config


def runner(max_in_flight: int = 8) -> BatchRunner:
    engine: Any = FakeEngine(fake_config())
    pipeline = Pipeline(Settings(default_k=0), engine, Metrics())
    return BatchRunner(ChatServing(pipeline), CompletionServing(pipeline), max_in_flight)


def chat_line(custom_id: str, words: str = "a bb ccc", **body: Any) -> str:
    payload = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": words}],
        "max_tokens": 3,
        **body,
    }
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": payload}
    )


def completion_line(custom_id: str) -> str:
    body = {"model": "fake-model", "prompt": ["one two", "three"], "max_tokens": 2}
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}
    )


MIXED = [
    chat_line("a"),
    "{not json",
    json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}),
    chat_line("b", "x y"),
    "",
    chat_line("a", "again"),
    json.dumps({"custom_id": "u", "method": "POST", "url": "/v1/embeddings", "body": {}}),
    json.dumps({"custom_id": "g", "method": "GET", "url": "/v1/completions", "body": {}}),
    json.dumps({"custom_id": "nb", "method": "POST", "url": "/v1/completions", "body": [1]}),
    chat_line("zero", max_tokens=0),
    chat_line("s", stream=True),
    chat_line("m", model="no-such-model"),
    completion_line("c"),
    "[1, 2]",
]
EXPECTED_ERRORS = {
    2: "invalid_json",
    3: "missing_custom_id",
    6: "duplicate_custom_id",
    7: "invalid_url",
    8: "invalid_method",
    9: "invalid_body",
    10: "invalid_request",
    11: "unsupported_value",
    12: "model_not_found",
    14: "invalid_json",
}


def write_input(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(
    input_path: Path, output: Path, shard: Shard | None = None, r: BatchRunner | None = None
) -> BatchSummary:
    return asyncio.run((r or runner()).run(input_path, output, shard or Shard(), progress=False))


def test_parse_line_names_each_problem() -> None:
    assert parse_line(1, b"\xff\xfe").error.code == "invalid_json"  # type: ignore[union-attr]
    assert parse_line(1, b'"text"').error.code == "invalid_json"  # type: ignore[union-attr]
    assert parse_line(1, b'{"custom_id": 7}').error.code == "missing_custom_id"  # type: ignore[union-attr]
    ok = parse_line(4, chat_line("x").encode())
    assert ok.error is None and ok.custom_id == "x" and ok.url == "/v1/chat/completions"
    assert BatchLine(9).key == "line:9" and ok.key == "x"


def test_every_line_gets_one_output_line_in_input_order(tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", MIXED)
    out = tmp_path / "out.jsonl"
    summary = run(source, out)

    lines = records(out)
    numbers = [n for n, line in enumerate(MIXED, start=1) if line.strip()]
    assert [r["line"] for r in lines] == numbers
    errors = {r["line"]: r["error"]["code"] for r in lines if r["error"] is not None}
    assert errors == EXPECTED_ERRORS
    for r in lines:
        assert set(r) == {"id", "custom_id", "line", "response", "error"}
        if r["error"] is None:
            assert r["response"]["status_code"] == 200
            assert r["response"]["body"]["choices"]
        else:
            assert r["response"]["status_code"] in (400, 404)
            assert r["response"]["body"]["error"]["code"] == r["error"]["code"]
            assert r["error"]["message"]
    completion = next(r for r in lines if r["custom_id"] == "c")
    assert [c["index"] for c in completion["response"]["body"]["choices"]] == [0, 1]
    assert summary.lines == len(numbers)
    assert summary.succeeded == 3 and summary.failed == len(EXPECTED_ERRORS)
    assert summary.completion_tokens == 3 + 3 + 2 * 2


def test_rerun_resumes_repairs_a_torn_line_and_never_writes_twice(tmp_path: Path) -> None:
    lines = [chat_line(f"id-{i}", f"w{i} x") for i in range(40)] + MIXED
    source = write_input(tmp_path / "in.jsonl", lines)
    reference = tmp_path / "reference.jsonl"
    run(source, reference)

    # What a killed run leaves: some finished lines in completion order, then a torn one.
    out = tmp_path / "out.jsonl"
    done = records(reference)[5:17:2]
    out.write_text(
        "".join(json.dumps(r) + "\n" for r in reversed(done))
        + json.dumps(records(reference)[0])[:37]
    )
    summary = run(source, out)
    assert summary.skipped_done == len(done)

    result = records(out)
    assert [r["line"] for r in result] == [r["line"] for r in records(reference)]
    assert [r["custom_id"] for r in result] == [r["custom_id"] for r in records(reference)]
    kept = {r["line"]: r["id"] for r in done}
    assert all(r["id"] == kept[r["line"]] for r in result if r["line"] in kept)

    again = run(source, out)
    assert again.skipped_done == again.lines and records(out) == result


def test_a_dead_engine_stops_the_job_and_a_rerun_finishes_it(tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", [chat_line(f"id-{i}") for i in range(20)])
    out = tmp_path / "out.jsonl"
    failing = runner(max_in_flight=2)
    serve_line = failing.serve_line

    async def dies_at_seven(line: BatchLine) -> Any:
        if line.custom_id == "id-7":
            raise unavailable("the engine died", code="engine_dead")
        return await serve_line(line)

    failing.serve_line = dies_at_seven  # type: ignore[method-assign]
    with pytest.raises(Exception, match="engine died"):
        run(source, out, r=failing)
    written = {r["custom_id"] for r in records(out)}
    assert "id-7" not in written and all(r["error"] is None for r in records(out))

    run(source, out)
    assert [r["custom_id"] for r in records(out)] == [f"id-{i}" for i in range(20)]


def test_shards_partition_the_lines_and_merge_back(tmp_path: Path) -> None:
    lines = [chat_line(f"id-{i}", f"w{i}") for i in range(30)] + MIXED
    source = write_input(tmp_path / "in.jsonl", lines)
    whole = tmp_path / "whole.jsonl"
    run(source, whole)

    shards = [tmp_path / f"shard-{i}.jsonl" for i in range(3)]
    for i, path in enumerate(shards):
        run(source, path, Shard(i, 3))
    sizes = [len(records(p)) for p in shards]
    assert sum(sizes) == len(records(whole)) and all(sizes)
    seen = [r["line"] for p in shards for r in records(p)]
    assert len(seen) == len(set(seen))

    merged = tmp_path / "merged.jsonl"
    report = merge_outputs(merged, shards, source)
    assert report["lines"] == report["input_lines"] == len(records(whole))

    def comparable(r: dict[str, Any]) -> tuple[Any, ...]:
        body = r["response"]["body"]
        texts = [
            c.get("text") or c.get("message", {}).get("content") for c in body.get("choices", [])
        ]
        return r["line"], r["custom_id"], r["response"]["status_code"], texts

    assert [comparable(r) for r in records(merged)] == [comparable(r) for r in records(whole)]

    with pytest.raises(BatchError, match="no output"):
        merge_outputs(tmp_path / "partial.jsonl", shards[:2], source)
    with pytest.raises(BatchError, match="missing shard"):
        merge_outputs(tmp_path / "m.jsonl", [tmp_path / "nope.jsonl"])


def test_shard_arguments() -> None:
    assert Shard.parse("2/4") == Shard(2, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(BatchError):
            Shard.parse(bad)
    keys = [f"k{i}" for i in range(200)]
    owners = [[s for s in range(4) if Shard(s, 4).owns(k)] for k in keys]
    assert all(len(o) == 1 for o in owners)


def test_input_and_output_must_differ(tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", [chat_line("a")])
    with pytest.raises(BatchError):
        run(source, source)


def test_memory_stays_bounded_on_a_large_input(tmp_path: Path) -> None:
    """A 40 MB input streams through with a few MB of Python allocations at most."""
    padding = "p" * 14000  # an ignored field makes each line ~14 kB
    source = tmp_path / "big.jsonl"
    with source.open("w") as fh:
        for i in range(3000):
            fh.write(chat_line(f"id-{i}", "a b", metadata=padding) + "\n")
    assert source.stat().st_size > 40_000_000
    out = tmp_path / "out.jsonl"

    tracemalloc.start()
    try:
        summary = run(source, out, r=runner(max_in_flight=32))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.succeeded == 3000
    assert peak < 10_000_000, f"peak Python allocations {peak / 1e6:.1f} MB"


def test_count_lines_and_progress_eta(tmp_path: Path) -> None:
    from serve.batch import count_lines
    from serve.progress import ProgressBar

    path = tmp_path / "in.jsonl"
    path.write_bytes(b"a\n" * 2_500_000 + b"last without newline")
    assert count_lines(path, chunk=4096) == 2_500_001
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert count_lines(tmp_path / "empty.jsonl") == 0
    progress = ProgressBar("batch", "lines", enabled=False)
    progress.advance(3)
    assert progress.eta_seconds() is None  # no total yet
    progress.set_total(11)
    eta = progress.eta_seconds()
    assert eta is not None and eta > 0
    progress.done = 11
    assert progress.eta_seconds() == 0
