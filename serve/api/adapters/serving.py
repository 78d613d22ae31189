"""Adapter management: list, load (checked, then loaded into vLLM) and unload."""

from __future__ import annotations

import asyncio
from pathlib import Path

from routing.registry import Adapter, AdapterError
from routing.service import RoutingService
from serve.api.adapters.protocol import AdapterCard
from serve.engine.engine import Engine
from serve.engine.types import LoraLoadError, LoraTarget
from serve.errors import APIError
from serve.metrics import Metrics


def _api_error(exc: AdapterError) -> APIError:
    return APIError(str(exc), exc.status, "invalid_request_error", "lora_path", exc.code)


class AdapterServing:
    def __init__(self, routing: RoutingService, engine: Engine, metrics: Metrics) -> None:
        self.routing = routing
        self.engine = engine
        self.metrics = metrics
        self._lock = asyncio.Lock()
        metrics.adapters_loaded.set_function(lambda: float(len(routing.registry.all())))

    def card(self, adapter: Adapter) -> AdapterCard:
        return AdapterCard(
            id=adapter.name,
            kind=adapter.kind,
            rank=adapter.rank,
            tasks=adapter.tasks,
            parent=self.routing.base_name,
            routable=adapter.meta is not None,
        )

    def list(self) -> list[AdapterCard]:
        return [self.card(a) for a in self.routing.registry.all()]

    async def load(self, name: str, path: str) -> AdapterCard:
        registry = self.routing.registry
        if name in (self.routing.base_name, self.routing.auto_name):
            raise APIError(
                f"{name!r} names the base model or `auto`",
                400,
                param="lora_name",
                code="invalid_adapter_name",
            )
        # One load at a time: two loads of one name must not both pass the existence check.
        async with self._lock:
            if registry.get(name) is not None:
                raise _api_error(
                    AdapterError(f"an adapter named {name!r} is already loaded", "adapter_exists")
                )
            try:
                adapter = await asyncio.to_thread(registry.inspect, name, Path(path))
            except AdapterError as exc:
                raise _api_error(exc) from None
            try:
                # vLLM reads the files itself now, so whatever it refuses is a 400 here
                # rather than a failed request later.
                await self.engine.add_lora(LoraTarget(adapter.name, adapter.path))
            except LoraLoadError as exc:
                raise _api_error(AdapterError(f"adapter {name!r}: {exc}")) from None
            registry.add(adapter)
        return self.card(adapter)

    async def unload(self, name: str) -> AdapterCard:
        async with self._lock:
            try:
                adapter = self.routing.registry.remove(name)
            except AdapterError as exc:
                raise APIError(str(exc), exc.status, param="lora_name", code=exc.code) from None
            await self.engine.remove_lora(name)
        return self.card(adapter)
