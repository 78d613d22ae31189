"""The V1 logits processor that fuses each group's next-token logits at every step.

Installed for the whole engine (`logits_processors=[...]`), it sees every request of the
batch and reads its SamplingParams.extra_args (routing/fusion/spec.py). At each step, for
each group whose members are all in the batch with the same number of output tokens, it
computes the fused logits (routing/fusion/logits.py) and writes them into every member's
row. The sampler then treats the rows alike: the same penalties (the members' outputs are
the same tokens), temperature, top-p and, since every member carries the group's seed, the
same random draw. So every member takes the same token and they never diverge.

A group found out of lockstep (a member missing from the step while others sample, or the
members at different output lengths: preemption of one member, an admission the scheduler
could not keep together) is marked broken for good, and from then on each member is forced
to a token of its own (member i: token i + 1). Its members therefore disagree at the first
position that could have been wrong, and the API process, which compares the members'
tokens before it releases any (routing/fusion/group.py), fails the request with a clear
error instead of returning a text no fusion produced.

Requests outside groups cost one dict lookup when they join the batch; a batch without
groups returns at once.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor.interface import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

from routing.fusion.logits import alphas_for, fuse
from routing.fusion.spec import FusionSpec, FusionSpecError, parse_params

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

log = logging.getLogger(f"vllm.{__name__}")

QUALNAME = f"{__name__}:FusionLogitsProcessor"
# Broken groups remembered (their members may come back to the batch later, say after a
# preemption); old entries are long finished.
_BROKEN_KEPT = 4096
# Stands in for -inf inside the fusion arithmetic (float32 holds 4 x this).
_BANNED = -1e30


@dataclass
class _Member:
    spec: FusionSpec
    # vLLM's own running list of the request's output tokens (a live reference).
    output: list[int]


class FusionLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        try:
            parse_params(sampling_params)
        except FusionSpecError as exc:
            raise ValueError(str(exc)) from exc

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self._rows: dict[int, _Member] = {}
        self._broken: OrderedDict[str, None] = OrderedDict()

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token greedy decoding picks

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._rows.pop(index, None)
        for index, params, _prompt, output in batch_update.added:
            spec = parse_params(params)
            if spec is None:
                self._rows.pop(index, None)
            else:
                self._rows[index] = _Member(spec, output)
        for a, b, direction in batch_update.moved:
            moving = self._rows.pop(a, None)
            if direction == MoveDirectionality.SWAP:
                other = self._rows.pop(b, None)
                if other is not None:
                    self._rows[a] = other
            else:
                self._rows.pop(b, None)
            if moving is not None:
                self._rows[b] = moving

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        groups: dict[str, list[tuple[int, _Member]]] = defaultdict(list)
        for row, member in self._rows.items():
            groups[member.spec.group].append((row, member))
        for group, rows in groups.items():
            rows.sort(key=lambda rm: rm[1].spec.member)
            if group in self._broken or not _in_lockstep(rows):
                self._break(group, rows, logits)
                continue
            spec = rows[0][1].spec
            index = torch.tensor([row for row, _ in rows], dtype=torch.long, device=logits.device)
            members = logits.index_select(0, index).float()
            # Tokens a processor before this one banned (-inf: min_tokens, logit bias, bad
            # words, allowed ids) stay banned for the group; inside the arithmetic they are
            # a large finite number, since 0 * -inf (a weight of 0) would be NaN.
            banned = torch.isinf(members).any(dim=0) if not torch.isfinite(members).all() else None
            if banned is not None:
                members = members.masked_fill(banned, _BANNED)
            if spec.base:
                base, experts = members[0], members[1:]
                alphas = alphas_for(base, experts, spec.alphas, spec.prior)
                fused = fuse(base, experts, alphas)
            else:  # fixed weights summing to 1: the base's coefficient is 0
                assert spec.alphas is not None
                fused = fuse(None, members, torch.tensor(spec.alphas, dtype=members.dtype))
            if banned is not None:
                fused = fused.masked_fill(banned, float("-inf"))
            fused = fused.to(logits.dtype)
            logits[index] = fused.unsqueeze(0).expand(len(rows), -1)
        return logits

    def _break(self, group: str, rows: list[tuple[int, _Member]], logits: torch.Tensor) -> None:
        if group not in self._broken:
            log.warning(
                "fusion group %s lost lockstep (members %s at output lengths %s of %d); "
                "its request will fail",
                group,
                [m.spec.member for _, m in rows],
                [len(m.output) for _, m in rows],
                rows[0][1].spec.size,
            )
            self._broken[group] = None
            while len(self._broken) > _BROKEN_KEPT:
                self._broken.popitem(last=False)
        vocab = logits.shape[1]
        for row, member in rows:
            logits[row] = float("-inf")
            logits[row, (member.spec.member + 1) % vocab] = 0.0


def _in_lockstep(rows: list[tuple[int, _Member]]) -> bool:
    spec = rows[0][1].spec
    if [m.spec.member for _, m in rows] != list(range(spec.size)):
        return False
    length = len(rows[0][1].output)
    return all(len(m.output) == length for _, m in rows)


def processor_args() -> dict[str, Any]:
    """The engine arguments that install the processor."""
    return {"logits_processors": [QUALNAME]}
