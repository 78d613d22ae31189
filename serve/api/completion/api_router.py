from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from serve.api.completion.protocol import CompletionRequest, CompletionResponse
from serve.api.completion.serving import CompletionServing
from serve.api.deps import get_completion_serving, require_api_key
from serve.api.protocol import ERROR_RESPONSES
from serve.api.streaming import serve_generation

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["openai"])


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
async def create_completion(
    body: CompletionRequest,
    raw: Request,
    serving: Annotated[CompletionServing, Depends(get_completion_serving)],
) -> Response:
    return await serve_generation(serving, body, raw, "cmpl", body.stream)
