from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from serve.api.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
from serve.api.chat_completion.serving import ChatServing
from serve.api.deps import get_chat_serving, require_api_key
from serve.api.protocol import ERROR_RESPONSES
from serve.api.streaming import serve_generation

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["openai"])


@router.post(
    "/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    raw: Request,
    serving: Annotated[ChatServing, Depends(get_chat_serving)],
) -> Response:
    return await serve_generation(serving, body, raw, "chatcmpl", body.stream)
