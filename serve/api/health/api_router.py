from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serve.api.deps import get_state
from serve.api.state import Status

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health(request: Request) -> Response:
    """200 once the engine serves; 503 while it starts, drains or after it failed."""
    state = get_state(request)
    ready = state.status is Status.READY and state.engine is not None and not state.engine.errored
    body = f'{{"status": "{state.status.value}"}}'
    return Response(content=body, status_code=200 if ready else 503, media_type="application/json")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = get_state(request)
    return Response(content=generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
