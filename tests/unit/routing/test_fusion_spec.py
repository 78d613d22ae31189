"""The member spec a fusion group's requests carry in SamplingParams.extra_args."""

from __future__ import annotations

import pytest

from routing.fusion.spec import KEY, FusionSpec, FusionSpecError, parse


def test_round_trip() -> None:
    spec = FusionSpec("g", 1, 3, (0.5, 0.25), (1.0, 1.0))
    assert parse(spec.to_extra_args()) == spec
    dynamic = FusionSpec("g", 0, 2, None, (1.0,))
    assert parse(dynamic.to_extra_args()) == dynamic
    alone = FusionSpec("g", 0, 1, (1.0,), (1.0,), base=False)
    assert parse(alone.to_extra_args()) == alone and alone.adapters == 1


def test_the_base_is_needed_unless_fixed_weights_sum_to_one() -> None:
    from routing.fusion.spec import needs_base

    assert needs_base(None)
    assert needs_base([0.5])
    assert needs_base([0.7, 0.5])
    assert not needs_base([1.0])
    assert not needs_base([0.7, 0.3])
    assert not needs_base([0.1] * 10)


def test_not_a_member() -> None:
    assert parse(None) is None
    assert parse({}) is None
    assert parse({"other": 1}) is None


@pytest.mark.parametrize(
    "raw",
    [
        "x",
        {"group": "", "member": 0, "size": 2, "alphas": [1.0], "prior": [1.0]},
        {"group": "g", "member": 2, "size": 2, "alphas": [1.0], "prior": [1.0]},
        {"group": "g", "member": 0, "size": 1, "alphas": [], "prior": []},
        {"group": "g", "member": 0, "size": 11, "alphas": [1.0] * 10, "prior": [1.0] * 10},
        {"group": "g", "member": 0, "size": 2, "alphas": [1.0, 2.0], "prior": [1.0]},
        {"group": "g", "member": 0, "size": 2, "alphas": [float("nan")], "prior": [1.0]},
        {"group": "g", "member": 0, "size": 2, "alphas": [5.0], "prior": [1.0]},
        {"group": "g", "member": 0, "size": 2, "alphas": None, "prior": [0.0]},
        {"group": "g", "member": 0, "size": 2, "alphas": None, "prior": [-1.0]},
        {"group": "g", "member": 0, "size": 1, "alphas": [0.5], "prior": [1.0], "base": False},
        {"group": "g", "member": 0, "size": 1, "alphas": None, "prior": [1.0], "base": False},
        {"group": "g", "member": 0, "size": 2, "alphas": [1.0], "prior": [1.0], "base": "no"},
    ],
)
def test_malformed_specs_are_refused(raw: object) -> None:
    with pytest.raises(FusionSpecError):
        parse({KEY: raw})
