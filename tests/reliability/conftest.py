"""Servers for the reliability suite: the session server (tests/conftest.py) and fresh,
dedicated servers for tests that flood, drain or kill one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import MODEL, SMALL_ENGINE, Server, clean_environment, launch, stop

# Ends the spare server: runs after every other test that uses it (marker in pyproject).
ENDS_SPARE_SERVER = "ends_spare_server"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The spare server is started once for the overload test and then drained by the drain
    # test: one server start instead of two. The drain test must come last of its users.
    enders = [item for item in items if item.get_closest_marker(ENDS_SPARE_SERVER)]
    if not enders:
        return
    others = [item for item in items if not item.get_closest_marker(ENDS_SPARE_SERVER)]
    users = [
        i for i, item in enumerate(others) if "spare_server" in getattr(item, "fixturenames", ())
    ]
    at = (users[-1] + 1) if users else len(others)
    items[:] = [*others[:at], *enders, *others[at:]]


def launch_dedicated(
    model_dir: Path,
    log_path: Path,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
) -> Server:
    """A server of the test's own: no store (a temporary CROSSTASK_HOME without one), no
    keys unless `env` sets them, a small engine."""
    home = log_path.parent / "home"
    home.mkdir(exist_ok=True)
    return launch(
        log_path,
        clean_environment(CROSSTASK_HOME=str(home), HF_HUB_OFFLINE="1", **(env or {})),
        ["--model", str(model_dir), "--served-model-name", MODEL, *SMALL_ENGINE, *(args or [])],
        model_dir,
    )


# The spare server's limits: two sequences run at once and two more may wait, so a burst
# of a dozen requests overflows it; a drain period long enough for a short stream on a
# busy CI machine.
SPARE_MAX_NUM_SEQS = 2
SPARE_MAX_WAITING = 2
SPARE_DRAIN_SECONDS = 60


@pytest.fixture(scope="session")
def spare_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("spare") / "server.log"
    started = launch_dedicated(
        model_dir,
        log_path,
        env={
            "CROSSTASK_MAX_WAITING": str(SPARE_MAX_WAITING),
            "CROSSTASK_DRAIN_SECONDS": str(SPARE_DRAIN_SECONDS),
            "CROSSTASK_RETRY_AFTER_SECONDS": "2",
        },
        args=["--max-num-seqs", str(SPARE_MAX_NUM_SEQS)],
    )
    try:
        yield started
    finally:
        stop(started.process)
