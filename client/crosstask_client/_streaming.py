"""Streams of typed chunks read from a server-sent-event response.

A stream ends at ``data: [DONE]``; a body that ends before it raises
:class:`APIConnectionError` (the answer was cut off). A stream owns its HTTP response. It is
closed (so the server sees the disconnect and aborts
the request) when the events end (``data: [DONE]``), on an error, when the ``with`` /
``async with`` block is left, on :meth:`Stream.close`, or when the caller leaves a ``for``
loop over it early (the iterating generator is finalized at once in CPython; for the async
stream asyncio finalizes it on the next loop turn: prefer ``async with`` there).
"""

from __future__ import annotations

import types
from collections.abc import AsyncIterator, Iterator
from typing import Generic, Optional, TypeVar

import httpx
from pydantic import BaseModel

from ._core import connection_error, validate
from ._sse import SSEDecoder, event_payload
from .errors import APIConnectionError
from .types import CrosstaskInfo, Usage

__all__ = ["AsyncStream", "Stream"]

C = TypeVar("C", bound=BaseModel)


class _StreamState(Generic[C]):
    """What both stream kinds record while reading."""

    def __init__(self, response: httpx.Response, chunk_type: type[C]) -> None:
        self.response = response
        self._chunk_type = chunk_type
        self._decoder = SSEDecoder()
        self._started = False
        self._done = False
        self.crosstask: Optional[CrosstaskInfo] = None
        self.usage: Optional[Usage] = None

    def _claim(self) -> None:
        if self._started:
            raise RuntimeError("a stream can be iterated only once")
        self._started = True

    def _chunk(self, line: str) -> Optional[C]:
        event = self._decoder.feed(line)
        if event is None:
            return None
        payload = event_payload(event)
        if payload is None:
            self._done = True
            return None
        chunk = validate(self._chunk_type, payload)
        info = getattr(chunk, "crosstask", None)
        if info is not None:
            self.crosstask = info
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self.usage = usage
        return chunk

    def _truncated(self) -> APIConnectionError:
        """The error for a body that ended before ``data: [DONE]``."""
        return APIConnectionError("the event stream ended before data: [DONE]")


class Stream(_StreamState[C]):
    """Typed chunks of a streamed chat or completion; iterate it once.

    Attributes:
        response: the underlying ``httpx.Response``.
        crosstask: the ``crosstask`` annotation, once the chunk carrying it was read.
        usage: the usage, once a chunk carrying it was read.

    Use as ``with client.chat(..., stream=True) as stream: for chunk in stream: ...``;
    a plain ``for`` loop also closes the connection when it ends or is broken out of.
    """

    def __iter__(self) -> Iterator[C]:
        self._claim()
        return self._iterate()

    def _iterate(self) -> Iterator[C]:
        try:
            try:
                for line in self.response.iter_lines():
                    chunk = self._chunk(line)
                    if chunk is not None:
                        yield chunk
                    if self._done:
                        return
                raise self._truncated()
            except httpx.TransportError as exc:
                raise connection_error(exc) from exc
        finally:
            self.close()

    def close(self) -> None:
        """Close the HTTP response (and so the connection, if the answer is not complete)."""
        self.response.close()

    def __enter__(self) -> Stream[C]:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[types.TracebackType],
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Stream of {self._chunk_type.__name__}>"


class AsyncStream(_StreamState[C]):
    """Typed chunks of a streamed chat or completion, read asynchronously; iterate it once.

    Attributes are those of :class:`Stream`. Use as
    ``async with await client.chat(..., stream=True) as stream: async for chunk in stream``.
    """

    def __aiter__(self) -> AsyncIterator[C]:
        self._claim()
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[C]:
        try:
            try:
                async for line in self.response.aiter_lines():
                    chunk = self._chunk(line)
                    if chunk is not None:
                        yield chunk
                    if self._done:
                        return
                raise self._truncated()
            except httpx.TransportError as exc:
                raise connection_error(exc) from exc
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP response (and so the connection, if the answer is not complete)."""
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[C]:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[types.TracebackType],
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<AsyncStream of {self._chunk_type.__name__}>"
