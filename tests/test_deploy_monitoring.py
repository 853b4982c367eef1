"""deploy/monitoring (alert rules) and deploy/examples (KEDA, HPA): valid against their projects'
own schemas, naming only metrics the services export, and doing what they say: each alert fires
on series that should fire it and not on others (promtool), and Prometheus stores the decider's
series under the deployment's namespace, not the pod's, as the KEDA queries and alerts expect."""

from __future__ import annotations

import copy
import shutil
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

import jsonschema  # type: ignore[import-untyped]
import prometheus_client
import pytest
import yaml  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry

from services.decider import gauges
from shared.messages import DeploymentKey, ReplicaTarget
from tests import test_deploy_dashboard as dashboard
from tests import test_deploy_manifests as deploy
from tests import test_deploy_prometheus as scraping

CRDS = Path(__file__).parent / "data" / "crds"
RULES = deploy.DEPLOY / "monitoring" / "prometheus-rules.yaml"
SCALED_OBJECTS = deploy.DEPLOY / "examples" / "keda" / "scaledobjects.yaml"
HPAS = deploy.DEPLOY / "examples" / "hpa" / "hpa.yaml"
# The Prometheus scaler's trigger metadata (prometheusMetadata in KEDA v2.20.2's
# pkg/scalers/prometheus_scaler.go), and those it requires.
PROMETHEUS_SCALER_FIELDS = {
    "serverAddress", "query", "queryParameters", "threshold", "activationThreshold",
    "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion", "timeout",
    "identityOwner",
}
PROMETHEUS_SCALER_REQUIRED = {"serverAddress", "query", "threshold"}


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return binary


# --- the projects' own schemas ------------------------------------------------------------------

def strict(schema: Any) -> Any:
    """The schema as the API server's strict field validation applies it: an object with declared
    properties takes no others (unless it says it keeps unknown fields)."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the openAPIV3Schema of every vendored CRD version."""
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        for crd in deploy.load_yaml_documents(path.read_text()):
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def custom_resources() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in deploy.manifest_files(include_custom=True)
            for doc in deploy.documents(path)
            if doc["apiVersion"].split("/")[0] in deploy.CUSTOM_RESOURCE_GROUPS]


def test_the_vendored_schemas_are_the_ones_the_examples_use() -> None:
    used = {(doc["apiVersion"], doc["kind"]) for _, doc in custom_resources()}
    assert used == {("keda.sh/v1alpha1", "ScaledObject"),
                    ("monitoring.coreos.com/v1", "PrometheusRule"),
                    ("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate")}
    assert used <= set(crd_schemas())


@pytest.mark.parametrize(("path", "doc"), custom_resources(),
                         ids=lambda v: str(v.relative_to(deploy.DEPLOY))
                         if isinstance(v, Path) else v["metadata"]["name"])
def test_every_custom_resource_is_valid_against_its_projects_schema(
    path: Path, doc: dict[str, Any]
) -> None:
    schema = crd_schemas()[(doc["apiVersion"], doc["kind"])]
    # Draft 7, the JSON Schema that OpenAPI v3's schema objects follow; the schema itself is not
    # checked against the metaschema: its patterns are Go's regular expressions, not Python's.
    jsonschema.Draft7Validator(schema).validate(doc)
    # the base's (cert-manager's) get the namespace of the base's kustomization
    namespace = doc["metadata"].get("namespace")
    if path.resolve() in deploy.resource_files(deploy.BASE):
        namespace = namespace or deploy.kustomization(deploy.BASE)["namespace"]
    assert doc["metadata"]["name"] and namespace


@pytest.mark.parametrize("target", deploy.TARGETS)
def test_the_rendered_custom_resources_are_valid_against_their_projects_schema(
    target: str,
) -> None:
    found = [doc for doc in deploy.rendered(target) if deploy.is_custom(doc)]
    assert {doc["kind"] for doc in found} == {"Issuer", "Certificate"}
    for doc in found:
        jsonschema.Draft7Validator(crd_schemas()[(doc["apiVersion"], doc["kind"])]).validate(doc)
        assert doc["metadata"]["namespace"] == "slaplanner"


