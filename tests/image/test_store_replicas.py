"""deploy/'s store setup, in containers: the writer Deployment's seed init container fills
the store and adapter volumes from the image, the writer serves and publishes snapshots,
two read-only replicas (after their wait-for-store init container) follow them. A
demonstration added through the writer is served by both replicas after their reload."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.image.conftest import ADMIN_KEY, API_KEY, SECRETS, SMALL_ENGINE
from tests.image.docker import Container, unique
from tests.image.manifests import docker_run, one
from tests.server import free_port

RELOAD_SECONDS = "2"
PICKUP_TIMEOUT_S = 120


def _pod(manifests: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return dict(one(manifests, "Deployment", name)["spec"]["template"]["spec"])


def _run_init(image: str, pod: dict[str, Any], name: str, config: dict[str, str],
              volumes: dict[str, str]) -> str:  # fmt: skip
    run = docker_run(pod, name, config, volumes, SECRETS, init=True)
    container = Container.start(run.command(image, unique(name)))
    try:
        code = container.wait_exit(timeout=300)
        logs = container.logs()
        assert code == 0, logs
        return logs
    finally:
        container.remove()


def _serve(image: str, pod: dict[str, Any], config: dict[str, str], volumes: dict[str, str],
           role: str, **env: str) -> tuple[str, Container]:  # fmt: skip
    run = docker_run(pod, "crosstask", config, volumes, SECRETS)
    port = free_port()
    run.env.update(SMALL_ENGINE, CROSSTASK_HOST="127.0.0.1", CROSSTASK_PORT=str(port), **env)
    return f"http://127.0.0.1:{port}", Container.start(run.command(image, unique(role)))


@pytest.fixture(scope="module")
def servers(
    image: str,
    server_manifests: list[dict[str, Any]],
    config: dict[str, str],
    volumes: dict[str, str],
) -> Iterator[dict[str, str]]:
    writer_pod = _pod(server_manifests, "crosstask-store-writer")
    reader_pod = _pod(server_manifests, "crosstask")
    seeded = _run_init(image, writer_pod, "seed", config, volumes)
    assert "seeding /var/lib/crosstask/store" in seeded, seeded
    started: list[Container] = []
    try:
        writer_url, writer = _serve(image, writer_pod, config, volumes, "writer")
        started.append(writer)
        writer.wait_healthy(writer_url)
        _run_init(image, reader_pod, "wait-for-store", config, volumes)
        urls = {"writer": writer_url}
        for name in ("replica-1", "replica-2"):
            url, replica = _serve(
                image, reader_pod, config, volumes, name,
                CROSSTASK_STORE_RELOAD_SECONDS=RELOAD_SECONDS,
            )  # fmt: skip
            started.append(replica)
            urls[name] = url
        for container, name in zip(started[1:], ("replica-1", "replica-2"), strict=True):
            container.wait_healthy(urls[name])
        yield urls
    finally:
        for container in started:
            container.remove()


def _search(url: str, query: str) -> list[dict[str, Any]]:
    response = httpx.post(
        f"{url}/v1/demonstrations/search",
        json={"query": query, "k": 1},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    response.raise_for_status()
    return list(response.json()["data"])


def test_a_demonstration_added_through_the_writer_reaches_both_replicas(
    servers: dict[str, str],
) -> None:
    task = f"image_test_{uuid.uuid4().hex[:8]}"
    marker = f"zebra quartz {uuid.uuid4().hex[:6]}"
    added = httpx.post(
        f"{servers['writer']}/v1/demonstrations",
        json={
            "task": task,
            "definition": "Repeat the phrase.",
            "examples": [{"input": marker, "output": marker}],
        },
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=60,
    )
    assert added.status_code == 200, added.text
    for replica in ("replica-1", "replica-2"):
        refused = httpx.post(
            f"{servers[replica]}/v1/demonstrations",
            json={"task": task, "definition": "x", "examples": [{"input": "a", "output": "b"}]},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=30,
        )
        assert 400 <= refused.status_code < 500, refused.text
        deadline = time.monotonic() + PICKUP_TIMEOUT_S
        while True:
            hits = _search(servers[replica], f"Repeat the phrase. {marker}")
            if hits and hits[0]["task"] == task:
                break
            assert time.monotonic() < deadline, f"{replica} never served {task}: {hits}"
            time.sleep(1)
