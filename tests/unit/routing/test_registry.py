"""The adapter registry's path checks: whatever the file system refuses about a requested
path is an AdapterError with a 4xx status, never an OSError out of the request."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from routing import registry as registry_module
from routing.registry import AdapterError, AdapterRegistry
from tests.unit.tiny_lora import write_tiny_base, write_tiny_lora


@pytest.fixture
def registry(tmp_path: Path) -> AdapterRegistry:
    root = tmp_path / "adapters"
    write_tiny_lora(root / "good")
    (root / "plain-file").write_text("not a folder")
    os.symlink("loop-b", root / "loop-a")
    os.symlink("loop-a", root / "loop-b")
    return AdapterRegistry(root, write_tiny_base(tmp_path / "base"), max_rank=8)


def refusal(registry: AdapterRegistry, path: str | Path) -> AdapterError:
    with pytest.raises(AdapterError) as caught:
        registry.inspect("x", Path(path))
    return caught.value


def test_a_good_adapter_passes(registry: AdapterRegistry) -> None:
    adapter = registry.inspect("x", Path("good"))
    assert adapter.rank == 2 and adapter.path == registry.root / "good"


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("a" * 4000, 400, "invalid_adapter_path"),  # one name far past NAME_MAX
        ("/".join(["b" * 200] * 25), 400, "invalid_adapter_path"),  # past PATH_MAX
        ("nothing-here", 404, "adapter_not_found"),
        ("plain-file/below", 404, "adapter_not_found"),  # ENOTDIR
        ("plain-file", 400, "invalid_adapter"),
        ("loop-a", 403, "adapter_path_forbidden"),
        ("nul\x00byte", 400, "invalid_adapter_path"),
        ("../outside", 403, "adapter_path_forbidden"),
    ],
)
def test_every_bad_path_is_a_4xx(
    registry: AdapterRegistry, path: str, status: int, code: str
) -> None:
    error = refusal(registry, path)
    assert (error.status, error.code) == (status, code)
    assert len(str(error)) < 300  # a long path is not echoed in full


@pytest.mark.parametrize(
    ("err", "status", "code"),
    [
        (errno.EACCES, 403, "adapter_path_forbidden"),
        (errno.EPERM, 403, "adapter_path_forbidden"),
        (errno.ELOOP, 400, "invalid_adapter_path"),
        (errno.ENAMETOOLONG, 400, "invalid_adapter_path"),
        (errno.EIO, 400, "invalid_adapter_path"),
    ],
)
# The existence check, the folder and file checks after it, and the read of the weights.
@pytest.mark.parametrize("call", ["exists", "is_dir", "is_file", "_fingerprint"])
def test_os_errors_inside_the_root_are_4xx(
    registry: AdapterRegistry,
    monkeypatch: pytest.MonkeyPatch,
    err: int,
    status: int,
    code: str,
    call: str,
) -> None:
    # Tests may run as root, which no permission bit stops: the file system's refusal is
    # simulated.
    def refuse(path: Path, *args: object) -> bool:
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(registry_module if call.startswith("_") else Path, call, refuse)
    error = refusal(registry, "good")
    assert (error.status, error.code) == (status, code)
    assert str(registry.root) not in str(error)  # the server's folders stay private
