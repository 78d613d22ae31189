"""The server overlays are what deploy/README.md says: probes, graceful shutdown,
rolling updates, resources, security context, config and secrets, the store with one
writer and many readers, autoscaling, disruption budget, network policy, monitoring."""

from __future__ import annotations

import pytest
from deploy_helpers import (
    SERVER_OVERLAYS,
    WITH_COMPONENTS,
    configmap_data,
    container,
    env_map,
    find,
    one,
    render,
)

pytestmark = pytest.mark.usefixtures("kubectl")

READER = "crosstask"
WRITER = "crosstask-store-writer"
SERVER_DEPLOYMENTS = (READER, WRITER)
PORT = 8000
UID = 10001
# Numbers deploy/README.md states.
PRESTOP_SLEEP = 10
GRACE_PERIOD = 60
STARTUP_BUDGET_SECONDS = 600
SECRET = "crosstask-api-keys"

overlays = pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
deployments = pytest.mark.parametrize("deployment", SERVER_DEPLOYMENTS)


def pod_spec(overlay: str, deployment: str) -> dict:
    return one(render(overlay), "Deployment", deployment)["spec"]["template"]["spec"]


def server(overlay: str, deployment: str) -> dict:
    return container(pod_spec(overlay, deployment), "crosstask")


def all_containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


# --- probes and shutdown --------------------------------------------------------------


@overlays
@deployments
def test_probes_use_health(overlay, deployment):
    c = server(overlay, deployment)
    (port,) = c["ports"]
    assert port == {"name": "http", "containerPort": PORT, "protocol": "TCP"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe


@overlays
@deployments
def test_startup_probe_allows_model_load(overlay, deployment):
    p = server(overlay, deployment)["startupProbe"]
    assert p["periodSeconds"] * p["failureThreshold"] == STARTUP_BUDGET_SECONDS


@overlays
@deployments
def test_readiness_reacts_fast_and_liveness_is_patient(overlay, deployment):
    c = server(overlay, deployment)
    ready, live = c["readinessProbe"], c["livenessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] <= 10
    # A busy replica must not be restarted for one slow answer.
    assert live["failureThreshold"] >= 3 and live["timeoutSeconds"] >= 5
    assert live["periodSeconds"] * live["failureThreshold"] >= 60


@overlays
@deployments
def test_graceful_shutdown_outlasts_prestop_and_drain(overlay, deployment):
    spec = pod_spec(overlay, deployment)
    c = server(overlay, deployment)
    assert c["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", str(PRESTOP_SLEEP)]}}
    drain = int(configmap_data(render(overlay))["CROSSTASK_DRAIN_SECONDS"])
    assert drain == 30
    assert spec["terminationGracePeriodSeconds"] == GRACE_PERIOD
    assert PRESTOP_SLEEP + drain < GRACE_PERIOD