def test_the_strict_schema_refuses_a_field_keda_does_not_know() -> None:
    [doc, _] = deploy.documents(SCALED_OBJECTS)
    wrong = copy.deepcopy(doc)
    wrong["spec"]["maxReplicas"] = 16  # the HPA's spelling, not KEDA's maxReplicaCount
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        jsonschema.Draft7Validator(crd_schemas()[("keda.sh/v1alpha1", "ScaledObject")]).validate(
            wrong)


# --- KEDA and the HPA scale to the decider's desired replicas ----------------------------------

def scaled_objects() -> list[dict[str, Any]]:
    return list(deploy.documents(SCALED_OBJECTS))


def test_each_role_has_a_scaled_object_on_its_desired_replicas() -> None:
    roles = {}
    for doc in scaled_objects():
        [trigger] = doc["spec"]["triggers"]
        metadata = trigger["metadata"]
        assert trigger["type"] == "prometheus"
        assert set(metadata) <= PROMETHEUS_SCALER_FIELDS
        assert set(metadata) >= PROMETHEUS_SCALER_REQUIRED
        # AverageValue 1: the HPA sets ceil(desired / 1) replicas, the decider's number
        assert trigger["metricType"] == "AverageValue" and float(metadata["threshold"]) == 1.0
        assert dashboard.metric_names(metadata["query"]) == {
            "slaplanner_decider_desired_replicas"}
        role = "prefill" if 'role="prefill"' in metadata["query"] else "decode"
        assert f'role="{role}"' in metadata["query"]
        roles[role] = doc["spec"]["scaleTargetRef"]
        # what the actuator guards, KEDA must not undo: no scale to zero, hold on missing data
        assert doc["spec"]["minReplicaCount"] >= 1
        assert doc["spec"]["fallback"]["behavior"] == "currentReplicasIfHigher"
        assert metadata["ignoreNullValues"] == "false"
    assert set(roles) == {"prefill", "decode"}
    assert {ref["kind"] for ref in roles.values()} == {"DynamoGraphDeploymentScalingAdapter"}


def test_each_role_has_an_hpa_on_its_desired_replicas() -> None:
    roles = set()
    for doc in deploy.documents(HPAS):
        [metric] = doc["spec"]["metrics"]
        assert metric["external"]["metric"]["name"] == "slaplanner_decider_desired_replicas"
        assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}
        roles.add(metric["external"]["metric"]["selector"]["matchLabels"]["role"])
    assert roles == {"prefill", "decode"}


