"""Text that JSON can carry but UTF-8 cannot: checked before a request is validated."""

from __future__ import annotations

from typing import Any


def find_lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string holding a lone UTF-16 surrogate (JSON allows the
    escape "\\ud800", but such text cannot be encoded as UTF-8: the tokenizer and the
    engine's wire format fail on it), or None when every string is valid Unicode."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where or "(body)"
        elif isinstance(item, dict):
            for key, child in item.items():
                # The path goes into an error message: keep it encodable itself.
                name = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
                stack.append((key, where))
                stack.append((child, f"{where}.{name}" if where else name))
        elif isinstance(item, list):
            stack.extend((child, f"{where}.{i}") for i, child in enumerate(item))
    return None
