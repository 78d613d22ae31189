"""Sample server answers used by the tests."""

from __future__ import annotations

from typing import Any

CROSSTASK = {
    "demonstrations": [{"id": "d1", "task": "object_counting", "score": 0.83}],
    "routing": {"mode": "merge", "adapters": [{"name": "arith", "weight": 0.6}]},
}


def chat_completion(content: str = "4", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "smollm2-135m-instruct",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        "crosstask": CROSSTASK,
    }
    body.update(extra)
    return body


def completion(text: str = " 4", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700000000,
        "model": "smollm2-135m-instruct",
        "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        "crosstask": CROSSTASK,
    }
    body.update(extra)
    return body


def chat_chunks(pieces: list[str]) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = []
    for number, piece in enumerate(pieces):
        delta: dict[str, Any] = {"content": piece}
        if number == 0:
            delta["role"] = "assistant"
        chunks.append(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": "smollm2-135m-instruct",
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            }
        )
    chunks[-1]["choices"][0]["finish_reason"] = "stop"
    chunks[-1]["crosstask"] = CROSSTASK
    return chunks


def completion_chunks(pieces: list[str]) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = [
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1700000000,
            "model": "smollm2-135m-instruct",
            "choices": [{"index": 0, "text": piece, "finish_reason": None}],
        }
        for piece in pieces
    ]
    chunks[-1]["choices"][0]["finish_reason"] = "length"
    chunks[-1]["crosstask"] = CROSSTASK
    return chunks
