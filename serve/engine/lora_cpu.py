"""A faster CPU LoRA path for vLLM, installed into every vLLM process by a plugin.

Why: vLLM's CPU punica wrapper (`vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU`) runs
every LoRA layer through `vllm.lora.ops.torch_ops`, whose `bgmv_*` ops gather one whole
(rank x hidden) LoRA matrix per token (`weights[indices]`) and contract with an einsum. A
1k-token prompt thus copies a thousand copies of each padded LoRA matrix, for each of the
seven projections of all 30 layers, every step: prefill with one adapter ran many times
slower than without (docs/routing.md, "Serving speed"). The V1 CPU model runner also
always takes the "prefill" (sgmv) path, so decode pays the same per-token gather.

What this does instead (`FastPunicaWrapperCPU`):
- Once per engine step, the tokens are grouped by adapter slot (`_plan_step`): one row
  range per adapter when its tokens are adjacent (a prefill, or one adapter); otherwise
  (requests of several adapters interleaved, as in mixed decode) the LoRA tokens are sorted
  by slot once per layer, so every adapter is again one row range, and the result goes back
  with a single index_add_.
- Per group and per slice, the update is two small matmuls, `(x @ A[:r].T) * scale @ B[:, :r].T`
  with the adapter's weights used in place (views, no copies), accumulated by addmm_
  straight into the output rows.
- `r` is the adapter's real rank, not `max_lora_rank`: vLLM zero-pads every slot to
  `max_lora_rank`, and the trailing zero rows of A contribute exactly nothing. Ranks are
  re-read only when a stacked weight tensor changes (its `_version` counter moves, which
  happens when vLLM loads or evicts an adapter into a slot).
- Tokens whose slot is -1 (requests without LoRA) get no update at all. (vLLM's torch ops
  index the stacked weights with -1, i.e. read the *last* slot: harmless while that slot is
  empty, wrong once all `max_loras` slots hold adapters.)

The drop-in op functions (`sgmv_*`, `bgmv_*`) have the signatures of `vllm.lora.ops.torch_ops`
and the same results (up to float summation order); the wrapper uses them for the rarely hot
paths (embeddings, logits, the separate shrink/expand calls).

How it gets into the worker: on CPU, vLLM spawns the EngineCore process and, from it, the
worker process, so a patch applied in the API process would not reach the model. vLLM loads
every `vllm.general_plugins` entry point in every one of its processes before the model is
built; crosstask registers `register()` below there (pyproject.toml). It points the CPU
platform's punica wrapper at `FastPunicaWrapperCPU`, which logs one line in the worker when
the LoRA layers are created. Switch it off with `CROSSTASK_FAST_LORA=0` (read in each process,
so set it before the engine starts), or exclude it with vLLM's `VLLM_PLUGINS`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

# Under "vllm." so that vLLM's logging setup (handler, format, VLLM_LOGGING_LEVEL) also shows
# these lines from its EngineCore and worker processes, where crosstask configures nothing.
log = logging.getLogger(f"vllm.{__name__}")

ENV_SWITCH = "CROSSTASK_FAST_LORA"
WRAPPER_QUALNAME = f"{__name__}.FastPunicaWrapperCPU"

# Rows of one adapter slot: a contiguous range (a view, no copy) or an index list.
Rows = slice | torch.Tensor


def fast_lora_enabled() -> bool:
    """On unless CROSSTASK_FAST_LORA is 0/false/no/off."""
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    return value not in {"0", "false", "no", "off"}


def register() -> None:
    """vLLM `general_plugins` entry point: runs in the API, EngineCore and worker processes,
    possibly more than once each, so it is idempotent. Only the CPU platform is touched."""
    if not fast_lora_enabled():
        log.info("crosstask fast CPU LoRA path disabled (%s=0)", ENV_SWITCH)
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    platform_cls = type(current_platform)
    if platform_cls.get_punica_wrapper() == WRAPPER_QUALNAME:
        return

    def get_punica_wrapper(cls: type) -> str:
        return WRAPPER_QUALNAME

    platform_cls.get_punica_wrapper = classmethod(get_punica_wrapper)  # type: ignore[method-assign,assignment]


# -- grouping tokens by adapter ----------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    slot: int
    rows: Rows
    count: int


def _groups_from_segments(
    slots: Sequence[int], starts: Sequence[int], lengths: Sequence[int], device: torch.device
) -> list[_Group]:
    """Merge runs of equal slots into one group per slot; -1 (no LoRA) is left out."""
    ranges: dict[int, list[tuple[int, int]]] = {}
    for slot, start, length in zip(slots, starts, lengths, strict=True):
        if slot >= 0 and length > 0:
            ranges.setdefault(slot, []).append((start, start + length))
    groups: list[_Group] = []
    for slot, spans in ranges.items():
        count = sum(end - start for start, end in spans)
        if len(spans) == 1:
            groups.append(_Group(slot, slice(spans[0][0], spans[0][1]), count))
        else:
            index = torch.cat([torch.arange(s, e, dtype=torch.long) for s, e in spans])
            groups.append(_Group(slot, index.to(device), count))
    return groups


def _groups_from_indices(indices: torch.Tensor) -> list[_Group]:
    """Group the tokens of a per-token slot tensor (-1 = no LoRA)."""
    if indices.numel() == 0:
        return []
    values, counts = torch.unique_consecutive(indices, return_counts=True)
    lengths: list[int] = counts.tolist()
    starts: list[int] = []
    position = 0
    for length in lengths:
        starts.append(position)
        position += length
    return _groups_from_segments(values.tolist(), starts, lengths, indices.device)


def _groups_from_sgmv(
    seq_start: torch.Tensor, seq_len: torch.Tensor, slots: torch.Tensor
) -> list[_Group]:
    return _groups_from_segments(
        slots.tolist(), seq_start.tolist(), seq_len.tolist(), seq_start.device
    )


@dataclass(frozen=True)
class _LoraPlan:
    """One engine step's tokens by adapter. With `order` None, each group's rows index the
    layer input directly (each adapter's tokens are adjacent). Otherwise the LoRA tokens are
    taken in `order` (sorted by slot, tokens without LoRA left out) and each group is a row
    range of that sorted copy: the deltas then go back with one index_add_ per layer instead
    of one per group and slice (CPU index_add_ into a column slice of the output is a slow
    per-row loop)."""

    groups: list[_Group]
    order: torch.Tensor | None


def _plan_step(indices: torch.Tensor) -> _LoraPlan:
    groups = _groups_from_indices(indices)
    if all(isinstance(g.rows, slice) for g in groups):
        return _LoraPlan(groups, None)
    order = torch.argsort(indices, stable=True)
    without_lora = int((indices < 0).sum())
    order = order[without_lora:]
    return _LoraPlan(_groups_from_indices(indices[order]), order)


# -- the ops: y (op)= x @ W[slot].T per group ----------------------------------------------


def _slot_matrix(weights: torch.Tensor, slot: int) -> torch.Tensor:
    """(out, in) matrix of one slot from stacked (slots, out, in) or (slots, 1, out, in)."""
    matrix = weights[slot]
    return matrix[0] if matrix.dim() == 3 else matrix


def _grouped_apply(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    output: torch.Tensor,
    groups: Sequence[_Group],
    *,
    col_offset: int,
    width: int,
    add: bool,
    scale: float,
    compute_dtype: torch.dtype,
) -> None:
    """output[rows, col_offset:col_offset+width] (+)= scale * inputs[rows] @ W[slot].T[:, :width]
    for every group; rows of no group are zeroed when not adding (the original ops assign
    every row)."""
    region = output[:, col_offset : col_offset + width]
    if not add:
        region.zero_()
    x = inputs.to(compute_dtype)
    # The original ops broadcast a single input row over every output row.
    broadcast = x.shape[0] == 1 and output.shape[0] != 1
    for group in groups:
        w = _slot_matrix(weights, group.slot)[:width].to(compute_dtype)
        rows_x = x[group.rows] if isinstance(group.rows, slice) else x.index_select(0, group.rows)
        result = rows_x @ w.T
        if scale != 1.0:
            result.mul_(scale)
        result = result.to(output.dtype)
        if broadcast:
            region += result
        elif isinstance(group.rows, slice):
            # add_ on the view, not `region[rows] += ...`: that would also copy the view
            # back onto itself through __setitem__.
            region[group.rows].add_(result)
        else:
            region.index_add_(0, group.rows, result)


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    """As `vllm.lora.ops.torch_ops.bgmv_shrink`: output[:, :rank] = scaling * x @ A[slot].T."""
    width = lora_b_weights.shape[-2]
    _grouped_apply(
        inputs,
        lora_b_weights,
        output_tensor,
        _groups_from_indices(lora_indices_tensor),
        col_offset=0,
        width=width,
        add=False,
        scale=scaling,
        compute_dtype=output_tensor.dtype,
    )


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    """As `vllm.lora.ops.torch_ops.bgmv_expand`: output[:, :n] (+)= x @ B[slot].T, n the
    smaller of B's and output's widths (padding)."""
    width = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    _grouped_apply(
        inputs,
        lora_b_weights,
        output_tensor,
        _groups_from_indices(lora_indices_tensor),
        col_offset=0,
        width=width,
        add=add_inputs,
        scale=1.0,
        compute_dtype=output_tensor.dtype,
    )


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    """As `vllm.lora.ops.torch_ops.bgmv_expand_slice`: output[:, off:off+size] (+)= x @ B.T."""
    _grouped_apply(
        inputs,
        lora_b_weights,
        output_tensor,
        _groups_from_indices(lora_indices_tensor),
        col_offset=slice_offset,
        width=slice_size,
        add=add_inputs,
        scale=1.0,
        compute_dtype=output_tensor.dtype,
    )


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    """As `vllm.lora.ops.torch_ops.sgmv_shrink`, per run of same-slot tokens."""
    _grouped_apply(
        inputs,
        lora_a_weights,
        output_tensor,
        _groups_from_sgmv(b_seq_start_loc, seq_len_tensor, lora_indices_tensor),
        col_offset=0,
        width=lora_a_weights.shape[-2],
        add=False,
        scale=scaling,
        compute_dtype=output_tensor.dtype,
    )


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    """As `vllm.lora.ops.torch_ops.sgmv_expand`, per run of same-slot tokens."""
    _grouped_apply(
        inputs,
        lora_b_weights,
        output_tensor,
        _groups_from_sgmv(b_seq_start_loc, seq_len_tensor, lora_indices_tensor),
        col_offset=0,
        width=min(lora_b_weights.shape[-2], output_tensor.shape[1]),
        add=add_inputs,
        scale=1.0,
        compute_dtype=output_tensor.dtype,
    )


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    """As `vllm.lora.ops.torch_ops.sgmv_expand_slice`, per run of same-slot tokens."""
    _grouped_apply(
        inputs,
        lora_b_weights,
        output_tensor,
        _groups_from_sgmv(b_seq_start_loc, seq_len_tensor, lora_indices_tensor),
        col_offset=slice_offset,
        width=slice_size,
        add=add_inputs,
        scale=1.0,
        compute_dtype=output_tensor.dtype,
    )


# -- the wrapper ----------------------------------------------------------------------


class _SlotRanks:
    """The real rank of each slot of stacked LoRA A weights (slots, 1, max_rank, in): the
    number of leading rows up to the last non-zero one. Re-read only when the tensor's
    version counter moves (vLLM wrote an adapter into, or cleared, a slot)."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[torch.Tensor, int, list[int]]] = {}
        self._warned = False

    def get(self, lora_a: torch.Tensor) -> list[int]:
        if lora_a.is_inference():
            # Inference tensors keep no version counter: no safe cache, use the full rank.
            if not self._warned:
                log.warning("LoRA weights are inference tensors: computing at max_lora_rank")
                self._warned = True
            return [lora_a.shape[-2]] * lora_a.shape[0]
        entry = self._cache.get(id(lora_a))
        version = lora_a._version
        if entry is not None and entry[0] is lora_a and entry[1] == version:
            return entry[2]
        ranks = self.scan(lora_a)
        self._cache[id(lora_a)] = (lora_a, version, ranks)
        return ranks

    @staticmethod
    def scan(lora_a: torch.Tensor) -> list[int]:
        flat = lora_a.reshape(lora_a.shape[0], lora_a.shape[-2], lora_a.shape[-1])
        nonzero = flat.ne(0).any(dim=-1)  # (slots, max_rank)
        positions = torch.arange(1, flat.shape[1] + 1, device=flat.device)
        return (nonzero * positions).amax(dim=1).tolist() if flat.shape[1] else []


class FastPunicaWrapperCPU(PunicaWrapperCPU):
    """vLLM's CPU punica wrapper with grouped matmuls instead of per-token weight gathers."""

    def __init__(
        self,
        max_num_batched_tokens: int,
        max_batches: int,
        device: torch.device | str,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self._plan = _LoraPlan([], None)
        self._ranks = _SlotRanks()
        # Counts the fused linear calls: a cheap way to see from a debugger or a test that
        # this path, not the original, ran.
        self.fast_calls = 0
        log.info("crosstask fast CPU LoRA path active (%s, pid %d)", WRAPPER_QUALNAME, os.getpid())

    def update_metadata(
        self,
        mapping: Any,
        lora_index_to_id: list[int | None],
        max_loras: int,
        vocab_size: int,
        **kwargs: Any,
    ) -> None:
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        # Once per step, not once per layer: every LoRA layer of the step shares it.
        self._plan = _plan_step(self.token_lora_indices)

    # The fused hot path: every linear layer (qkv, o, gate_up, down).
    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        assert len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices)
        self.fast_calls += 1
        plan = self._plan
        if not plan.groups:
            return
        x2 = x.view(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        # As the original: the shrink runs in float32 (its buffer), the expand in y's dtype.
        x32 = x2.to(torch.float32)
        if plan.order is None:
            source, target = x32, y2
        else:
            source = x32.index_select(0, plan.order)
            target = y2.new_zeros((source.shape[0], y2.shape[1]))
        ranks = [self._ranks.get(a) for a in lora_a_stacked]
        for group in plan.groups:
            rows = group.rows
            assert isinstance(rows, slice)
            xg = source[rows]
            offset = 0
            for slice_idx, width in enumerate(output_slices):
                rank = ranks[slice_idx][group.slot]
                if rank > 0:
                    a = lora_a_stacked[slice_idx][group.slot, 0, :rank]
                    b = lora_b_stacked[slice_idx][group.slot, 0, :width, :rank]
                    h = xg @ a.to(torch.float32).T
                    if scale != 1.0:
                        h.mul_(scale)
                    # addmm_ into the strided view: BLAS accumulates in place, no temporary.
                    target[rows, offset : offset + width].addmm_(h.to(y2.dtype), b.to(y2.dtype).T)
                offset += width
        if plan.order is not None:
            y2.index_add_(0, plan.order, target)

    # The separate shrink/expand steps (fully sharded LoRA, embeddings): the fast ops.
    def _shrink_prefill(
        self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float
    ) -> None:
        if self.no_lora:
            return
        sgmv_shrink(x, w_t_all, y, *self.prefill_metadata, scale)

    def _shrink_decode(
        self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float
    ) -> None:
        bgmv_shrink(x, w_t_all, y, self.token_lora_indices, scale)

    def _expand_prefill(
        self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, add_inputs: bool
    ) -> None:
        if self.no_lora:
            return
        sgmv_expand(x, w_t_all, y, *self.prefill_metadata, add_inputs)

    def _expand_decode(
        self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, add_inputs: bool
    ) -> None:
        bgmv_expand(x, w_t_all, y, self.token_lora_indices, add_inputs)

    def _expand_slice_prefill(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        w_t_all: torch.Tensor,
        y_offset: int,
        y_slice_size: int,
        add_inputs: bool,
    ) -> None:
        if self.no_lora:
            return
        sgmv_expand_slice(x, w_t_all, y, *self.prefill_metadata, y_offset, y_slice_size, add_inputs)

    def _expand_slice_decode(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        w_t_all: torch.Tensor,
        y_offset: int,
        y_slice_size: int,
        add_inputs: bool,
    ) -> None:
        bgmv_expand_slice(
            x, w_t_all, y, self.token_lora_indices, y_offset, y_slice_size, add_inputs
        )

    def add_lora_logits(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: float,
        *,
        buffer: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        if buffer is None:
            r = lora_b_stacked.size(-1)
            buffer = torch.zeros((x2.size(0), r), dtype=torch.float32, device=x2.device)
        bgmv_shrink(x2, lora_a_stacked, buffer, self.sampler_indices, scale)
        bgmv_expand(buffer, lora_b_stacked, y2, self.sampler_indices, add_inputs=True)
