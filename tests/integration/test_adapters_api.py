"""Adapters through the real server: listing, `model: <adapter>`, explicit adapter and merge
routing, `auto`, runtime load/unload while requests run, and every refusal a 4xx with the
server still serving. The library is tests/conftest.py's random LoRAs."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import MODEL, Server

GREEDY = {"temperature": 0, "max_tokens": 12}
QUESTION = [{"role": "user", "content": "Name three fruits."}]


def chat(server: Server, key: str | None = None, **body: Any) -> httpx.Response:
    payload = {"model": MODEL, "messages": QUESTION, **GREEDY, **body}
    return httpx.post(
        f"{server.v1}/chat/completions", json=payload, headers=server.headers(key), timeout=300
    )


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def routing(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return dict(response.json()["crosstask"]["routing"])


def admin_post(
    server: Server, path: str, body: dict[str, Any], key: str | None = None
) -> httpx.Response:
    return httpx.post(
        f"{server.v1}/{path}",
        json=body,
        headers=server.headers(key or server.admin_key),
        timeout=300,
    )


def test_adapters_are_listed_with_tasks_and_rank(server: Server) -> None:
    listing = httpx.get(f"{server.v1}/adapters", headers=server.headers(), timeout=30).json()
    cards = {c["id"]: c for c in listing["data"]}
    assert {"alpha", "beta", "general", "plain"} <= set(cards)
    assert cards["beta"]["rank"] == 8 and cards["beta"]["tasks"] == ["task_beta"]
    assert cards["general"]["kind"] == "generalist" and cards["plain"]["routable"] is False
    models = httpx.get(f"{server.v1}/models", headers=server.headers(), timeout=30).json()
    by_id = {m["id"]: m for m in models["data"]}
    assert by_id["alpha"]["parent"] == MODEL and by_id["auto"]["parent"] == MODEL


def test_an_adapter_changes_the_output_and_model_name_equals_routing(server: Server) -> None:
    base = text(chat(server))
    by_model = chat(server, model="alpha")
    by_routing = chat(server, crosstask={"routing": {"mode": "adapter", "adapters": ["alpha"]}})
    assert text(by_model) == text(by_routing) != base
    assert routing(by_model) == {
        "mode": "adapter",
        "adapters": [{"name": "alpha", "weight": 1.0}],
        "scores": [],
        "reason": "",
    }
    assert routing(chat(server)) == {"mode": "off", "adapters": [], "scores": [], "reason": ""}


def test_merge_is_served_from_cache_after_the_first_build(server: Server) -> None:
    body = {"routing": {"mode": "merge", "adapters": ["alpha", "beta"], "weights": [3, 1]}}
    first = chat(server, crosstask=body)
    assert routing(first) == {
        "mode": "merge",
        "adapters": [{"name": "alpha", "weight": 0.75}, {"name": "beta", "weight": 0.25}],
        "scores": [],
        "reason": "",
    }
    hits = server.metric("crosstask_merge_cache_hits_total")
    second = chat(server, crosstask=body)
    assert text(second) == text(first)
    assert server.metric("crosstask_merge_cache_hits_total") == hits + 1
    # The same merge at [0.75, 0.25] is the same cached adapter.
    same = chat(server, crosstask={"routing": {**body["routing"], "weights": [0.75, 0.25]}})
    assert text(same) == text(first)
    assert text(first) not in (text(chat(server, model="alpha")), text(chat(server, model="beta")))


def test_auto_routes_by_the_query_and_honours_exclusions(server: Server) -> None:
    french = [
        {"role": "system", "content": "Translate the English sentence into French."},
        {"role": "user", "content": "The cat sleeps."},
    ]
    chosen = routing(chat(server, model="auto", messages=french))
    assert chosen["mode"] == "adapter" and chosen["adapters"][0]["name"] == "alpha"
    # The router says why: every candidate specialist's similarity, nearest first.
    assert chosen["scores"][0]["name"] == "alpha"
    similarities = [s["similarity"] for s in chosen["scores"]]
    assert similarities == sorted(similarities, reverse=True) and chosen["reason"]
    excluded = routing(
        chat(server, model="auto", messages=french, crosstask={"exclude_tasks": ["task_alpha"]})
    )
    # alpha (and the generalist, trained on task_alpha too) are out.
    assert "alpha" not in [a["name"] for a in excluded["adapters"]]
    assert "general" not in [a["name"] for a in excluded["adapters"]]


def test_routing_refusals_are_4xx(server: Server) -> None:
    cases = [
        ({"routing": {"mode": "adapter", "adapters": ["nope"]}}, 404),
        ({"routing": {"mode": "adapter", "adapters": ["alpha", "beta"]}}, 400),
        ({"routing": {"mode": "merge", "adapters": ["alpha", "beta"], "weights": [1, -1]}}, 400),
        ({"routing": {"mode": "merge", "adapters": ["alpha", "alpha"]}}, 400),
        ({"routing": {"mode": "merge", "adapters": ["alpha", "beta"], "weights": [1]}}, 400),
        ({"routing": {"mode": "fuse", "adapters": ["alpha"], "weights": [5]}}, 400),
        ({"routing": {"mode": "adapter", "adapters": ["alpha"], "alpha": "dynamic"}}, 400),
        ({"routing": {"mode": "off", "adapters": ["alpha"]}}, 400),
    ]
    for extension, status in cases:
        response = chat(server, crosstask=extension)
        assert response.status_code == status, (extension, response.text)
        assert response.json()["error"]["message"]
    nan = httpx.post(
        f"{server.v1}/chat/completions",
        content=json.dumps(
            {
                "model": MODEL,
                "messages": QUESTION,
                "crosstask": {"routing": {"mode": "merge", "adapters": ["alpha", "beta"]}},
            }
        ).replace('"beta"]', '"beta"], "weights": [NaN, 1]'),
        headers={**server.headers(), "Content-Type": "application/json"},
        timeout=30,
    )
    assert nan.status_code == 400
    assert text(chat(server))  # still serving


def test_load_and_unload_round_trip_while_requests_run(server: Server, adapters_dir: Path) -> None:
    shutil.copytree(adapters_dir / "beta", adapters_dir / "gamma-src")
    results: list[int] = []

    def background() -> None:
        for _ in range(3):
            results.append(chat(server, max_tokens=24).status_code)

    worker = threading.Thread(target=background)
    worker.start()
    loaded = admin_post(
        server, "load_lora_adapter", {"lora_name": "gamma", "lora_path": "gamma-src"}
    )
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["id"] == "gamma" and loaded.json()["rank"] == 8
    assert text(chat(server, model="gamma")) == text(chat(server, model="beta"))
    again = admin_post(
        server, "load_lora_adapter", {"lora_name": "gamma", "lora_path": "gamma-src"}
    )
    assert again.status_code == 400 and again.json()["error"]["code"] == "adapter_exists"
    unloaded = admin_post(server, "unload_lora_adapter", {"lora_name": "gamma"})
    assert unloaded.status_code == 200
    assert chat(server, model="gamma").status_code == 404
    missing = admin_post(server, "unload_lora_adapter", {"lora_name": "gamma"})
    assert missing.status_code == 404
    worker.join()
    assert results == [200, 200, 200]


def test_bad_adapters_are_refused_and_the_server_keeps_serving(
    server: Server, adapters_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(adapters_dir / "alpha", outside)
    (adapters_dir / "link-out").symlink_to(outside, target_is_directory=True)

    broken = adapters_dir / "broken"
    shutil.copytree(adapters_dir / "alpha", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 64)

    high = adapters_dir / "high-rank"
    shutil.copytree(adapters_dir / "alpha", high)
    config = json.loads((high / "adapter_config.json").read_text())
    (high / "adapter_config.json").write_text(json.dumps({**config, "r": 4096}))

    other_base = adapters_dir / "other-base"
    shutil.copytree(adapters_dir / "alpha", other_base)
    meta = json.loads((other_base / "crosstask_adapter.json").read_text())
    meta["base_model"]["hidden_size"] = 4096
    (other_base / "crosstask_adapter.json").write_text(json.dumps(meta))

    pickled = adapters_dir / "pickled"
    shutil.copytree(adapters_dir / "alpha", pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")

    cases = [
        ("x1", str(outside), 403),
        ("x2", "../outside", 403),
        ("x3", "link-out", 403),
        ("x4", "/etc", 403),
        ("x5", "no-such-folder", 404),
        ("x6", "broken", 400),
        ("x7", "high-rank", 400),
        ("x8", "other-base", 400),
        ("x9", "pickled", 400),
        ("bad name!", "alpha", 400),
        ("merge-x", "alpha", 400),
        (MODEL, "alpha", 400),
    ]
    for name, path, status in cases:
        response = admin_post(server, "load_lora_adapter", {"lora_name": name, "lora_path": path})
        assert response.status_code == status, (name, path, response.text)
        assert response.json()["error"]["message"]
    listing = httpx.get(f"{server.v1}/adapters", headers=server.headers(), timeout=30).json()
    assert not {c["id"] for c in listing["data"]} & {"x1", "x3", "x6", "x7", "x8", "x9"}
    assert text(chat(server))


@pytest.mark.parametrize(("key", "status"), [(None, 401), ("test-key-2", 403), ("wrong", 401)])
def test_management_needs_the_admin_key(server: Server, key: str | None, status: int) -> None:
    body = {"lora_name": "alpha2", "lora_path": "alpha"}
    headers = server.headers(key) if key else {}
    response = httpx.post(f"{server.v1}/load_lora_adapter", json=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
