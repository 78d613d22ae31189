"""Server-sent events.

A line decoder (per the WHATWG event-stream rules) and the payload rules of OpenAI streams
(JSON ``data``, a final ``data: [DONE]``, an ``{"error": ...}`` payload mid-stream).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

from .errors import APIResponseValidationError, APIStatusError, status_error

__all__ = ["DONE", "SSEDecoder", "ServerSentEvent", "decode_lines", "event_payload"]

DONE = "[DONE]"


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched event."""

    data: str
    event: Optional[str] = None
    id: Optional[str] = None
    retry: Optional[int] = None


class SSEDecoder:
    """Turns the lines of an event stream (without line terminators) into events."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event: Optional[str] = None
        self._id: Optional[str] = None
        self._retry: Optional[int] = None

    def feed(self, line: str) -> Optional[ServerSentEvent]:
        """Take one line; return the event that a blank line completes, else ``None``."""
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):  # comment / keep-alive
            return None
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id":
            if "\0" not in value:
                self._id = value
        elif field == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def flush(self) -> Optional[ServerSentEvent]:
        """Dispatch the pending event, if it has data (at a blank line or end of stream)."""
        if not self._data:
            self._event = None
            return None
        event = ServerSentEvent(
            data="\n".join(self._data), event=self._event, id=self._id, retry=self._retry
        )
        self._data = []
        self._event = None
        return event


def decode_lines(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """Every event of an iterable of lines, including one left unterminated at the end."""
    decoder = SSEDecoder()
    for line in lines:
        event = decoder.feed(line)
        if event is not None:
            yield event
    last = decoder.flush()
    if last is not None:
        yield last


def event_payload(event: ServerSentEvent) -> Optional[dict[str, Any]]:
    """The JSON object an OpenAI stream event carries; ``None`` for ``[DONE]``.

    Raises:
        APIStatusError: the event carries an ``{"error": ...}`` object.
        APIResponseValidationError: the data is not a JSON object.
    """
    data = event.data.strip()
    if data == DONE:
        return None
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise APIResponseValidationError(
            f"stream event is not JSON: {data[:200]!r}", status_code=200, body=data
        ) from exc
    if not isinstance(payload, dict):
        raise APIResponseValidationError(
            "stream event is not a JSON object", status_code=200, body=payload
        )
    if "error" in payload and payload.get("error") is not None and "choices" not in payload:
        raise _stream_error(payload)
    return payload


def _stream_error(payload: dict[str, Any]) -> APIStatusError:
    error = payload.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return status_error(status, payload)