def test_the_queries_and_rules_are_valid_promql_on_exported_metrics(tmp_path: Path) -> None:
    exported = dashboard.exported_metrics()
    rules = yaml.safe_load(RULES.read_text())["spec"]
    queries = [doc["spec"]["triggers"][0]["metadata"]["query"] for doc in scaled_objects()]
    exprs = queries + [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    unknown = {(expr, name) for expr in exprs for name in dashboard.metric_names(expr)
               if name not in exported and name not in dashboard.PROMETHEUS_SERIES}
    assert unknown == set()
    rules["groups"].append({"name": "keda", "rules": [
        {"record": f"keda:query_{i}", "expr": query} for i, query in enumerate(queries)]})
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    checked = subprocess.run([promtool(), "check", "rules", str(tmp_path / "rules.yaml")],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- the alerts fire when they should and only then ---------------------------------------------

LLAMA = 'namespace="prod", deployment="llama", job="slaplanner", pod="slaplanner-decider-0"'
CALM = 'namespace="prod", deployment="calm", job="slaplanner", pod="slaplanner-decider-0"'


def alert_test(alert: str, series: dict[str, str], at_minutes: int,
               fires: list[dict[str, Any]], quiet_before_minutes: int) -> dict[str, Any]:
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "alert_rule_test": [
            {"eval_time": f"{quiet_before_minutes}m", "alertname": alert, "exp_alerts": []},
            {"eval_time": f"{at_minutes}m", "alertname": alert, "exp_alerts": fires},
        ],
    }


def test_every_alert_fires_on_its_cause_and_not_on_a_calm_deployment(tmp_path: Path) -> None:
    rules = yaml.safe_load(RULES.read_text())["spec"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    runbook = {rule["alert"]: rule["annotations"]["runbook"].replace(
        "{{ $labels.namespace }}", "prod").replace("{{ $labels.deployment }}", "llama")
        for group in rules["groups"] for rule in group["rules"]}
    tests = [
        alert_test("SlaplannerSlaAttainmentLow", {
            # llama's TTFT p99 is 2.4 times its target for 20 minutes; calm's within it
            f"slaplanner_decider_observed_ttft_p99_seconds{{{LLAMA}}}": "1.2x20",
            f"slaplanner_decider_ttft_target_seconds{{{LLAMA}}}": "0.5x20",
            f"slaplanner_decider_observed_itl_p99_seconds{{{LLAMA}}}": "0.02x20",
            f"slaplanner_decider_itl_target_seconds{{{LLAMA}}}": "0.05x20",
            f"slaplanner_decider_observed_ttft_p99_seconds{{{CALM}}}": "0.4x20",
            f"slaplanner_decider_ttft_target_seconds{{{CALM}}}": "0.5x20",
        }, 16, [{"exp_labels": {"severity": "warning", "namespace": "prod",
                                "deployment": "llama", "latency": "TTFT"},
                 "exp_annotations": {
                     "summary": "prod/llama: under 99 % of requests within the TTFT target",
                     "description": "The TTFT p99 of prod/llama has been 2.40 times its target "
                                    "or more for 15 minutes.",
                     "runbook": runbook["SlaplannerSlaAttainmentLow"]}}], 14),
        alert_test("SlaplannerGpuBudgetBinding", {
            f'slaplanner_decider_binding_rule{{{LLAMA}, role="prefill", '
            f'rule="gpu_budget_sla_split"}}': "1x40",
            f'slaplanner_decider_binding_rule{{{CALM}, role="prefill", '
            f'rule="queueing_model"}}': "1x40",
        }, 32, [{"exp_labels": {"severity": "info", "namespace": "prod", "deployment": "llama"},
                 "exp_annotations": {
                     "summary": "prod/llama: the GPU budget cuts what the decider wants",
                     "description": "For 30 minutes the GPU budget has set the replica count of "
                                    "prod/llama: the load needs more GPUs than "
                                    "SLAPLANNER_MAX_TOTAL_GPUS allows.",
                     "runbook": runbook["SlaplannerGpuBudgetBinding"]}}], 29),
        alert_test("SlaplannerMetricsStale", {
            f"slaplanner_decider_target_held{{{LLAMA}}}": "1x20",
            f"slaplanner_decider_target_held{{{CALM}}}": "0x20",
        }, 12, [{"exp_labels": {"severity": "warning", "namespace": "prod", "deployment": "llama"},
                 "exp_annotations": {
                     "summary": "prod/llama: planning on hold, metrics stale or missing",
                     "description": "For 10 minutes the decider has held the replicas of "
                                    "prod/llama because its metrics are stale or missing; "
                                    "nothing is scaled down meanwhile, and nothing up either.",
                     "runbook": runbook["SlaplannerMetricsStale"]}}], 9),
        alert_test("SlaplannerNoRecentDecision", {
            # llama's last decision was at time 0; calm decides every minute
            f"slaplanner_decider_last_decision_timestamp_seconds{{{LLAMA}}}": "0x30",
            f"slaplanner_decider_last_decision_timestamp_seconds{{{CALM}}}": "0+60x30",
        }, 20, [{"exp_labels": {"severity": "warning", "namespace": "prod", "deployment": "llama"},
                 "exp_annotations": {
                     "summary": "prod/llama: no decision for 20m 0s",
                     "description": "The decider has taken no decision for prod/llama for over "
                                    "10 minutes: the collector, the forecaster or the decider "
                                    "has stopped, or the deployment is gone.",
                     "runbook": runbook["SlaplannerNoRecentDecision"]}}], 14),
        alert_test("SlaplannerActuatorFailing", {
            f'slaplanner_actuator_outcomes_total{{{LLAMA}, backend="dynamo", '
            f'outcome="failed"}}': "0+1x20",
            f'slaplanner_actuator_outcomes_total{{{CALM}, backend="dynamo", '
            f'outcome="applied"}}': "0+1x20",
            f'slaplanner_actuator_outcomes_total{{{CALM}, backend="dynamo", '
            f'outcome="failed"}}': "3x20",
        }, 12, [{"exp_labels": {"severity": "critical", "namespace": "prod",
                                "deployment": "llama", "outcome": "failed"},
                 "exp_annotations": {
                     "summary": "prod/llama: the actuator's targets are failed",
                     "description": "For 10 minutes the actuator has reported failed outcomes "
                                    "for prod/llama: the decisions are not applied.",
                     "runbook": runbook["SlaplannerActuatorFailing"]}}], 9),
        alert_test("SlaplannerServiceDown", {
            'up{job="slaplanner", component="decider", pod="slaplanner-decider-0"}': "0x10",
            'up{job="slaplanner", component="collector", pod="slaplanner-collector-0"}': "1x10",
            'slaplanner_nats_connected{service="actuator", pod="slaplanner-actuator-0"}': "1x10",
        }, 6, [{"exp_labels": {"severity": "critical", "job": "slaplanner",
                               "component": "decider", "pod": "slaplanner-decider-0"},
                "exp_annotations": {
                    "summary": "slaplanner decider is down or cut off from NATS",
                    "description": "slaplanner-decider-0 has not been scraped, or not connected "
                                   "to NATS, for 5 minutes.",
                    "runbook": runbook["SlaplannerServiceDown"]}}], 4),
    ]
    assert {t["alert_rule_test"][0]["alertname"] for t in tests} == alerts  # each one tested
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}))
    result = subprocess.run([promtool(), "test", "rules", str(tmp_path / "tests.yaml")],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Prometheus keeps the deployment's namespace on the decider's series -----------------------

@pytest.fixture
def decider_metrics() -> Iterator[int]:
    """A /metrics endpoint serving the decider's gauges after one target, and a service metric,
    as the decider's process does."""
    registry = CollectorRegistry()
    recorder = gauges.DeciderGauges(registry)
    recorder.record(ReplicaTarget(
        deployment=DeploymentKey(namespace="inference", name="llama-70b"), window_end=1.7e9,
        policy="slaplanner", prefill_replicas=5, decode_replicas=3,
        explanation={"prefill_bound_by": "queueing_model", "decode_bound_by": "itl_curve"}))
    prometheus_client.Gauge("slaplanner_nats_connected", "1 while connected", ["service"],
                            registry=registry).labels("decider").set(1)
    server: WSGIServer = make_server("127.0.0.1", 0, prometheus_client.make_wsgi_app(registry))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port
    finally:
        server.shutdown()


def test_prometheus_stores_the_deciders_series_under_the_deployments_namespace(
    decider_metrics: int, tmp_path: Path,
) -> None:
    config = yaml.safe_load(scraping.PROMETHEUS_YML.read_text())
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "slaplanner"]
    config["scrape_configs"] = [{**job, "scrape_interval": "1s", "scrape_timeout": "1s"}]
    decider = next(p for p in scraping.deploy_pods()
                   if p.labels.get("app.kubernetes.io/component") == "decider")
    pod = scraping.Pod(decider.name, scraping.NAMESPACE, decider.labels, [("http", 8080)], {})
    with scraping.running_prometheus(config, scraping.pod_target_groups(pod, decider_metrics),
                                     tmp_path) as prometheus:

        def query(expr: str) -> list[dict[str, Any]]:
            url = (f"http://127.0.0.1:{prometheus.port}/api/v1/query?"
                   + urllib.parse.urlencode({"query": expr}))
            result: list[dict[str, Any]] = scraping.get_json(url)["data"]["result"]
            return result

        found = prometheus.until(lambda: query("slaplanner_decider_desired_replicas"))
        # what the KEDA example asks for, as it asks for it
        [prefill] = query('max(slaplanner_decider_desired_replicas{namespace="inference", '
                          'deployment="llama-70b", role="prefill"})')
        assert prefill["value"][1] == "5"
        assert {series["metric"]["namespace"] for series in found} == {"inference"}
        assert not any("exported_namespace" in series["metric"] for series in found)
        # a series without a namespace of its own gets the pod's
        [connected] = query("slaplanner_nats_connected")
        assert connected["metric"]["namespace"] == scraping.NAMESPACE
        assert connected["metric"]["component"] == "decider"
