"""Containers for the image tests: started with `docker run`, read through `docker logs`
and `docker inspect`, always removed."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from dataclasses import dataclass

import httpx


def docker(*argv: str, timeout: float = 300, check: bool = True) -> str:
    result = subprocess.run(
        ["docker", *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


def unique(prefix: str) -> str:
    return f"crosstask-test-{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Container:
    name: str

    @classmethod
    def start(cls, command: list[str]) -> Container:
        """`command` is a whole `docker run --name NAME ...` line; it runs detached."""
        name = command[command.index("--name") + 1]
        subprocess.run(
            [command[0], command[1], "--detach", *command[2:]],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return cls(name)

    def logs(self) -> str:
        result = subprocess.run(
            ["docker", "logs", self.name], capture_output=True, text=True, timeout=60
        )
        return result.stdout + result.stderr

    def state(self) -> dict[str, object]:
        return dict(json.loads(docker("inspect", "--format", "{{json .State}}", self.name)))

    def running(self) -> bool:
        return bool(self.state()["Running"])

    def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} still running after {timeout} s")
            time.sleep(0.5)
        return int(self.state()["ExitCode"])  # type: ignore[call-overload]

    def wait_healthy(self, base_url: str, timeout: float = 600) -> float:
        """Seconds until /health answers 200; fails with the log if the container stops."""
        started = time.monotonic()
        while True:
            if not self.running():
                raise AssertionError(f"{self.name} exited:\n{self.logs()[-4000:]}")
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{self.name} not ready:\n{self.logs()[-4000:]}")
            time.sleep(1)

    def memory_mib(self) -> float:
        """Resident memory of the container's processes now (docker stats)."""
        text = docker("stats", "--no-stream", "--format", "{{.MemUsage}}", self.name)
        amount = text.split("/")[0].strip()
        units = {"KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0, "B": 1 / 1024 / 1024}
        for unit, factor in units.items():
            if amount.endswith(unit):
                return float(amount[: -len(unit)]) * factor
        raise AssertionError(f"docker stats: {text!r}")

    def remove(self) -> None:
        docker("rm", "--force", "--volumes", self.name, check=False)
