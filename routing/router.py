"""The router: from a request's query embedding to off, one adapter, or a weighted merge.

Arrow- and LoraHub-style routing without gradient steps: every adapter carries a prototype
(centroids of its embedded training queries, see routing/adapter_meta.py); a request is
compared with each by cosine similarity (its best centroid), using the very embedding the
retrieval step made. Then:

- adapters trained on any of `exclude_tasks` are out (those tasks count as unseen);
- specialists: the nearest one alone when it is close (>= `single_min`) and clearly ahead
  of the runner-up (by >= `single_margin`); otherwise a merge of the top `top_k` that are
  close enough (>= `merge_min`), weighted by a softmax of similarity / `temperature`;
- nothing close enough: the generalist (trained on every seen task) when one is allowed
  and `fallback` is "generalist", else the base model alone.

Thresholds are settings (`CROSSTASK_ROUTER_*`), calibrated on the dev tasks only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from routing.adapter_meta import AdapterMeta
from routing.modes import RoutingMode

FALLBACKS = ("generalist", "off")
COMBINES = ("merge", "fuse")


@dataclass(frozen=True)
class RouterConfig:
    # The calibrated defaults (serve/settings.py says why).
    single_min: float = 0.6
    single_margin: float = 0.05
    merge_min: float = 1.0
    top_k: int = 2
    temperature: float = 0.05
    # Merge weights are rounded to this grid: every distinct weight vector is a merge to
    # build and a LoRA slot to load, so nearby requests should share one.
    weight_step: float = 0.1
    fallback: str = "generalist"
    # How several close specialists are combined: "merge" (one merged LoRA) or "fuse"
    # (their logits fused at every step, routing/fusion).
    combine: str = "merge"

    def __post_init__(self) -> None:
        if self.combine not in COMBINES:
            raise ValueError(f"router combine must be one of {COMBINES}, not {self.combine!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"router fallback must be one of {FALLBACKS}, not {self.fallback!r}")
        if self.temperature <= 0 or self.top_k < 1:
            raise ValueError("router temperature must be > 0 and top_k >= 1")


@dataclass(frozen=True)
class Scored:
    name: str
    similarity: float


@dataclass
class Route:
    """What the router chose: mode "off", "adapter", "merge" or "fuse", with normalized
    weights."""

    mode: RoutingMode
    adapters: list[tuple[str, float]] = field(default_factory=list)
    scores: list[Scored] = field(default_factory=list)
    reason: str = ""


def similarity(query: np.ndarray, meta: AdapterMeta) -> float:
    """Cosine similarity of a unit-length query with the adapter's nearest centroid."""
    centroids = np.asarray(meta.prototype.centroids, dtype=np.float32)
    if centroids.shape[1] != query.shape[-1]:
        raise ValueError(
            f"adapter {meta.name}: prototype dimension {centroids.shape[1]} does not match "
            f"the embedder's {query.shape[-1]}"
        )
    return float(np.max(centroids @ query.astype(np.float32)))


def softmax_weights(
    similarities: Sequence[float], temperature: float, step: float = 0.0
) -> list[float]:
    """Softmax of similarity / temperature; with `step`, rounded to multiples of it
    (summing to 1, zeros possible)."""
    top = max(similarities)
    exps = [math.exp((s - top) / temperature) for s in similarities]
    total = sum(exps)
    weights = [e / total for e in exps]
    if step <= 0:
        return weights
    units = round(1 / step)
    counts = [math.floor(w * units) for w in weights]
    # Largest remainders get the units that flooring lost, so the grid weights sum to 1.
    by_remainder = sorted(
        range(len(weights)), key=lambda i: weights[i] * units - counts[i], reverse=True
    )
    for i in by_remainder[: units - sum(counts)]:
        counts[i] += 1
    return [c / units for c in counts]


def route(
    query: np.ndarray,
    adapters: Sequence[AdapterMeta],
    exclude_tasks: Sequence[str] = (),
    config: RouterConfig | None = None,
    top_k: int | None = None,
) -> Route:
    excluded = set(exclude_tasks)
    allowed = [a for a in adapters if not excluded.intersection(a.tasks)]
    generalists = [a for a in allowed if a.kind == "generalist"]
    scores = sorted(
        (Scored(a.name, similarity(query, a)) for a in allowed if a.kind == "specialist"),
        key=lambda s: s.similarity,
        reverse=True,
    )
    general = max(generalists, key=lambda a: similarity(query, a)).name if generalists else None
    return decide(scores, general, config, top_k)


def decide(
    scores: Sequence[Scored],
    generalist: str | None,
    config: RouterConfig | None = None,
    top_k: int | None = None,
) -> Route:
    """The decision from the allowed specialists' similarities (best first) and the
    allowed generalist's name (None: none allowed). Separate from `route` so that the
    thresholds can be calibrated on recorded similarities (bench/calibrate_router.py)."""
    config = config or RouterConfig()
    scores = list(scores)
    k = top_k or config.top_k
    if scores:
        best = scores[0]
        runner_up = scores[1].similarity if len(scores) > 1 else -1.0
        if best.similarity >= config.single_min and best.similarity - runner_up >= (
            config.single_margin
        ):
            return Route(
                RoutingMode.ADAPTER, [(best.name, 1.0)], scores, "one specialist clearly nearest"
            )
        close = [s for s in scores[:k] if s.similarity >= config.merge_min]
        if len(close) >= 2:
            weights = softmax_weights(
                [s.similarity for s in close], config.temperature, config.weight_step
            )
            chosen = [(s.name, w) for s, w in zip(close, weights, strict=True) if w > 0]
            if len(chosen) >= 2:
                return Route(
                    RoutingMode(config.combine), chosen, scores, "several specialists close"
                )
            close = close[:1]
        if len(close) == 1:
            return Route(
                RoutingMode.ADAPTER, [(close[0].name, 1.0)], scores, "one specialist close"
            )
    if config.fallback == "generalist" and generalist is not None:
        return Route(
            RoutingMode.ADAPTER, [(generalist, 1.0)], scores, "no specialist close: generalist"
        )
    return Route(RoutingMode.OFF, [], scores, "no adapter close enough")
