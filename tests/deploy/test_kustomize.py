"""Every kustomization under deploy/ renders, and every object is valid Kubernetes.

Built-in kinds are validated with kubernetes-validate (its JSON schemas ship inside the
package, so this runs offline) in strict mode (unknown fields are errors) against
Kubernetes 1.32. Custom resources (the ServiceMonitor) have no schema there and are
checked structurally instead.
"""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from deploy_helpers import (
    ALL_RENDERS,
    COMPONENTS,
    DEPLOY,
    K8S_VERSION,
    KUSTOMIZATIONS,
    find,
    render,
)

pytestmark = pytest.mark.usefixtures("kubectl")

CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# Manifests applied on their own (not through a kustomization).
LOOSE_MANIFESTS = (
    DEPLOY / "secret.example.yaml",
    DEPLOY / "batch" / "batch-files-pod.yaml",
)


def _validate(doc: dict) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata'].get('name')}: {e.message} at {where}")


def _validate_service_monitor(doc: dict) -> None:
    spec = doc["spec"]
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
    assert doc["metadata"]["name"]
    assert spec["selector"]["matchLabels"], "a ServiceMonitor without a selector scrapes nothing"
    assert spec["endpoints"], "a ServiceMonitor needs endpoints"
    for ep in spec["endpoints"]:
        assert set(ep) <= {
            "port",
            "path",
            "interval",
            "scrapeTimeout",
            "scheme",
            "honorLabels",
            "relabelings",
            "metricRelabelings",
            "bearerTokenSecret",
            "authorization",
            "tlsConfig",
        }, ep
        assert isinstance(ep["port"], str) and ep["port"], "scrape a named Service port"
        assert ep.get("path", "/metrics").startswith("/")


def test_kubernetes_validate_has_the_target_version():
    assert kubernetes_validate.utils.major_minor(K8S_VERSION) in {
        kubernetes_validate.utils.major_minor(v) for v in kubernetes_validate.utils.all_versions()
    }


def test_strict_validation_catches_mistakes():
    """Guard against a validator that accepts anything."""
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": "eighty"}], "selectr": {}},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", ALL_RENDERS)
def test_renders_and_validates(name):
    docs = render(name)
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            _validate_service_monitor(doc)
        else:
            _validate(doc)


@pytest.mark.parametrize("name", ALL_RENDERS)
def test_namespaced_objects_have_the_namespace(name):
    for doc in render(name):
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "crosstask", (
                f"{doc['kind']}/{doc['metadata']['name']}"
            )


@pytest.mark.parametrize("name", ALL_RENDERS)
def test_names_are_unique(name):
    keys = [(d["kind"], d["metadata"]["name"]) for d in render(name)]
    assert len(keys) == len(set(keys))


def test_base_needs_no_custom_resource_definitions():
    for name in KUSTOMIZATIONS:
        assert not [d for d in render(name) if (d["apiVersion"], d["kind"]) in CUSTOM_KINDS], name


def test_every_kustomization_is_tested():
    """A kustomization added under deploy/ must be added to the lists in conftest.py."""
    known = {p.resolve() for p in KUSTOMIZATIONS.values()} | {
        p.resolve() for p in COMPONENTS.values()
    }
    on_disk = {p.parent.resolve() for p in DEPLOY.rglob("kustomization.yaml")}
    assert on_disk == known
    for path in COMPONENTS.values():
        assert yaml.safe_load((path / "kustomization.yaml").read_text())["kind"] == "Component"


@pytest.mark.parametrize("path", LOOSE_MANIFESTS, ids=lambda p: p.name)
def test_loose_manifests_validate(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        _validate(doc)


def test_secret_example_holds_placeholders_only():
    (secret,) = [d for d in yaml.safe_load_all((DEPLOY / "secret.example.yaml").read_text()) if d]
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "crosstask-api-keys"
    values = secret["stringData"]
    assert set(values) == {"api-keys", "admin-key"}
    for value in values.values():
        assert "REPLACE" in value, "the example must not carry usable keys"
    # The secret is never part of a kustomization (no placeholder keys get deployed).
    for name in ALL_RENDERS:
        assert not find(render(name), "Secret"), name


def test_prometheus_adapter_rule_exposes_the_queue_metric():
    rules = yaml.safe_load(
        (COMPONENTS["hpa-requests-waiting"] / "prometheus-adapter-rules.yaml").read_text()
    )
    (rule,) = rules["rules"]["custom"]
    assert "crosstask_requests_waiting" in rule["seriesQuery"]
    assert rule["name"]["as"] == "crosstask_requests_waiting"
    assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"
    assert rule["resources"]["overrides"]["namespace"]["resource"] == "namespace"
