"""The fusion rule (routing/fusion/logits.py): exact at the invariants the issue pins down,
and the dynamic rule does what its docstring says."""

from __future__ import annotations

import torch

from routing.fusion.logits import S_MAX, _kl_from_base, alphas_for, dynamic_alphas, fuse

V = 512


def _logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * scale


def test_fixed_weights_are_exact_at_the_invariants() -> None:
    base, a, b = _logits(0), _logits(1), _logits(2)
    assert torch.equal(fuse(base, a.unsqueeze(0), torch.tensor([1.0])), a)
    assert torch.equal(fuse(base, a.unsqueeze(0), torch.tensor([0.0])), base)
    assert torch.equal(fuse(base, torch.stack([a, a]), torch.tensor([0.5, 0.5])), a)
    # Weights summing to 1: the base term is 0, so leaving the base out changes nothing.
    pair, split = torch.stack([a, b]), torch.tensor([0.6, 0.4])
    assert torch.equal(fuse(None, pair, split), fuse(base, pair, split))
    # And in general the proxy-tuning form z_b + sum alpha_i (z_i - z_b).
    alphas = torch.tensor([0.7, -0.3])
    expected = base + 0.7 * (a - base) - 0.3 * (b - base)
    assert torch.allclose(fuse(base, torch.stack([a, b]), alphas), expected, atol=1e-5)


def test_dynamic_one_adapter_is_that_adapter() -> None:
    base, a = _logits(3), _logits(4)
    alphas = dynamic_alphas(base, a.unsqueeze(0), [1.0])
    assert alphas.tolist() == [1.0]
    assert torch.equal(fuse(base, a.unsqueeze(0), alphas), a)


def test_dynamic_same_adapter_twice_is_that_adapter() -> None:
    base, a = _logits(5), _logits(6)
    alphas = dynamic_alphas(base, torch.stack([a, a]), [0.5, 0.5])
    assert alphas.tolist() == [0.5, 0.5]
    assert torch.equal(fuse(base, torch.stack([a, a]), alphas), a)


def test_dynamic_matches_the_mean_divergence_and_favours_the_departing_adapter() -> None:
    base = _logits(7)
    near = base + 0.2 * _logits(8, 1.0)  # agrees with the base
    far = _logits(9)  # departs from it
    experts = torch.stack([near, far])
    alphas = dynamic_alphas(base, experts, [1.0, 1.0])
    assert alphas[1] > alphas[0] > 0
    logp_base = torch.log_softmax(base, -1)
    kappa = _kl_from_base(torch.log_softmax(experts, -1), logp_base)
    pi = kappa / kappa.sum()
    target = float((pi * kappa).sum())
    fused = fuse(base, experts, alphas)
    reached = float(_kl_from_base(torch.log_softmax(fused, -1).unsqueeze(0), logp_base)[0])
    # Within the 0.01 rounding of s.
    assert abs(reached - target) / target < 0.05
    # The prior moves weight toward the adapter it favours.
    tilted = dynamic_alphas(base, experts, [9.0, 1.0])
    assert tilted[0] / tilted[1] > alphas[0] / alphas[1]


def test_dynamic_clamps_and_handles_agreement() -> None:
    base = _logits(10)
    same = dynamic_alphas(base, torch.stack([base, base]), [1.0, 3.0])
    assert torch.allclose(same, torch.tensor([0.25, 0.75]))
    assert float(dynamic_alphas(base, _logits(11).unsqueeze(0), [1.0]).sum()) <= S_MAX


def test_alphas_for_uses_fixed_weights_when_given() -> None:
    base, a = _logits(12), _logits(13)
    assert alphas_for(base, a.unsqueeze(0), [0.3], [1.0]).tolist() == [0.30000001192092896]
