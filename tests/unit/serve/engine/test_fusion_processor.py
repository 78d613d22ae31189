"""The fusion logits processor on hand-made batches: it fuses a group's rows in place, keeps
track of rows as vLLM adds, removes and moves requests, and breaks a group whose members
are out of lockstep by forcing each member to a token of its own."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality

from routing.fusion.logits import fuse
from routing.fusion.spec import FusionSpec
from serve.engine.fusion_processor import FusionLogitsProcessor

V = 64


def params(spec: FusionSpec | None) -> Any:
    return SimpleNamespace(extra_args=spec.to_extra_args() if spec else None)


def member(group: str, i: int, size: int, alphas: tuple[float, ...] | None = (0.5,)) -> Any:
    n = size - 1
    return params(
        FusionSpec(
            group,
            i,
            size,
            alphas if alphas is None or len(alphas) == n else (1.0 / n,) * n,
            (1.0,) * n,
        )
    )


def update(
    added: list[tuple[int, Any, list[int]]] = (),
    removed: list[int] = (),  # type: ignore[assignment]
    moved: list[tuple[int, int, MoveDirectionality]] = (),
    size: int = 0,
) -> BatchUpdate:  # type: ignore[assignment]
    return BatchUpdate(
        batch_size=size,
        removed=list(removed),
        added=[(i, p, None, out) for i, p, out in added],
        moved=list(moved),
    )


def processor() -> FusionLogitsProcessor:
    return FusionLogitsProcessor(None, torch.device("cpu"), False)  # type: ignore[arg-type]


def test_batch_without_groups_is_untouched() -> None:
    proc = processor()
    proc.update_state(update([(0, params(None), []), (1, params(None), [])], size=2))
    logits = torch.randn(2, V)
    before = logits.clone()
    assert proc.apply(logits) is logits
    assert torch.equal(logits, before)


def test_group_rows_get_the_fused_logits_others_keep_theirs() -> None:
    proc = processor()
    out: list[int] = []
    proc.update_state(
        update(
            [
                (0, member("g", 1, 2), list(out)),
                (1, params(None), []),
                (2, member("g", 0, 2), list(out)),
            ],
            size=3,
        )
    )
    logits = torch.randn(3, V)
    base, adapter, plain = logits[2].clone(), logits[0].clone(), logits[1].clone()
    proc.apply(logits)
    expected = fuse(base, adapter.unsqueeze(0), torch.tensor([0.5]))
    assert torch.equal(logits[0], expected) and torch.equal(logits[2], expected)
    assert torch.equal(logits[1], plain)


def test_rows_follow_moves_and_swaps() -> None:
    proc = processor()
    proc.update_state(
        update(
            [(0, member("g", 0, 2), []), (1, member("g", 1, 2), []), (2, params(None), [])], size=3
        )
    )
    # vLLM swaps rows 0 and 2 (condensing the batch): the group's rows are now 1 and 2.
    proc.update_state(update(moved=[(0, 2, MoveDirectionality.SWAP)], size=3))
    logits = torch.randn(3, V)
    plain = logits[0].clone()
    expected = fuse(logits[2].clone(), logits[1].clone().unsqueeze(0), torch.tensor([0.5]))
    proc.apply(logits)
    assert torch.equal(logits[0], plain)
    assert torch.equal(logits[1], expected) and torch.equal(logits[2], expected)
    proc.update_state(
        update(removed=[0], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)], size=2)
    )
    logits = torch.randn(2, V)
    expected = fuse(logits[0].clone(), logits[1].clone().unsqueeze(0), torch.tensor([0.5]))
    proc.apply(logits)
    assert torch.equal(logits[0], expected) and torch.equal(logits[1], expected)


def _forced(row: torch.Tensor) -> int:
    assert int(torch.isfinite(row).sum()) == 1
    return int(row.argmax())


def test_member_missing_breaks_the_group_for_good() -> None:
    proc = processor()
    outputs: list[list[int]] = [[7], [7]]
    proc.update_state(update([(0, member("g", 0, 2), outputs[0])], size=1))
    logits = torch.randn(1, V)
    proc.apply(logits)
    assert _forced(logits[0]) == 1  # member 0 -> token 1
    # The missing member comes back at the same length: the group stays broken, and the
    # members take different tokens, so the API sees the disagreement.
    proc.update_state(update([(1, member("g", 1, 2), outputs[1])], size=2))
    logits = torch.randn(2, V)
    proc.apply(logits)
    assert (_forced(logits[0]), _forced(logits[1])) == (1, 2)


def test_different_output_lengths_break_the_group() -> None:
    proc = processor()
    proc.update_state(update([(0, member("g", 0, 2), [1, 2]), (1, member("g", 1, 2), [1])], size=2))
    logits = torch.randn(2, V)
    proc.apply(logits)
    assert (_forced(logits[0]), _forced(logits[1])) == (1, 2)


def test_dynamic_group_with_one_adapter_is_that_adapter() -> None:
    proc = processor()
    proc.update_state(
        update([(0, member("d", 0, 2, None), []), (1, member("d", 1, 2, None), [])], size=2)
    )
    logits = torch.randn(2, V) * 3
    adapter = logits[1].clone()
    proc.apply(logits)
    assert torch.equal(logits[0], adapter) and torch.equal(logits[1], adapter)


def test_group_without_the_base_mixes_the_adapters() -> None:
    proc = processor()
    specs = [FusionSpec("w", i, 2, (0.25, 0.75), (1.0, 1.0), base=False) for i in range(2)]
    proc.update_state(update([(0, params(specs[0]), []), (1, params(specs[1]), [])], size=2))
    logits = torch.randn(2, V)
    expected = 0.25 * logits[0] + 0.75 * logits[1]
    proc.apply(logits)
    assert torch.allclose(logits[0], expected) and torch.equal(logits[0], logits[1])


def test_banned_tokens_stay_banned_and_nothing_is_nan() -> None:
    proc = processor()
    specs = [FusionSpec("b", i, 3, (0.5, 0.5), (1.0, 1.0)) for i in range(3)]
    proc.update_state(update([(i, params(specs[i]), []) for i in range(3)], size=3))
    logits = torch.randn(3, V)
    logits[:, 5] = float("-inf")  # banned for every member, e.g. min_tokens on EOS
    logits[1, 7] = float("-inf")  # banned in one member's row only
    proc.apply(logits)
    assert not torch.isnan(logits).any()
    assert torch.isinf(logits[:, 5]).all() and torch.isinf(logits[:, 7]).all()
    assert int(torch.isfinite(logits[0]).sum()) == V - 2
    dynamic = processor()
    dspecs = [FusionSpec("d", i, 3, None, (1.0, 1.0)) for i in range(3)]
    dynamic.update_state(update([(i, params(dspecs[i]), []) for i in range(3)], size=3))
    logits = torch.randn(3, V)
    logits[:, 3] = float("-inf")
    dynamic.apply(logits)
    assert not torch.isnan(logits).any() and torch.isinf(logits[:, 3]).all()
