"""deploy's scrape configuration, run by a real Prometheus against pods described by deploy/.

Prometheus' Kubernetes discovery offers one target per declared container port of each pod, with
the pod's namespace, name, labels, annotations and port name as ``__meta_kubernetes_*`` labels.
Here the same targets come from a file (the Debian build of Prometheus has no Kubernetes
discovery, and there is no cluster): the pods of deploy/base as their manifests declare them,
a Dynamo frontend and workers as the Dynamo operator labels them, and plain vLLM pods labelled as
docs/operations.md says. Prometheus applies the relabelling of deploy/base/prometheus/prometheus.yml
unchanged; the test reads which targets it keeps and with which labels. Every address is on the
loopback interface.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from services.collector import promql
from services.collector.settings import CollectorSettings
from shared import embedded_nats
from shared.settings import settings_from
from tests import test_deploy_manifests as deploy
from tests.conftest import serve_exposition

PROMETHEUS_YML = deploy.BASE / "prometheus" / "prometheus.yml"
NAMESPACE = "slaplanner"


def meta(name: str) -> str:
    """A Kubernetes label or annotation name as Prometheus' discovery spells it."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


@dataclass
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]
    ports: list[tuple[str, int]]  # (name, containerPort)
    annotations: dict[str, str]


def pod_target_groups(pod: Pod, address_port: int) -> list[dict[str, Any]]:
    """What the pod role of kubernetes_sd_configs offers for one pod: a target per port."""
    common = {
        "__meta_kubernetes_namespace": pod.namespace,
        "__meta_kubernetes_pod_name": pod.name,
        "__meta_kubernetes_pod_ip": "127.0.0.1",
        **{f"__meta_kubernetes_pod_label_{meta(k)}": v for k, v in pod.labels.items()},
        **{f"__meta_kubernetes_pod_labelpresent_{meta(k)}": "true" for k in pod.labels},
        **{f"__meta_kubernetes_pod_annotation_{meta(k)}": v for k, v in pod.annotations.items()},
    }
    return [
        {"targets": [f"127.0.0.1:{address_port + i}"],
         "labels": {**common, "__meta_kubernetes_pod_container_port_name": port_name,
                    "__meta_kubernetes_pod_container_port_number": str(number)}}
        for i, (port_name, number) in enumerate(pod.ports)
    ]


def deploy_pods() -> list[Pod]:
    """The pods of deploy/base, from their manifests."""
    pods = []
    for workload, spec in deploy.pod_templates(deploy.resources(deploy.BASE)):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        ports = [(p["name"], p["containerPort"]) for c in spec["containers"]
                 for p in c.get("ports", [])]
        pods.append(Pod(f"{workload['metadata']['name']}-0", NAMESPACE, labels, ports,
                        workload["spec"]["template"]["metadata"].get("annotations", {})))
    return pods


def dynamo_pods() -> list[Pod]:
    """A DynamoGraphDeployment's pods as the Dynamo operator labels them."""
    def labels(kind: str, enabled: str = "true", role: str = "") -> dict[str, str]:
        # the operator's role label of a worker: prefill or decode (none when aggregated)
        return {"nvidia.com/dynamo-component-type": kind, "nvidia.com/metrics-enabled": enabled,
                "nvidia.com/dynamo-graph-deployment-name": "vllm-disagg",
                **({"nvidia.com/dynamo-sub-component-type": role} if role else {})}

    return [
        Pod("vllm-disagg-frontend-abc", "dynamo", labels("frontend"), [("http", 8000)], {}),
        Pod("vllm-disagg-vllmprefillworker-abc", "dynamo", labels("worker", role="prefill"),
            [("system", 9090), ("nixl", 5600)], {}),
        Pod("vllm-disagg-vllmdecodeworker-abc", "dynamo", labels("worker", role="decode"),
            [("system", 9090)], {}),
        Pod("vllm-disagg-quiet-worker", "dynamo", labels("worker", "false"),
            [("system", 9090)], {}),
    ]


def vllm_pods() -> list[Pod]:
    """Plain vLLM workers of the scale overlay, labelled as docs/operations.md says."""
    return [
        Pod(f"llama-{role}-abc", "llm",
            {"slaplanner.io/deployment": "llama", "slaplanner.io/role": role, "app": "vllm"},
            [("http", 8000), ("nixl", 5600)], {"prometheus.io/port": "8000"})
        for role in ("prefill", "decode")
    ] + [
        # not annotated with its metrics port: not scraped
        Pod("llama-sidecar-abc", "llm", {"slaplanner.io/deployment": "llama"}, [("http", 80)], {}),
        # nothing to do with slaplanner
        Pod("web-abc", "web", {"app": "web"}, [("http", 80)],
            {"prometheus.io/port": "80"}),
    ]


