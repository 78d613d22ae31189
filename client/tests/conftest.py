from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any, Callable

import pytest

try:
    import crosstask_client  # noqa: F401
except ImportError:  # a source checkout without `pip install -e client`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from stub_server import StubServer  # noqa: E402

from crosstask_client import Crosstask  # noqa: E402


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


@pytest.fixture
def clients() -> Iterator[Callable[..., Crosstask]]:
    """Make ``Crosstask`` clients that are closed when the test ends."""
    made: list[Crosstask] = []

    def make(*args: Any, **kwargs: Any) -> Crosstask:
        client = Crosstask(*args, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
