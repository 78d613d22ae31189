from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from serve.api.deps import get_pipeline, require_api_key
from serve.api.models.protocol import ModelCard, ModelList
from serve.api.protocol import ERROR_RESPONSES
from serve.errors import not_found
from serve.pipeline import AUTO_MODEL, Pipeline

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["openai"])


def _cards(pipeline: Pipeline) -> list[ModelCard]:
    config = pipeline.engine.config
    created = int(pipeline.started_at)
    base = ModelCard(
        id=config.served_name,
        created=created,
        root=str(config.model_dir),
        max_model_len=pipeline.engine.max_model_len,
    )
    # `auto` is virtual: the router picks what serves each request, on this base model.
    auto = ModelCard(
        id=AUTO_MODEL,
        created=created,
        root=str(config.model_dir),
        parent=config.served_name,
        max_model_len=pipeline.engine.max_model_len,
    )
    adapters = [
        ModelCard(
            id=adapter.name,
            created=created,
            root=str(adapter.path),
            parent=config.served_name,
            max_model_len=pipeline.engine.max_model_len,
        )
        for adapter in (pipeline.routing.registry.all() if pipeline.routing else [])
    ]
    return [base, auto, *adapters]


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(pipeline: Annotated[Pipeline, Depends(get_pipeline)]) -> ModelList:
    return ModelList(data=_cards(pipeline))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(
    model_id: str, pipeline: Annotated[Pipeline, Depends(get_pipeline)]
) -> ModelCard:
    for card in _cards(pipeline):
        if card.id == model_id:
            return card
    raise not_found(f"The model `{model_id}` does not exist.", "model", "model_not_found")
