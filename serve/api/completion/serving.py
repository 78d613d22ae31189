"""Completions: each prompt of the request runs through the pipeline; prompt i's choice j
is choice i * n + j of the response, as in the OpenAI API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from serve.api.completion.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from serve.api.protocol import CrosstaskAnnotation, UsageInfo
from serve.api.streaming import (
    ChunkMaker,
    StreamTally,
    check_limits,
    chunk_maker,
    sse_chunks,
)
from serve.engine.types import OutputDelta, TokenLogprob
from serve.errors import bad_request
from serve.pipeline import GenerationRequest, Pipeline, PreparedRequest


def _logprobs(items: list[TokenLogprob] | None, offset: int) -> CompletionLogprobs | None:
    if items is None:
        return None
    result = CompletionLogprobs()
    for item in items:
        result.tokens.append(item.token)
        result.token_logprobs.append(item.logprob)
        result.top_logprobs.append(dict(item.top))
        result.text_offset.append(offset)
        offset += len(item.token)
    return result


class CompletionServing:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def prepare(self, request: CompletionRequest) -> list[PreparedRequest]:
        """Validate every prompt before any is generated, so a bad one fails the whole
        request instead of wasting the others' work."""
        if request.echo:
            raise bad_request("echo is not supported.", param="echo", code="unsupported_value")
        settings = self.pipeline.settings
        check_limits(request, settings, request.logprobs)
        prompts = request.prompts()
        if len(prompts) > settings.max_prompts_per_request:
            raise bad_request(
                f"At most {settings.max_prompts_per_request} prompts per request.",
                param="prompt",
            )
        return list(
            await asyncio.gather(
                *(
                    self.pipeline.prepare(
                        GenerationRequest(
                            model=request.model,
                            params=request.generation_params(request.max_tokens, request.logprobs),
                            max_tokens=request.max_tokens,
                            prompt=prompt,
                            options=request.options(),
                        )
                    )
                    for prompt in prompts
                )
            )
        )

    async def complete(
        self, request: CompletionRequest, prepared: list[PreparedRequest], request_id: str
    ) -> CompletionResponse:
        results = await asyncio.gather(
            *(self.pipeline.complete(p, f"{request_id}-{i}") for i, p in enumerate(prepared))
        )
        n = request.n
        choices = [
            CompletionChoice(
                index=i * n + c.index,
                text=c.text,
                logprobs=_logprobs(c.logprobs, 0),
                finish_reason=c.finish_reason,
            )
            for i, done in enumerate(results)
            for c in done.choices
        ]
        return CompletionResponse(
            id=request_id,
            created=int(time.time()),
            model=request.model,
            choices=choices,
            usage=UsageInfo.of(
                sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
            ),
            crosstask=CrosstaskAnnotation.of(results[0].annotation),
        )

    async def stream(
        self, request: CompletionRequest, prepared: list[PreparedRequest], request_id: str
    ) -> AsyncIterator[str]:
        created = int(time.time())
        n = request.n
        tally = StreamTally(unfinished=n * len(prepared))
        offsets = [0] * tally.unfinished

        chunk: ChunkMaker[CompletionChoice] = chunk_maker(
            CompletionChunk, request_id, created, request.model
        )

        async def steps() -> AsyncIterator[list[CompletionChoice]]:
            async for prompt_index, deltas in _merge(self.pipeline, prepared, request_id):
                choices = []
                for d in deltas:
                    index = prompt_index * n + d.index
                    if tally.count(d):
                        choices.append(
                            CompletionChoice(
                                index=index,
                                text=d.text,
                                logprobs=_logprobs(d.logprobs, offsets[index]),
                                finish_reason=d.finish_reason,
                            )
                        )
                        offsets[index] += len(d.text)
                yield choices

        prompt_tokens = sum(len(p.prompt_token_ids) for p in prepared)
        usage = (
            (lambda: UsageInfo.of(prompt_tokens, tally.completion_tokens))
            if request.include_usage
            else None
        )
        annotation = CrosstaskAnnotation.of(prepared[0].annotation)
        async for event in sse_chunks(steps(), chunk, tally, annotation, usage):
            yield event


async def _merge(
    pipeline: Pipeline, prepared: list[PreparedRequest], request_id: str
) -> AsyncIterator[tuple[int, list[OutputDelta]]]:
    """Interleave the streams of several prompts as their deltas arrive."""
    if len(prepared) == 1:
        async for deltas in pipeline.stream(prepared[0], request_id):
            yield 0, deltas
        return
    queue: asyncio.Queue[tuple[int, list[OutputDelta]] | BaseException | None] = asyncio.Queue()

    async def pump(index: int, item: PreparedRequest) -> None:
        try:
            async for deltas in pipeline.stream(item, f"{request_id}-{index}"):
                await queue.put((index, deltas))
        except Exception as exc:
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prepared)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
