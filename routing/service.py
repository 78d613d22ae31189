"""The routing step of the request path: from the request's model and `crosstask.routing`
(and its query embedding, for `auto`) to what the engine serves: the base model, one
adapter, or a cached weighted merge of several.

    model                         routing.mode        served
    base name (or unset mode)     off / absent        base model
    base name or "auto"           adapter [name]      that adapter
    base name or "auto"           merge [names, w]    the merge (weights default to equal)
    base name or "auto"           fuse [names, w]     the base and those adapters, their
                                                      logits fused at every step (weights
                                                      default to equal; alpha "dynamic")
    base name or "auto"           fuse (no names)     the same, with the router's top_k
                                                      specialists and its weights
    "auto"                        absent / auto       the router decides (routing/router.py)
    an adapter's name             absent / adapter    that adapter
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from routing.adapter_meta import packaged_library_dir
from routing.fusion.spec import MAX_ABS_ALPHA
from routing.fusion.spec import MAX_ADAPTERS as MAX_FUSED_ADAPTERS
from routing.merge import MergeCache, MergeError, MergeLease, Source
from routing.modes import RoutingMode
from routing.registry import Adapter, AdapterRegistry
from routing.router import RouterConfig, route, softmax_weights

log = logging.getLogger(__name__)


class RoutingError(ValueError):
    """A routing request that cannot be served: the message and the request field."""

    def __init__(self, message: str, param: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class Plan:
    """What to serve: mode and weights for the annotation, the LoRA (name, folder) for the
    engine (None: the base model), and what the merge cache did."""

    mode: RoutingMode
    adapters: list[tuple[str, float]] = field(default_factory=list)
    lora: tuple[str, Path] | None = None
    merge_hit: bool | None = None
    merge_seconds: float = 0.0
    # The merge's folder is kept for this request until it releases this (routing/merge.py).
    merge_lease: MergeLease | None = None
    # The router's view, for `auto` only: each candidate specialist's similarity to the
    # request (best first) and why it chose what it chose.
    scores: list[tuple[str, float]] = field(default_factory=list)
    reason: str = ""
    # For "fuse": the member adapters (name, folder) in order, their fixed weights (None:
    # dynamic per step) and the prior weights that dynamic fusion starts from.
    fusion: list[tuple[str, Path]] = field(default_factory=list)
    alphas: list[float] | None = None
    prior: list[float] = field(default_factory=list)


@dataclass
class RoutingRequest:
    model: str
    mode: RoutingMode | None
    adapters: list[str] | None
    weights: list[float] | None
    top_k: int | None
    exclude_tasks: Sequence[str]
    alpha: str | None = None


class RoutingService:
    def __init__(
        self,
        registry: AdapterRegistry,
        merges: MergeCache,
        config: RouterConfig,
        base_name: str,
        auto_name: str = "auto",
    ) -> None:
        self.registry = registry
        self.merges = merges
        self.config = config
        self.base_name = base_name
        self.auto_name = auto_name

    def resolve_mode(self, request: RoutingRequest) -> RoutingMode:
        """The mode this request asks for (before the router runs)."""
        if request.mode is not None:
            return request.mode
        if request.model == self.auto_name:
            return RoutingMode.AUTO
        if request.model == self.base_name:
            return RoutingMode.OFF
        return RoutingMode.ADAPTER  # the model names an adapter

    def needs_query(self, request: RoutingRequest) -> bool:
        mode = self.resolve_mode(request)
        return mode == RoutingMode.AUTO or (mode == RoutingMode.FUSE and not request.adapters)

    async def plan(self, request: RoutingRequest, query: np.ndarray | None) -> Plan:
        mode = self.resolve_mode(request)
        names = list(request.adapters or [])
        model_adapter = self.registry.get(request.model)
        if (
            model_adapter is not None
            and not names
            and mode in (RoutingMode.ADAPTER, RoutingMode.MERGE, RoutingMode.FUSE)
        ):
            names = [request.model]
        elif model_adapter is not None and mode in (RoutingMode.OFF, RoutingMode.AUTO):
            raise RoutingError(
                f"model {request.model!r} is an adapter; routing.mode {str(mode)!r} contradicts it",
                "crosstask.routing.mode",
            )
        if mode == RoutingMode.OFF:
            if names:
                raise RoutingError(
                    "routing.mode 'off' serves the base model; drop routing.adapters",
                    "crosstask.routing.adapters",
                )
            return Plan(RoutingMode.OFF)
        if mode == RoutingMode.FUSE:
            return self._fuse(request, names, query)
        if request.alpha is not None:
            raise RoutingError(
                "routing.alpha applies to routing.mode 'fuse' only", "crosstask.routing.alpha"
            )
        if mode == RoutingMode.AUTO:
            if names:
                return await self._merge_or_single(names, request.weights)
            if query is None:
                # No text to embed (token-id prompt, empty input): nothing to route on.
                return Plan(RoutingMode.OFF)
            decision = route(
                query, self.registry.routable(), request.exclude_tasks, self.config, request.top_k
            )
            names = [n for n, _ in decision.adapters]
            weights = [w for _, w in decision.adapters]
            if decision.mode == RoutingMode.OFF:
                plan = Plan(RoutingMode.OFF)
            elif decision.mode == RoutingMode.FUSE:
                fuse_request = dataclasses.replace(request, weights=weights, alpha=None)
                plan = self._fuse(fuse_request, names, query)
            else:
                plan = await self._merge_or_single(names, weights)
            plan.scores = [(s.name, round(s.similarity, 4)) for s in decision.scores]
            plan.reason = decision.reason
            return plan
        if mode == RoutingMode.ADAPTER:
            if len(names) != 1:
                raise RoutingError(
                    "routing.mode 'adapter' takes exactly one adapter (routing.adapters or model)",
                    "crosstask.routing.adapters",
                )
            if request.weights is not None and len(request.weights) != 1:
                raise RoutingError("one adapter takes one weight", "crosstask.routing.weights")
            adapter = self._get(names[0])
            return Plan(RoutingMode.ADAPTER, [(adapter.name, 1.0)], (adapter.name, adapter.path))
        if mode == RoutingMode.MERGE:
            if not names:
                raise RoutingError(
                    "routing.mode 'merge' needs routing.adapters", "crosstask.routing.adapters"
                )
            return await self._merge_or_single(names, request.weights, force_merge=True)
        raise RoutingError(f"unknown routing.mode {str(mode)!r}", "crosstask.routing.mode")

    def _fuse(self, request: RoutingRequest, names: list[str], query: np.ndarray | None) -> Plan:
        weights = request.weights
        scores: list[tuple[str, float]] = []
        reason = ""
        if not names:
            if query is None:
                raise RoutingError(
                    "routing.mode 'fuse' without routing.adapters fuses the router's nearest "
                    "specialists, which needs a text query; name the adapters",
                    "crosstask.routing.adapters",
                )
            decision = route(
                query, self.registry.routable(), request.exclude_tasks, self.config, None
            )
            k = request.top_k or self.config.top_k
            nearest = decision.scores[:k]
            if not nearest:
                raise RoutingError(
                    "no specialist is allowed for this request to fuse; name the adapters",
                    "crosstask.routing.adapters",
                )
            names = [s.name for s in nearest]
            if weights is None:
                weights = softmax_weights(
                    [s.similarity for s in nearest], self.config.temperature, 0.0
                )
            scores = [(s.name, round(s.similarity, 4)) for s in decision.scores]
            reason = f"the {len(names)} nearest specialists"
        if len(names) > MAX_FUSED_ADAPTERS:
            raise RoutingError(
                f"routing.mode 'fuse' takes at most {MAX_FUSED_ADAPTERS} adapters",
                "crosstask.routing.adapters",
            )
        adapters = [self._get(n) for n in names]  # one adapter twice is allowed
        if weights is not None and len(weights) != len(adapters):
            raise RoutingError(
                "routing.weights needs one weight per adapter", "crosstask.routing.weights"
            )
        dynamic = request.alpha == "dynamic"
        if weights is not None and any(abs(w) > MAX_ABS_ALPHA for w in weights):
            raise RoutingError(
                f"fusion weights must lie in [-{MAX_ABS_ALPHA}, {MAX_ABS_ALPHA}]",
                "crosstask.routing.weights",
            )
        if dynamic and weights is not None and (min(weights) < 0 or sum(weights) <= 0):
            raise RoutingError(
                "with alpha 'dynamic', routing.weights are prior weights: non-negative with "
                "a positive sum",
                "crosstask.routing.weights",
            )
        equal = [1.0 / len(adapters)] * len(adapters)
        alphas = None if dynamic else list(weights if weights is not None else equal)
        prior = list(weights if weights is not None and dynamic else equal)
        shown = alphas if alphas is not None else [w / sum(prior) for w in prior]
        return Plan(
            RoutingMode.FUSE,
            [(a.name, round(w, 6)) for a, w in zip(adapters, shown, strict=True)],
            scores=scores,
            reason=(reason + "; " if reason else "")
            + ("dynamic weights per step (prior shown)" if dynamic else "fixed weights"),
            fusion=[(a.name, a.path) for a in adapters],
            alphas=alphas,
            prior=prior,
        )

    def _get(self, name: str) -> Adapter:
        adapter = self.registry.get(name)
        if adapter is None:
            known = ", ".join(a.name for a in self.registry.all()) or "none"
            raise RoutingError(
                f"no adapter named {name!r} (loaded: {known}; see GET /v1/adapters)",
                "crosstask.routing.adapters",
                "adapter_not_found",
            )
        return adapter

    async def _merge_or_single(
        self, names: list[str], weights: list[float] | None, force_merge: bool = False
    ) -> Plan:
        if len(set(names)) != len(names):
            raise RoutingError(
                "routing.adapters names an adapter twice", "crosstask.routing.adapters"
            )
        adapters = [self._get(n) for n in names]
        raw = weights if weights is not None else [1.0] * len(adapters)
        if len(raw) != len(adapters):
            raise RoutingError(
                "routing.weights needs one weight per adapter", "crosstask.routing.weights"
            )
        if len(adapters) == 1 and not force_merge:
            a = adapters[0]
            return Plan(RoutingMode.ADAPTER, [(a.name, 1.0)], (a.name, a.path))
        try:
            result = await self.merges.get(
                [Source(a.name, a.path, a.fingerprint) for a in adapters], raw, pin=True
            )
        except MergeError as exc:
            raise RoutingError(str(exc), "crosstask.routing.weights") from None
        total = sum(raw)
        return Plan(
            RoutingMode.MERGE,
            [(a.name, w / total) for a, w in zip(adapters, raw, strict=True)],
            (result.name, result.path),
            merge_hit=result.hit,
            merge_seconds=result.build_seconds,
            merge_lease=result.lease,
        )


def default_library() -> Path | None:
    """The adapter library shipped with crosstask (routing/library), if installed."""
    folder = packaged_library_dir()
    return folder if folder.is_dir() and any(p.is_dir() for p in folder.iterdir()) else None


def build_routing(
    adapters_root: Path,
    model_dir: Path,
    base_name: str,
    merges_dir: Path,
    config: RouterConfig,
    max_rank: int,
    merge_cache_size: int,
    embedder: str | None,
    on_evict: Callable[[str], Awaitable[object]] | None = None,
) -> RoutingService:
    """Scan the adapters root into a registry and put the router and merge cache on it."""
    registry = AdapterRegistry(adapters_root, model_dir, max_rank, embedder)
    problems = registry.scan()
    log.info(
        "Adapters: %d from %s (%s)%s",
        len(registry.all()),
        adapters_root,
        ", ".join(f"{a.name}:{a.kind}:r{a.rank}" for a in registry.all()) or "none",
        f"; {len(problems)} refused" if problems else "",
    )
    merges = MergeCache(merges_dir, merge_cache_size, max_rank, on_evict)
    return RoutingService(registry, merges, config, base_name)
