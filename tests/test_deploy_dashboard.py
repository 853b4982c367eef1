"""deploy/grafana/slaplanner.json: a dashboard whose every query names metrics the services export.

The exported names come from the code: the services' modules are imported and the metrics they
register with prometheus_client are read back (the decider's gauges, created on its first
target, from a registry of their own). A query naming anything else would show an empty panel.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from prometheus_client.registry import CollectorRegistry

from services.decider import gauges
from tests import test_deploy_manifests as deploy

DASHBOARD = deploy.DEPLOY / "grafana" / "slaplanner.json"
# Series Prometheus itself adds to every scrape target.
PROMETHEUS_SERIES = {"up"}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def names_of(registry: CollectorRegistry) -> set[str]:
    names = set()
    for family in registry.collect():
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


@cache
def exported_metrics() -> frozenset[str]:
    for module in ("shared.service", *(f"services.{s}.__main__" for s in deploy.SERVICES),
                   "services.actuator.service", "services.decider.service",
                   "services.forecaster.service"):
        importlib.import_module(module)
    own = CollectorRegistry()
    gauges.DeciderGauges(registry=own)
    return frozenset(names_of(prometheus_client.REGISTRY) | names_of(own))


@cache
def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def queries() -> list[str]:
    exprs = [t["expr"] for p in panels() for t in p["targets"]]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names of a PromQL expression (or a Grafana label_values() query)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"label_values\(([^,)]+),[^)]*\)", r"\1", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        follows = text[match.end():].lstrip()[:1]
        if follows == "(" or word.lower() in PROMQL_WORDS or word.startswith("$"):
            continue
        if text[max(0, match.start() - 1)] == "$":
            continue
        names.add(word)
    return names


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    board = dashboard()
    assert board["uid"] == "slaplanner" and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "deployment"} <= variables
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["description"], panel["title"]
        for target in panel["targets"]:
            assert metric_names(target["expr"]), target


def test_the_metric_name_reader_reads_promql() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le, service) '
        '(rate(slaplanner_handler_seconds_bucket{service=~"$s"}[$__rate_interval])))'
    ) == {"slaplanner_handler_seconds_bucket"}
    assert metric_names("a_gauge / on (deployment) b_gauge{x=\"y\"} > bool 1") == {
        "a_gauge", "b_gauge"}
    assert metric_names("label_values(slaplanner_decider_ttft_target_seconds, deployment)") == {
        "slaplanner_decider_ttft_target_seconds"}


def test_every_query_names_only_metrics_the_services_export() -> None:
    exported = exported_metrics()
    # the reading of the registry found the services' metrics, not an empty registry
    assert {"slaplanner_messages_rejected_total", "slaplanner_actuator_outcomes_total",
            "slaplanner_decider_desired_replicas"} <= exported
    unknown = {(expr, name) for expr in queries() for name in metric_names(expr)
               if name not in exported and name not in PROMETHEUS_SERIES}
    assert unknown == set()


@pytest.mark.parametrize(
    ("what", "together"),
    [
        ("TTFT p99 and mean against its target", {
            "slaplanner_decider_observed_ttft_p99_seconds",
            "slaplanner_decider_observed_ttft_seconds", "slaplanner_decider_ttft_target_seconds"}),
        ("ITL p99 and mean against its target", {
            "slaplanner_decider_observed_itl_p99_seconds",
            "slaplanner_decider_observed_itl_seconds", "slaplanner_decider_itl_target_seconds"}),
        ("observed attainment: the shares within each target", {
            "slaplanner_decider_observed_ttft_attainment_ratio",
            "slaplanner_decider_observed_itl_attainment_ratio"}),
        ("predicted attainment", {"slaplanner_decider_predicted_attainment_ratio"}),
        ("the binding rule", {"slaplanner_decider_binding_rule"}),
        ("request rate and forecast", {"slaplanner_decider_observed_request_rate_per_second",
                                       "slaplanner_decider_forecast_request_rate_per_second"}),
        ("replicas, desired vs running", {"slaplanner_decider_desired_replicas",
                                          "slaplanner_decider_observed_workers"}),
        ("correction factors", {"slaplanner_decider_prefill_correction_factor",
                                "slaplanner_decider_decode_correction_factor"}),
        ("rejected messages", {"slaplanner_messages_rejected_total"}),
    ],
)
def test_a_panel_shows(what: str, together: set[str]) -> None:
    shown = [p["title"] for p in panels()
             if together <= {n for t in p["targets"] for n in metric_names(t["expr"])}]
    assert shown, what


def test_every_decider_gauge_of_docs_metrics_is_on_the_dashboard() -> None:
    documented = set(re.findall(r"^\| `(slaplanner_decider_\w+)` \|",
                                (deploy.REPO / "docs" / "metrics.md").read_text(), re.M))
    assert documented
    shown = {n for expr in queries() for n in metric_names(expr)}
    assert documented - shown == set()


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    rules = []
    for i, expr in enumerate(q for q in queries() if not q.startswith("label_values(")):
        concrete = (expr.replace("$__rate_interval", "5m").replace("$deployment", ".*")
                    .replace("$namespace", ".*"))
        rules.append({"record": f"dashboard:query_{i}", "expr": concrete})
    (tmp_path / "rules.json").write_text(json.dumps({"groups": [{"name": "dashboard",
                                                                 "rules": rules}]}))
    checked = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.json")],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
