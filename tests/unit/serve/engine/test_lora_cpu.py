"""serve.engine.lora_cpu's fast CPU LoRA ops and punica wrapper give what vLLM's own torch ops and
CPU wrapper give, on random tensors: several adapters mixed in one batch (adjacent and
interleaved), tokens without LoRA (-1), several output slices (qkv, gate_up),
add_inputs on and off, ranks 2/8/16 padded into the stacked max rank."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch
from vllm.lora.layers import LoRAMapping
from vllm.lora.ops import torch_ops
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from serve.engine import lora_cpu

HIDDEN = 64
MAX_RANK = 16
SLOTS = 4
# Per token: the adapter slot, -1 for none. Adjacent runs, an interleaving, and -1s.
TOKEN_SLOTS = [0] * 5 + [1] * 3 + [-1] * 4 + [2] * 6 + [0] * 2 + [1, 2, -1, 0, 1] + [2] * 3
QKV = (64, 16, 16)
GATE_UP = (96, 96)
DOWN = (48,)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Float32 sums in another order: relative error around 1e-6 on values up to ~100.
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def _stacked_a(ranks: list[int], width: int = HIDDEN, seed: int = 0) -> torch.Tensor:
    """(slots, 1, MAX_RANK, width), slot i random in its first ranks[i] rows, zero after:
    the layout vLLM gives a rank-r adapter in a max_lora_rank buffer. Slots beyond the
    ranks given stay empty (zero), like vLLM's free slots."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.zeros(SLOTS, 1, MAX_RANK, width)
    for slot, rank in enumerate(ranks):
        weights[slot, 0, :rank] = torch.randn(rank, width, generator=gen)
    return weights


