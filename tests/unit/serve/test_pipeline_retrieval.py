"""How the request path picks demonstrations: the scope (by the task definition, shared by
a task's requests, or by each input), the one default gate for requests that ask for
nothing, and a request's own `k` and `min_score` used as given."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence

import numpy as np

from retrieval.retriever import EmbeddingCache
from retrieval.scope import RetrievalScope
from retrieval.store_types import Hit
from routing.modes import RoutingMode
from serve.engine.types import GenerationParams
from serve.metrics import Metrics
from serve.pipeline import CrosstaskOptions, GenerationRequest, Message, Pipeline
from serve.settings import Settings
from tests.unit.fake_engine import FakeEngine, fake_config

DEFINITION = "Answer the science question in one word."


def _vector(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    v = np.random.default_rng(seed).standard_normal(8).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeRetriever:
    """Searches answer by the query text: each text has its own demonstrations, whose
    scores are set per test."""

    def __init__(self, scores: Sequence[float]) -> None:
        self.scores = list(scores)
        self.cache = EmbeddingCache()
        self.embedded: list[str] = []
        self._by_vector: dict[bytes, str] = {}

    async def embed(self, text: str) -> np.ndarray:
        self.embedded.append(text)
        vector = _vector(text)
        self._by_vector[vector.tobytes()] = text
        return vector

    async def search(
        self, vector: np.ndarray, k: int, min_score: float, exclude_tasks: Sequence[str]
    ) -> list[Hit]:
        text = self._by_vector[vector.tobytes()]
        tag = hashlib.sha256(text.encode()).hexdigest()[:6]
        hits = [
            Hit(f"d{i}", f"task{i}", f"define {tag} {i}", f"in {tag} {i}", f"out {i}", s, "t")
            for i, s in enumerate(self.scores)
        ]
        return [h for h in hits if h.score >= min_score][:k]


def _pipeline(scores: Sequence[float], **settings: object) -> tuple[Pipeline, FakeRetriever]:
    retriever = FakeRetriever(scores)
    engine = FakeEngine(fake_config(), max_model_len=4096)
    defaults: dict[str, object] = {"default_k": 4, "demo_min_score": 0.5}
    pipeline = Pipeline(
        Settings(**(defaults | settings)),  # type: ignore[arg-type]
        engine,  # type: ignore[arg-type]
        Metrics(),
        retriever,  # type: ignore[arg-type]
    )
    return pipeline, retriever


def _request(text: str, system: str | None = DEFINITION, **options: object) -> GenerationRequest:
    messages = [Message("system", system)] if system else []
    return GenerationRequest(
        model="fake-model",
        params=GenerationParams(max_tokens=2, temperature=0.0),
        max_tokens=2,
        messages=[*messages, Message("user", text)],
        options=CrosstaskOptions(**options),  # type: ignore[arg-type]
    )


def _prepare(pipeline: Pipeline, request: GenerationRequest):  # type: ignore[no-untyped-def]
    return asyncio.run(pipeline.prepare(request))


def test_the_default_gate_keeps_only_near_demonstrations() -> None:
    pipeline, _ = _pipeline([0.8, 0.6, 0.4, 0.2])
    prepared = _prepare(pipeline, _request("What do plants need?"))
    annotation = prepared.annotation
    assert [d.score for d in annotation.demonstrations] == [0.8, 0.6]
    assert annotation.retrieval is not None
    assert annotation.retrieval.considered == 4
    assert annotation.retrieval.min_score == 0.5
    assert annotation.retrieval.reason == ""


def test_a_far_request_gets_none_and_is_told_why() -> None:
    pipeline, _ = _pipeline([0.33, 0.3, 0.28, 0.2])
    far = _prepare(pipeline, _request("What is the capital of France?", system=None))
    bare = _prepare(pipeline, _request("What is the capital of France?", system=None, k=0))
    assert far.annotation.demonstrations == []
    assert far.prompt_token_ids == bare.prompt_token_ids
    note = far.annotation.retrieval
    assert note is not None and note.considered == 0
    assert note.reason == "no task definition (crosstask.task or a system message)"
    # With a definition, the gate decides.
    gated = _prepare(pipeline, _request("What is the capital of France?"))
    assert gated.annotation.demonstrations == []
    assert gated.annotation.retrieval is not None
    assert gated.annotation.retrieval.considered == 4
    assert gated.annotation.retrieval.reason == "nearest scores 0.330, below min_score 0.500"
    assert bare.annotation.retrieval is not None and bare.annotation.retrieval.reason == "k = 0"


def test_a_requests_own_k_and_min_score_are_used_as_given() -> None:
    pipeline, _ = _pipeline([0.8, 0.6, 0.4, 0.2])
    asked = _prepare(pipeline, _request("What do plants need?", k=3))
    assert [d.score for d in asked.annotation.demonstrations] == [0.8, 0.6, 0.4]
    gated = _prepare(pipeline, _request("What do plants need?", k=4, min_score=0.3))
    assert [d.score for d in gated.annotation.demonstrations] == [0.8, 0.6, 0.4]
    lower = _prepare(pipeline, _request("What do plants need?", min_score=0.1))
    assert len(lower.annotation.demonstrations) == 4  # the server's k, the request's gate


def test_the_gate_holds_in_every_routing_mode() -> None:
    # Without adapters only `off` can be served; the gate does not ask which mode it is.
    pipeline, _ = _pipeline([0.8, 0.2], demo_min_score=0.9)
    prepared = _prepare(pipeline, _request("x", routing_mode=RoutingMode.OFF))
    assert prepared.annotation.demonstrations == []


def test_task_scope_gives_a_tasks_requests_one_prompt_prefix() -> None:
    pipeline, retriever = _pipeline([0.9, 0.8, 0.7])
    first = _prepare(pipeline, _request("What do plants need?"))
    second = _prepare(pipeline, _request("Why is the sky blue?"))
    assert retriever.embedded == [DEFINITION, DEFINITION]  # the definition alone
    assert first.annotation.retrieval is not None
    assert first.annotation.retrieval.scope == RetrievalScope.TASK
    assert [d.id for d in first.annotation.demonstrations] == [
        d.id for d in second.annotation.demonstrations
    ]
    a, b = first.prompt_token_ids, second.prompt_token_ids
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    # Everything but the input is shared: the demonstrations and the definition.
    assert shared >= len(a) - len(["What", "do", "plants", "need?"]) - 1


def test_input_scope_searches_by_definition_and_input() -> None:
    pipeline, retriever = _pipeline([0.9, 0.8])
    prepared = _prepare(pipeline, _request("What do plants need?", scope=RetrievalScope.INPUT))
    assert retriever.embedded == [f"{DEFINITION}\nWhat do plants need?"]
    assert prepared.annotation.retrieval is not None
    assert prepared.annotation.retrieval.scope == RetrievalScope.INPUT


def test_task_scope_without_a_definition_searches_by_the_input_when_asked() -> None:
    pipeline, retriever = _pipeline([0.9, 0.8])
    prepared = _prepare(pipeline, _request("What do plants need?", system=None, min_score=0.5))
    assert retriever.embedded == ["What do plants need?"]
    assert prepared.annotation.retrieval is not None
    assert prepared.annotation.retrieval.scope == RetrievalScope.INPUT


def test_prompt_tokens_added_are_counted() -> None:
    pipeline, _ = _pipeline([0.9, 0.8])
    prepared = _prepare(pipeline, _request("What do plants need?"))
    bare = _prepare(pipeline, _request("What do plants need?", k=0))
    added = len(prepared.prompt_token_ids) - len(bare.prompt_token_ids)
    histogram = pipeline.metrics.demonstration_prompt_tokens
    assert added > 0
    assert (
        pipeline.metrics.registry.get_sample_value("crosstask_demonstration_prompt_tokens_sum")
        == added
    ), histogram