@overlays
def test_readers_roll_without_losing_capacity(overlay):
    d = one(render(overlay), "Deployment", READER)["spec"]
    assert d["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert d.get("minReadySeconds", 0) > 0
    # The HPA owns the replica count.
    assert "replicas" not in d


@overlays
def test_single_writer(overlay):
    d = one(render(overlay), "Deployment", WRITER)["spec"]
    assert d["replicas"] == 1
    # Recreate: the old writer is gone before a new one starts.
    assert d["strategy"] == {"type": "Recreate"}


# --- resources --------------------------------------------------------------------------


@overlays
@deployments
def test_every_container_has_requests_and_limits(overlay, deployment):
    for c in all_containers(pod_spec(overlay, deployment)):
        res = c["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res[kind]), (c["name"], kind)


@deployments
def test_gpu_overlay_requests_one_gpu(deployment):
    spec = pod_spec("gpu", deployment)
    res = container(spec, "crosstask")["resources"]
    assert res["requests"]["nvidia.com/gpu"] == 1
    assert res["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])


@deployments
def test_cpu_overlay_is_guaranteed_qos_without_gpu(deployment):
    res = server("cpu", deployment)["resources"]
    assert res["requests"] == res["limits"]
    assert "nvidia.com/gpu" not in res["limits"]


@overlays
def test_images_are_pinned_per_target(overlay):
    for d in find(render(overlay), "Deployment"):
        for c in all_containers(d["spec"]["template"]["spec"]):
            image = c["image"]
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest", image
            assert tag.endswith(f"-{overlay}"), image
            assert c["imagePullPolicy"] == "IfNotPresent"


# --- security -----------------------------------------------------------------------


@overlays
@deployments
def test_pod_security_context(overlay, deployment):
    spec = pod_spec(overlay, deployment)
    sc = spec["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == UID and sc["runAsGroup"] == UID
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for c in all_containers(spec):
        csc = c["securityContext"]
        assert csc["readOnlyRootFilesystem"] is True, c["name"]
        assert csc["allowPrivilegeEscalation"] is False, c["name"]
        assert csc["runAsNonRoot"] is True, c["name"]
        assert csc["capabilities"] == {"drop": ["ALL"]}, c["name"]


@overlays
@deployments
def test_writable_scratch_on_read_only_root(overlay, deployment):
    spec = pod_spec(overlay, deployment)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in server(overlay, deployment)["volumeMounts"]}
    for path in ("/tmp", "/home/crosstask", "/dev/shm"):
        assert path in mounts, path
        assert "emptyDir" in volumes[mounts[path]], path
        assert volumes[mounts[path]]["emptyDir"].get("sizeLimit"), path
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_namespace_enforces_restricted_pod_security():
    ns = one(render("cpu"), "Namespace", "crosstask")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# --- configuration and secrets ------------------------------------------------------------


@overlays
@deployments
def test_config_from_configmap_keys_from_secret(overlay, deployment):
    docs = render(overlay)
    c = server(overlay, deployment)
    (env_from,) = c["envFrom"]
    cm_name = env_from["configMapRef"]["name"]
    assert one(docs, "ConfigMap", cm_name)
    env = env_map(c)
    for var, key in (("CROSSTASK_API_KEYS", "api-keys"), ("CROSSTASK_ADMIN_KEY", "admin-key")):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == SECRET and ref["key"] == key
        assert not ref.get("optional", False), "no Secret must mean no start, not no auth"
    for e in c.get("env", []):
        assert "KEY" not in e["name"] or "valueFrom" in e, f"{e['name']} must come from the Secret"


@overlays
def test_configmap_settings(overlay):
    data = configmap_data(render(overlay))
    assert data["CROSSTASK_PORT"] == str(PORT)
    assert data["CROSSTASK_HOST"] == "0.0.0.0"
    assert data["HF_HUB_OFFLINE"] == "1" and data["TRANSFORMERS_OFFLINE"] == "1"
    assert data["CROSSTASK_STORE"] == "/var/lib/crosstask/store"
    assert data["CROSSTASK_ADAPTERS"] == "/var/lib/crosstask/adapters"
    assert int(data["CROSSTASK_STORE_RELOAD_SECONDS"]) > 0
    # Readers must have moved off a replaced snapshot before the writer deletes it.
    assert int(data["CROSSTASK_STORE_SNAPSHOT_GRACE_SECONDS"]) > 2 * int(
        data["CROSSTASK_STORE_RELOAD_SECONDS"]
    )
    for key in (
        "CROSSTASK_MAX_WAITING",
        "CROSSTASK_MAX_NUM_SEQS",
        "CROSSTASK_KV_CACHE_GB",
        "CROSSTASK_MAX_MODEL_LEN",
    ):
        assert int(data[key]) > 0, key
    assert "CROSSTASK_API_KEYS" not in data and "CROSSTASK_ADMIN_KEY" not in data


# --- the store: one writer, many readers ---------------------------------------------------


@overlays
def test_readers_mount_store_and_adapters_read_only(overlay):
    spec = pod_spec(overlay, READER)
    volumes = {v["name"]: v for v in spec["volumes"]}
    for name, claim in (("store", "crosstask-store"), ("adapters", "crosstask-adapters")):
        assert volumes[name]["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
    for c in all_containers(spec):
        for m in c["volumeMounts"]:
            if m["name"] in ("store", "adapters"):
                assert m["readOnly"] is True, (c["name"], m)
    assert env_map(server(overlay, READER))["CROSSTASK_STORE_READONLY"]["value"] == "true"


@overlays
def test_writer_owns_the_store(overlay):
    spec = pod_spec(overlay, WRITER)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["store"]["persistentVolumeClaim"] == {"claimName": "crosstask-store"}
    mounts = {m["name"]: m for m in server(overlay, WRITER)["volumeMounts"]}
    assert not mounts["store"].get("readOnly", False)
    writer_env = env_map(server(overlay, WRITER))
    assert writer_env["CROSSTASK_STORE_READONLY"]["value"] == "false"
    assert writer_env["CROSSTASK_STORE_PUBLISH_SNAPSHOTS"]["value"] == "true"
    # First install: the writer seeds the shared volumes; readers wait for it.
    (seed,) = spec["initContainers"]
    assert ".seeded" in seed["command"][-1]
    (wait,) = pod_spec(overlay, READER)["initContainers"]
    assert ".seeded" in wait["command"][-1]
    # ... and for its first published snapshot, which a read-only mount can open.
    assert "/var/lib/crosstask/store/CURRENT" in wait["command"][-1]


@overlays
def test_shared_volumes_are_read_write_many(overlay):
    for claim in ("crosstask-store", "crosstask-adapters"):
        pvc = one(render(overlay), "PersistentVolumeClaim", claim)
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


# --- services, autoscaling, disruption budget, network policy -----------------------------


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@overlays
def test_services_route_to_the_right_pods(overlay):
    docs = render(overlay)
    reader_labels = one(docs, "Deployment", READER)["spec"]["template"]["metadata"]["labels"]
    writer_labels = one(docs, "Deployment", WRITER)["spec"]["template"]["metadata"]["labels"]
    main = one(docs, "Service", "crosstask")["spec"]
    assert _selects(main["selector"], reader_labels) and _selects(main["selector"], writer_labels)
    writes = one(docs, "Service", "crosstask-store-writer")["spec"]
    assert _selects(writes["selector"], writer_labels) and not _selects(
        writes["selector"], reader_labels
    )
    for svc in (main, writes):
        assert svc["ports"] == [
            {"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}
        ]


@overlays
def test_hpa_scales_the_readers_on_cpu(overlay):
    hpa = one(render(overlay), "HorizontalPodAutoscaler", "crosstask")
    spec = hpa["spec"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": READER}
    assert spec["minReplicas"] >= 2 and spec["maxReplicas"] > spec["minReplicas"]
    (metric,) = spec["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


@overlays
def test_pdb_covers_the_readers_only(overlay):
    docs = render(overlay)
    pdb = one(docs, "PodDisruptionBudget", "crosstask")["spec"]
    assert pdb["maxUnavailable"] == 1
    reader_labels = one(docs, "Deployment", READER)["spec"]["template"]["metadata"]["labels"]
    writer_labels = one(docs, "Deployment", WRITER)["spec"]["template"]["metadata"]["labels"]
    assert _selects(pdb["selector"]["matchLabels"], reader_labels)
    assert not _selects(pdb["selector"]["matchLabels"], writer_labels)
    hpa = one(docs, "HorizontalPodAutoscaler", "crosstask")["spec"]
    assert hpa["minReplicas"] > pdb["maxUnavailable"]


@overlays
def test_network_policy_admits_only_the_http_port(overlay):
    docs = render(overlay)
    np = one(docs, "NetworkPolicy", "crosstask")["spec"]
    assert np["policyTypes"] == ["Ingress"]
    for label_set in (
        one(docs, "Deployment", READER)["spec"]["template"]["metadata"]["labels"],
        one(docs, "Deployment", WRITER)["spec"]["template"]["metadata"]["labels"],
    ):
        assert _selects(np["podSelector"]["matchLabels"], label_set)
    sources = []
    for rule in np["ingress"]:
        assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
        assert rule["from"], "an empty 'from' would admit everyone"
        sources += rule["from"]
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    } in sources


# --- optional components ---------------------------------------------------------------------


@pytest.mark.parametrize("name", WITH_COMPONENTS)
def test_queue_metric_component(name):
    hpa = one(render(name), "HorizontalPodAutoscaler", "crosstask")["spec"]
    kinds = [m["type"] for m in hpa["metrics"]]
    assert kinds == ["Resource", "Pods"]
    pods = hpa["metrics"][1]["pods"]
    assert pods["metric"]["name"] == "crosstask_requests_waiting"
    assert pods["target"]["type"] == "AverageValue"


@pytest.mark.parametrize("name", WITH_COMPONENTS)
def test_service_monitor_scrapes_the_main_service(name):
    docs = render(name)
    sm = one(docs, "ServiceMonitor", "crosstask")
    svc = one(docs, "Service", "crosstask")
    assert _selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    # Not the writer's Service too: its pod is already behind "crosstask" (no double scrape).
    writer_svc = one(docs, "Service", "crosstask-store-writer")
    assert not _selects(sm["spec"]["selector"]["matchLabels"], writer_svc["metadata"]["labels"])
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert ep["path"] == "/metrics"
