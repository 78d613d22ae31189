"""deploy/batch's Indexed Job, in containers: its command on two shards, then the merge
Job, over store and adapter volumes seeded as deploy/ seeds them. Each output line's
custom_id, status and answer at temperature 0 equal those of `crosstask batch` run outside
the container on the same input, store and adapters (ids are random)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.image.conftest import SECRETS
from tests.image.docker import Container, unique
from tests.image.manifests import docker_run, one, render

SHARDS = 2


def _lines() -> list[dict[str, Any]]:
    prompts = [
        ("Count the objects.", "I have a chair, two tables and a lamp. How many objects?"),
        ("Answer with a number.", "What is 7 plus 5?"),
        ("Translate into French.", "Good morning"),
        ("Name the color.", "The sky on a clear day."),
        ("Give the opposite.", "hot"),
        ("Answer yes or no.", "Is water wet?"),
    ]
    lines = []
    for i, (task, text) in enumerate(prompts):
        body: dict[str, Any] = {"max_tokens": 12, "temperature": 0}
        if i % 2:
            url = "/v1/completions"
            body |= {"model": "auto", "prompt": f"{task}\n{text}\n"}
        else:
            url = "/v1/chat/completions"
            body |= {
                "model": "smollm2-135m-instruct",
                "messages": [
                    {"role": "system", "content": task},
                    {"role": "user", "content": text},
                ],
            }
        lines.append({"custom_id": f"line-{i}", "method": "POST", "url": url, "body": body})
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/nowhere", "body": {}})
    return lines


def _answers(path: Path) -> dict[str, tuple[int | None, str | None]]:
    out: dict[str, tuple[int | None, str | None]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        response = record.get("response") or {}
        body = response.get("body") or {}
        choices = body.get("choices") or [{}]
        text = choices[0].get("text") or (choices[0].get("message") or {}).get("content")
        out[record["custom_id"]] = (response.get("status_code"), text)
    return out


def _run_to_end(image: str, run_command: list[str]) -> str:
    container = Container.start(run_command)
    try:
        code = container.wait_exit(timeout=900)
        logs = container.logs()
        assert code == 0, logs[-4000:]
        return logs
    finally:
        container.remove()


@pytest.fixture(scope="module")
def batch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("batch")
    folder.chmod(0o777)  # the Job's user writes its shards here
    with (folder / "input.jsonl").open("w") as fh:
        for line in _lines():
            fh.write(json.dumps(line) + "\n")
    return folder


def test_sharded_job_and_merge_match_a_run_outside(
    image: str,
    server_manifests: list[dict[str, Any]],
    config: dict[str, str],
    volumes: dict[str, str],
    batch_dir: Path,
    tmp_path: Path,
) -> None:
    volumes = {**volumes, "crosstask-batch": str(batch_dir)}
    writer = one(server_manifests, "Deployment", "crosstask-store-writer")["spec"]["template"]
    seed = docker_run(writer["spec"], "seed", config, volumes, SECRETS, init=True)
    _run_to_end(image, seed.command(image, unique("seed")))

    job = one(render("batch"), "Job", "crosstask-batch")["spec"]["template"]["spec"]
    container = next(c for c in job["containers"] if c["name"] == "batch")
    for item in container["env"]:
        if item["name"] == "CROSSTASK_BATCH_SHARDS":
            item["value"] = str(SHARDS)
    for index in range(SHARDS):
        run = docker_run(
            job, "batch", config, volumes, SECRETS,
            fields={"metadata.annotations['batch.kubernetes.io/job-completion-index']": str(index)},
        )  # fmt: skip
        # Eager mode: the engine starts without compiling; the answers are the same.
        run.env["CROSSTASK_ENFORCE_EAGER"] = "true"
        _run_to_end(image, run.command(image, unique(f"shard-{index}")))
    merge_job = one(render("batch/merge"), "Job", "crosstask-batch-merge")["spec"]["template"]
    merge_spec = merge_job["spec"]
    merge_container = next(c for c in merge_spec["containers"] if c["name"] == "merge")
    merge_container["args"] = [
        a for a in merge_container["args"]
        if not a.startswith("/data/batch/shard-") or int(a[-7]) < SHARDS
    ]  # fmt: skip
    merge = docker_run(merge_spec, "merge", config, volumes, SECRETS)
    _run_to_end(image, merge.command(image, unique("merge")))

    # The same input outside the container, over the same store and adapters: the
    # volumes the seed container filled from the image.
    store, adapters = volumes["crosstask-store"], volumes["crosstask-adapters"]
    outside = tmp_path / "outside.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSTASK_")}
    env["CROSSTASK_HOME"] = os.environ.get("CROSSTASK_HOME", str(Path.home() / ".cache/crosstask"))
    subprocess.run(
        [
            sys.executable, "-m", "serve.cli", "batch", str(batch_dir / "input.jsonl"),
            str(outside), "--store", store, "--adapters", adapters,
            "--enforce-eager", "--no-progress",
        ],
        check=True, env=env, timeout=900, capture_output=True,
    )  # fmt: skip
    inside = _answers(batch_dir / "merged.jsonl")
    assert set(inside) == {line["custom_id"] for line in _lines()}
    assert inside == _answers(outside)
    assert inside["bad"][0] is None or inside["bad"][0] >= 400
    assert all(status == 200 for cid, (status, _) in inside.items() if cid != "bad"), inside
    # A routed completion may well stop at once (an empty text is an answer); the chat
    # lines, base model with the task as system message, always say something.
    assert all(inside[f"line-{i}"][1] for i in range(0, len(_lines()) - 1, 2)), inside
