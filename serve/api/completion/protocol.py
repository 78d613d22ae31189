"""Completion request and response models (the OpenAI schema plus `crosstask`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from serve.api.protocol import CrosstaskAnnotation, SamplingRequest, UsageInfo

MAX_PROMPT_CHARS = 1_000_000


class CompletionRequest(SamplingRequest):
    # A string, a list of strings, a list of token ids, or a list of token-id lists, as in
    # the OpenAI API; each prompt yields n choices.
    prompt: str | list[str] | list[int] | list[list[int]]
    # OpenAI's completion default, kept by vLLM too.
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: object) -> object:
        if isinstance(value, str):
            if len(value) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
            return value
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be an empty list")
            if any(isinstance(p, list) and not p for p in value):
                raise ValueError("prompt must not contain an empty token list")
        return value

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [[int(p) for p in self.prompt]]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    crosstask: CrosstaskAnnotation


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    crosstask: CrosstaskAnnotation | None = None
