"""What both generation resources need around the pipeline: request limits, server-sent
events, and aborting the engine request when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from serve.api.protocol import CrosstaskAnnotation, SamplingRequest, UsageInfo
from serve.engine.types import OutputDelta
from serve.errors import APIError, bad_request
from serve.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R", contravariant=True)
P = TypeVar("P")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_limits(request: SamplingRequest, settings: Settings, logprobs: int | None) -> None:
    if request.n > settings.max_n:
        raise bad_request(f"n must be at most {settings.max_n}.", param="n")
    if len(request.stop_list()) > settings.max_stop:
        raise bad_request(f"At most {settings.max_stop} stop strings are allowed.", param="stop")
    if logprobs is not None and logprobs > settings.max_top_logprobs:
        raise bad_request(
            f"At most {settings.max_top_logprobs} top logprobs can be returned.",
            param="logprobs",
        )


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json(exclude_none=False)}\n\n"


def sse_error(error: APIError) -> str:
    import json

    return f"data: {json.dumps(error.body())}\n\n"


SSE_DONE = "data: [DONE]\n\n"

C = TypeVar("C", bound=BaseModel)


@dataclass
class StreamTally:
    """What a stream has produced so far, across its choices."""

    unfinished: int
    completion_tokens: int = 0

    def count(self, delta: OutputDelta) -> bool:
        """Count `delta`; True when it carries something a client must be sent."""
        self.completion_tokens += len(delta.token_ids)
        if delta.finish_reason is not None:
            self.unfinished -= 1
        return bool(delta.text or delta.finish_reason is not None or delta.logprobs)


class ChunkMaker(Protocol[C]):
    def __call__(
        self,
        choices: list[C],
        *,
        crosstask: CrosstaskAnnotation | None = None,
        usage: UsageInfo | None = None,
    ) -> str: ...


def chunk_maker(
    chunk_type: Callable[..., BaseModel], request_id: str, created: int, model: str
) -> ChunkMaker[C]:
    """Server-sent events of one stream's chunks (`chunk_type`: the resource's chunk model)."""

    def chunk(
        choices: list[C],
        *,
        crosstask: CrosstaskAnnotation | None = None,
        usage: UsageInfo | None = None,
    ) -> str:
        payload = chunk_type(
            id=request_id,
            created=created,
            model=model,
            choices=choices,
            crosstask=crosstask,
            usage=usage,
        )
        return sse(payload)

    return chunk


async def sse_chunks(
    steps: AsyncIterator[list[C]],
    chunk: ChunkMaker[C],
    tally: StreamTally,
    annotation: CrosstaskAnnotation,
    usage: Callable[[], UsageInfo] | None,
) -> AsyncIterator[str]:
    """The events of a generation stream after its first: a chunk per engine step with
    choices to send (the one that finishes the last choice carries the annotation); an
    error event if the generation fails; the usage chunk when asked for; `[DONE]`."""
    try:
        async for choices in steps:
            if choices:
                yield chunk(choices, crosstask=annotation if tally.unfinished == 0 else None)
    except APIError as error:
        yield sse_error(error)
        yield SSE_DONE
        return
    if usage is not None:
        yield chunk([], usage=usage(), crosstask=annotation)
    yield SSE_DONE


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work`, unless the client disconnects first: then cancel it (which aborts the
    engine request) and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    log.info("Client disconnected; aborting its request.")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


class GenerationServing(Protocol[R, P]):
    async def prepare(self, request: R) -> P: ...

    async def complete(self, request: R, prepared: P, request_id: str) -> BaseModel: ...

    def stream(self, request: R, prepared: P, request_id: str) -> AsyncIterator[str]: ...


async def serve_generation(
    serving: GenerationServing[R, P], body: R, raw: Request, id_prefix: str, stream: bool
) -> Response:
    """The shape of both generation routes: prepare (errors here are plain 4xx responses),
    then stream events or await the whole result while watching for a disconnect."""
    request_id = new_id(id_prefix)
    prepared = await serving.prepare(body)
    if stream:
        return event_stream(serving.stream(body, prepared, request_id))
    result = await unless_disconnected(raw, serving.complete(body, prepared, request_id))
    if result is None:
        # Nobody is listening; the status is for the access log and the metrics only.
        return Response(status_code=499)
    return Response(content=result.model_dump_json(), media_type="application/json")
