"""What the demonstration store takes and gives back: its records, ids and errors.

Free of NumPy, SQLite and FAISS, so that code which only passes demonstrations around
(the API layer, prompt building) can name them without loading the store's machinery.
"""

from __future__ import annotations

from dataclasses import dataclass

# A demonstration's id is this prefix and its seq in the database.
ID_PREFIX = "d"


class StoreError(RuntimeError):
    """The store cannot do what was asked (read-only, locked, closed, incompatible)."""


class ValidationError(StoreError, ValueError):
    """Bad input; raised before anything is written."""


@dataclass(frozen=True, slots=True)
class NewDemo:
    task: str
    input: str
    output: str
    definition: str = ""
    source: str = "api"


@dataclass(frozen=True, slots=True)
class Demo:
    id: str
    task: str
    definition: str
    input: str
    output: str
    source: str


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    task: str
    definition: str
    input: str
    output: str
    score: float
    source: str


def demo_id(seq: int) -> str:
    return ID_PREFIX + str(seq)


def parse_id(value: object) -> int | None:
    """The seq an id names; None for anything that is not an id of ours."""
    if not isinstance(value, str) or not value.startswith(ID_PREFIX):
        return None
    digits = value[len(ID_PREFIX) :]
    # isdigit() alone takes digits int() refuses (superscripts such as "²").
    return int(digits) if digits.isascii() and digits.isdigit() else None
