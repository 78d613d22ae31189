"""deploy/README.md states the numbers the manifests and the Dockerfile use."""

from __future__ import annotations

import re

import pytest
from deploy_helpers import DEPLOY, REPO, configmap_data, container, env_map, one, render

README = DEPLOY / "README.md"

pytestmark = pytest.mark.usefixtures("kubectl")


def readme() -> str:
    return README.read_text()


def test_probe_and_shutdown_numbers():
    text = readme()
    c = container(
        one(render("cpu"), "Deployment", "crosstask")["spec"]["template"]["spec"], "crosstask"
    )
    startup = c["startupProbe"]
    minutes = startup["periodSeconds"] * startup["failureThreshold"] // 60
    assert f"every {startup['periodSeconds']} s, {startup['failureThreshold']} failures" in text
    assert f"up to **{minutes} minutes**" in text
    sleep = c["lifecycle"]["preStop"]["exec"]["command"][1]
    assert f"preStop hook sleeps {sleep} s" in text
    grace = one(render("cpu"), "Deployment", "crosstask")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    drain = configmap_data(render("cpu"))["CROSSTASK_DRAIN_SECONDS"]
    assert (
        f"terminationGracePeriodSeconds: {grace}` covers {sleep} s preStop + {drain} s drain"
        in text
    )
    assert "`maxUnavailable: 0`, `maxSurge: 1`" in text


def test_scaling_numbers():
    hpa = one(render("cpu"), "HorizontalPodAutoscaler", "crosstask")["spec"]
    assert f"between {hpa['minReplicas']} and\n{hpa['maxReplicas']} replicas" in readme()


def test_store_settings_are_documented_and_used():
    text = readme()
    for setting in (
        "CROSSTASK_STORE_READONLY=true",
        "CROSSTASK_STORE_READONLY=false",
        "CROSSTASK_STORE_RELOAD_SECONDS",
        "CROSSTASK_STORE_SNAPSHOT_GRACE_SECONDS",
    ):
        assert setting in text
    data = configmap_data(render("cpu"))
    for name in ("CROSSTASK_STORE_RELOAD_SECONDS", "CROSSTASK_STORE_SNAPSHOT_GRACE_SECONDS"):
        assert f"`{name}={data[name]}`" in text


def test_batch_numbers():
    job = one(render("batch"), "Job", "crosstask-batch")
    spec = job["spec"]
    text = readme()
    assert f"`completions: {spec['completions']}`" in text
    assert f"`parallelism: {spec['parallelism']}`" in text
    assert f"`backoffLimitPerIndex: {spec['backoffLimitPerIndex']}`" in text
    c = container(spec["template"]["spec"], "batch")
    assert "crosstask " + " ".join(c["args"]) in text
    assert (
        f'`CROSSTASK_BATCH_SHARDS` is `"{env_map(c)["CROSSTASK_BATCH_SHARDS"]["value"]}"`' in text
    )


def test_base_images_match_the_dockerfile():
    dockerfile = (REPO / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    text = readme()
    assert f"python:{args['PYTHON_VERSION']}-slim-trixie" in text
    assert f"nvidia/cuda:{args['CUDA_VERSION']}-base-ubuntu22.04" in text
    assert f"ghcr.io/astral-sh/uv:{args['UV_VERSION']}" in text
    assert "python:${PYTHON_VERSION}-slim-trixie" in dockerfile
    assert "nvidia/cuda:${CUDA_VERSION}-base-ubuntu22.04" in dockerfile


def test_every_metric_is_documented():
    from test_grafana import METRICS

    for metric in METRICS:
        assert f"`{metric}`" in readme(), metric
