"""The image's default run serves: its own baked store, adapter library and merge cache,
under the server Deployment's user, read-only root, tmpfs mounts and shared memory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.image.conftest import ADMIN_KEY, API_KEY, SECRETS, SMALL_ENGINE
from tests.image.docker import Container, unique
from tests.image.manifests import docker_run, one
from tests.server import free_port


@pytest.fixture(scope="module")
def server(
    image: str, server_manifests: list[dict[str, Any]], config: dict[str, str]
) -> Iterator[tuple[str, Container, float]]:
    pod = one(server_manifests, "Deployment", "crosstask")["spec"]["template"]["spec"]
    # The Deployment's container without its store and adapter volumes: the image's own
    # defaults (the read-only replica setup is tests/image/test_store_replicas.py).
    pod = {**pod, "volumes": [v for v in pod["volumes"] if "persistentVolumeClaim" not in v]}
    container_spec = next(c for c in pod["containers"] if c["name"] == "crosstask")
    container_spec = {
        **container_spec,
        "volumeMounts": [
            m for m in container_spec["volumeMounts"] if m["name"] not in ("store", "adapters")
        ],
    }
    pod = {**pod, "containers": [container_spec]}
    run = docker_run(pod, "crosstask", config, {}, SECRETS)
    for name in ("CROSSTASK_STORE", "CROSSTASK_ADAPTERS", "CROSSTASK_STORE_READONLY"):
        run.env.pop(name, None)
    port = free_port()
    run.env.update(SMALL_ENGINE, CROSSTASK_HOST="127.0.0.1", CROSSTASK_PORT=str(port))
    container = Container.start(run.command(image, unique("server")))
    base_url = f"http://127.0.0.1:{port}"
    try:
        cold_start = container.wait_healthy(base_url)
        yield base_url, container, cold_start
    finally:
        container.remove()


def test_default_run_serves_every_mode(server: tuple[str, Container, float]) -> None:
    base_url, container, cold_start = server
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)
    models = [m.id for m in client.models.list().data]
    base = models[0]
    adapters = [m for m in models if m not in (base, "auto")]
    assert len(adapters) >= 2, models
    messages = [{"role": "user", "content": "Name a primary color."}]
    chat = client.chat.completions.create(
        model=base,
        messages=messages,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    assert chat.choices[0].message.content
    completion = client.completions.create(
        model=base, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert completion.choices[0].text
    one_adapter = client.chat.completions.create(
        model=adapters[0],
        messages=messages,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    assert one_adapter.model_extra["crosstask"]["routing"]["mode"] == "adapter"
    for mode in ("merge", "fuse"):
        reply = client.chat.completions.create(
            model=base,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=8,
            temperature=0,
            extra_body={"crosstask": {"routing": {"mode": mode, "adapters": adapters[:2]}}},
        )
        assert reply.model_extra["crosstask"]["routing"]["mode"] == mode, reply.model_extra
        assert reply.choices[0].message.content is not None
    # The baked store is the image's own, read-only for the runtime user: served, and a
    # write is refused with a clear error rather than failing the start. It holds the
    # seen tasks where the build had BIG-bench, and nothing where it had not.
    headers = {"Authorization": f"Bearer {API_KEY}"}
    metrics = httpx.get(f"{base_url}/metrics", headers=headers, timeout=30).text
    size = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("crosstask_store_size")
    )
    search = httpx.post(
        f"{base_url}/v1/demonstrations/search",
        json={"query": "count the objects", "k": 2},
        headers=headers,
        timeout=30,
    )
    assert search.status_code == 200, search.text
    assert len(search.json()["data"]) == min(2, size), (size, search.text)
    added = httpx.post(
        f"{base_url}/v1/demonstrations",
        json={"task": "t", "definition": "d", "examples": [{"input": "a", "output": "b"}]},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=30,
    )
    assert added.status_code == 403 and added.json()["error"]["code"] == "store_read_only"
    print(
        json.dumps(
            {
                "cold_start_to_health_s": round(cold_start, 1),
                "memory_at_rest_mib": round(container.memory_mib()),
            }
        )
    )
