"""The image run as deploy/README.md documents it for plain Docker (the image's user and
command, `--shm-size=1g`) serves; every start-up failure, Docker's own 64 MiB of /dev/shm
among them, exits non-zero within 10 s of the failure, with its cause in the last log line
(a supervisor restarts it; a container that is up but will never serve is the worst case).

Docker's 64 MiB is a container of its own, checked by Docker's clock (state and log
timestamps). The other failures run as `docker exec` in one container of the image: each
new container costs a copy of the whole image under the vfs storage driver, and the
process checked is the same one the image's entrypoint starts."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from tests.image.docker import Container, unique
from tests.server import free_port

EXIT_WITHIN_S = 10


def _when(stamp: str) -> datetime:
    # Docker's RFC 3339 with nanoseconds; Python takes microseconds.
    head, _, rest = stamp.partition(".")
    fraction = rest.rstrip("Z")[:6]
    return datetime.fromisoformat(f"{head}.{fraction:0<6}+00:00")


def _failed(image: str, *argv: str, shm: str = "1g") -> tuple[int, str, float]:
    """Run the image to its end: (exit code, last log line, seconds from the first line
    that names the failure to the exit)."""
    container = Container.start(
        [
            "docker",
            "run",
            "--name",
            unique("fails"),
            "--network",
            "host",
            *shm_flag(shm),
            image,
            *argv,
        ]
    )
    try:
        code = container.wait_exit(timeout=600)
        logs = subprocess.run(
            ["docker", "logs", "--timestamps", container.name],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        # Both streams, each line stamped by Docker; in time order.
        stamped = sorted(
            line for line in (logs.stdout + logs.stderr).splitlines() if line[:4].isdigit()
        )
        assert stamped, container.logs()
        finished = _when(str(container.state()["FinishedAt"]))
        failure = next(
            (line for line in stamped if "error" in line.lower() or "failed" in line.lower()),
            stamped[-1],
        )
        seconds = (finished - _when(failure.split(" ", 1)[0])).total_seconds()
        return code, stamped[-1].split(" ", 1)[1], seconds
    finally:
        container.remove()


def shm_flag(shm: str) -> list[str]:
    return [] if shm == "docker's default" else [f"--shm-size={shm}"]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_docker_run_as_documented_serves(image: str) -> None:
    port = free_port()
    container = Container.start(
        ["docker", "run", "--name", unique("plain"), "--network", "host", "--shm-size=1g",
         image, "serve", "--host", "127.0.0.1", "--port", str(port), "--enforce-eager"]
    )  # fmt: skip
    try:
        container.wait_healthy(f"http://127.0.0.1:{port}")
    finally:
        container.remove()


@pytest.fixture(scope="module")
def holder(image: str) -> Iterator[Container]:
    """One running container of the image (its user, 1 GiB of /dev/shm) to exec in."""
    container = Container.start(
        ["docker", "run", "--name", unique("holder"), "--network", "host", "--shm-size=1g",
         "--entrypoint", "sleep", image, "infinity"]
    )  # fmt: skip
    try:
        yield container
    finally:
        container.remove()


_LOGGED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _failed_in(holder: Container, *argv: str) -> tuple[int, str, float]:
    """Run `crosstask ARGV` in the holder to its end: (exit code, last line, seconds from
    the failure to the exit). The failure is the first logged line that says error or
    failed, else the last logged line, else the start (the failure comes after either, so
    the figure is an upper bound)."""
    result = subprocess.run(
        ["docker", "exec", holder.name, "sh", "-c",
         'echo "start $(date +%s.%N)"; crosstask "$@" 2>&1; code=$?; '
         'echo "exit $code $(date +%s.%N)"', "sh", *argv],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = result.stdout.strip().splitlines()
    _, began = lines[0].split()
    _, code, ended = lines[-1].split()
    output = lines[1:-1]
    stamped = [(m.group(1), line) for line in output if (m := _LOGGED.match(line))]
    failure = next(
        (stamp for stamp, line in stamped if "error" in line.lower() or "failed" in line.lower()),
        stamped[-1][0] if stamped else None,
    )
    failed_at = (
        datetime.strptime(failure, "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC).timestamp()
        if failure
        else float(began)
    )
    return int(code), output[-1], float(ended) - failed_at


@pytest.mark.parametrize(
    ("argv", "cause"),
    [
        (("serve", "--store", "/nowhere"), "--store /nowhere: no such folder"),
        (("serve", "--adapters", "/nowhere"), "--adapters /nowhere: no such folder"),
        (("serve", "--model", "/tmp"), "not a Hugging Face model folder"),
        # vLLM refuses a context longer than the model's: the engine fails while loading.
        (("serve", "--max-model-len", "1000000", "--enforce-eager"), "start-up failed"),
    ],
)
def test_start_up_failures_exit_promptly(
    holder: Container, argv: tuple[str, ...], cause: str
) -> None:
    started = time.monotonic()
    code, last, seconds = _failed_in(
        holder, *argv, "--host", "127.0.0.1", "--port", str(free_port())
    )
    assert code != 0
    assert last.startswith("crosstask serve: error: ") and cause in last, last
    assert seconds <= EXIT_WITHIN_S, (seconds, last, time.monotonic() - started)


def test_port_in_use_exits_promptly(holder: Container, busy_port: int) -> None:
    code, last, seconds = _failed_in(
        holder, "serve", "--host", "127.0.0.1", "--port", str(busy_port)
    )
    assert code != 0
    assert f"cannot listen on 127.0.0.1:{busy_port}" in last, last
    assert seconds <= EXIT_WITHIN_S


def test_dockers_default_shared_memory_exits_promptly(image: str) -> None:
    code, last, seconds = _failed(
        image, "serve", "--host", "127.0.0.1", "--port", str(free_port()), shm="docker's default"
    )
    assert code != 0
    assert "/dev/shm has 64 MiB free" in last and "--shm-size=1g" in last, last
    assert seconds <= EXIT_WITHIN_S
