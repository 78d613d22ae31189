"""deploy/'s manifests as `docker run` arguments: the same user, read-only root, tmpfs and
shared memory, environment and arguments a pod would get, so that the image is tested
the way Kubernetes runs it (no cluster here: kustomize renders, docker runs)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def render(path: str) -> list[dict[str, Any]]:
    """`kubectl kustomize` of a folder under deploy/, as a list of objects."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "deploy" / path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def config_map(objects: list[dict[str, Any]]) -> dict[str, str]:
    maps = [o for o in objects if o["kind"] == "ConfigMap"]
    return {k: str(v) for m in maps for k, v in (m.get("data") or {}).items()}


@dataclass
class DockerRun:
    """What `docker run` needs to run one container of a pod spec."""

    user: str
    args: list[str]
    env: dict[str, str]
    flags: list[str] = field(default_factory=list)
    entrypoint: list[str] | None = None

    def command(self, image: str, name: str) -> list[str]:
        argv = ["docker", "run", "--name", name, "--network", "host", *self.flags]
        argv += ["--user", self.user]
        for key, value in self.env.items():
            argv += ["--env", f"{key}={value}"]
        if self.entrypoint is not None:
            argv += ["--entrypoint", self.entrypoint[0]]
            return [*argv, image, *self.entrypoint[1:], *self.args]
        return [*argv, image, *self.args]


def _size(limit: str | None) -> str:
    """A Kubernetes quantity (1Gi, 512Mi) as a docker size (1g, 512m)."""
    if not limit:
        return "1g"
    match = re.fullmatch(r"(\d+)([KMG])i?", limit)
    assert match, limit
    return f"{match.group(1)}{match.group(2).lower()}"


def _substitute(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args and commands."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def docker_run(
    pod: dict[str, Any],
    container_name: str,
    config: Mapping[str, str],
    volumes: Mapping[str, str],
    secrets: Mapping[str, str] | None = None,
    fields: Mapping[str, str] | None = None,
    init: bool = False,
) -> DockerRun:
    """The `docker run` form of the container (or init container) `container_name` of
    `pod` (a pod spec). `config`: the ConfigMap data; `volumes`: claim name -> docker
    volume (or host folder); `secrets`: secret key -> value; `fields`: fieldRef path ->
    value (the Job's completion index)."""
    pool = pod["initContainers"] if init else pod["containers"]
    container = next(c for c in pool if c["name"] == container_name)
    context = pod.get("securityContext", {}) | container.get("securityContext", {})
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config)
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = _substitute(str(item["value"]), env)
        elif "secretKeyRef" in (ref := item.get("valueFrom", {})):
            env[item["name"]] = (secrets or {})[ref["secretKeyRef"]["key"]]
        elif "fieldRef" in ref:
            env[item["name"]] = (fields or {})[ref["fieldRef"]["fieldPath"]]
    flags: list[str] = []
    if context.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    if context.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    for capability in context.get("capabilities", {}).get("drop", []):
        flags += ["--cap-drop", capability]
    by_name = {v["name"]: v for v in pod.get("volumes", [])}
    uid, gid = context.get("runAsUser", 0), context.get("runAsGroup", 0)
    for mount in container.get("volumeMounts", []):
        volume = by_name[mount["name"]]
        path = mount["mountPath"]
        if "emptyDir" in volume:
            empty = volume["emptyDir"] or {}
            size = _size(empty.get("sizeLimit"))
            if path == "/dev/shm":
                flags.append(f"--shm-size={size}")
            else:
                flags += ["--tmpfs", f"{path}:size={size},uid={uid},gid={gid},mode=0770"]
        elif "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]
            read_only = mount.get("readOnly") or claim.get("readOnly")
            source = volumes[claim["claimName"]]
            flags += ["--volume", f"{source}:{path}" + (":ro" if read_only else "")]
        else:
            raise AssertionError(f"volume kind not handled: {volume}")
    args = [_substitute(str(a), env) for a in container.get("args", [])]
    command = container.get("command")
    return DockerRun(
        user=f"{uid}:{gid}",
        args=args,
        env=env,
        flags=flags,
        entrypoint=[_substitute(str(c), env) for c in command] if command else None,
    )
