"""The image tests (`make image-test`): the built image, run as deploy/ runs it.

They need a Docker engine and a built image named by CROSSTASK_IMAGE; `make test` leaves
this folder out (tests/conftest.py) and `make image-test` builds the image first."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.image.docker import docker
from tests.image.manifests import config_map, render

UID = 10001
API_KEY = "image-test-key"
ADMIN_KEY = "image-test-admin"
SECRETS = {"api-keys": API_KEY, "admin-key": ADMIN_KEY}
# Three engines at once (one store writer, two replicas) must fit this machine: a small KV
# cache and context instead of the manifests' production sizes.
SMALL_ENGINE = {"CROSSTASK_KV_CACHE_GB": "0.5", "CROSSTASK_MAX_MODEL_LEN": "2048"}


@pytest.fixture(scope="session")
def image() -> str:
    name = os.environ.get("CROSSTASK_IMAGE")
    assert name, "CROSSTASK_IMAGE names the image to test (make image-test sets it)"
    docker("image", "inspect", name)
    return name


@pytest.fixture(scope="session")
def server_manifests() -> list[dict[str, Any]]:
    return render("overlays/cpu")


@pytest.fixture(scope="session")
def config(server_manifests: list[dict[str, Any]]) -> dict[str, str]:
    return config_map(server_manifests)


def volume(folder: Path) -> str:
    """A host folder owned by the image's user, as fsGroup makes a pod's volume. Host
    folders rather than docker volumes: handing a docker volume to that user takes a
    container, and each container costs a copy of the whole image under the vfs driver."""
    folder.mkdir(parents=True)
    os.chown(folder, UID, UID)
    folder.chmod(0o770)
    return str(folder)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The manifests' claims as host folders."""
    root = tmp_path_factory.mktemp("volumes")
    root.chmod(0o755)
    return {
        claim: volume(root / claim)
        for claim in ("crosstask-store", "crosstask-adapters", "crosstask-batch")
    }
