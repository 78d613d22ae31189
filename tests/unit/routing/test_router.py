"""The router's decisions on crafted prototypes: off, one adapter, a merge, exclusions."""

from __future__ import annotations

import numpy as np
import pytest

from routing.adapter_meta import AdapterMeta, Prototype
from routing.router import RouterConfig, route, softmax_weights

DIM = 8
BASE = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 10}


def unit(*values: float) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


def adapter(
    name: str, direction: np.ndarray, tasks: list[str], kind: str = "specialist"
) -> AdapterMeta:
    return AdapterMeta(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        tasks=tasks,
        rank=4,
        base_model=BASE,
        prototype=Prototype("test-embedder", 1, [direction.tolist()], [10]),
    )


A = adapter("a", unit(1, 0, 0), ["task_a"])
B = adapter("b", unit(0, 1, 0), ["task_b"])
C = adapter("c", unit(0.9, 0.45, 0), ["task_c"])
G = adapter(
    "general", unit(0.3, 0.3, 0.3, 0.3), ["task_a", "task_b", "task_c", "task_g"], "generalist"
)
CONFIG = RouterConfig(single_min=0.8, single_margin=0.1, merge_min=0.5, top_k=2, temperature=0.1)


def test_one_specialist_clearly_ahead() -> None:
    decision = route(unit(0, 1, 0.05), [A, B, C, G], config=CONFIG)
    assert decision.mode == "adapter" and decision.adapters == [("b", 1.0)]


def test_two_close_specialists_are_merged_with_softmax_weights() -> None:
    decision = route(unit(1, 0.2, 0), [A, B, C, G], config=CONFIG)
    assert decision.mode == "merge"
    names = [n for n, _ in decision.adapters]
    assert names == ["a", "c"] or names == ["c", "a"]
    weights = [w for _, w in decision.adapters]
    assert sum(weights) == pytest.approx(1.0) and all(w > 0 for w in weights)


def test_close_specialists_are_fused_when_configured() -> None:
    import dataclasses

    fusing = dataclasses.replace(CONFIG, combine="fuse")
    decision = route(unit(1, 0.2, 0), [A, B, C, G], config=fusing)
    assert decision.mode == "fuse"
    assert sorted(n for n, _ in decision.adapters) == ["a", "c"]


def test_nothing_close_falls_back_to_the_generalist_or_off() -> None:
    far = unit(0, 0, 0, 0, 1)
    assert route(far, [A, B, G], config=CONFIG).adapters == [("general", 1.0)]
    off = RouterConfig(single_min=0.8, merge_min=0.5, fallback="off")
    assert route(far, [A, B, G], config=off).mode == "off"
    assert route(far, [A, B], config=CONFIG).mode == "off"
    assert route(far, [], config=CONFIG).mode == "off"


def test_excluded_tasks_rule_adapters_out() -> None:
    query = unit(0, 1, 0)
    decision = route(query, [A, B, G], exclude_tasks=["task_b"], config=CONFIG)
    # b and the generalist (trained on task_b too) are out; a is not close: base model.
    assert decision.mode == "off"
    assert route(query, [A, B, G], exclude_tasks=["unknown"], config=CONFIG).adapters == [
        ("b", 1.0)
    ]


def test_grid_weights_sum_to_one() -> None:
    weights = softmax_weights([0.71, 0.70, 0.69], temperature=0.05, step=0.1)
    assert sum(weights) == pytest.approx(1.0)
    assert all(abs(w * 10 - round(w * 10)) < 1e-9 for w in weights)
    assert softmax_weights([0.9, 0.1], temperature=0.01, step=0.1) == [1.0, 0.0]


def test_prototype_dimension_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="dimension"):
        route(np.ones(4, dtype=np.float32) / 2, [A], config=CONFIG)


def test_bad_router_settings() -> None:
    with pytest.raises(ValueError):
        RouterConfig(fallback="random")
    with pytest.raises(ValueError):
        RouterConfig(temperature=0)
    with pytest.raises(ValueError):
        RouterConfig(combine="average")
