"""Prompt assembly with demonstrations."""

from __future__ import annotations

from retrieval.prompt import Demonstration, Turn, chat_turns, fit, plain_prompt

NEAR = Demonstration("a", "Define A.", "a-in-1", "a-out-1")
NEAR2 = Demonstration("a", "Define A.", "a-in-2", "a-out-2")
FAR = Demonstration("b", "Define B.", "b-in", "b-out")


def test_plain_prompt_puts_the_nearest_last_and_shares_definitions() -> None:
    text = plain_prompt("Define Q.", "q-in", [NEAR, NEAR2, FAR])
    assert text == (
        "Definition: Define B.\n\nInput: b-in\nOutput: b-out\n\n"
        "Definition: Define A.\n\nInput: a-in-2\nOutput: a-out-2\n\n"
        "Input: a-in-1\nOutput: a-out-1\n\n"
        "Definition: Define Q.\n\nInput: q-in\nOutput:"
    )


def test_plain_prompt_without_demonstrations_or_definition() -> None:
    assert plain_prompt(None, "q", []) == "Input: q\nOutput:"


def test_chat_turns_insert_shots_after_the_system_turn() -> None:
    turns = [Turn("system", "Define Q."), Turn("user", "q-in")]
    shaped = chat_turns(turns, "Define Q.", [NEAR, FAR])
    assert [t.role for t in shaped] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert shaped[1].content == "Definition: Define B.\n\nInput: b-in"
    assert shaped[2].content == "b-out"
    assert shaped[-1] == Turn("user", "Definition: Define Q.\n\nInput: q-in")


def test_chat_turns_leave_a_conversation_as_sent() -> None:
    turns = [Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "q-in")]
    shaped = chat_turns(turns, "", [NEAR])
    assert shaped[-3:] == turns


def test_chat_turns_add_the_task_as_system_turn_when_missing() -> None:
    shaped = chat_turns([Turn("user", "q-in")], "Define Q.", [NEAR])
    assert shaped[0] == Turn("system", "Define Q.")


def test_fit_drops_the_farthest_first() -> None:
    demos = [NEAR, NEAR2, FAR]
    sizes = {3: 300, 2: 200, 1: 100, 0: 10}
    kept, size = fit(demos, lambda d: sizes[len(d)], budget=150)
    assert kept == [NEAR]
    assert size == 100
    kept, size = fit(demos, lambda d: sizes[len(d)], budget=5)
    assert kept == []
    assert size == 10
