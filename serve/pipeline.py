"""The one request path, shared by the HTTP API and the batch job:

    validate -> retrieve -> route -> assemble prompt -> generate -> annotate

Inputs and outputs are plain dataclasses; the pydantic protocol models stay at the API
boundary.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from retrieval.prompt import (
    Demonstration,
    Turn,
    demonstration_blocks,
    fit,
    request_prompt,
)
from retrieval.query import query_text
from retrieval.retriever import Retriever
from retrieval.scope import RetrievalScope
from retrieval.store_types import Hit
from routing.merge import MergeLease
from routing.modes import RoutingMode
from routing.service import RoutingError, RoutingRequest, RoutingService
from serve.engine.engine import Engine
from serve.engine.types import (
    EngineDeadError,
    FusionError,
    FusionTarget,
    GenerationParams,
    InvalidParamsError,
    LoraLoadError,
    LoraTarget,
    OutputDelta,
    TokenLogprob,
    fusion_members,
)
from serve.errors import APIError, bad_request, not_found, unavailable
from serve.metrics import Metrics
from serve.settings import Settings

AUTO_MODEL = "auto"
# Where the model starts writing the next Definition/Input block of a few-shot prompt, it
# has finished its answer.
DEMONSTRATION_STOPS = ("\n\nInput:", "\n\nDefinition:")


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
    scope: RetrievalScope | None = None
    routing_mode: RoutingMode | None = None
    adapters: list[str] | None = None
    weights: list[float] | None = None
    top_k: int | None = None
    alpha: str | None = None
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
    mode: RoutingMode
    adapters: list[tuple[str, float]] = field(default_factory=list)
    scores: list[tuple[str, float]] = field(default_factory=list)
    reason: str = ""


@dataclass
class RetrievalNote:
    """How the demonstrations were chosen: what was searched for, how many came back
    (`considered`), the score a demonstration needed (`min_score`) and, when none went
    in, why."""

    scope: RetrievalScope
    considered: int = 0
    min_score: float = 0.0
    reason: str = ""


@dataclass
class RetrievalPlan:
    k: int
    query: str  # the text to embed and search with ("" when nothing to search)
    min_score: float
    note: RetrievalNote | None  # None: no retrieval at all (no store, token-id prompt)


@dataclass
class Annotation:
    demonstrations: list[DemonstrationRef]
    routing: RoutingDecision
    retrieval: RetrievalNote | None = None


@dataclass
class PreparedRequest:
    prompt_token_ids: list[int]
    params: GenerationParams
    annotation: Annotation
    received_at: float
    lora: LoraTarget | None = None
    fusion: FusionTarget | None = None
    # Keeps a merged `lora`'s folder until stream() ends: vLLM loads it from there.
    merge_lease: MergeLease | None = None


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


def _too_long(request: GenerationRequest, message: str) -> APIError:
    """The 400 for a prompt the request cannot have, on the field that holds it."""
    return bad_request(
        message,
        param="messages" if request.messages is not None else "prompt",
        code="context_length_exceeded",
    )


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        metrics: Metrics,
        retriever: Retriever | None = None,
        routing: RoutingService | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.retriever = retriever
        self.routing = routing
        self.started_at = time.time()

    @property
    def model_name(self) -> str:
        return self.engine.config.served_name

    # -- validate, retrieve, route, assemble ----------------------------------------------

    async def prepare(self, request: GenerationRequest) -> PreparedRequest:
        received_at = time.monotonic()
        self._check_model(request.model)
        plan = self._retrieval_plan(request)
        routing_request = self._routing_request(request)
        wants_query = (
            self.routing is not None
            and routing_request is not None
            and self.routing.needs_query(routing_request)
        )
        # The router compares the definition plus input with its adapters; retrieval with
        # task scope searches by the definition alone. Both texts are embedded through
        # the retriever's cache, so a task's definition is embedded once, and with input
        # scope the two are one embedding.
        text_prompt = request.prompt is None or isinstance(request.prompt, str)
        route_text = (
            self._query(request, RetrievalScope.INPUT)
            if wants_query and self.retriever is not None and text_prompt
            else ""
        )
        hits: list[Hit] = []
        if plan.k > 0 and plan.query:
            vector = await self._embed(plan.query)
            hits = await self._search(request, vector, plan.k)
        route_vector = await self._embed(route_text) if route_text else None
        decision, lora, fusion, lease = await self._route(routing_request, route_vector)
        try:
            demos = self._gate(plan, hits)
            prompt_ids, demos = self._assemble(request, demos, fusion)
            params = self._fit_to_context(request, prompt_ids)
            if fusion is not None:
                self._check_fusion(request, params, fusion, len(prompt_ids))
        except BaseException:
            if lease is not None:
                lease.release()  # refused: nothing will load the merge for this request
            raise
        if demos:
            self.metrics.demonstrations.observe(len(demos))
        return PreparedRequest(
            prompt_token_ids=prompt_ids,
            params=params,
            annotation=Annotation(
                demonstrations=[DemonstrationRef(h.id, h.task, h.score) for h in demos],
                routing=decision,
                retrieval=plan.note,
            ),
            received_at=received_at,
            lora=lora,
            fusion=fusion,
            merge_lease=lease,
        )

    def _routing_request(self, request: GenerationRequest) -> RoutingRequest | None:
        if self.routing is None:
            return None
        options = request.options
        return RoutingRequest(
            model=request.model,
            mode=options.routing_mode,
            adapters=options.adapters,
            weights=options.weights,
            top_k=options.top_k,
            exclude_tasks=options.exclude_tasks,
            alpha=options.alpha,
        )

    async def _route(
        self, routing_request: RoutingRequest | None, vector: np.ndarray | None
    ) -> tuple[RoutingDecision, LoraTarget | None, FusionTarget | None, MergeLease | None]:
        if self.routing is None or routing_request is None:
            return RoutingDecision(RoutingMode.OFF), None, None, None
        if self.routing.needs_query(routing_request) and self.retriever is None:
            raise bad_request(
                "Routing with `auto` compares the request's embedding with the adapters'; "
                "this server has no embedder (no demonstration store) configured.",
                param="crosstask.routing.mode",
                code="unsupported_value",
            )
        try:
            plan = await self.routing.plan(routing_request, vector)
        except RoutingError as exc:
            status = 404 if exc.code == "adapter_not_found" else 400
            raise APIError(str(exc), status, "invalid_request_error", exc.param, exc.code) from None
        self.metrics.routing_requests.labels(plan.mode).inc()
        for name, _ in plan.adapters:
            self.metrics.adapter_requests.labels(name).inc()
        if plan.merge_hit is not None:
            if plan.merge_hit:
                self.metrics.merge_cache_hits.inc()
            else:
                self.metrics.merge_cache_misses.inc()
                self.metrics.merge_build_seconds.observe(plan.merge_seconds)
        lora = LoraTarget(plan.lora[0], plan.lora[1]) if plan.lora is not None else None
        fusion = (
            FusionTarget([LoraTarget(n, p) for n, p in plan.fusion], plan.alphas, plan.prior)
            if plan.mode == RoutingMode.FUSE
            else None
        )
        if fusion is not None:
            self.metrics.fused_requests.inc()
        decision = RoutingDecision(plan.mode, plan.adapters, plan.scores, plan.reason)
        return decision, lora, fusion, plan.merge_lease

    def _gate(self, plan: RetrievalPlan, hits: list[Hit]) -> list[Hit]:
        """The demonstrations that score at least the plan's `min_score`; the note says
        how many were considered and, when none is kept, why."""
        note = plan.note
        kept = [h for h in hits if h.score >= plan.min_score]
        if note is None:
            return kept
        note.considered = len(hits)
        if plan.k > 0 and not kept and not note.reason:
            if hits:
                nearest = max(h.score for h in hits)
                note.reason = f"nearest scores {nearest:.3f}, below min_score {plan.min_score:.3f}"
            else:
                note.reason = "the store has no demonstration to offer (empty, or all excluded)"
        return kept

    def _check_fusion(
        self,
        request: GenerationRequest,
        params: GenerationParams,
        fusion: FusionTarget,
        prompt_tokens: int,
    ) -> None:
        """Refuse what a fusion group cannot do, before any member is sent."""
        param = "crosstask.routing.mode"
        if not self.engine.config.fusion_on:
            raise bad_request(
                "routing.mode 'fuse' is switched off on this server (CROSSTASK_FUSION_ENABLED"
                "=false or adapters disabled).",
                param=param,
                code="unsupported_value",
            )
        if params.n != 1:
            raise bad_request("routing.mode 'fuse' generates one choice (n = 1).", param="n")
        if params.logprobs is not None:
            raise bad_request(
                "logprobs are not available with routing.mode 'fuse' (each member has its "
                "own; the fused distribution is not returned).",
                param="logprobs",
            )
        if len(fusion.adapters) > self.engine.config.max_loras:
            raise bad_request(
                f"routing.mode 'fuse' with {len(fusion.adapters)} adapters needs as many LoRA "
                f"slots; this server has {self.engine.config.max_loras} (CROSSTASK_MAX_LORAS).",
                param="crosstask.routing.adapters",
                code="unsupported_value",
            )
        members = fusion_members(fusion)
        limit = self.engine.fusion_prompt_limit(members)
        if prompt_tokens > limit:
            raise _too_long(
                request,
                f"A fusion group of {members} members prefills its prompt "
                f"once per member in one engine step, so the prompt may have at most {limit} "
                f"tokens here; it has {prompt_tokens}. Use fewer adapters or "
                "demonstrations, or raise --max-num-batched-tokens.",
            )

    def _check_model(self, model: str) -> None:
        if model in (self.model_name, AUTO_MODEL):
            return
        if self.routing is not None and self.routing.registry.get(model) is not None:
            return
        if model not in (self.model_name, AUTO_MODEL):
            raise not_found(
                f"The model `{model}` does not exist. Available: "
                f"{self.model_name}, {AUTO_MODEL} and the adapters (see GET /v1/models).",
                param="model",
                code="model_not_found",
            )

    def _retrieval_plan(self, request: GenerationRequest) -> RetrievalPlan:
        """How many demonstrations to retrieve, by which text, and the score they need.
        A request's own `k` and `min_score` are used as given (with `k` and no
        `min_score`, every one of the `k` goes in); a request that asks for neither gets
        the server's defaults, gated by CROSSTASK_DEMO_MIN_SCORE, and none when it names
        no task. What cannot be honoured is refused: silently ignoring a field would
        answer another question."""
        options = request.options
        self._check_routing(options)
        token_ids = request.prompt is not None and not isinstance(request.prompt, str)
        if options.k is not None and options.k > 0 and self.retriever is None:
            raise bad_request(
                "crosstask.demonstrations.k > 0 needs a demonstration store; this server "
                "has none configured (k must be 0).",
                param="crosstask.demonstrations.k",
                code="unsupported_value",
            )
        if options.k is not None and options.k > 0 and token_ids:
            raise bad_request(
                "Demonstrations need a text prompt; token-id prompts take k = 0.",
                param="crosstask.demonstrations.k",
                code="unsupported_value",
            )
        scope = options.scope or RetrievalScope(self.settings.demo_scope)
        if self.retriever is None or token_ids:
            return RetrievalPlan(0, "", 0.0, None)
        k = self.settings.default_k if options.k is None else options.k
        if options.min_score is not None:
            min_score = options.min_score
        elif options.k is not None:
            min_score = 0.0
        else:
            min_score = self.settings.demo_min_score
        query = self._query(request, scope)
        asked = options.k is not None or options.min_score is not None or options.scope
        if scope == RetrievalScope.TASK and not query:
            # No definition to share demonstrations across: the input decides.
            scope = RetrievalScope.INPUT
            query = self._query(request, scope) if asked else ""
        note = RetrievalNote(scope, min_score=min_score)
        if k == 0:
            note.reason = "k = 0"
        elif not query and not asked:
            # A plain chat turn names no task, so no other task's examples can show its
            # format; the gate was fitted on requests that do name one.
            note.reason = "no task definition (crosstask.task or a system message)"
        elif not query:
            note.reason = "the request has no text to search with"
        return RetrievalPlan(k, query, min_score, note)

    def _query(self, request: GenerationRequest, scope: RetrievalScope) -> str:
        """The text embedded for `scope`: the task definition alone (task; empty without
        one), or the definition and the input (input, as stored demonstrations are)."""
        definition, text = self._definition_and_input(request)
        if scope == RetrievalScope.TASK:
            return query_text(definition, "") if definition.strip() else ""
        return query_text(definition, text)

    def _check_routing(self, options: CrosstaskOptions) -> None:
        if self.routing is not None:
            return  # the routing step checks the fields against the registered adapters
        if options.routing_mode not in (None, RoutingMode.OFF):
            raise bad_request(
                f"crosstask.routing.mode {str(options.routing_mode)!r} needs the adapter library; "
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

    def _definition_and_input(self, request: GenerationRequest) -> tuple[str, str]:
        """The task definition (the `task` field, else the system message) and the input
        (the last user message, or the completion prompt)."""
        definition = request.options.task or ""
        if request.messages is not None:
            if not definition:
                definition = next(
                    (m.content for m in request.messages if m.role in ("system", "developer")),
                    "",
                )
            text = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
            return definition, text
        return definition, request.prompt if isinstance(request.prompt, str) else ""

    async def _embed(self, query: str) -> np.ndarray:
        assert self.retriever is not None
        started = time.monotonic()
        vector = await self.retriever.embed(query)
        self.metrics.embedding_latency.observe(time.monotonic() - started)
        return vector

    async def _search(self, request: GenerationRequest, vector: np.ndarray, k: int) -> list[Hit]:
        assert self.retriever is not None
        started = time.monotonic()
        hits = await self.retriever.search(vector, k, 0.0, request.options.exclude_tasks)
        self.metrics.retrieval_latency.observe(time.monotonic() - started)
        return hits

    def _assemble(
        self, request: GenerationRequest, hits: list[Hit], fusion: FusionTarget | None = None
    ) -> tuple[list[int], list[Hit]]:
        """Token ids of the prompt, and the demonstrations that fit in it (dropped
        farthest first until prompt plus max_tokens fit the context and, for a fusion
        group, the prompt fits the group's one-step prefill)."""
        if request.prompt is not None and not isinstance(request.prompt, str):
            vocab = len(self.engine.tokenizer)
            if any(t < 0 or t >= vocab for t in request.prompt):
                raise bad_request(
                    f"Prompt token ids must lie in [0, {vocab}).",
                    param="prompt",
                    code="invalid_token_id",
                )
            return list(request.prompt), []
        if request.messages is None and request.prompt is None:
            raise bad_request("Either messages or prompt is required.")
        render = self._renderer(request)
        if not hits:
            return render([]), []
        demos = [Demonstration(h.task, h.definition, h.input, h.output) for h in hits]
        budget = self.engine.max_model_len - (request.max_tokens or 1)
        if fusion is not None:
            budget = min(budget, self.engine.fusion_prompt_limit(fusion_members(fusion)))
        cache: dict[int, list[int]] = {}

        def size(kept: Sequence[Demonstration]) -> int:
            cache[len(kept)] = render(kept)
            return len(cache[len(kept)])

        kept, _ = fit(demos, size, budget)
        if kept:
            # Ask the model to stop where the next demonstration block would begin.
            request.params.stop = [*request.params.stop, *DEMONSTRATION_STOPS]
            added = len(cache[len(kept)]) - len(render([]))
            self.metrics.demonstration_prompt_tokens.observe(max(added, 0))
        return cache[len(kept)], hits[: len(kept)]

    def _renderer(
        self, request: GenerationRequest
    ) -> Callable[[Sequence[Demonstration]], list[int]]:
        definition, text = self._definition_and_input(request)
        if request.messages is None:
            prompt = str(request.prompt)

            def completion(demos: Sequence[Demonstration]) -> list[int]:
                if not demos:
                    return self.engine.encode(prompt)
                return self.engine.encode(f"{demonstration_blocks(demos)}\n\n{prompt}")

            return completion
        turns = [Turn(m.role, m.content) for m in request.messages]

        def chat(demos: Sequence[Demonstration]) -> list[int]:
            # The layout is decided in one place, shared with adapter training.
            shaped = request_prompt(turns, definition, text, demos, self.settings.prompt_format)
            if isinstance(shaped, str):
                return self.engine.encode(shaped)
            return self.engine.render_chat([{"role": t.role, "content": t.content} for t in shaped])

        return chat

    def _fit_to_context(
        self, request: GenerationRequest, prompt_ids: list[int]
    ) -> GenerationParams:
        limit = self.engine.max_model_len
        if not prompt_ids:
            raise bad_request("The prompt is empty.", param="prompt", code="empty_prompt")
        room = limit - len(prompt_ids)
        if room < 1 or (request.max_tokens is not None and request.max_tokens > room):
            wanted = request.max_tokens if request.max_tokens is not None else 1
            raise _too_long(
                request,
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {len(prompt_ids) + wanted} tokens ({len(prompt_ids)} in the "
                f"prompt, {wanted} for the completion). Please reduce the length of the "
                "messages or completion.",
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
        stream = (
            self.engine.generate_fused(
                prepared.prompt_token_ids, prepared.params, request_id, prepared.fusion
            )
            if prepared.fusion is not None
            else self.engine.generate(
                prepared.prompt_token_ids, prepared.params, request_id, lora=prepared.lora
            )
        )
        try:
            async for deltas in stream:
                if first and any(d.token_ids for d in deltas):
                    self.metrics.ttft.observe(time.monotonic() - prepared.received_at)
                    first = False
                generated += sum(len(d.token_ids) for d in deltas)
                yield deltas
            finished = True
        except LoraLoadError as exc:
            raise bad_request(
                f"The adapter could not be loaded: {exc}",
                param="crosstask.routing.adapters",
                code="invalid_adapter",
            ) from exc
        except FusionError as exc:
            raise unavailable(str(exc), code="fusion_lockstep_lost") from exc
        except EngineDeadError as exc:
            raise APIError(
                f"The engine failed while generating: {exc}",
                500,
                "server_error",
                code="engine_dead",
            ) from exc
        finally:
            await stream.aclose()
            if prepared.merge_lease is not None:
                prepared.merge_lease.release()  # the engine is done with the merge's folder
            if prepared.fusion is not None:
                self.metrics.fused_steps.inc(generated)
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
