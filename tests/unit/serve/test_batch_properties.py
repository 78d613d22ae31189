"""Property tests of the batch job's input reader, on the real serving objects with the fake
engine behind them: whatever bytes an input file holds (random bytes, invalid UTF-8, any
JSON value, objects with or without a custom_id, duplicates, nested junk, numbers beyond
int64 and float, NaN, lone surrogates, long lines), the job

- never raises;
- writes exactly one output line per non-blank input line, in input order, carrying the
  line's number and its custom_id (null when the line has no usable one);
- gives every failed line `error: {code, message}` and the same error as its response body;
- flags the second and later uses of a custom_id, and only those, as duplicates;
- adds nothing when rerun over its own output, and, killed at any byte of its output,
  finishes to the same result on a rerun;
- splits into shards that cover every line exactly once.

tests/unit/serve/test_batch.py has the worked examples; this file searches for counterexamples."""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve.batch import CHAT_URL, COMPLETIONS_URL, BatchSummary, Shard, merge_outputs, parse_line
from tests.unit.serve.test_batch import runner

PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies ----------------------------------------------------------------------------

# All of Unicode, lone surrogates included (JSON carries them as \udXXX escapes).
any_text = st.text(st.characters(exclude_categories=()), max_size=12)
numbers = (
    st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30])
)
scalars = st.none() | st.booleans() | numbers | any_text
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(any_text, children, max_size=3)
    ),
    max_leaves=10,
)

# A few ids shared across lines, so that duplicates are common; plus hostile ones.
custom_ids = st.sampled_from(["a", "b", "c", "é", "\ud800", " ", "line:1"]) | any_text
small_text = st.text(st.characters(codec="utf-8"), max_size=16)
valid_chat = st.fixed_dictionaries(
    {
        "model": st.just("fake-model"),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user", "assistant"]), "content": small_text}
            ),
            min_size=1,
            max_size=2,
        ),
    },
    optional={
        "max_tokens": st.integers(1, 4),
        "temperature": st.floats(0, 2),
        "seed": st.integers(0, 2**63 - 1),
        "stop": small_text,
        "user": small_text,
        "stream": st.booleans(),
        "unknown_field": json_values,
    },
)
valid_completion = st.fixed_dictionaries(
    {
        "model": st.just("fake-model"),
        "prompt": small_text.filter(str.strip)
        | st.lists(st.integers(0, 999), min_size=1, max_size=6),
    },
    optional={"max_tokens": st.integers(1, 4), "echo": st.booleans(), "stream": st.booleans()},
)