def _stacked_b(ranks: list[int], out: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    weights = torch.zeros(SLOTS, 1, out, MAX_RANK)
    for slot, rank in enumerate(ranks):
        weights[slot, 0, :, :rank] = torch.randn(out, rank, generator=gen)
    return weights


def _sgmv_meta(
    indices: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]:
    slots, lengths = torch.unique_consecutive(torch.tensor(indices), return_counts=True)
    starts = torch.zeros_like(lengths)
    starts[1:] = torch.cumsum(lengths, 0)[:-1]
    return starts, lengths, slots, len(slots), int(lengths.max()), len(indices)


def _wrappers(slots: list[int]) -> tuple[PunicaWrapperCPU, lora_cpu.FastPunicaWrapperCPU]:
    """The original and the fast wrapper with the same step metadata, as the V1 CPU model
    runner sets it (LoRA ids slot+1, 0 for none; is_prefill always True)."""
    ids = [slot + 1 for slot in slots]
    mapping = LoRAMapping(tuple(ids), tuple(ids), is_prefill=True)
    index_to_id: list[int | None] = [i + 1 for i in range(SLOTS)]
    original = PunicaWrapperCPU(256, 32, "cpu")
    fast = lora_cpu.FastPunicaWrapperCPU(256, 32, "cpu")
    for wrapper in (original, fast):
        wrapper.update_metadata(mapping, index_to_id, SLOTS, 1000)
    return original, fast


# -- the drop-in ops ------------------------------------------------------------------


@pytest.mark.parametrize("rank", [2, 8, 16])
@pytest.mark.parametrize("scaling", [1.0, 0.5])
def test_sgmv_and_bgmv_shrink(rank: int, scaling: float) -> None:
    # Three adapters; slot 3 (the one vLLM's ops read for -1) left empty.
    a = _stacked_a([rank, rank, rank])
    x = torch.randn(len(TOKEN_SLOTS), HIDDEN)
    indices = torch.tensor(TOKEN_SLOTS)
    want = torch.full((len(TOKEN_SLOTS), MAX_RANK), 7.0)
    got = want.clone()
    torch_ops.sgmv_shrink(x, a, want, *_sgmv_meta(TOKEN_SLOTS), scaling)
    lora_cpu.sgmv_shrink(x, a, got, *_sgmv_meta(TOKEN_SLOTS), scaling)
    assert _close(got, want)

    want = torch.full((len(TOKEN_SLOTS), MAX_RANK), 7.0)
    got = want.clone()
    torch_ops.bgmv_shrink(x, a, want, indices, scaling)
    lora_cpu.bgmv_shrink(x, a, got, indices, scaling)
    assert _close(got, want)


@pytest.mark.parametrize("rank", [2, 8, 16])
@pytest.mark.parametrize("add_inputs", [True, False])
def test_sgmv_and_bgmv_expand(rank: int, add_inputs: bool) -> None:
    out = 40
    b = _stacked_b([rank, rank, rank], out)
    h = torch.randn(len(TOKEN_SLOTS), MAX_RANK)
    indices = torch.tensor(TOKEN_SLOTS)
    base = torch.randn(len(TOKEN_SLOTS), out)

    want, got = base.clone(), base.clone()
    torch_ops.sgmv_expand(h, b, want, *_sgmv_meta(TOKEN_SLOTS), add_inputs)
    lora_cpu.sgmv_expand(h, b, got, *_sgmv_meta(TOKEN_SLOTS), add_inputs)
    assert _close(got, want)

    want, got = base.clone(), base.clone()
    torch_ops.bgmv_expand(h, b, want, indices, add_inputs)
    lora_cpu.bgmv_expand(h, b, got, indices, add_inputs)
    assert _close(got, want)


@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_slice_over_qkv_slices(add_inputs: bool) -> None:
    ranks = [2, 8, 16]
    total = sum(QKV)
    h = torch.randn(len(TOKEN_SLOTS), MAX_RANK)
    indices = torch.tensor(TOKEN_SLOTS)
    for op in ("sgmv", "bgmv"):
        want = torch.randn(len(TOKEN_SLOTS), total)
        got = want.clone()
        offset = 0
        for i, width in enumerate(QKV):
            b = _stacked_b(ranks, width, seed=10 + i)
            if op == "sgmv":
                meta = _sgmv_meta(TOKEN_SLOTS)
                torch_ops.sgmv_expand_slice(h, b, want, *meta, offset, width, add_inputs)
                lora_cpu.sgmv_expand_slice(h, b, got, *meta, offset, width, add_inputs)
            else:
                torch_ops.bgmv_expand_slice(h, b, want, indices, offset, width, add_inputs)
                lora_cpu.bgmv_expand_slice(h, b, got, indices, offset, width, add_inputs)
            offset += width
        assert _close(got, want), op


def test_expand_pads_to_the_narrower_width() -> None:
    """bgmv_expand writes min(B's width, output's width) columns, as the original."""
    b = _stacked_b([8, 8], 50)
    h = torch.randn(6, MAX_RANK)
    indices = torch.tensor([0, 0, 1, 1, 1, 0])
    want = torch.randn(6, 44)
    got = want.clone()
    torch_ops.bgmv_expand(h, b, want, indices, True)
    lora_cpu.bgmv_expand(h, b, got, indices, True)
    assert _close(got, want)


# -- the wrapper: the fused linear path vLLM's LoRA layers call ------------------------


@pytest.mark.parametrize("slices", [QKV, GATE_UP, DOWN], ids=["qkv", "gate_up", "single"])
@pytest.mark.parametrize("ranks", [[2, 8, 16], [8, 8, 8], [16, 2, 16]])
def test_add_lora_linear_equals_original(slices: tuple[int, ...], ranks: list[int]) -> None:
    original, fast = _wrappers(TOKEN_SLOTS)
    a = tuple(_stacked_a(ranks, seed=20 + i) for i in range(len(slices)))
    b = tuple(_stacked_b(ranks, width, seed=30 + i) for i, width in enumerate(slices))
    x = torch.randn(len(TOKEN_SLOTS), HIDDEN)
    want = torch.randn(len(TOKEN_SLOTS), sum(slices))
    got = want.clone()
    original.add_lora_linear(want, x, a, b, 1.0, slices)
    fast.add_lora_linear(got, x, a, b, 1.0, slices)
    assert _close(got, want)
    assert fast.fast_calls == 1


def test_add_lora_linear_scale_and_single_adapter_batch() -> None:
    """A whole batch on one adapter (the prefill case): one contiguous group."""
    slots = [1] * 40
    original, fast = _wrappers(slots)
    a = (_stacked_a([8, 8]),)
    b = (_stacked_b([8, 8], 48),)
    x = torch.randn(40, HIDDEN)
    want = torch.randn(40, 48)
    got = want.clone()
    original.add_lora_linear(want, x, a, b, 0.25, (48,))
    fast.add_lora_linear(got, x, a, b, 0.25, (48,))
    assert _close(got, want)


def test_no_lora_batch_is_untouched() -> None:
    _, fast = _wrappers([-1] * 12)
    a = (_stacked_a([8, 8, 8, 8]),)
    b = (_stacked_b([8, 8, 8, 8], 48),)
    x = torch.randn(12, HIDDEN)
    y = torch.randn(12, 48)
    got = y.clone()
    fast.add_lora_linear(got, x, a, b, 1.0, (48,))
    assert torch.equal(got, y)


def test_tokens_without_lora_ignore_a_full_last_slot() -> None:
    """With every slot holding an adapter, -1 tokens still get no update. (vLLM's torch ops
    read weights[-1], the last slot, for them: the difference this test pins down.)"""
    slots = [0, 0, -1, -1, 3, 3, -1]
    _, fast = _wrappers(slots)
    ranks = [8, 8, 8, 8]
    a = (_stacked_a(ranks),)
    b = (_stacked_b(ranks, 48),)
    x = torch.randn(len(slots), HIDDEN)
    y = torch.randn(len(slots), 48)
    got = y.clone()
    fast.add_lora_linear(got, x, a, b, 1.0, (48,))
    want = y.clone()
    for row, slot in enumerate(slots):
        if slot >= 0:
            want[row] += x[row] @ a[0][slot, 0].T @ b[0][slot, 0].T
    assert _close(got, want)
    assert torch.equal(got[2], y[2])


def test_rank_cache_follows_slot_updates() -> None:
    """The real rank of a slot is re-read when vLLM writes a new adapter into it."""
    slots = [0] * 6
    original, fast = _wrappers(slots)
    a = (_stacked_a([2]),)
    b = (_stacked_b([2], 48),)
    x = torch.randn(6, HIDDEN)
    fast.add_lora_linear(torch.zeros(6, 48), x, a, b, 1.0, (48,))
    # vLLM's set_lora: zero the slot, then copy the new (higher rank) weights in place.
    a[0][0] = 0
    a[0][0, 0, :12] = torch.randn(12, HIDDEN)
    b[0][0, 0, :, :12] = torch.randn(48, 12)
    want, got = torch.zeros(6, 48), torch.zeros(6, 48)
    original.add_lora_linear(want, x, a, b, 1.0, (48,))
    fast.add_lora_linear(got, x, a, b, 1.0, (48,))
    assert _close(got, want)


def test_inference_tensor_weights_fall_back_to_the_padded_rank() -> None:
    """Weights made under torch.inference_mode have no version counter to cache ranks by."""
    original, fast = _wrappers(TOKEN_SLOTS)
    with torch.inference_mode():
        a = (_stacked_a([2, 8, 16]),)
        b = (_stacked_b([2, 8, 16], 48),)
    x = torch.randn(len(TOKEN_SLOTS), HIDDEN)
    want, got = torch.zeros(len(TOKEN_SLOTS), 48), torch.zeros(len(TOKEN_SLOTS), 48)
    with torch.inference_mode():
        original.add_lora_linear(want, x, a, b, 1.0, (48,))
        fast.add_lora_linear(got, x, a, b, 1.0, (48,))
    assert _close(got, want)


def test_step_plan_sorts_only_interleaved_batches() -> None:
    """Adjacent adapters index the input directly; interleaved ones go through one sort."""
    adjacent = lora_cpu._plan_step(torch.tensor([0, 0, -1, 1, 1, 1]))
    assert adjacent.order is None
    assert [(g.slot, g.rows) for g in adjacent.groups] == [(0, slice(0, 2)), (1, slice(3, 6))]
    mixed = lora_cpu._plan_step(torch.tensor([1, 0, -1, 1, 0, 2]))
    assert mixed.order is not None
    assert mixed.order.tolist() == [1, 4, 0, 3, 5]
    assert [(g.slot, g.rows) for g in mixed.groups] == [
        (0, slice(0, 2)),
        (1, slice(2, 4)),
        (2, slice(4, 5)),
    ]


def test_add_lora_logits_equals_original() -> None:
    slots = [0, 1, -1, 2]
    original, fast = _wrappers(slots)
    a = _stacked_a([8, 8, 8])
    b = _stacked_b([8, 8, 8], 100)
    x = torch.randn(len(slots), HIDDEN)
    want = torch.randn(len(slots), 100)
    got = want.clone()
    original.add_lora_logits(want, x, a, b, 1.0)
    fast.add_lora_logits(got, x, a, b, 1.0)
    assert _close(got, want)


# -- installation -----------------------------------------------------------------------


def test_register_points_the_cpu_platform_at_the_fast_wrapper(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the plugin only touches the CPU platform")
    platform_cls = type(current_platform)
    # monkeypatch restores the original classmethod afterwards.
    monkeypatch.setattr(platform_cls, "get_punica_wrapper", platform_cls.get_punica_wrapper)
    original = platform_cls.get_punica_wrapper()

    monkeypatch.setenv(lora_cpu.ENV_SWITCH, "0")
    lora_cpu.register()
    assert platform_cls.get_punica_wrapper() == original

    monkeypatch.setenv(lora_cpu.ENV_SWITCH, "1")
    lora_cpu.register()
    lora_cpu.register()  # idempotent: vLLM may load plugins more than once per process
    assert platform_cls.get_punica_wrapper() == lora_cpu.WRAPPER_QUALNAME
