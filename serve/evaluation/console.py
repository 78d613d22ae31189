"""`crosstask eval`'s warnings, on stderr like all its messages. A module of its own so
that loading tasks can warn without importing the runner."""

from __future__ import annotations

import sys


def warn(message: str) -> None:
    print(f"crosstask eval: warning: {message}", file=sys.stderr, flush=True)
