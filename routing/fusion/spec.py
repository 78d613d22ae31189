"""What a fusion group's member requests carry to the engine: one dict under
`SamplingParams.extra_args[KEY]`. Read in the API process (to build it), in the EngineCore
(the scheduler admits the group together) and in the worker (the logits processor fuses)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

KEY = "crosstask_fusion"
# A group is the base plus up to this many adapters: each member is a full sequence in the
# batch (its own prefill and KV cache), so a large group costs as much as that many requests.
MAX_ADAPTERS = 8
# |alpha| beyond this turns logit arithmetic into noise (logits of magnitude ~20 times 8).
MAX_ABS_ALPHA = 4.0


class FusionSpecError(ValueError):
    """A malformed fusion spec (only a client bypassing crosstask's API could send one)."""


@dataclass(frozen=True)
class FusionSpec:
    """Member `member` (0 = the base model, i >= 1 = adapter i) of group `group`, which has
    `size` members. `alphas` are the adapters' fixed weights; None means dynamic, with
    `prior` weighting the adapters."""

    group: str
    member: int
    size: int
    alphas: tuple[float, ...] | None
    prior: tuple[float, ...]

    def to_extra_args(self) -> dict[str, Any]:
        return {
            KEY: {
                "group": self.group,
                "member": self.member,
                "size": self.size,
                "alphas": list(self.alphas) if self.alphas is not None else None,
                "prior": list(self.prior),
            }
        }


def _floats(value: object, n: int, name: str) -> tuple[float, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != n:
        raise FusionSpecError(f"fusion {name} must be a list of {n} numbers")
    out = tuple(float(v) for v in value)
    if not all(math.isfinite(v) and abs(v) <= MAX_ABS_ALPHA for v in out):
        raise FusionSpecError(f"fusion {name} must be finite with |value| <= {MAX_ABS_ALPHA}")
    return out


def parse(extra_args: Mapping[str, Any] | None) -> FusionSpec | None:
    """The spec in `extra_args`, None when the request is not a fusion member."""
    if not extra_args or KEY not in extra_args:
        return None
    raw = extra_args[KEY]
    if not isinstance(raw, Mapping):
        raise FusionSpecError("fusion spec must be an object")
    group, member, size = raw.get("group"), raw.get("member"), raw.get("size")
    if not isinstance(group, str) or not group:
        raise FusionSpecError("fusion group must be a non-empty string")
    if not isinstance(size, int) or not 2 <= size <= MAX_ADAPTERS + 1:
        raise FusionSpecError(f"fusion size must be 2..{MAX_ADAPTERS + 1}")
    if not isinstance(member, int) or not 0 <= member < size:
        raise FusionSpecError("fusion member must be in [0, size)")
    alphas = raw.get("alphas")
    prior = _floats(raw.get("prior"), size - 1, "prior")
    if alphas is None and (min(prior) < 0 or sum(prior) <= 0):
        raise FusionSpecError("dynamic fusion needs non-negative prior weights with a positive sum")
    return FusionSpec(
        group=group,
        member=member,
        size=size,
        alphas=None if alphas is None else _floats(alphas, size - 1, "alphas"),
        prior=prior,
    )


def parse_params(sampling_params: Any) -> FusionSpec | None:
    """The spec of a vLLM SamplingParams (or None)."""
    return parse(getattr(sampling_params, "extra_args", None))
