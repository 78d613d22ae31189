"""Pydantic models shared by the OpenAI-compatible resources: the `crosstask` request
extension, its response annotation, usage and the error body."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from retrieval.scope import RetrievalScope
from routing.modes import RoutingMode
from serve.api.unicode import find_lone_surrogate
from serve.engine.types import GenerationParams
from serve.pipeline import Annotation, CrosstaskOptions

# Upper bounds that keep one request from asking for unbounded work (docs/api.md, "Limits").
MAX_DEMONSTRATIONS = 32
MAX_ROUTED_ADAPTERS = 8
MAX_EXCLUDED_TASKS = 1024
MAX_TASK_CHARS = 8192


class OpenAIBaseModel(BaseModel):
    # Unknown fields are ignored, as vLLM and OpenAI clients expect of a server.
    model_config = ConfigDict(extra="ignore")


class DemonstrationOptions(OpenAIBaseModel):
    k: int | None = Field(default=None, ge=0, le=MAX_DEMONSTRATIONS)
    min_score: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    # Extension: what the demonstrations are chosen by (docs/retrieval.md, "Scope").
    scope: Literal["task", "input"] | None = None


class RoutingOptions(OpenAIBaseModel):
    mode: Literal["off", "adapter", "merge", "fuse", "auto"] | None = None
    adapters: list[str] | None = Field(default=None, max_length=MAX_ROUTED_ADAPTERS)
    weights: list[float] | None = Field(default=None, max_length=MAX_ROUTED_ADAPTERS)
    top_k: int | None = Field(default=None, ge=1, le=MAX_ROUTED_ADAPTERS)
    alpha: Literal["dynamic"] | None = None

    @model_validator(mode="after")
    def _weights_match(self) -> RoutingOptions:
        if self.weights is not None:
            import math

            if any(not math.isfinite(w) for w in self.weights):
                raise ValueError("routing.weights must be finite numbers")
            if self.adapters is not None and len(self.weights) != len(self.adapters):
                raise ValueError("routing.weights must have one weight per adapter")
        return self


class CrosstaskExtension(OpenAIBaseModel):
    """The optional `crosstask` object of a chat or completion request."""

    task: str | None = Field(default=None, max_length=MAX_TASK_CHARS)
    demonstrations: DemonstrationOptions | None = None
    routing: RoutingOptions | None = None
    exclude_tasks: list[str] | None = Field(default=None, max_length=MAX_EXCLUDED_TASKS)

    def to_options(self) -> CrosstaskOptions:
        demos = self.demonstrations or DemonstrationOptions()
        routing = self.routing or RoutingOptions()
        return CrosstaskOptions(
            task=self.task,
            k=demos.k,
            min_score=demos.min_score,
            scope=None if demos.scope is None else RetrievalScope(demos.scope),
            routing_mode=None if routing.mode is None else RoutingMode(routing.mode),
            adapters=routing.adapters,
            weights=routing.weights,
            top_k=routing.top_k,
            alpha=routing.alpha,
            exclude_tasks=list(self.exclude_tasks or []),
        )


class DemonstrationAnnotation(BaseModel):
    id: str
    task: str
    score: float


class AdapterWeight(BaseModel):
    name: str
    weight: float


class AdapterScore(BaseModel):
    name: str
    similarity: float


class RoutingAnnotation(BaseModel):
    mode: str
    adapters: list[AdapterWeight] = Field(default_factory=list)
    # Extensions (auto only): the router's candidates and its reason, so a client can see
    # why a request was routed as it was.
    scores: list[AdapterScore] = Field(default_factory=list)
    reason: str = ""


class RetrievalAnnotation(BaseModel):
    """Extension: how the demonstrations were chosen. `considered` came back from the
    store; those scoring below `min_score` stayed out; `reason` says why none went in."""

    scope: Literal["task", "input"]
    considered: int
    min_score: float
    reason: str = ""


class CrosstaskAnnotation(BaseModel):
    """What the server did for a request: demonstrations used and the routing decision."""

    demonstrations: list[DemonstrationAnnotation] = Field(default_factory=list)
    routing: RoutingAnnotation
    # Absent when the request could have no demonstrations (no store, token-id prompt).
    retrieval: RetrievalAnnotation | None = None

    @classmethod
    def of(cls, annotation: Annotation) -> CrosstaskAnnotation:
        return cls(
            demonstrations=[
                DemonstrationAnnotation(id=d.id, task=d.task, score=d.score)
                for d in annotation.demonstrations
            ],
            routing=RoutingAnnotation(
                mode=annotation.routing.mode,
                adapters=[AdapterWeight(name=n, weight=w) for n, w in annotation.routing.adapters],
                scores=[AdapterScore(name=n, similarity=s) for n, s in annotation.routing.scores],
                reason=annotation.routing.reason,
            ),
            retrieval=None
            if annotation.retrieval is None
            else RetrievalAnnotation(
                scope=annotation.retrieval.scope.value,
                considered=annotation.retrieval.considered,
                min_score=annotation.retrieval.min_score,
                reason=annotation.retrieval.reason,
            ),
        )


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class SamplingRequest(OpenAIBaseModel):
    """Fields that chat and completion requests share."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: object) -> object:
        # JSON may carry lone surrogates ("\ud800"); no tokenizer or engine can encode them,
        # so they are the client's error (400), found here rather than as a 500 later.
        where = find_lone_surrogate(data)
        if where is not None:
            raise PydanticCustomError(
                "invalid_unicode",
                "{where}: text must be valid Unicode (it holds a lone surrogate)",
                {"where": where},
            )
        return data

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extension, used by its benchmark client to generate exactly max_tokens.
    ignore_eos: bool = False
    crosstask: CrosstaskExtension | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def generation_params(self, max_tokens: int | None, logprobs: int | None) -> GenerationParams:
        return GenerationParams(
            max_tokens=max_tokens or 0,
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=self.stop_list(),
            seed=self.seed,
            logprobs=logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            ignore_eos=self.ignore_eos,
        )

    def options(self) -> CrosstaskOptions:
        return self.crosstask.to_options() if self.crosstask else CrosstaskOptions()

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# The error statuses every /v1 route documents in the OpenAPI schema.
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 429, 503)
}
