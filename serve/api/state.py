"""The app's one piece of mutable state: what the server has started and how it is doing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from retrieval.retriever import Retriever
from routing.service import RoutingService
from serve.api.adapters.serving import AdapterServing
from serve.api.admission import RequestGate, engine_slots
from serve.api.chat_completion.serving import ChatServing
from serve.api.completion.serving import CompletionServing
from serve.api.demonstrations.serving import DemonstrationServing
from serve.engine.engine import Engine
from serve.engine.types import EngineConfig
from serve.metrics import Metrics
from serve.pipeline import Pipeline
from serve.settings import Settings


class Status(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class ServerState:
    settings: Settings
    engine_config: EngineConfig
    metrics: Metrics = field(default_factory=Metrics)
    status: Status = Status.STARTING
    failure: str | None = None
    engine: Engine | None = None
    pipeline: Pipeline | None = None
    chat: ChatServing | None = None
    completion: CompletionServing | None = None
    retriever: Retriever | None = None
    demonstrations: DemonstrationServing | None = None
    adapters: AdapterServing | None = None
    # Called with an exit code when the server can no longer serve (engine failed to start
    # or died), so that the process exits and its supervisor restarts it.
    on_fatal: Callable[[int], None] = lambda code: None
    gate: RequestGate = field(init=False)

    def __post_init__(self) -> None:
        self.gate = RequestGate(
            self.metrics.registry,
            engine_slots=lambda: engine_slots(self.engine, self.settings),
            max_waiting=self.settings.max_waiting,
        )

    @property
    def ready(self) -> bool:
        return self.status is Status.READY

    @property
    def draining(self) -> bool:
        return self.status is Status.DRAINING

    def begin_drain(self) -> None:
        """Stop taking requests: /health and new /v1 requests answer 503 from now on,
        while those in flight go on."""
        if self.status in (Status.READY, Status.STARTING):
            self.status = Status.DRAINING
            self.metrics.engine_ready.set(0)

    def attach(
        self, engine: Engine, retriever: Retriever | None, routing: RoutingService | None = None
    ) -> None:
        self.engine = engine
        self.retriever = retriever
        if retriever is not None:
            self.demonstrations = DemonstrationServing(retriever, self.metrics)
        if routing is not None:
            self.adapters = AdapterServing(routing, engine, self.metrics)
        self.pipeline = Pipeline(self.settings, engine, self.metrics, retriever, routing)
        self.chat = ChatServing(self.pipeline)
        self.completion = CompletionServing(self.pipeline)
        self.metrics.track_engine_load(
            engine.queue_lengths, lambda: engine.preemptions, lambda: engine.prefix_cache
        )
        if retriever is not None:
            cache = retriever.cache
            self.metrics.track_embedding_cache(lambda: (cache.hits, cache.misses))
        # A drain that began while the engine was starting stays a drain.
        if self.status is Status.STARTING:
            self.status = Status.READY
            self.metrics.engine_ready.set(1)

    def fail(self, reason: str) -> None:
        self.status = Status.FAILED
        self.failure = reason
        self.metrics.engine_ready.set(0)
