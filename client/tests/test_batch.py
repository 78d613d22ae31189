from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from payloads import chat_completion, completion

from crosstask_client import (
    BatchOutput,
    ChatCompletion,
    Completion,
    Demonstrations,
    Routing,
    batch_completion_line,
    batch_line,
    read_batch_output,
)


def _fake_run_batch(lines: list[str]) -> list[dict[str, Any]]:
    """What a batch job writes for these input lines (the body echoed into the answer)."""
    out: list[dict[str, Any]] = []
    for number, line in enumerate(lines):
        request = json.loads(line)
        if request["body"].get("max_tokens") == 0:
            out.append(
                {
                    "id": f"batch-{number}",
                    "custom_id": request["custom_id"],
                    "response": {
                        "status_code": 400,
                        "request_id": f"req-{number}",
                        "body": {
                            "error": {
                                "message": "max_tokens must be at least 1",
                                "type": "BadRequestError",
                                "param": "max_tokens",
                                "code": 400,
                            }
                        },
                    },
                    "error": None,
                }
            )
            continue
        if request["url"] == "/v1/chat/completions":
            body = chat_completion(content=request["body"]["messages"][-1]["content"])
        else:
            body = completion(text=request["body"]["prompt"])
        out.append(
            {
                "id": f"batch-{number}",
                "custom_id": request["custom_id"],
                "response": {"status_code": 200, "request_id": f"req-{number}", "body": body},
                "error": None,
            }
        )
    out.append(
        {
            "id": "batch-x",
            "custom_id": "broken",
            "response": None,
            "error": {"message": "line 4 is not JSON"},
        }
    )
    return out


def test_round_trip(tmp_path: Path) -> None:
    lines = [
        batch_line(
            "chat-1",
            [{"role": "user", "content": "hi"}],
            "auto",
            demonstrations=Demonstrations(k=2),
            routing=Routing(mode="auto"),
            max_tokens=4,
        ),
        batch_completion_line("cmpl-1", "2+2=", "smollm2-135m-instruct", max_tokens=2),
        batch_line("bad-1", [{"role": "user", "content": "x"}], max_tokens=0),
    ]
    infile = tmp_path / "in.jsonl"
    infile.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for line in infile.read_text().splitlines():
        record = json.loads(line)
        assert set(record) == {"custom_id", "method", "url", "body"}
        assert record["method"] == "POST"
    first = json.loads(lines[0])
    assert first["body"]["crosstask"] == {"demonstrations": {"k": 2}, "routing": {"mode": "auto"}}

    outfile = tmp_path / "out.jsonl"
    outfile.write_text(
        "\n".join(json.dumps(o) for o in _fake_run_batch(lines)) + "\n\n", encoding="utf-8"
    )
    results = {r.custom_id: r for r in read_batch_output(outfile)}
    assert list(results) == ["chat-1", "cmpl-1", "bad-1", "broken"]

    chat = results["chat-1"]
    assert isinstance(chat, BatchOutput) and chat.ok
    assert isinstance(chat.result, ChatCompletion)
    assert chat.result.text == "hi"
    assert chat.result.crosstask is not None
    assert chat.result.crosstask.routing is not None
    assert chat.result.crosstask.routing.mode == "merge"

    cmpl = results["cmpl-1"]
    assert isinstance(cmpl.result, Completion) and cmpl.result.text == "2+2="

    bad = results["bad-1"]
    assert not bad.ok and bad.result is None
    assert bad.response is not None and bad.response.status_code == 400
    assert isinstance(bad.response.body, dict)
    assert bad.response.body["error"]["param"] == "max_tokens"

    broken = results["broken"]
    assert not broken.ok and broken.response is None and broken.error is not None


def test_unicode_and_custom_id(tmp_path: Path) -> None:
    line = batch_line("ü-1", [{"role": "user", "content": "naïve ☃"}])
    assert "☃" in line and "\n" not in line
    with pytest.raises(ValueError):
        batch_line("", [{"role": "user", "content": "x"}])


def test_read_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"custom_id": "a", "response": null, "error": null}\nnot json\n')
    reader = read_batch_output(path)
    assert next(reader).custom_id == "a"
    with pytest.raises(ValueError, match=":2:"):
        next(reader)


def test_unknown_body_kept_as_dict(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(
        json.dumps(
            {
                "id": "b",
                "custom_id": "e",
                "error": None,
                "response": {"status_code": 200, "body": {"object": "embedding.list", "data": []}},
            }
        )
    )
    (only,) = list(read_batch_output(str(path)))
    assert only.ok and only.result is None
    assert only.response is not None and only.response.body == {
        "object": "embedding.list",
        "data": [],
    }
