"""The app's one piece of mutable state: what the server has started and how it is doing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from retrieval.retriever import Retriever
from serve.api.chat_completion.serving import ChatServing
from serve.api.completion.serving import CompletionServing
from serve.api.demonstrations.serving import DemonstrationServing
from serve.engine import Engine, EngineConfig
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
    # Called with an exit code when the server can no longer serve (engine failed to start
    # or died), so that the process exits and its supervisor restarts it.
    on_fatal: Callable[[int], None] = lambda code: None

    def attach(self, engine: Engine, retriever: Retriever | None) -> None:
        self.engine = engine
        self.retriever = retriever
        if retriever is not None:
            self.demonstrations = DemonstrationServing(retriever, self.metrics)
        self.pipeline = Pipeline(self.settings, engine, self.metrics, retriever)
        self.chat = ChatServing(self.pipeline)
        self.completion = CompletionServing(self.pipeline)
        self.metrics.track_engine_load(engine.load)
        self.status = Status.READY
        self.metrics.engine_ready.set(1)

    def fail(self, reason: str) -> None:
        self.status = Status.FAILED
        self.failure = reason
        self.metrics.engine_ready.set(0)
