"""Helpers for the deployment tests: render kustomizations with `kubectl kustomize`,
find objects, expand $(VAR) like the kubelet. Imported by the tests as `deploy_helpers`
(conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

# Kubernetes version the manifests are validated against (kubectl here and in CI: 1.32).
K8S_VERSION = "1.32.0"

# Every kustomization under deploy/ that renders on its own, by name.
KUSTOMIZATIONS = {
    "base": DEPLOY / "base",
    "cpu": DEPLOY / "overlays" / "cpu",
    "gpu": DEPLOY / "overlays" / "gpu",
    "batch": DEPLOY / "batch",
    "batch-merge": DEPLOY / "batch" / "merge",
}
SERVER_OVERLAYS = ("cpu", "gpu")
COMPONENTS = {
    "servicemonitor": DEPLOY / "components" / "servicemonitor",
    "hpa-requests-waiting": DEPLOY / "components" / "hpa-requests-waiting",
}
# Overlay + every optional component, rendered through a temporary kustomization.
WITH_COMPONENTS = {f"{o}+components": o for o in SERVER_OVERLAYS}
ALL_RENDERS = tuple(KUSTOMIZATIONS) + tuple(WITH_COMPONENTS)


def kubectl_path() -> str | None:
    return shutil.which("kubectl")


@functools.cache
def _kustomize(directory: str) -> tuple[dict, ...]:
    kubectl = kubectl_path()
    assert kubectl is not None
    proc = subprocess.run(
        [kubectl, "kustomize", directory],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KUBECONFIG": os.devnull},  # rendering never needs a cluster
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(proc.stdout) if d)
    assert docs, f"kubectl kustomize {directory} rendered nothing"
    return docs


@functools.cache
def render(name: str) -> tuple[dict, ...]:
    """The objects `kubectl kustomize` renders for one entry of ALL_RENDERS."""
    if name in KUSTOMIZATIONS:
        return _kustomize(str(KUSTOMIZATIONS[name]))
    overlay = WITH_COMPONENTS[name]
    # kustomize refuses absolute paths in resources/components: use relative ones.
    with tempfile.TemporaryDirectory(prefix="crosstask-kustomize-") as tmp:
        rel = lambda p: os.path.relpath(p, tmp)  # noqa: E731
        (Path(tmp) / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "namespace": "crosstask",
                    "resources": [rel(KUSTOMIZATIONS[overlay])],
                    "components": [rel(c) for c in COMPONENTS.values()],
                }
            )
        )
        return _kustomize(tmp)


def find(docs, kind: str, name: str | None = None) -> list[dict]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs, kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def configmap_data(docs) -> dict[str, str]:
    (cm,) = [
        d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("crosstask-config")
    ]
    return cm["data"]


def container(pod_spec: dict, name: str) -> dict:
    (c,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return c


def env_map(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand_k8s(value: str, env: dict[str, str]) -> str:
    """Expand $(VAR) the way the kubelet does in command/args: defined variables are
    replaced, undefined references are left as they are, and $$ escapes a $."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR.sub(sub, value)


def referenced_vars(value: str) -> set[str]:
    return {m.group(1) for m in _VAR.finditer(value) if m.group(1)}
