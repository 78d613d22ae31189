"""Chat completions: protocol models in, the pipeline in the middle, protocol models out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from serve.api.chat_completion.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    DeltaMessage,
    TokenLogprobModel,
    TopLogprob,
)
from serve.api.protocol import CrosstaskAnnotation, UsageInfo
from serve.api.streaming import (
    ChunkMaker,
    StreamTally,
    check_limits,
    chunk_maker,
    sse_chunks,
)
from serve.engine.types import TokenLogprob
from serve.errors import bad_request
from serve.pipeline import GenerationRequest, Message, Pipeline, PreparedRequest


def _logprobs(items: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
    if items is None:
        return None
    return ChoiceLogprobs(
        content=[
            TokenLogprobModel(
                token=item.token,
                logprob=item.logprob,
                bytes=list(item.token.encode()),
                top_logprobs=[
                    TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in item.top
                ],
            )
            for item in items
        ]
    )


class ChatServing:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def prepare(self, request: ChatCompletionRequest) -> PreparedRequest:
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true.", param="top_logprobs")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        check_limits(request, self.pipeline.settings, logprobs)
        max_tokens = request.effective_max_tokens()
        return await self.pipeline.prepare(
            GenerationRequest(
                model=request.model,
                params=request.generation_params(max_tokens, logprobs),
                max_tokens=max_tokens,
                messages=[Message(role=m.role, content=m.text()) for m in request.messages],
                options=request.options(),
            )
        )

    async def complete(
        self, request: ChatCompletionRequest, prepared: PreparedRequest, request_id: str
    ) -> ChatCompletionResponse:
        done = await self.pipeline.complete(prepared, request_id)
        return ChatCompletionResponse(
            id=request_id,
            created=int(time.time()),
            model=request.model,
            choices=[
                ChatChoice(
                    index=c.index,
                    message=AssistantMessage(content=c.text),
                    logprobs=_logprobs(c.logprobs),
                    finish_reason=c.finish_reason,
                )
                for c in done.choices
            ],
            usage=UsageInfo.of(done.prompt_tokens, done.completion_tokens),
            crosstask=CrosstaskAnnotation.of(done.annotation),
        )

    async def stream(
        self, request: ChatCompletionRequest, prepared: PreparedRequest, request_id: str
    ) -> AsyncIterator[str]:
        created = int(time.time())
        n = prepared.params.n
        tally = StreamTally(unfinished=n)

        chunk: ChunkMaker[ChatChunkChoice] = chunk_maker(
            ChatCompletionChunk, request_id, created, request.model
        )

        async def steps() -> AsyncIterator[list[ChatChunkChoice]]:
            async for deltas in self.pipeline.stream(prepared, request_id):
                yield [
                    ChatChunkChoice(
                        index=d.index,
                        delta=DeltaMessage(content=d.text),
                        logprobs=_logprobs(d.logprobs),
                        finish_reason=d.finish_reason,
                    )
                    for d in deltas
                    if tally.count(d)
                ]

        yield chunk(
            [
                ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(n)
            ]
        )
        usage = (
            (lambda: UsageInfo.of(len(prepared.prompt_token_ids), tally.completion_tokens))
            if request.include_usage
            else None
        )
        annotation = CrosstaskAnnotation.of(prepared.annotation)
        async for event in sse_chunks(steps(), chunk, tally, annotation, usage):
            yield event
