"""Request and response models of the demonstration store's routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from retrieval import store_limits as limits
from serve.api.protocol import OpenAIBaseModel


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or blank")
    return value


class ExampleIn(OpenAIBaseModel):
    input: str = Field(min_length=1, max_length=limits.MAX_INPUT_CHARS)
    output: str = Field(min_length=1, max_length=limits.MAX_OUTPUT_CHARS)

    _check = field_validator("input", "output")(_not_blank)


class AddDemonstrationsRequest(OpenAIBaseModel):
    task: str = Field(min_length=1, max_length=limits.MAX_TASK_CHARS)
    definition: str = Field(default="", max_length=limits.MAX_DEFINITION_CHARS)
    examples: list[ExampleIn] = Field(min_length=1, max_length=limits.MAX_ADD)

    _check = field_validator("task")(_not_blank)


class AddDemonstrationsResponse(BaseModel):
    object: Literal["demonstrations.added"] = "demonstrations.added"
    task: str
    ids: list[str]
    store_size: int


class SearchRequest(OpenAIBaseModel):
    query: str = Field(min_length=1, max_length=limits.MAX_INPUT_CHARS)
    k: int = Field(default=4, ge=1, le=limits.MAX_K)
    min_score: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    exclude_tasks: list[str] = Field(default_factory=list, max_length=limits.MAX_EXCLUDE_TASKS)

    _check = field_validator("query")(_not_blank)


class SearchHit(BaseModel):
    id: str
    task: str
    score: float
    definition: str
    input: str
    output: str


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[SearchHit]
