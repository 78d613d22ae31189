from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from serve.api.demonstrations.protocol import (
    AddDemonstrationsRequest,
    AddDemonstrationsResponse,
    SearchRequest,
    SearchResponse,
)
from serve.api.demonstrations.serving import DemonstrationServing
from serve.api.deps import get_state, require_admin, require_api_key, require_ready
from serve.api.protocol import ERROR_RESPONSES
from serve.errors import not_found

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["demonstrations"])


async def get_demonstrations(request: Request) -> DemonstrationServing:
    state = get_state(request)
    require_ready(state)
    serving = state.demonstrations
    if serving is None:
        raise not_found(
            "This server has no demonstration store (start it with --store DIR, or let "
            "`crosstask prepare` build the default one).",
            code="store_not_configured",
        )
    return serving


Serving = Annotated[DemonstrationServing, Depends(get_demonstrations)]


@router.post(
    "/v1/demonstrations",
    response_model=AddDemonstrationsResponse,
    responses=ERROR_RESPONSES,
    dependencies=[Depends(require_admin)],
)
async def add_demonstrations(
    body: AddDemonstrationsRequest, serving: Serving
) -> AddDemonstrationsResponse:
    """Add demonstrations of one task; answered only once they are durable."""
    return await serving.add(body)


@router.post("/v1/demonstrations/search", response_model=SearchResponse, responses=ERROR_RESPONSES)
async def search_demonstrations(body: SearchRequest, serving: Serving) -> SearchResponse:
    return await serving.search(body)
