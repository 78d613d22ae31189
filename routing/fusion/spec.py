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


def needs_base(alphas: Sequence[float] | None) -> bool:
    """Whether the base model must decode as a member. The fused logits are
    (1 - sum alpha) z_b + sum alpha_i z_i, so when fixed weights sum to 1 (equal weights
    and the router's softmax weights do) the base's coefficient is 0 and a whole sequence
    of work is saved. Dynamic weights always compare with the base."""
    return alphas is None or abs(math.fsum(alphas) - 1.0) > 1e-6


@dataclass(frozen=True)
class FusionSpec:
    """Member `member` of group `group`, which has `size` members: with `base`, member 0 is
    the base model and member i >= 1 adapter i; without, member i is adapter i + 1.
    `alphas` are the adapters' fixed weights; None means dynamic, with `prior` weighting
    the adapters."""

    group: str
    member: int
    size: int
    alphas: tuple[float, ...] | None
    prior: tuple[float, ...]
    base: bool = True

    @property
    def adapters(self) -> int:
        return self.size - 1 if self.base else self.size

    def to_extra_args(self) -> dict[str, Any]:
        return {
            KEY: {
                "group": self.group,
                "member": self.member,
                "size": self.size,
                "alphas": list(self.alphas) if self.alphas is not None else None,
                "prior": list(self.prior),
                "base": self.base,
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
    base = raw.get("base", True)
    if not isinstance(group, str) or not group:
        raise FusionSpecError("fusion group must be a non-empty string")
    if not isinstance(base, bool):
        raise FusionSpecError("fusion base must be true or false")
    smallest = 2 if base else 1
    if not isinstance(size, int) or not smallest <= size <= MAX_ADAPTERS + int(base):
        raise FusionSpecError(f"fusion size must be {smallest}..{MAX_ADAPTERS + int(base)}")
    if not isinstance(member, int) or not 0 <= member < size:
        raise FusionSpecError("fusion member must be in [0, size)")
    n = size - 1 if base else size
    alphas = raw.get("alphas")
    prior = _floats(raw.get("prior"), n, "prior")
    if alphas is None and (min(prior) < 0 or sum(prior) <= 0):
        raise FusionSpecError("dynamic fusion needs non-negative prior weights with a positive sum")
    fixed = None if alphas is None else _floats(alphas, n, "alphas")
    if not base and needs_base(fixed):
        raise FusionSpecError("a group without the base needs fixed weights summing to 1")
    return FusionSpec(group=group, member=member, size=size, alphas=fixed, prior=prior, base=base)


def parse_params(sampling_params: Any) -> FusionSpec | None:
    """The spec of a vLLM SamplingParams (or None)."""
    return parse(getattr(sampling_params, "extra_args", None))
