"""Adding demonstrations (embedded, then durably stored) and searching them."""

from __future__ import annotations

import asyncio

from retrieval.query import query_text
from retrieval.retriever import Retriever
from retrieval.store_types import NewDemo, StoreError, ValidationError
from serve.api.demonstrations.protocol import (
    AddDemonstrationsRequest,
    AddDemonstrationsResponse,
    SearchHit,
    SearchRequest,
    SearchResponse,
)
from serve.errors import APIError, bad_request
from serve.metrics import Metrics


def store_read_only() -> APIError:
    return APIError(
        "This server is a read-only replica of the demonstration store "
        "(CROSSTASK_STORE_READONLY=true). Send writes to the store's writer, the server "
        "without that setting (on Kubernetes: Service crosstask-store-writer); replicas "
        "pick them up with its next published snapshot.",
        403,
        "invalid_request_error",
        None,
        "store_read_only",
    )


class DemonstrationServing:
    def __init__(self, retriever: Retriever, metrics: Metrics) -> None:
        self.retriever = retriever
        self.metrics = metrics
        metrics.store_size.set_function(lambda: float(retriever.store.count()))

    async def add(self, request: AddDemonstrationsRequest) -> AddDemonstrationsResponse:
        if self.retriever.store.read_only:
            # Refused before the embedding: this replica could never store the result.
            raise store_read_only()
        records = [
            NewDemo(
                task=request.task,
                input=e.input,
                output=e.output,
                definition=request.definition,
                source="api",
            )
            for e in request.examples
        ]
        texts = [query_text(request.definition, e.input) for e in request.examples]
        vectors = await self.retriever.encode(texts)
        try:
            # Returns only once the whole batch is committed to disk (or nothing is).
            ids = await asyncio.to_thread(self.retriever.store.add, records, vectors)
        except ValidationError as exc:
            raise bad_request(str(exc), param="examples") from exc
        except StoreError as exc:
            raise APIError(
                str(exc), 409, "invalid_request_error", None, "store_unavailable"
            ) from exc
        return AddDemonstrationsResponse(
            task=request.task, ids=ids, store_size=self.retriever.store.count()
        )

    async def search(self, request: SearchRequest) -> SearchResponse:
        vector = await self.retriever.embed(query_text("", request.query))
        try:
            hits = await self.retriever.search(
                vector, request.k, request.min_score, request.exclude_tasks
            )
        except ValidationError as exc:
            raise bad_request(str(exc)) from exc
        return SearchResponse(
            data=[
                SearchHit(
                    id=h.id,
                    task=h.task,
                    score=h.score,
                    definition=h.definition,
                    input=h.input,
                    output=h.output,
                )
                for h in hits
            ]
        )
