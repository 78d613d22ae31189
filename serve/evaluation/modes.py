"""The modes of `crosstask eval` and what each sends (`K` is `--k`):

- `zero`: no help at all, in three prompt formats, all reported: `zero_plain` (a
  `/v1/completions` prompt "Definition/Input/Output"), `zero_chat` (`/v1/chat/completions`
  with the definition as the system message) and `zero_shaped` (the chat messages the
  server sends after demonstrations, without them: the system message, then a user turn
  "Definition: ... Input: ..."). `zero` is the best of them.
- `defaults`: the chat messages and nothing else (no `k`, no routing): what the server's
  own defaults make of a plain request.
- `retrieval`: the chat messages, with K demonstrations retrieved per input (scope
  `input`), base model.
- `retrieval_task`: the same with K demonstrations per task definition (scope `task`).
- `adapter`: no demonstrations, `routing.mode = "auto"` (the router picks adapters).
- `generalist`: no demonstrations, the adapter named `generalist` alone (`routing.mode =
  "adapter"`): the reference the router's choices are measured against.
- `auto`: K demonstrations and `routing.mode = "auto"`.
- `fusion`: no demonstrations, `routing.mode = "fuse"`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from retrieval.prompt import shaped_instruction

MODES = ("zero", "defaults", "retrieval", "adapter", "auto", "fusion")
# Extra modes that run only when asked for by name.
EXTRA_MODES = ("generalist", "retrieval_task")
GENERALIST_ADAPTER = "generalist"
ZERO_VARIANTS = ("zero_plain", "zero_chat", "zero_shaped")
# What `--modes` accepts: the public modes, plus the two zero-shot formats on their own.
KNOWN_MODES = (*MODES, *EXTRA_MODES, *ZERO_VARIANTS)


@dataclass(frozen=True, slots=True)
class Variant:
    """One way of asking: an endpoint and its messages, plus the `crosstask` extension it
    sends (`k` or `routing` None: not sent, the server's default applies)."""

    name: str
    endpoint: Literal["completions", "chat", "shaped"]
    k: int | None
    routing: str | None
    adapters: tuple[str, ...] = ()
    scope: Literal["task", "input"] | None = None

    def extension(self, task: str) -> dict[str, Any]:
        extension: dict[str, Any] = {}
        if self.k is not None:
            extension["demonstrations"] = {"k": self.k}
            if self.scope is not None:
                extension["demonstrations"]["scope"] = self.scope
        if self.routing is not None:
            extension["routing"] = {"mode": self.routing}
            if self.adapters:
                extension["routing"]["adapters"] = list(self.adapters)
        extension["exclude_tasks"] = [task]
        return extension


def parse_modes(text: str) -> list[str]:
    """`zero,retrieval` -> ["zero", "retrieval"]; unknown names raise ValueError."""
    modes: list[str] = []
    for part in text.split(","):
        name = part.strip()
        if not name:
            continue
        if name not in KNOWN_MODES:
            raise ValueError(f"unknown mode {name!r} (known: {', '.join(KNOWN_MODES)})")
        if name not in modes:
            modes.append(name)
    if not modes:
        raise ValueError("no mode given")
    return modes


def variants_for(modes: Sequence[str], k: int) -> list[Variant]:
    """The requests to run for the requested modes (`zero` runs both of its formats)."""
    table = {
        "zero_plain": Variant("zero_plain", "completions", 0, "off"),
        "zero_chat": Variant("zero_chat", "chat", 0, "off"),
        "zero_shaped": Variant("zero_shaped", "shaped", 0, "off"),
        "defaults": Variant("defaults", "chat", None, None),
        "retrieval": Variant("retrieval", "chat", k, "off", scope="input"),
        "retrieval_task": Variant("retrieval_task", "chat", k, "off", scope="task"),
        "adapter": Variant("adapter", "chat", 0, "auto"),
        # Demonstrations as the server decides (its default k, scope and gate).
        "auto": Variant("auto", "chat", None, "auto"),
        "fusion": Variant("fusion", "chat", 0, "fuse"),
        "generalist": Variant("generalist", "chat", 0, "adapter", (GENERALIST_ADAPTER,)),
    }
    names: list[str] = []
    for mode in modes:
        for name in ZERO_VARIANTS if mode == "zero" else (mode,):
            if name not in names:
                names.append(name)
    return [table[n] for n in names]


def plain_prompt(definition: str, text: str) -> str:
    return f"Definition: {definition}\n\nInput: {text}\nOutput:"


def chat_messages(definition: str, text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": definition}, {"role": "user", "content": text}]


def shaped_messages(definition: str, text: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": definition},
        {"role": "user", "content": shaped_instruction(definition, text)},
    ]
