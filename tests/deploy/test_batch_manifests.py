"""The batch Jobs: an Indexed Job runs shard i of N in pod i, the merge Job joins exactly
the N shard outputs, and the numbers agree with each other."""

from __future__ import annotations

import pytest
from deploy_helpers import container, env_map, expand_k8s, one, referenced_vars, render

pytestmark = pytest.mark.usefixtures("kubectl")

ANNOTATION_PATH = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def shard_job() -> dict:
    return one(render("batch"), "Job", "crosstask-batch")


def merge_job() -> dict:
    return one(render("batch-merge"), "Job", "crosstask-batch-merge")


def shard_container() -> dict:
    return container(shard_job()["spec"]["template"]["spec"], "batch")


def shard_count() -> int:
    return shard_job()["spec"]["completions"]


def literal_env(c: dict, index: int) -> dict[str, str]:
    """The env the kubelet would see in pod `index` (literal values and the index)."""
    env = {name: e["value"] for name, e in env_map(c).items() if "value" in e}
    env["JOB_COMPLETION_INDEX"] = str(index)
    return env


def test_indexed_job_shape():
    spec = shard_job()["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == 4
    assert 1 <= spec["parallelism"] <= spec["completions"]
    # Per-index retries need restartPolicy Never; a retried pod resumes its own output.
    assert spec["backoffLimitPerIndex"] >= 1
    assert spec["maxFailedIndexes"] == 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_index_comes_from_the_downward_api():
    env = env_map(shard_container())
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == ANNOTATION_PATH
    # The shard count the pods use is the Job's completions.
    assert env["CROSSTASK_BATCH_SHARDS"]["value"] == str(shard_count())


def test_args_only_reference_declared_env():
    """Kubernetes expands $(VAR) in args only for variables in the container's env; an
    undeclared reference would reach crosstask literally."""
    c = shard_container()
    declared = set(env_map(c))
    for arg in c["args"]:
        assert referenced_vars(arg) <= declared, arg
    assert "command" not in c, "the image's ENTRYPOINT (crosstask) runs the shard"


def test_each_pod_runs_its_own_shard():
    c = shard_container()
    n = shard_count()
    outputs = set()
    for i in range(n):
        args = [expand_k8s(a, literal_env(c, i)) for a in c["args"]]
        # crosstask batch INPUT OUTPUT --shard I/N
        assert args[0] == "batch" and len(args) == 5
        assert args[3:] == ["--shard", f"{i}/{n}"]
        assert args[1] == "/data/batch/input.jsonl"
        outputs.add(args[2])
    assert len(outputs) == n, "every shard writes its own output file"


def test_merge_joins_exactly_the_shard_outputs():
    c = shard_container()
    n = shard_count()
    shard_outputs = []
    for i in range(n):
        args = [expand_k8s(a, literal_env(c, i)) for a in c["args"]]
        shard_outputs.append(args[2])
    shard_input = expand_k8s(c["args"][1], literal_env(c, 0))

    m = container(merge_job()["spec"]["template"]["spec"], "merge")
    args = m["args"]
    assert args[:2] == ["batch", "merge"]
    out = args[args.index("--out") + 1]
    inp = args[args.index("--input") + 1]
    rest = [
        a
        for j, a in enumerate(args[2:], start=2)
        if args[j - 1] not in ("--out", "--input") and not a.startswith("--")
    ]
    assert inp == shard_input
    assert sorted(rest) == sorted(shard_outputs)
    assert out not in shard_outputs and out != inp


def test_jobs_share_the_batch_volume():
    for job in (shard_job(), merge_job()):
        spec = job["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["batch"]["persistentVolumeClaim"]["claimName"] == "crosstask-batch"
        (c,) = spec["containers"]
        assert {"name": "batch", "mountPath": "/data/batch"} in c["volumeMounts"]
    pvc = one(render("batch"), "PersistentVolumeClaim", "crosstask-batch")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("which", ["shards", "merge"])
def test_batch_pods_are_locked_down(which):
    job = shard_job() if which == "shards" else merge_job()
    spec = job["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(
            c["resources"]["limits"]
        )
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])


def test_batch_reads_the_shared_store_read_only():
    c = shard_container()
    env = env_map(c)
    assert env["CROSSTASK_STORE_READONLY"]["value"] == "true"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["store"]["readOnly"] is True and mounts["adapters"]["readOnly"] is True
