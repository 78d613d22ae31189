r"""Helpers for batch jobs in the OpenAI batch JSONL format.

The format is the one ``crosstask batch`` and ``vllm run-batch`` read and write.

Input lines are built from the same typed arguments as :meth:`Crosstask.chat` and
:meth:`Crosstask.complete`, by the same code, so a batch line and a live request with the
same arguments send the same body::

    with open("in.jsonl", "w") as f:
        f.write(batch_line("q1", [{"role": "user", "content": "2+2?"}], max_tokens=8) + "\\n")

Output lines are read back typed with :func:`read_batch_output`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, field_validator

from . import _body
from ._body import DemonstrationsArg, MessagesArg, PromptArg, RoutingArg
from .types import ChatCompletion, Completion

__all__ = [
    "BatchOutput",
    "BatchResponse",
    "batch_completion_line",
    "batch_line",
    "read_batch_output",
]

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"


def _line(custom_id: str, url: str, body: dict[str, Any]) -> str:
    if not isinstance(custom_id, str) or not custom_id:
        raise ValueError("custom_id must be a non-empty string")
    record = {"custom_id": custom_id, "method": "POST", "url": url, "body": body}
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def batch_line(
    custom_id: str,
    messages: MessagesArg,
    model: str = "auto",
    *,
    task: Optional[str] = None,
    demonstrations: DemonstrationsArg = None,
    routing: RoutingArg = None,
    exclude_tasks: Optional[Sequence[str]] = None,
    **sampling: Any,
) -> str:
    """One batch input line (JSON, without the newline) for ``POST /v1/chat/completions``.

    The arguments after ``custom_id`` are those of :meth:`Crosstask.chat` (no streaming).
    """
    body = _body.chat_body(
        messages,
        model,
        task=task,
        demonstrations=demonstrations,
        routing=routing,
        exclude_tasks=exclude_tasks,
        sampling=sampling,
    )
    return _line(custom_id, CHAT_URL, body)


def batch_completion_line(
    custom_id: str,
    prompt: PromptArg,
    model: str = "auto",
    *,
    task: Optional[str] = None,
    demonstrations: DemonstrationsArg = None,
    routing: RoutingArg = None,
    exclude_tasks: Optional[Sequence[str]] = None,
    **sampling: Any,
) -> str:
    """One batch input line (JSON, without the newline) for ``POST /v1/completions``.

    The arguments after ``custom_id`` are those of :meth:`Crosstask.complete`.
    """
    body = _body.completion_body(
        prompt,
        model,
        task=task,
        demonstrations=demonstrations,
        routing=routing,
        exclude_tasks=exclude_tasks,
        sampling=sampling,
    )
    return _line(custom_id, COMPLETIONS_URL, body)


class BatchResponse(BaseModel):
    """The ``response`` of an output line: the HTTP status and the body.

    A successful body is parsed into a ``ChatCompletion`` or ``Completion`` (by its
    ``object``); any other body (an error body, say) stays a dict.
    """

    model_config = ConfigDict(extra="allow")

    status_code: int
    request_id: Optional[str] = None
    body: Union[ChatCompletion, Completion, dict[str, Any], None] = None

    @field_validator("body", mode="before")
    @classmethod
    def _typed_body(cls, value: Any) -> Any:
        if isinstance(value, dict):
            kind = value.get("object")
            if kind == "chat.completion":
                return ChatCompletion.model_validate(value)
            if kind == "text_completion":
                return Completion.model_validate(value)
        return value


class BatchOutput(BaseModel):
    """One output line: ``{"id", "custom_id", "response": {"status_code", "body"}, "error"}``."""

    model_config = ConfigDict(extra="allow")

    id: Optional[str] = None
    custom_id: Optional[str] = None
    response: Optional[BatchResponse] = None
    error: Optional[Any] = None

    @property
    def ok(self) -> bool:
        """Whether the line succeeded: no ``error`` and a 2xx response."""
        return (
            self.error is None
            and self.response is not None
            and 200 <= self.response.status_code < 300
        )

    @property
    def result(self) -> Union[ChatCompletion, Completion, None]:
        """The typed response body of a successful line, else ``None``."""
        if not self.ok or self.response is None:
            return None
        body = self.response.body
        return body if isinstance(body, (ChatCompletion, Completion)) else None


def read_batch_output(path: Union[str, os.PathLike[str]]) -> Iterator[BatchOutput]:
    """Read a batch output JSONL file, one typed :class:`BatchOutput` per non-blank line.

    Raises:
        ValueError: a line is not a JSON object of the output shape (with its line number).
    """
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield BatchOutput.model_validate_json(line)
            except ValueError as exc:
                raise ValueError(
                    f"{os.fspath(path)}:{number}: not a batch output line: {exc}"
                ) from exc
