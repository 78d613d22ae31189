"""The one request path, shared by the HTTP API and the batch job:

    validate -> retrieve -> route -> assemble prompt -> generate -> annotate

Inputs and outputs are plain dataclasses; the pydantic protocol models stay at the API
boundary.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from serve.engine import (
    Engine,
    EngineDeadError,
    GenerationParams,
    InvalidParamsError,
    OutputDelta,
    TokenLogprob,
)
from serve.errors import APIError, bad_request, not_found, unavailable
from serve.metrics import Metrics
from serve.settings import Settings

AUTO_MODEL = "auto"
ROUTING_MODES = ("off", "adapter", "merge", "fuse", "auto")


@dataclass
class Message:
    role: str
    content: str


@dataclass
class CrosstaskOptions:
    """The request's `crosstask` extension, as plain data."""

    task: str | None = None
    k: int | None = None
    min_score: float | None = None
    routing_mode: str | None = None
    adapters: list[str] | None = None
    weights: list[float] | None = None
    top_k: int | None = None
    exclude_tasks: list[str] = field(default_factory=list)


@dataclass
class GenerationRequest:
    """One prompt to complete: chat messages or a completion prompt (text or token ids)."""

    model: str
    params: GenerationParams
    max_tokens: int | None
    messages: list[Message] | None = None
    prompt: str | list[int] | None = None
    options: CrosstaskOptions = field(default_factory=CrosstaskOptions)


@dataclass
class DemonstrationRef:
    id: str
    task: str
    score: float


@dataclass
class RoutingDecision:
    mode: str
    adapters: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Annotation:
    demonstrations: list[DemonstrationRef]
    routing: RoutingDecision


@dataclass
class PreparedRequest:
    prompt_token_ids: list[int]
    params: GenerationParams
    annotation: Annotation
    received_at: float


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    token_count: int = 0
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class Completed:
    choices: list[ChoiceResult]
    prompt_tokens: int
    completion_tokens: int
    annotation: Annotation


