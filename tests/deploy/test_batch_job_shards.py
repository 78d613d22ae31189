"""The shards of a small batch file, run the way the Indexed Job runs them, merge back to
the unsharded output.

The Job's own manifests drive the run: the shard container's args (with $(VAR) expanded
from the container's env the way the kubelet does, JOB_COMPLETION_INDEX = i for pod i)
and the merge Job's args. Paths under the Jobs' volume mounts are mapped to a temporary
folder; `crosstask` (the image's ENTRYPOINT) runs as a subprocess with the local defaults
(`crosstask prepare`). CROSSTASK_MAX_NUM_SEQS=1 decodes one request at a time, so greedy
outputs do not depend on which requests share a batch, i.e. on the sharding; eager mode
and a small KV cache keep the six engine start-ups short.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_helpers import container, env_map, expand_k8s, one, referenced_vars, render

pytestmark = [pytest.mark.requires_batch, pytest.mark.usefixtures("kubectl")]

TIMEOUT = 900  # seconds per process: model load (+ compile) dominates
MODEL = os.environ.get("CROSSTASK_TEST_BATCH_MODEL", "auto")


def crosstask_exe() -> str:
    beside = Path(sys.executable).parent / "crosstask"
    path = str(beside) if beside.exists() else shutil.which("crosstask")
    if path is None:
        pytest.skip("the crosstask command is not installed")
    probe = subprocess.run([path, "batch", "--help"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip("`crosstask batch` does not exist yet")
    return path


def input_lines() -> list[dict]:
    params = {"temperature": 0, "max_tokens": 8, "seed": 1234}
    chat = [
        "Name a primary colour.",
        "What is 2 + 3? Answer with a number.",
        "Translate 'cat' into French.",
        "Is the sky green? Answer yes or no.",
    ]
    lines = [
        {
            "custom_id": f"chat-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": q}], **params},
        }
        for i, q in enumerate(chat)
    ]
    lines += [
        {
            "custom_id": "completion-0",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "The capital of France is", **params},
        },
        {
            "custom_id": "ext-0",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": "Count the objects the user lists."},
                    {"role": "user", "content": "an apple, a pear and a plum"},
                ],
                "crosstask": {"demonstrations": {"k": 0}},
                **params,
            },
        },
        # A bad line yields an output line with `error` set; it never stops the job.
        {"custom_id": "bad-0", "method": "POST", "url": "/v1/no-such-route", "body": {}},
        {
            "custom_id": "completion-1",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "One, two, three,", **params},
        },
    ]
    return lines


def map_paths(args: list[str], mounts: list[dict], root: Path) -> list[str]:
    """Container paths under a volume mount -> the same paths under root/<volume>."""
    out = []
    for arg in args:
        for m in mounts:
            prefix = m["mountPath"].rstrip("/") + "/"
            if arg.startswith(prefix):
                arg = str(root / m["name"] / arg[len(prefix) :])
                break
        out.append(arg)
    return out


def run(exe: str, args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, **env}
    )
    assert proc.returncode == 0, f"crosstask {' '.join(args)} failed:\n{proc.stderr[-4000:]}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def comparable(line: dict) -> tuple:
    """What must agree between sharded and unsharded runs (ids and timestamps need not)."""
    response = line.get("response") or {}
    body = response.get("body") or {}
    texts = []
    for choice in body.get("choices", []):
        texts.append(
            choice.get("text") if "text" in choice else (choice.get("message") or {}).get("content")
        )
    return (
        line["custom_id"],
        response.get("status_code"),
        line.get("error") is not None,
        tuple(texts),
    )


def test_sharded_job_merges_to_the_unsharded_output(tmp_path: Path):
    exe = crosstask_exe()

    job = one(render("batch"), "Job", "crosstask-batch")
    n = job["spec"]["completions"]
    shard = container(job["spec"]["template"]["spec"], "batch")
    assert "command" not in shard, "the Job relies on the image ENTRYPOINT (crosstask)"
    merge = container(
        one(render("batch-merge"), "Job", "crosstask-batch-merge")["spec"]["template"]["spec"],
        "merge",
    )

    # Literal env of the shard container; only what its args reference is passed on (the
    # store/adapter paths point into volumes that exist only in the cluster).
    literal = {name: e["value"] for name, e in env_map(shard).items() if "value" in e}
    used = set().union(*(referenced_vars(a) for a in shard["args"]))
    # Eager mode and a small cache: six engine start-ups, compiled, would take CI minutes.
    base_env = {
        "CROSSTASK_MAX_NUM_SEQS": "1",
        "CROSSTASK_ENFORCE_EAGER": "true",
        "CROSSTASK_KV_CACHE_GB": "1",
        "CROSSTASK_MAX_MODEL_LEN": "4096",
    }

    lines = input_lines()
    input_arg = map_paths([expand_k8s(shard["args"][1], literal)], shard["volumeMounts"], tmp_path)[
        0
    ]
    Path(input_arg).parent.mkdir(parents=True, exist_ok=True)
    Path(input_arg).write_text("".join(json.dumps(line) + "\n" for line in lines))

    shard_outputs = []
    for i in range(n):
        pod_env = {**literal, "JOB_COMPLETION_INDEX": str(i)}
        args = [expand_k8s(a, pod_env) for a in shard["args"]]
        assert all(not referenced_vars(a) for a in args), args
        args = map_paths(args, shard["volumeMounts"], tmp_path)
        env = {k: v for k, v in pod_env.items() if k in used | {"JOB_COMPLETION_INDEX"}}
        run(exe, args, {**base_env, **env})
        shard_outputs.append(Path(args[2]))
        assert shard_outputs[-1].exists()

    # Every input line went to exactly one shard.
    ids = [line["custom_id"] for out in shard_outputs for line in read_jsonl(out)]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines)

    merge_args = map_paths(list(merge["args"]), merge["volumeMounts"], tmp_path)
    run(exe, merge_args, base_env)
    merged = Path(merge_args[merge_args.index("--out") + 1])

    unsharded = tmp_path / "unsharded.jsonl"
    run(exe, ["batch", input_arg, str(unsharded)], base_env)

    merged_lines, unsharded_lines = read_jsonl(merged), read_jsonl(unsharded)
    assert [line["custom_id"] for line in merged_lines] == [line["custom_id"] for line in lines]
    assert [comparable(x) for x in merged_lines] == [comparable(x) for x in unsharded_lines]
    bad = next(x for x in merged_lines if x["custom_id"] == "bad-0")
    assert bad["error"] is not None
    for line in merged_lines:
        if line["custom_id"] != "bad-0":
            assert line["error"] is None and line["response"]["status_code"] == 200, line
