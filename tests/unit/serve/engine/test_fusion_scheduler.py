"""Admission of fusion groups (serve/engine/fusion_scheduler.py `held_from`): a group is admitted
whole or held back with everything behind it."""

from __future__ import annotations

from serve.engine.fusion_scheduler import Queued


def plain(tokens: int = 10, lora: int | None = None) -> Queued:
    return Queued(None, 1, tokens, tokens // 16 + 1, lora)


def group(name: str, size: int, tokens: int, loras: list[int | None]) -> list[Queued]:
    return [Queued(name, size, tokens, tokens // 16 + 1, loras[i]) for i in range(size)]


def held(
    queue: list[Queued],
    budget: int = 1000,
    slots: int = 64,
    blocks: int = 1000,
    loras: tuple[int, ...] = (),
    max_loras: int | None = 8,
) -> int:
    from serve.engine.fusion_scheduler import held_from

    return held_from(queue, budget, slots, blocks, loras, max_loras)


def test_everything_fits() -> None:
    queue = [plain(), *group("g", 3, 100, [None, 1, 2]), plain()]
    assert held(queue) == len(queue)


def test_group_over_the_token_budget_waits_with_what_follows() -> None:
    queue = [plain(100), *group("g", 3, 300, [None, 1, 2]), plain()]
    # 100 + 3 * 300 = 1000 fits exactly; one token less does not.
    assert held(queue, budget=1000) == len(queue)
    assert held(queue, budget=999) == 1


def test_group_needs_slots_blocks_and_lora_slots() -> None:
    queue = group("g", 3, 10, [None, 1, 2])
    assert held(queue, slots=2) == 0
    assert held(queue, blocks=2) == 0
    assert held(queue, loras=(5, 6, 7), max_loras=4) == 0
    assert held(queue, loras=(1, 5, 6), max_loras=4) == 3  # adapter 1 is already in
    assert held(queue, max_loras=None) == 3


def test_a_partial_or_broken_group_is_left_to_the_base_scheduler() -> None:
    # One member preempted and queued alone: no group to keep together any more.
    queue = [group("g", 3, 10, [None, 1, 2])[1], plain()]
    assert held(queue, budget=5) == 2


def test_second_group_held_when_first_took_the_room() -> None:
    queue = [*group("a", 2, 400, [None, 1]), *group("b", 2, 400, [None, 2])]
    assert held(queue, budget=1000) == 2