def as_file_sd(config: dict[str, Any], targets: Path) -> dict[str, Any]:
    """deploy's config with each Kubernetes discovery replaced by the file of pod targets."""
    out = json.loads(json.dumps(config))
    for job in out["scrape_configs"]:
        [discovery] = job.pop("kubernetes_sd_configs")
        assert discovery["role"] == "pod", job["job_name"]
        job["file_sd_configs"] = [{"files": [str(targets)]}]
        # scrapes fail at once on the loopback ports, and rarely (a caller that scrapes a real
        # endpoint sets its own interval in the config it passes)
        job.setdefault("scrape_interval", "1h")
        job.setdefault("scrape_timeout", job["scrape_interval"])
    return out


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@dataclass
class Targets:
    active: list[dict[str, Any]]
    dropped: list[dict[str, Any]]

    def job(self, name: str) -> list[dict[str, str]]:
        return [t["labels"] for t in self.active if t["labels"]["job"] == name]

    def of_pod(self, pod: str) -> list[dict[str, str]]:
        return [t["labels"] for t in self.active if t["labels"].get("pod") == pod]


@dataclass
class RunningPrometheus:
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def until(self, answer: Callable[[], Any], timeout_s: float = 60.0) -> Any:
        """The first truthy ``answer()`` (an OSError while it starts counts as none)."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, self.log.read_text()
            try:
                found = answer()
                if found:
                    return found
            except OSError:
                pass
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)


@contextlib.contextmanager
def running_prometheus(config: dict[str, Any], targets: list[dict[str, Any]],
                       tmp: Path) -> Iterator[RunningPrometheus]:
    """A real Prometheus with ``config``, its Kubernetes discovery replaced by ``targets``."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian package prometheus)")
    (tmp / "pods.json").write_text(json.dumps(targets))
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(as_file_sd(config, tmp / "pods.json")))
    port = embedded_nats.free_port()
    process = subprocess.Popen(
        [binary, f"--config.file={tmp / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp / "log").open("wb"))
    try:
        yield RunningPrometheus(port, process, tmp / "log")
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def targets() -> Iterator[Targets]:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    groups: list[dict[str, Any]] = []
    for i, pod in enumerate(deploy_pods() + dynamo_pods() + vllm_pods()):
        groups += pod_target_groups(pod, 20_000 + 10 * i)
    with tempfile.TemporaryDirectory(prefix="slaplanner-prom-") as tmp_name, \
            running_prometheus(config, groups, Path(tmp_name)) as prometheus:

        def discovered() -> dict[str, Any] | None:
            data: dict[str, Any] = get_json(
                f"http://127.0.0.1:{prometheus.port}/api/v1/targets?state=any")["data"]
            # every job has taken the pods from discovery
            return data if {t["labels"]["job"] for t in data["activeTargets"]} == jobs else None

        data = prometheus.until(discovered)
        yield Targets(data["activeTargets"], data["droppedTargets"])


def test_the_four_services_are_scraped_on_their_http_port(targets: Targets) -> None:
    scraped = targets.job("slaplanner")
    assert sorted(t["component"] for t in scraped) == sorted(deploy.SERVICES)
    for labels in scraped:
        service = labels["component"]
        port = deploy.main_container(service)["ports"][0]["containerPort"]
        [pod] = [p for p in deploy_pods() if p.name == labels["pod"]]
        assert labels["instance"] == f"127.0.0.1:{port_address(pod, 'http')}"
        assert port == 8080
        assert labels["namespace"] == NAMESPACE
    # NATS and Prometheus themselves are not in the planner's job
    assert not targets.of_pod("slaplanner-nats-0") and not targets.of_pod(
        "slaplanner-prometheus-0")


def port_address(pod: Pod, name: str) -> int:
    index = [p for p, _ in pod.ports].index(name)
    offset = (deploy_pods() + dynamo_pods() + vllm_pods()).index(pod)
    return 20_000 + 10 * offset + index


def discover_labels(target: str) -> list[str]:
    return deploy.planner_env(target)["SLAPLANNER_DISCOVER_LABELS"].split(",")


def test_the_dynamo_frontend_and_workers_are_scraped_on_their_named_ports(
    targets: Targets
) -> None:
    frontend = targets.job("dynamo-frontend")
    arrivals = targets.job("dynamo-frontend-arrivals")
    workers = targets.job("dynamo-worker")
    assert [t["pod"] for t in frontend] == [t["pod"] for t in arrivals] == [
        "vllm-disagg-frontend-abc"]
    assert sorted(t["pod"] for t in workers) == ["vllm-disagg-vllmdecodeworker-abc",
                                                 "vllm-disagg-vllmprefillworker-abc"]
    for labels in frontend + arrivals + workers:
        pod = next(p for p in dynamo_pods() if p.name == labels["pod"])
        port = "system" if labels["job"] == "dynamo-worker" else "http"
        assert labels["instance"] == f"127.0.0.1:{port_address(pod, port)}"
        # the labels the collector discovers the deployment by: dynamo/vllm-disagg
        assert {k: labels[k] for k in discover_labels("dynamo")} == {
            "namespace": "dynamo", "deployment": "vllm-disagg"}
    # each worker's role, from the operator's pod label, as the collector's fallback reads it
    settings = CollectorSettings.model_validate({})
    for labels in workers:
        role = "prefill" if "prefill" in labels["pod"] else "decode"
        assert labels["role"] == role
        fallback = getattr(settings, f"{role}_fallback_selector")
        assert re.findall(r'(\w+)="([^"]*)"', fallback) == [("role", role)]
    assert not targets.of_pod("vllm-disagg-quiet-worker")


def test_plain_vllm_workers_are_scraped_on_their_annotated_port_with_their_role(
    targets: Targets
) -> None:
    scraped = targets.job("inference-pods")
    assert sorted(t["pod"] for t in scraped) == ["llama-decode-abc", "llama-prefill-abc"]
    # the scale overlay tells prefill from decode workers by these selectors' labels
    selectors = [deploy.planner_env("scale")[f"SLAPLANNER_{role}_SELECTOR"]
                 for role in ("PREFILL", "DECODE")]
    for labels in scraped:
        pod = next(p for p in vllm_pods() if p.name == labels["pod"])
        assert labels["instance"] == "127.0.0.1:8000"  # the annotation, whatever ports exist
        assert {k: labels[k] for k in discover_labels("scale")} == {
            "namespace": "llm", "deployment": "llama"}
        role = pod.labels["slaplanner.io/role"]
        matching = [s for s in selectors
                    if all(labels.get(k) == v for k, v in re.findall(r'(\w+)="([^"]*)"', s))]
        assert matching == [f'role="{role}"'], labels
    assert not targets.of_pod("llama-sidecar-abc") and not targets.of_pod("web-abc")


def duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    assert match is not None, text
    return int(match.group(1)) * units[match.group(2)]


@pytest.mark.parametrize("target", deploy.TARGETS)
def test_arrivals_are_scraped_as_often_as_the_collector_counts_them(target: str) -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    arrivals, frontend = jobs["dynamo-frontend-arrivals"], jobs["dynamo-frontend"]
    collector = settings_from(CollectorSettings, {}, deploy.local_env(target))
    interval = duration_s(arrivals["scrape_interval"])
    # a sample in every bin of SLAPLANNER_ARRIVAL_BIN_S (whole bins in a window: see
    # test_deploy_config)
    assert interval <= collector.arrival_bin_s
    assert duration_s(arrivals["scrape_timeout"]) <= interval
    # the same frontends, and the arrival counter stored once: by the fast job only
    assert arrivals["relabel_configs"] == frontend["relabel_configs"]
    counter = "dynamo_frontend_requests_started_total"
    assert arrivals["metric_relabel_configs"] == [
        {"source_labels": ["__name__"], "regex": counter, "action": "keep"}]
    assert frontend["metric_relabel_configs"] == [
        {"source_labels": ["__name__"], "regex": counter, "action": "drop"}]
    # the name is the one the collector reads its arrivals from
    assert promql.DYNAMO.metrics[promql.DYNAMO.arrivals[0].metric] == (counter,)


@pytest.mark.parametrize("target", deploy.TARGETS)
def test_every_window_holds_at_least_two_scrapes_of_every_target(target: str) -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    default = config["global"]["scrape_interval"]
    window = deploy.planner_env(target)["SLAPLANNER_INTERVAL_S"]
    for job in config["scrape_configs"]:
        interval = duration_s(job.get("scrape_interval", default))
        assert 2 * interval <= duration_s(window), job["job_name"]


# ---------------------------------------------------------------------------------------------
# A pod cannot name deployments: only the labels Kubernetes (and the Dynamo operator) give it
# ---------------------------------------------------------------------------------------------

ROGUE_EXPOSITION = (
    "# TYPE dynamo_frontend_requests_total counter\n"
    'dynamo_frontend_requests_total{model="m",deployment="invented-1"} 5\n'
    'dynamo_frontend_requests_total{model="m",deployment="llama\\n"} 5\n'
    'dynamo_frontend_requests_total{model="m",namespace="kube-system",deployment="x"} 5\n'
)
HONEST_EXPOSITION = (
    "# TYPE dynamo_frontend_requests_total counter\n"
    'dynamo_frontend_requests_total{model="m"} 7\n'
    # a series that names a deployment of its own is renamed, never believed
    'dynamo_frontend_requests_total{model="m",deployment="not-mine"} 1\n'
)


def serve_text(text: str) -> ThreadingHTTPServer:
    """A /metrics endpoint on a free loopback port serving ``text``."""
    return serve_exposition(text.encode)


def scrape_pods(pods: list[tuple[Pod, int]], wanted: str, of_pod: str
                ) -> dict[str, list[dict[str, str]]]:
    """deploy's scrape config run by a real Prometheus, every job at 1 s, over pods served on
    the given ports, until every wanted metric (``|`` separated names) has a series of
    ``of_pod``: each one's series."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian package prometheus)")
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    names = wanted.split("|")
    with tempfile.TemporaryDirectory(prefix="slaplanner-prom-") as tmp_name:
        tmp = Path(tmp_name)
        groups = [group for pod, port in pods for group in pod_target_groups(pod, port)]
        (tmp / "pods.json").write_text(json.dumps(groups))
        scraped = as_file_sd(config, tmp / "pods.json")
        for job in scraped["scrape_configs"]:
            job["scrape_interval"] = job["scrape_timeout"] = "1s"
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(scraped))
        port = embedded_nats.free_port()
        process = subprocess.Popen(
            [binary, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=(tmp / "log").open("wb"))
        url = f"http://127.0.0.1:{port}/api/v1/query?query="
        seen: dict[str, list[dict[str, str]]] = {}
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                assert process.poll() is None, (tmp / "log").read_text()
                try:
                    targets = get_json(f"http://127.0.0.1:{port}/api/v1/targets")["data"]
                    # every kept target has been scraped at least once
                    if targets["activeTargets"] and all(
                            t["health"] == "up" for t in targets["activeTargets"]):
                        seen = {n: [r["metric"] for r in get_json(url + n)["data"]["result"]]
                                for n in names}
                        if all(any(s.get("pod") == of_pod for s in seen[n]) for n in names):
                            break
                except OSError:
                    pass
                time.sleep(0.2)
        finally:
            process.terminate()
            process.wait(timeout=30)
    return seen


def test_a_pod_without_the_graph_deployment_label_cannot_invent_deployments() -> None:
    honest, rogue = serve_text(HONEST_EXPOSITION), serve_text(ROGUE_EXPOSITION)
    frontend = {"nvidia.com/dynamo-component-type": "frontend",
                "nvidia.com/metrics-enabled": "true"}
    pods = [
        (Pod("vllm-disagg-frontend-abc", "dynamo",
             {**frontend, "nvidia.com/dynamo-graph-deployment-name": "vllm-disagg"},
             [("http", 8000)], {}), honest.server_port),
        # labelled as a Dynamo frontend and worker, but not by the operator: no graph label
        (Pod("rogue-frontend", "dynamo", frontend, [("http", 8000)], {}), rogue.server_port),
        (Pod("rogue-worker", "dynamo", {**frontend, "nvidia.com/dynamo-component-type": "worker"},
             [("system", 9090)], {}), rogue.server_port),
    ]
    try:
        seen = scrape_pods(pods, "dynamo_frontend_requests_total", "vllm-disagg-frontend-abc")[
            "dynamo_frontend_requests_total"]
    finally:
        honest.shutdown()
        rogue.shutdown()
    named = sorted({(s.get("namespace"), s.get("deployment")) for s in seen})
    assert named == [("dynamo", "vllm-disagg")], seen
    assert {s["pod"] for s in seen} == {"vllm-disagg-frontend-abc"}
    assert any(s.get("exported_deployment") == "not-mine" for s in seen), seen


def test_each_frontend_counter_is_stored_once_the_arrivals_by_the_fast_job() -> None:
    exposition = (
        "# TYPE dynamo_frontend_requests_started_total counter\n"
        'dynamo_frontend_requests_started_total{model="m",endpoint="chat_completions",'
        'request_type="stream"} 9\n'
        "# TYPE dynamo_frontend_requests_total counter\n"
        'dynamo_frontend_requests_total{model="m",status="success"} 7\n'
    )
    server = serve_text(exposition)
    pod = Pod("vllm-disagg-frontend-abc", "dynamo", {
        "nvidia.com/dynamo-component-type": "frontend", "nvidia.com/metrics-enabled": "true",
        "nvidia.com/dynamo-graph-deployment-name": "vllm-disagg"}, [("http", 8000)], {})
    try:
        seen = scrape_pods([(pod, server.server_port)],
                           "dynamo_frontend_requests_started_total|dynamo_frontend_requests_total",
                           "vllm-disagg-frontend-abc")
    finally:
        server.shutdown()
    assert [s["job"] for s in seen["dynamo_frontend_requests_started_total"]] == [
        "dynamo-frontend-arrivals"]
    assert [s["job"] for s in seen["dynamo_frontend_requests_total"]] == ["dynamo-frontend"]