@st.composite
def spoiled(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A valid body with one field replaced by hostile JSON, or dropped."""
    body = dict(draw(valid))
    key = draw(st.sampled_from(sorted({*body, "max_tokens", "n", "crosstask", "logprobs"})))
    if draw(st.booleans()):
        body[key] = draw(json_values)
    else:
        body.pop(key, None)
    return body


bodies = valid_chat | valid_completion | spoiled(valid_chat) | spoiled(valid_completion)
request_objects = st.fixed_dictionaries(
    {},
    optional={
        "custom_id": custom_ids | json_values,
        "method": st.just("POST") | st.sampled_from(["GET", "post", ""]) | json_values,
        "url": st.sampled_from([CHAT_URL, COMPLETIONS_URL, "/v1/embeddings", ""]) | json_values,
        "body": bodies | json_values,
        "junk": json_values,
    },
)

# Lines that get past the envelope checks, so that the bodies reach the serving objects.
well_formed_objects = st.fixed_dictionaries(
    {
        "custom_id": custom_ids,
        "url": st.sampled_from([CHAT_URL, COMPLETIONS_URL]),
        "body": bodies,
    },
    optional={"method": st.just("POST"), "junk": json_values},
)


def encode(value: Any, ascii_only: bool) -> bytes:
    """JSON with NaN/Infinity literals; lone surrogates become \\udXXX escapes, or (when
    not ascii_only) raw surrogate bytes, which are not valid UTF-8."""
    return json.dumps(value, allow_nan=True, ensure_ascii=ascii_only).encode(
        "utf-8", "surrogatepass"
    )


@st.composite
def object_lines(draw: st.DrawFn) -> bytes:
    return encode(draw(well_formed_objects | request_objects), draw(st.booleans()))


@st.composite
def json_lines(draw: st.DrawFn) -> bytes:
    return encode(draw(json_values), draw(st.booleans()))


@st.composite
def deep_lines(draw: st.DrawFn) -> bytes:
    """Nesting past what Python's JSON parser (or anything after it) recurses through, at
    the top or inside an otherwise valid request."""
    depth = draw(st.integers(1, 3000))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    junk = opener * depth + b"0" + closer * depth
    if draw(st.booleans()):
        return junk
    field = draw(st.sampled_from([b"messages", b"prompt", b"crosstask", b"unknown", b"stop"]))
    return (
        b'{"custom_id":"deep","url":"/v1/chat/completions","body":{"model":"fake-model",'
        b'"messages":[{"role":"user","content":"hi"}],"max_tokens":2,"'
        + field
        + b'":'
        + junk
        + b"}}"
    )


@st.composite
def huge_number_lines(draw: st.DrawFn) -> bytes:
    """Number literals beyond int64, float and Python's int-from-text digit limit."""
    digits = draw(st.integers(1, 6000))
    literal = draw(
        st.sampled_from([b"9" * digits, b"-" + b"9" * digits, b"1e" + b"9" * min(digits, 20)])
        | st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e-400", b"-0"])
    )
    field = draw(st.sampled_from([b"max_tokens", b"temperature", b"seed", b"n", b"top_p"]))
    return (
        b'{"custom_id":"num","url":"/v1/completions","body":{"model":"fake-model",'
        b'"prompt":"a b","' + field + b'":' + literal + b"}}"
    )


@st.composite
def long_lines(draw: st.DrawFn) -> bytes:
    """Lines up to ~100 kB: a long ignored field, a long prompt, or long junk."""
    size = draw(st.integers(1000, 100_000))
    kind = draw(st.sampled_from(["ignored", "prompt", "junk"]))
    if kind == "junk":
        return b"x" * size
    body: dict[str, Any] = {"model": "fake-model", "max_tokens": 2, "prompt": "a b"}
    if kind == "prompt":
        body["prompt"] = "w " * (size // 2)
    else:
        body["padding"] = "p" * size
    return encode({"custom_id": draw(custom_ids), "url": COMPLETIONS_URL, "body": body}, True)


random_bytes = st.binary(max_size=120)
raw_lines = (
    object_lines()
    | object_lines()
    | json_lines()
    | random_bytes
    | deep_lines()
    | huge_number_lines()
    | long_lines()
    | st.sampled_from([b"", b"   ", b"\t\r", b"\xff\xfe", b"{", b"[]", b"null", b"{}"])
).map(lambda line: line.replace(b"\n", b" "))
# Lines and their endings (CRLF too); a last line without its newline as well.
inputs = st.lists(st.tuples(raw_lines, st.sampled_from([b"\n", b"\r\n"])), max_size=12)


# -- the oracle and helpers -----------------------------------------------------------------


def content(parts: list[tuple[bytes, bytes]], last_newline: bool) -> bytes:
    data = b"".join(line + end for line, end in parts)
    return data if last_newline or not parts else data[: -len(parts[-1][1])]


def expected_lines(parts: list[tuple[bytes, bytes]]) -> list[tuple[int, bytes]]:
    """What the job must answer: every line that is not blank, by 1-based number."""
    return [(n, line.strip()) for n, (line, _) in enumerate(parts, start=1) if line.strip()]


def custom_id_of(raw: bytes) -> str | None:
    """The spec: a line's custom_id is a non-empty string `custom_id` of a JSON object."""
    try:
        data = json.loads(raw)
    except Exception:
        return None
    if isinstance(data, dict) and isinstance(data.get("custom_id"), str) and data["custom_id"]:
        return str(data["custom_id"])
    return None


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def outcome(record: dict[str, Any]) -> tuple[Any, ...]:
    """What a rerun must reproduce (ids and generated text aside)."""
    error = record["error"]
    return (
        record["line"],
        record["custom_id"],
        record["response"]["status_code"],
        None if error is None else error["code"],
    )


def run(input_path: Path, output: Path, shard: Shard | None = None) -> BatchSummary:
    return asyncio.run(runner().run(input_path, output, shard or Shard(), progress=False))


@contextmanager
def job(data: bytes) -> Iterator[tuple[Path, Path]]:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.jsonl"
        source.write_bytes(data)
        yield source, Path(tmp) / "out.jsonl"


def check_output(parts: list[tuple[bytes, bytes]], out: Path, summary: BatchSummary) -> None:
    expected = expected_lines(parts)
    got = records(out)
    assert [r["line"] for r in got] == [n for n, _ in expected]
    seen: set[str] = set()
    for record, (number, raw) in zip(got, expected, strict=True):
        assert set(record) == {"id", "custom_id", "line", "response", "error"}
        custom_id = custom_id_of(raw)
        assert record["custom_id"] == custom_id, (number, raw[:200])
        response, error = record["response"], record["error"]
        if error is None:
            assert response["status_code"] == 200
            assert response["body"]["choices"] and response["body"]["usage"]
        else:
            assert set(error) == {"code", "message"}, error
            assert isinstance(error["code"], str) and error["code"]
            assert isinstance(error["message"], str) and error["message"]
            assert 400 <= response["status_code"] < 500
            assert response["body"]["error"]["code"] == error["code"]
            assert response["body"]["error"]["message"] == error["message"]
        if custom_id is None:
            assert error is not None, (number, raw[:200])
        else:
            duplicate = error is not None and error["code"] == "duplicate_custom_id"
            assert duplicate == (custom_id in seen), (number, custom_id, error)
            seen.add(custom_id)
    assert summary.lines == len(expected) == summary.succeeded + summary.failed
    assert sum(summary.errors_by_code.values()) == summary.failed
    assert summary.failed == sum(r["error"] is not None for r in got)


# -- properties ----------------------------------------------------------------------------


@settings(PROPERTY_SETTINGS, max_examples=500)
@given(raw=raw_lines | st.binary(max_size=400))
def test_parse_line_never_raises_and_names_a_problem_or_a_request(raw: bytes) -> None:
    line = parse_line(7, raw)
    assert line.number == 7
    if line.error is None:
        assert line.custom_id and line.url in (CHAT_URL, COMPLETIONS_URL)
        assert isinstance(line.body, dict)
    else:
        assert line.error.code and line.error.message and line.body is None
    assert line.custom_id == custom_id_of(raw)


@PROPERTY_SETTINGS
@given(parts=inputs, last_newline=st.booleans())
def test_any_input_gets_one_output_line_per_line_and_a_rerun_adds_nothing(
    parts: list[tuple[bytes, bytes]], last_newline: bool
) -> None:
    with job(content(parts, last_newline)) as (source, out):
        summary = run(source, out)
        check_output(parts, out, summary)

        first = out.read_bytes()
        again = run(source, out)
        assert out.read_bytes() == first
        assert again.skipped_done == again.lines == summary.lines
        assert again.succeeded == again.failed == 0


@settings(PROPERTY_SETTINGS, max_examples=60)
@given(parts=inputs, cut=st.floats(0, 1), seed=st.integers(0, 2**32 - 1))
def test_a_run_killed_anywhere_finishes_to_the_same_result(
    parts: list[tuple[bytes, bytes]], cut: float, seed: int
) -> None:
    with job(content(parts, True)) as (source, out):
        run(source, out)
        reference = records(out)
        # What a killed run leaves: finished lines in completion order, the last one torn.
        finished = [json.dumps(r) + "\n" for r in reference]
        random.Random(seed).shuffle(finished)
        log = "".join(finished).encode()
        left = log[: int(len(log) * cut)]
        out.write_bytes(left)
        whole_lines = left[: left.rfind(b"\n") + 1].splitlines()
        kept = {r["line"]: r["id"] for r in map(json.loads, whole_lines)}

        resumed = run(source, out)
        result = records(out)
        assert [outcome(r) for r in result] == [outcome(r) for r in reference]
        assert resumed.skipped_done >= len(kept)
        assert all(r["id"] == kept[r["line"]] for r in result if r["line"] in kept)


@settings(PROPERTY_SETTINGS, max_examples=40)
@given(parts=inputs, count=st.integers(2, 4))
def test_shards_cover_every_line_once_and_merge_back(
    parts: list[tuple[bytes, bytes]], count: int
) -> None:
    with job(content(parts, True)) as (source, whole):
        run(source, whole)
        shards = [whole.with_name(f"shard-{i}.jsonl") for i in range(count)]
        for i, path in enumerate(shards):
            run(source, path, Shard(i, count))
        numbers = [r["line"] for path in shards for r in records(path)]
        assert sorted(numbers) == [r["line"] for r in records(whole)]

        merged = whole.with_name("merged.jsonl")
        report = merge_outputs(merged, shards, source)
        assert report["lines"] == report["input_lines"] == len(expected_lines(parts))
        # Duplicates of a custom_id land in one shard, so the merge flags the same lines.
        assert [outcome(r) for r in records(merged)] == [outcome(r) for r in records(whole)]
