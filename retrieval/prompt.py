"""Prompt assembly: the request's task definition and input, preceded by retrieved
demonstrations from other tasks, each shown with its own task's definition.

Two formats, chosen by measurement on the dev tasks (docs/retrieval.md):
- `plain`: one text of "Definition / Input / Output" blocks, completed after "Output:";
- `chat`: the chat template, each demonstration a user turn (its definition and input)
  answered by an assistant turn (its output), then the request's own messages.

Demonstrations are ordered farthest first, so the nearest one stands right before the
request; consecutive demonstrations of one task share one definition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Demonstration:
    task: str
    definition: str
    input: str
    output: str


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


def _block(definition: str | None, input: str, output: str | None) -> str:
    lines = []
    if definition:
        lines.append(f"Definition: {definition.strip()}\n")
    lines.append(f"Input: {input.strip()}")
    lines.append("Output:" if output is None else f"Output: {output.strip()}")
    return "\n".join(lines)


def shaped_instruction(definition: str | None, input: str) -> str:
    """A single instruction as the user turn after demonstrations asks it: "Definition:
    ... Input: ..." (`crosstask eval`'s `zero_shaped` sends it without demonstrations)."""
    return _block(definition, input, None).removesuffix("\nOutput:")


def _with_shared_definitions(demos: Sequence[Demonstration]) -> list[str | None]:
    """Each demonstration's definition, or None where the previous one already gave it."""
    shown: list[str | None] = []
    previous: str | None = None
    for demo in demos:
        shown.append(None if demo.definition == previous else demo.definition)
        previous = demo.definition
    return shown


def demonstration_blocks(demos: Sequence[Demonstration]) -> str:
    """`demos` best first (as the store returns them), rendered farthest first."""
    ordered = list(reversed(demos))
    return "\n\n".join(
        _block(shown, d.input, d.output)
        for d, shown in zip(ordered, _with_shared_definitions(ordered), strict=True)
    )


def plain_prompt(definition: str | None, input: str, demos: Sequence[Demonstration]) -> str:
    request = _block(definition, input, None)
    return f"{demonstration_blocks(demos)}\n\n{request}" if demos else request


def chat_turns(
    turns: Sequence[Turn], definition: str | None, demos: Sequence[Demonstration]
) -> list[Turn]:
    """The request's turns with the demonstrations inserted as earlier exchanges, after
    any system turn and before the rest. A single instruction is then asked in the
    demonstrations' own "Definition / Input" shape: on the dev tasks that scored better
    than leaving the user's turn as sent (docs/retrieval.md, "Prompt format, measured")."""
    ordered = list(reversed(demos))
    head = [t for t in turns[:1] if t.role in ("system", "developer")]
    rest = list(turns[len(head) :])
    shots: list[Turn] = []
    for demo, shown in zip(ordered, _with_shared_definitions(ordered), strict=True):
        text = shaped_instruction(shown, demo.input)
        shots += [Turn("user", text), Turn("assistant", demo.output.strip())]
    if not head and definition:
        head = [Turn("system", definition)]
    if len(rest) == 1 and rest[0].role == "user":
        # One instruction: ask it in the demonstrations' own shape.
        rest = [Turn("user", shaped_instruction(definition, rest[0].content))]
    return head + shots + rest


def request_prompt(
    turns: Sequence[Turn],
    definition: str,
    text: str,
    demos: Sequence[Demonstration],
    prompt_format: str,
) -> str | list[Turn]:
    """What the model is shown for a chat request: the turns to render with the chat
    template, or one text to encode as it stands (`plain` format, a single-turn request
    with demonstrations). `definition` and `text` are the request's task definition and
    last user message.

    The one place this decision is made, shared by the server and adapter training: an
    adapter trained on prompts laid out any other way would be trained for a prompt it
    never sees.
    """
    if not demos:
        return list(turns)
    single_turn = not any(t.role == "assistant" for t in turns)
    if prompt_format == "plain" and single_turn:
        return plain_prompt(definition, text, demos)
    return chat_turns(turns, definition, demos)


def fit(
    demos: Sequence[Demonstration], render: Callable[[Sequence[Demonstration]], int], budget: int
) -> tuple[list[Demonstration], int]:
    """Drop demonstrations, farthest first (they come best first), until the rendered
    prompt's token count is within `budget`. Returns the kept ones and that count."""
    kept = list(demos)
    while True:
        size = render(kept)
        if size <= budget or not kept:
            return kept, size
        kept.pop()
