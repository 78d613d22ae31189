"""The rewindable generator undoes exactly one step's draws, and the runner wrapper swaps
in rewindable copies that keep the seeded stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from serve.engine import seeded_sampling as cpu_seeded_sampling
from serve.engine.seeded_sampling import RewindableGenerator


def _draw(generator: torch.Generator) -> torch.Tensor:
    return torch.empty(4).exponential_(generator=generator)


def test_rewind_restores_the_state_before_the_step() -> None:
    generator = RewindableGenerator()
    generator.manual_seed(5)
    generator.mark_step()
    first = _draw(generator)
    generator.set_offset(generator.get_offset() - 4)  # vLLM's rewind call
    assert torch.equal(_draw(generator), first)


def test_positive_offsets_are_refused() -> None:
    with pytest.raises(RuntimeError):
        RewindableGenerator().set_offset(8)


@dataclass
class _State:
    generator: torch.Generator | None


@dataclass
class _Batch:
    req_ids: list[str]
    generators: dict[int, torch.Generator]


@dataclass
class _Runner:
    input_batch: _Batch
    requests: dict[str, _State]
    sampled: list[torch.Tensor] = field(default_factory=list)

    def _sample(self, *args: Any) -> None:
        for generator in self.input_batch.generators.values():
            self.sampled.append(_draw(generator))


def test_wrapped_sampling_swaps_in_rewindable_copies_of_the_same_stream() -> None:
    seeded = torch.Generator().manual_seed(11)
    reference = torch.Generator().manual_seed(11)
    runner = _Runner(_Batch(["a", "b"], {1: seeded}), {"a": _State(None), "b": _State(seeded)})

    runner_cls = type("Runner", (_Runner,), {})
    assert cpu_seeded_sampling.install(runner_cls)
    assert not cpu_seeded_sampling.install(runner_cls)
    runner.__class__ = runner_cls

    runner._sample(None)  # a partial prefill: drawn, then discarded and rewound
    swapped = runner.input_batch.generators[1]
    assert isinstance(swapped, RewindableGenerator)
    assert runner.requests["b"].generator is swapped
    swapped.set_offset(swapped.get_offset() - 4)
    runner._sample(None)  # the real first token
    assert torch.equal(runner.sampled[1], _draw(reference))
