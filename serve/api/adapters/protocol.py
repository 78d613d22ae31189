"""Adapter management: the registry listing and vLLM's runtime load/unload bodies."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from serve.api.protocol import OpenAIBaseModel


class AdapterCard(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    kind: str = Field(description="generalist, specialist, or unrouted (no crosstask metadata)")
    rank: int
    tasks: list[str]
    parent: str
    routable: bool = Field(description="Whether `auto` may choose it.")


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterCard] = Field(default_factory=list)


class LoadLoraAdapterRequest(OpenAIBaseModel):
    lora_name: str = Field(min_length=1, max_length=64)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(OpenAIBaseModel):
    lora_name: str = Field(min_length=1, max_length=64)
