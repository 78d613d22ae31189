"""The fusion rule on plain tensors, shared by the engine's logits processor and the tests'
reference implementation.

Fixed weights (proxy-tuning form): with base logits z_b and adapter logits z_i,

    z = z_b + sum_i alpha_i (z_i - z_b)

computed as (1 - sum alpha) z_b + sum alpha_i z_i, the same number in exact arithmetic
but exact in floating point at the points the tests pin down: alpha = [1] gives z_A bit
for bit, alpha = [0] gives z_b, and [A, A] with [0.5, 0.5] gives z_A.

Dynamic weights (after Fan et al. 2024, "On Giant's Shoulders: Effortless Weak to Strong by
Dynamic Logits Fusion"). Their rule picks, at each step, the fusion weight that makes the
fused model move away from its base as far as the expert moves away from its own base,
measured by KL divergence. Here every expert shares our one base model, so we use this
reading of it, at every step:

    kappa_i = KL(p_i || p_b)                 how far adapter i moves from the base now
    pi_i    = w_i kappa_i / sum_j w_j kappa_j   (w: the request's prior weights, equal by
                                             default; pi = w / sum w when every kappa is 0)
    d       = sum_i pi_i (z_i - z_b)         the kappa-weighted direction of the adapters
    s*      = the s in [0, S_MAX] with KL(softmax(z_b + s d) || p_b) = sum_i pi_i kappa_i,
              found by bisection (KL along that line grows monotonically with s, its
              derivative being s Var(d)), rounded to a multiple of S_STEP
    alpha   = s* pi

So an adapter that departs from the base at this step gets more say than one that agrees
with it, and the fused distribution departs from the base by the experts' average
divergence. With one adapter, pi = [1] and s* = 1 (up to the rounding), so alpha = [1]:
dynamic fusion of one adapter is that adapter, as in the paper's single-expert case.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

S_MAX = 2.0
S_STEP = 0.01
BISECTION_STEPS = 16


def fuse(base: torch.Tensor | None, experts: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Fused logits of shape (V,) from base (V,), experts (n, V) and alphas (n,). Without
    the base (None: weights summing to 1, see spec.needs_base) the base term is dropped;
    it is then 0 times z_b, so the result is the same bit for bit."""
    mixed = (alphas.unsqueeze(1) * experts).sum(dim=0)
    if base is None:
        return mixed
    return base * (1.0 - alphas.sum()) + mixed


def _kl_from_base(logp: torch.Tensor, logp_base: torch.Tensor) -> torch.Tensor:
    """KL(p || p_b) for each row of logp (n, V) against logp_base (V,)."""
    return (logp.exp() * (logp - logp_base)).sum(dim=-1).clamp_min(0.0)


def dynamic_alphas(
    base: torch.Tensor, experts: torch.Tensor, prior: Sequence[float]
) -> torch.Tensor:
    """Per-step weights by the KL-matching rule in the module docstring, shape (n,)."""
    logp_base = torch.log_softmax(base, dim=-1)
    kappa = _kl_from_base(torch.log_softmax(experts, dim=-1), logp_base)
    w = torch.tensor(list(prior), dtype=base.dtype)
    weighted = w * kappa
    pi = weighted / weighted.sum() if float(weighted.sum()) > 0 else w / w.sum()
    target = float((pi * kappa).sum())
    if target <= 0.0:
        return pi  # the adapters agree with the base: any s gives the base; keep s = 1
    direction = (pi.unsqueeze(1) * (experts - base)).sum(dim=0)

    def divergence(s: float) -> float:
        logp = torch.log_softmax(base + s * direction, dim=-1)
        return float(_kl_from_base(logp.unsqueeze(0), logp_base)[0])

    lo, hi = 0.0, S_MAX
    if divergence(hi) <= target:
        s = hi
    else:
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            if divergence(mid) < target:
                lo = mid
            else:
                hi = mid
        s = (lo + hi) / 2
    s = round(round(s / S_STEP) * S_STEP, 6)
    return pi * s


def alphas_for(
    base: torch.Tensor,
    experts: torch.Tensor,
    fixed: Sequence[float] | None,
    prior: Sequence[float],
) -> torch.Tensor:
    """The step's weights: the fixed ones, or dynamic ones when `fixed` is None."""
    if fixed is not None:
        return torch.tensor(list(fixed), dtype=base.dtype)
    return dynamic_alphas(base, experts, prior)
