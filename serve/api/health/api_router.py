from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serve.api.deps import get_state
from serve.api.state import ServerState, Status

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health(state: Annotated[ServerState, Depends(get_state)]) -> Response:
    """200 once the engine serves; 503 while it starts, drains or after it failed."""
    ready = state.status is Status.READY and state.engine is not None and not state.engine.errored
    body = f'{{"status": "{state.status.value}"}}'
    return Response(content=body, status_code=200 if ready else 503, media_type="application/json")


@router.get("/metrics")
async def metrics(state: Annotated[ServerState, Depends(get_state)]) -> Response:
    return Response(content=generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
