"""The V1 scheduler that keeps a fusion group's members together.

The logits processor can only fuse a group when all of its members sample in the same
step with the same history. vLLM's scheduler knows nothing of groups, and left alone it
splits them: the API process sends the members one by one, so one can arrive a step after
the others; the waiting loop stops admitting when the token budget, the free sequence
slots, the KV blocks or the LoRA slots run out, which can happen between two members; and
a running prefill can take the budget before the members' decodes. This subclass:

- holds arriving members back until the whole group has arrived, then queues them together;
- before each step, admits a waiting group only if all of it fits (the whole prompt of
  every member in the token budget, plus slots, KV blocks and LoRA slots, estimated
  conservatively from what running requests may take); otherwise the group, and everything
  queued behind it (first come, first served), waits for a later step;
- puts running members first, so that decodes of a group are scheduled before any long
  prefill can exhaust the budget, and are the last to be preempted.

Preemption of a single member can still happen under KV-cache pressure; the processor
detects the break and the request fails cleanly (serve/engine/fusion_processor.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler

from routing.fusion.spec import FusionSpec, parse_params

QUALNAME = f"{__name__}.FusionScheduler"


@dataclass(frozen=True)
class Queued:
    """What admission needs to know of one waiting request."""

    group: str | None
    size: int
    tokens: int  # tokens to compute to finish its prefill
    blocks: int  # KV blocks its prefill needs
    lora: int | None


def held_from(
    waiting: Sequence[Queued],
    token_budget: int,
    free_slots: int,
    free_blocks: int,
    loras: Iterable[int],
    max_loras: int | None,
) -> int:
    """The index in `waiting` from which requests are held back this step (len(waiting) to
    admit all): the first complete group (its members adjacent, as queued together) that
    would not fit whole in what the requests before it leave."""
    in_use = set(loras)
    i = 0
    while i < len(waiting):
        queued = waiting[i]
        members = list(waiting[i : i + queued.size]) if queued.group is not None else []
        if (
            queued.group is None
            or len(members) < queued.size
            or any(m.group != queued.group for m in members)
        ):
            # A plain request, or a group already broken (a member preempted alone): the
            # base scheduler takes it as it comes.
            token_budget -= queued.tokens
            free_slots -= 1
            free_blocks -= queued.blocks
            if queued.lora is not None:
                in_use.add(queued.lora)
            i += 1
            continue
        needed_loras = in_use | {m.lora for m in members if m.lora is not None}
        fits = (
            sum(m.tokens for m in members) <= token_budget
            and len(members) <= free_slots
            and sum(m.blocks for m in members) <= free_blocks
            and (max_loras is None or len(needed_loras) <= max_loras)
        )
        if not fits:
            return i
        token_budget -= sum(m.tokens for m in members)
        free_slots -= len(members)
        free_blocks -= sum(m.blocks for m in members)
        in_use = needed_loras
        i += len(members)
    return len(waiting)


class FusionScheduler(Scheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._arriving: dict[str, list[Any]] = {}

    # -- arrival ---------------------------------------------------------------------

    def add_request(self, request: Any) -> None:
        spec = parse_params(request.sampling_params)
        if spec is None:
            super().add_request(request)
            return
        members = self._arriving.setdefault(spec.group, [])
        members.append(request)
        if len(members) < spec.size:
            return
        del self._arriving[spec.group]
        members.sort(key=lambda r: parse_params(r.sampling_params).member)  # type: ignore[union-attr]
        for member in members:
            super().add_request(member)

    def finish_requests(self, request_ids: Any, finished_status: Any) -> Any:
        # An abort can come for a member still held on arrival (the client left, or the
        # API process could not send every member): forget it, and its group with it.
        if request_ids is None:
            self._arriving.clear()
        else:
            ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
            for group, members in list(self._arriving.items()):
                if any(m.request_id in ids for m in members):
                    del self._arriving[group]
        return super().finish_requests(request_ids, finished_status)

    # -- each step -------------------------------------------------------------------

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        self._members_first()
        held = self._hold_back()
        try:
            return super().schedule(*args, **kwargs)
        finally:
            if held:
                self.waiting.prepend_requests(reversed(held))

    def _members_first(self) -> None:
        members = [r for r in self.running if _spec(r) is not None]
        if members and len(members) < len(self.running):
            others = [r for r in self.running if _spec(r) is None]
            self.running[:] = members + others

    def _hold_back(self) -> list[Any]:
        waiting = list(self.waiting)
        if not any(_spec(r) is not None for r in waiting):
            return []
        block = self.block_size
        # What running requests may take this step: the rest of a prefill, or one token
        # (and at most one new block) per decode.
        running_tokens = sum(
            max(1, r.num_tokens_with_spec - r.num_computed_tokens) for r in self.running
        )
        queued = [
            Queued(
                group=spec.group if (spec := _spec(r)) is not None else None,
                size=spec.size if spec is not None else 1,
                tokens=max(1, r.num_tokens - r.num_computed_tokens),
                blocks=-(-(r.num_tokens + 1) // block),
                lora=r.lora_request.lora_int_id if r.lora_request is not None else None,
            )
            for r in waiting
        ]
        start = held_from(
            queued,
            token_budget=self.max_num_scheduled_tokens - running_tokens,
            free_slots=self.max_num_running_reqs - len(self.running),
            free_blocks=self.kv_cache_manager.block_pool.get_num_free_blocks() - len(self.running),
            loras=(r.lora_request.lora_int_id for r in self.running if r.lora_request is not None),
            max_loras=self.lora_config.max_loras if self.lora_config else None,
        )
        held = waiting[start:]
        if held:
            self.waiting.remove_requests(held)
        return held


def _spec(request: Any) -> FusionSpec | None:
    return parse_params(request.sampling_params)


def scheduler_args() -> dict[str, Any]:
    """The engine arguments that install the scheduler."""
    return {"scheduler_cls": QUALNAME}