class Pipeline:
    def __init__(self, settings: Settings, engine: Engine, metrics: Metrics) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.started_at = time.time()

    @property
    def model_name(self) -> str:
        return self.engine.config.served_name

    # -- validate, retrieve, route, assemble ----------------------------------------------

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        received_at = time.monotonic()
        self._check_model(request.model)
        self._check_options(request.options)
        routing = RoutingDecision(mode="off")
        prompt_ids = self._assemble(request)
        params = self._fit_to_context(request, prompt_ids)
        return PreparedRequest(
            prompt_token_ids=prompt_ids,
            params=params,
            annotation=Annotation(demonstrations=[], routing=routing),
            received_at=received_at,
        )

    def _check_model(self, model: str) -> None:
        if model not in (self.model_name, AUTO_MODEL):
            raise not_found(
                f"The model `{model}` does not exist. Available: "
                f"{self.model_name}, {AUTO_MODEL} (see GET /v1/models).",
                param="model",
                code="model_not_found",
            )

    def _check_options(self, options: CrosstaskOptions) -> None:
        # Fields that would change what is served are refused until the server can honour
        # them: silently ignoring them would answer a different question than was asked.
        if options.k not in (None, 0):
            raise bad_request(
                "crosstask.demonstrations.k > 0 needs a demonstration store; this server "
                "has none configured (k must be 0).",
                param="crosstask.demonstrations.k",
                code="unsupported_value",
            )
        if options.min_score is not None and options.min_score < 0:
            raise bad_request(
                "crosstask.demonstrations.min_score must be >= 0.",
                param="crosstask.demonstrations.min_score",
            )
        if options.routing_mode not in (None, "off"):
            raise bad_request(
                f"crosstask.routing.mode {options.routing_mode!r} needs the adapter library; "
                "this server has no adapters registered, so only 'off' can be served.",
                param="crosstask.routing.mode",
                code="unsupported_value",
            )
        if options.adapters:
            raise bad_request(
                "crosstask.routing.adapters names adapters, but none are registered.",
                param="crosstask.routing.adapters",
                code="unsupported_value",
            )
        if options.weights:
            raise bad_request(
                "crosstask.routing.weights needs adapters, but none are registered.",
                param="crosstask.routing.weights",
                code="unsupported_value",
            )

    def _assemble(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            return self.engine.render_chat(
                [{"role": m.role, "content": m.content} for m in request.messages]
            )
        if isinstance(request.prompt, str):
            return self.engine.encode(request.prompt)
        if request.prompt is not None:
            vocab = len(self.engine.tokenizer)
            if any(t < 0 or t >= vocab for t in request.prompt):
                raise bad_request(
                    f"Prompt token ids must lie in [0, {vocab}).",
                    param="prompt",
                    code="invalid_token_id",
                )
            return list(request.prompt)
        raise bad_request("Either messages or prompt is required.")

    def _fit_to_context(
        self, request: GenerationRequest, prompt_ids: list[int]
    ) -> GenerationParams:
        limit = self.engine.max_model_len
        if not prompt_ids:
            raise bad_request("The prompt is empty.", param="prompt", code="empty_prompt")
        room = limit - len(prompt_ids)
        if room < 1 or (request.max_tokens is not None and request.max_tokens > room):
            wanted = request.max_tokens if request.max_tokens is not None else 1
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {len(prompt_ids) + wanted} tokens ({len(prompt_ids)} in the "
                f"prompt, {wanted} for the completion). Please reduce the length of the "
                "messages or completion.",
                param="messages" if request.messages is not None else "prompt",
                code="context_length_exceeded",
            )
        params = request.params
        params.max_tokens = request.max_tokens if request.max_tokens is not None else room
        try:
            self.engine.check_params(params)
        except InvalidParamsError as exc:
            raise bad_request(str(exc), code="invalid_sampling_params") from exc
        return params

    # -- generate and annotate ---------------------------------------------------------

    async def stream(
        self, prepared: PreparedRequest, request_id: str
    ) -> AsyncGenerator[list[OutputDelta], None]:
        """The engine's deltas, with the request's metrics kept on the way. Closing the
        iterator before the end aborts the engine request and counts it as aborted."""
        if self.engine.errored:
            raise unavailable("The engine is not running.", code="engine_dead")
        first = True
        generated = 0
        finished = False
        try:
            async for deltas in self.engine.generate(
                prepared.prompt_token_ids, prepared.params, request_id
            ):
                if first and any(d.token_ids for d in deltas):
                    self.metrics.ttft.observe(time.monotonic() - prepared.received_at)
                    first = False
                generated += sum(len(d.token_ids) for d in deltas)
                yield deltas
            finished = True
        except EngineDeadError as exc:
            raise APIError(
                f"The engine failed while generating: {exc}",
                500,
                "server_error",
                code="engine_dead",
            ) from exc
        finally:
            self.metrics.completion_tokens.inc(generated)
            if finished:
                self.metrics.prompt_tokens.inc(len(prepared.prompt_token_ids))
            else:
                self.metrics.aborted.inc()

    async def complete(self, prepared: PreparedRequest, request_id: str) -> Completed:
        choices = [ChoiceResult(index=i) for i in range(prepared.params.n)]
        want_logprobs = prepared.params.logprobs is not None
        stream = self.stream(prepared, request_id)
        try:
            async for deltas in stream:
                for delta in deltas:
                    choice = choices[delta.index]
                    choice.text += delta.text
                    choice.token_count += len(delta.token_ids)
                    if want_logprobs:
                        choice.logprobs = (choice.logprobs or []) + (delta.logprobs or [])
                    if delta.finish_reason is not None:
                        choice.finish_reason = delta.finish_reason
        finally:
            await stream.aclose()
        return Completed(
            choices=choices,
            prompt_tokens=len(prepared.prompt_token_ids),
            completion_tokens=sum(c.token_count for c in choices),
            annotation=prepared.annotation,
        )
