from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from serve.api.adapters.protocol import (
    AdapterCard,
    AdapterList,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
)
from serve.api.adapters.serving import AdapterServing
from serve.api.deps import get_state, require_admin, require_api_key, require_ready
from serve.api.protocol import ERROR_RESPONSES
from serve.errors import not_found

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["adapters"])


async def get_adapters(request: Request) -> AdapterServing:
    state = get_state(request)
    require_ready(state)
    if state.adapters is None:
        raise not_found(
            "This server has no adapter library (start it with --adapters DIR).",
            code="adapters_not_configured",
        )
    return state.adapters


Serving = Annotated[AdapterServing, Depends(get_adapters)]


@router.get("/v1/adapters", response_model=AdapterList, responses=ERROR_RESPONSES)
async def list_adapters(serving: Serving) -> AdapterList:
    return AdapterList(data=serving.list())


@router.post(
    "/v1/load_lora_adapter",
    response_model=AdapterCard,
    responses=ERROR_RESPONSES,
    dependencies=[Depends(require_admin)],
)
async def load_lora_adapter(body: LoadLoraAdapterRequest, serving: Serving) -> AdapterCard:
    return await serving.load(body.lora_name, body.lora_path)


@router.post(
    "/v1/unload_lora_adapter",
    response_model=AdapterCard,
    responses=ERROR_RESPONSES,
    dependencies=[Depends(require_admin)],
)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, serving: Serving) -> AdapterCard:
    return await serving.unload(body.lora_name)
