"""bench/calibrate_router_cv.py's replay, without a server: on synthetic answers where the
nearest specialist helps only when it is close, the fitted rules find that out on held-out
folds, and the report's arithmetic (macro over tasks, weighted by fold) holds."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench"


@pytest.fixture(scope="module")
def cv() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # the script imports its sibling calibrate_demo_gate
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_router_cv", BENCH / "calibrate_router_cv.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def _examples(cv: ModuleType, near_helps: bool) -> list:
    rng = random.Random(0)
    examples = []
    for t in range(40):
        fold = t % 5
        close = t % 2 == 0  # half the tasks have a close specialist
        for i in range(3):
            s1 = rng.uniform(0.65, 0.8) if close else rng.uniform(0.2, 0.35)
            s2 = s1 - rng.uniform(0.06, 0.1)
            vector = np.zeros(8, dtype=np.float32)
            vector[t % 8] = 1.0
            good = near_helps and close
            scores = {
                "base": 10.0,
                "generalist": 30.0,
                "s1": 50.0 if good else 20.0,
                "s2": 25.0,
                "fuse": 40.0 if good else 28.0,
                "gen_demos": 35.0 if close else 20.0,
            }
            demo = 0.5 if close else 0.2
            examples.append(
                cv.Example(f"task{t}", i, fold, vector, [s1, s2, 0.5], demo, ["a", "b"], scores)
            )
    return examples


def test_rules_find_the_close_specialist_on_held_out_folds(cv: ModuleType) -> None:
    report = cv.cross_validate(_examples(cv, near_helps=True), 5)
    overall = report["cross_validated"]
    assert overall["generalist"] == pytest.approx(30.0)
    # s1 on the close half (50), the generalist on the rest (30).
    assert overall["centroid"] == pytest.approx(40.0)
    assert overall["fuse_near"] == pytest.approx(35.0)
    assert overall["demo_gate"] == pytest.approx(32.5)
    assert overall["learned"] >= overall["fuse_near"]
    assert overall["oracle"] == pytest.approx(40.0)
    for fold in report["folds"]:
        assert 0.35 <= fold["centroid"]["fitted"]["single_min"] <= 0.65


def test_when_no_specialist_helps_the_rules_keep_the_generalist(cv: ModuleType) -> None:
    report = cv.cross_validate(_examples(cv, near_helps=False), 5)
    overall = report["cross_validated"]
    assert overall["centroid"] == pytest.approx(30.0)
    assert overall["fuse_near"] == pytest.approx(30.0)
    # Demonstrations still help where they are near.
    assert overall["demo_gate"] == pytest.approx(32.5)
    assert overall["learned"] >= 30.0
    for fold in report["folds"]:
        assert fold["centroid"]["picks"] == {"generalist": fold["tasks"] * 3}


def test_records_round_trip(cv: ModuleType) -> None:
    ex = _examples(cv, near_helps=True)[0]
    back = cv.load_example(cv.dump_example(ex))
    assert back.task == ex.task and back.fold == ex.fold and back.names == ex.names
    assert back.scores == ex.scores and back.demo_score == ex.demo_score
    np.testing.assert_allclose(back.vector, ex.vector)
