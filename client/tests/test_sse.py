from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence

import httpx
import pytest
from payloads import chat_chunks, completion_chunks

from crosstask_client import (
    APIConnectionError,
    APIResponseValidationError,
    AsyncCrosstask,
    AsyncStream,
    BadRequestError,
    ChatCompletionChunk,
    CompletionChunk,
    Crosstask,
    ServerError,
    Stream,
)
from crosstask_client._sse import ServerSentEvent, decode_lines, event_payload


def test_decoder_fields_comments_and_multiline() -> None:
    lines = [
        ": keep-alive",
        "event: message",
        "id: 7",
        "retry: 1000",
        "data: line one",
        "data:line two",
        "",
        "",  # a second blank line dispatches nothing
        'data: {"a": 1}\r',
        "",
        "data: tail-without-blank-line",
    ]
    events = list(decode_lines(lines))
    assert events == [
        ServerSentEvent(data="line one\nline two", event="message", id="7", retry=1000),
        ServerSentEvent(data='{"a": 1}', id="7", retry=1000),
        ServerSentEvent(data="tail-without-blank-line", id="7", retry=1000),
    ]


def test_payload_rules() -> None:
    assert event_payload(ServerSentEvent(data="[DONE]")) is None
    assert event_payload(ServerSentEvent(data='{"x": 1}')) == {"x": 1}
    with pytest.raises(APIResponseValidationError):
        event_payload(ServerSentEvent(data="not json"))
    with pytest.raises(APIResponseValidationError):
        event_payload(ServerSentEvent(data="[1, 2]"))
    error = {
        "error": {"message": "bad stop", "type": "BadRequestError", "param": "stop", "code": 400}
    }
    with pytest.raises(BadRequestError) as caught:
        event_payload(ServerSentEvent(data=json.dumps(error)))
    assert caught.value.param == "stop" and caught.value.status_code == 400
    with pytest.raises(ServerError):
        event_payload(ServerSentEvent(data='{"error": {"message": "engine died"}}'))


def _sse_bytes(events: Sequence[object], done: bool = True) -> bytes:
    text = "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)
    if done:
        text += "data: [DONE]\n\n"
    return text.encode()


class _Body(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body delivered in awkward pieces, that records being closed."""

    def __init__(self, data: bytes, piece: int = 7) -> None:
        self.pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


def _transport(body: _Body) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stream"] is True
        assert request.headers["accept"] == "text/event-stream"
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body)

    return httpx.MockTransport(handler)


def test_chat_stream_typed_chunks() -> None:
    # Data after [DONE] is never read as an event.
    body = _Body(_sse_bytes([*chat_chunks(["Fo", "ur", "."])]) + b'data: {"junk": 1}\n\n')
    client = Crosstask("http://test", http_client=httpx.Client(transport=_transport(body)))
    stream = client.chat([{"role": "user", "content": "2+2?"}], stream=True, max_tokens=3)
    assert isinstance(stream, Stream)
    chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Four."
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].crosstask is not None and chunks[0].crosstask is None
    assert stream.crosstask is chunks[-1].crosstask
    assert stream.crosstask.demonstrations[0].id == "d1"
    assert body.closed
    with pytest.raises(RuntimeError):
        list(stream)


def test_completion_stream() -> None:
    body = _Body(_sse_bytes(completion_chunks(["a", "b"])))
    client = Crosstask("http://test", http_client=httpx.Client(transport=_transport(body)))
    with client.complete("x", stream=True) as stream:
        chunks = list(stream)
    assert [c.choices[0].text for c in chunks] == ["a", "b"]
    assert all(isinstance(c, CompletionChunk) for c in chunks)
    assert chunks[-1].crosstask is not None
    assert body.closed


def test_stream_cut_before_done_is_an_error() -> None:
    data = _sse_bytes(completion_chunks(["a", "b"]), done=False)
    for cut in (data, data[:-1], data[: len(data) // 2 + 3]):
        body = _Body(cut)
        client = Crosstask("http://test", http_client=httpx.Client(transport=_transport(body)))
        got = []
        with pytest.raises(APIConnectionError, match="DONE"):
            for chunk in client.complete("x", stream=True):
                got.append(chunk)
        assert len(got) <= 2 and body.closed


def test_break_closes_response() -> None:
    body = _Body(_sse_bytes(chat_chunks(["a", "b", "c", "d"])))
    client = Crosstask("http://test", http_client=httpx.Client(transport=_transport(body)))
    for _chunk in client.chat([{"role": "user", "content": "x"}], stream=True):
        break
    assert body.closed


def test_error_event_mid_stream() -> None:
    error = {
        "error": {"message": "boom", "type": "InternalServerError", "param": None, "code": 500}
    }
    body = _Body(_sse_bytes([chat_chunks(["a"])[0], error]))
    client = Crosstask("http://test", http_client=httpx.Client(transport=_transport(body)))
    stream = client.chat([{"role": "user", "content": "x"}], stream=True)
    got = []
    with pytest.raises(ServerError, match="boom"):
        for chunk in stream:
            got.append(chunk)
    assert len(got) == 1 and body.closed


def test_transport_failure_mid_stream() -> None:
    class Broken(_Body):
        def __iter__(self) -> Iterator[bytes]:
            yield self.pieces[0]
            raise httpx.ReadError("connection reset")

    body = Broken(_sse_bytes(chat_chunks(["a", "b"])), piece=200)
    client = Crosstask("http://test", http_client=httpx.Client(transport=_transport(body)))
    with pytest.raises(APIConnectionError):
        list(client.chat([{"role": "user", "content": "x"}], stream=True))
    assert body.closed


async def test_async_chat_stream() -> None:
    body = _Body(_sse_bytes(chat_chunks(["Fo", "ur"])))
    client = AsyncCrosstask(
        "http://test", http_client=httpx.AsyncClient(transport=_transport(body))
    )
    stream = await client.chat([{"role": "user", "content": "2+2?"}], stream=True)
    assert isinstance(stream, AsyncStream)
    async with stream:
        chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Four"
    assert stream.crosstask is not None
    assert body.closed


async def test_async_completion_stream_break() -> None:
    body = _Body(_sse_bytes(completion_chunks(["a", "b", "c"])))
    client = AsyncCrosstask(
        "http://test", http_client=httpx.AsyncClient(transport=_transport(body))
    )
    async with await client.complete("x", stream=True) as stream:
        async for chunk in stream:
            assert chunk.choices[0].text == "a"
            break
    assert body.closed
