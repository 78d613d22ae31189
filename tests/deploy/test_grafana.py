"""The Grafana dashboard is importable JSON and charts every documented metric, and
only those."""

from __future__ import annotations

import json
import re

from deploy_helpers import DEPLOY

DASHBOARD = DEPLOY / "grafana" / "crosstask-dashboard.json"

# The metric names the server exports (deploy/README.md, "Metrics").
METRICS = {
    "crosstask_requests_total",
    "crosstask_request_latency_seconds",
    "crosstask_time_to_first_token_seconds",
    "crosstask_prompt_tokens_total",
    "crosstask_completion_tokens_total",
    "crosstask_requests_running",
    "crosstask_requests_waiting",
    "crosstask_requests_aborted_total",
    "crosstask_retrieval_latency_seconds",
    "crosstask_store_size",
    "crosstask_routing_requests_total",
}
HISTOGRAMS = {
    "crosstask_request_latency_seconds",
    "crosstask_time_to_first_token_seconds",
    "crosstask_retrieval_latency_seconds",
}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def test_dashboard_metadata():
    d = dashboard()
    assert d["uid"] == "crosstask-overview" and d["title"] == "crosstask"
    names = {v["name"]: v for v in d["templating"]["list"]}
    assert (
        names["datasource"]["type"] == "datasource" and names["datasource"]["query"] == "prometheus"
    )
    assert {"namespace", "pod"} <= set(names)


def test_panels_are_well_formed():
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels():
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_every_documented_metric_is_charted():
    used = set()
    for expr in exprs():
        for name in re.findall(r"\bcrosstask_[a-z_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert base in METRICS, f"undocumented metric {name} in {expr}"
            if name != base:
                assert base in HISTOGRAMS, name
            used.add(base)
    assert used == METRICS


def test_queries_are_scoped_by_the_variables():
    for expr in exprs():
        assert 'namespace=~"$namespace"' in expr and 'pod=~"$pod"' in expr, expr
        assert expr.count("(") == expr.count(")"), expr
        assert expr.count("{") == expr.count("}"), expr


def test_histograms_use_rate_of_buckets():
    for expr in exprs():
        if "histogram_quantile" in expr:
            assert re.search(r"rate\(crosstask_[a-z_]+_bucket\{", expr), expr
            assert "by (le" in expr, expr
