"""The modes of `crosstask eval` and what each sends (`K` is `--k`):

- `zero`: no help at all, in two prompt formats, both reported: `zero_plain` (a
  `/v1/completions` prompt "Definition/Input/Output") and `zero_chat` (`/v1/chat/completions`
  with the definition as the system message). `zero` is the better of the two.
- `retrieval`: the chat messages, with K retrieved demonstrations, base model.
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

MODES = ("zero", "retrieval", "adapter", "auto", "fusion")
# Extra modes that run only when asked for by name.
EXTRA_MODES = ("generalist",)
GENERALIST_ADAPTER = "generalist"
ZERO_VARIANTS = ("zero_plain", "zero_chat")
# What `--modes` accepts: the public modes, plus the two zero-shot formats on their own.
KNOWN_MODES = (*MODES, *EXTRA_MODES, *ZERO_VARIANTS)


@dataclass(frozen=True, slots=True)
class Variant:
    """One way of asking: an endpoint plus the `crosstask` extension it sends."""

    name: str
    endpoint: Literal["completions", "chat"]
    k: int
    routing: str
    adapters: tuple[str, ...] = ()

    def extension(self, task: str) -> dict[str, Any]:
        routing: dict[str, Any] = {"mode": self.routing}
        if self.adapters:
            routing["adapters"] = list(self.adapters)
        return {
            "demonstrations": {"k": self.k},
            "routing": routing,
            "exclude_tasks": [task],
        }


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
        "retrieval": Variant("retrieval", "chat", k, "off"),
        "adapter": Variant("adapter", "chat", 0, "auto"),
        "auto": Variant("auto", "chat", k, "auto"),
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
