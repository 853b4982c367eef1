"""The Prometheus source against a real Prometheus server scraping real prometheus-client endpoints.

One Prometheus (scrape interval 1 s) scrapes a Dynamo frontend endpoint and five vLLM workers (two
prefill, three decode, one of them with the older vLLM metric names). The module's timeline is
fixed: a quiet start, then a burst of known requests, then quiet again. Each test reads the
window of the burst (or the quiet one after it) at evaluation times it chooses, and compares the
snapshot with the values worked out by hand below.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
import prometheus_client
import pytest
from nats.aio.client import Client as NATS

from services.collector import prometheus_source, query_config, window
from services.collector.settings import CollectorSettings
from shared.embedded_nats import free_port
from shared.messages import DeploymentKey, MetricSnapshot
from tests.conftest import ServiceProcess, docker_engine_answers

# What the test target runs when the binary is missing (Debian/Ubuntu); no recommends, so no
# node exporter and no web assets come along.
PROMETHEUS_INSTALL = ("apt-get", "install", "-y", "--no-install-recommends", "prometheus")
SCRAPE_INTERVAL_S = 1.0

# ---------------------------------------------------------------------------------------------
# A real Prometheus server
# ---------------------------------------------------------------------------------------------


def prometheus_binary() -> tuple[str | None, str]:
    """The prometheus binary, installing the Debian package if it is missing; else why not."""
    found = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin")
    if found:
        return found, ""
    apt = shutil.which("apt-get")
    if apt is None:
        return None, "no prometheus binary and no apt-get to install it"
    command = list(PROMETHEUS_INSTALL)
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return None, "no prometheus binary, and not root (nor sudo) to apt-get install it"
        command = ["sudo", "-n", *command]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    update = [*command[: command.index("install")], "update"]
    try:
        if subprocess.run(command, env=env, capture_output=True, timeout=600).returncode:
            # a fresh image has no package lists yet
            subprocess.run(update, env=env, capture_output=True, timeout=600)
            subprocess.run(command, env=env, capture_output=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"`{' '.join(command)}` failed: {exc}"
    found = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin")
    return (found, "") if found else (None, f"`{' '.join(command)}` did not install prometheus")


@dataclass
class PrometheusServer:
    """A real Prometheus on a free port, with its own config and storage directory."""

    workdir: Path
    targets: Sequence[str]
    binary: str | None = None  # None: run in a container (Docker engine answered)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    container: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _config(self) -> Path:
        targets = ", ".join(f"'{t}'" for t in self.targets)
        path = self.workdir / "prometheus.yml"
        path.write_text(
            "global:\n"
            f"  scrape_interval: {SCRAPE_INTERVAL_S:g}s\n"
            f"  scrape_timeout: {SCRAPE_INTERVAL_S:g}s\n"
            "scrape_configs:\n"
            "  - job_name: serving\n"
            f"    static_configs: [{{targets: [{targets}]}}]\n"
        )
        return path

    def start(self) -> PrometheusServer:
        config = self._config()
        (self.workdir / "data").mkdir(exist_ok=True)
        args = [f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]
        if self.binary is not None:
            log = (self.workdir / "prometheus.log").open("ab")
            self.process = subprocess.Popen([self.binary, *args], stdout=log,
                                            stderr=subprocess.STDOUT)
        else:
            from testcontainers.core.container import DockerContainer

            for path in (self.workdir, self.workdir / "data"):
                path.chmod(0o777)  # the image runs as nobody
            self.container = (
                DockerContainer("prom/prometheus:v2.53.0")
                .with_volume_mapping(str(self.workdir), str(self.workdir), "rw")
                .with_command(" ".join(args))
                .with_kwargs(network_mode="host")
            )
            self.container.start()
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as response:
                if response.status == 200:
                    return self
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"prometheus did not become ready:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.container is not None:
            self.container.stop()
            self.container = None

    def log(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query now, straight over HTTP (independent of the code under test)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5.0) as response:
            return list(orjson.loads(response.read())["data"]["result"])

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, expected: float, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.value(promql) == expected:
                return
            time.sleep(0.1)
        raise AssertionError(f"{promql} != {expected} (is {self.value(promql)})\n{self.log()}")


@contextlib.contextmanager
def running_prometheus(targets: Sequence[str]) -> Iterator[PrometheusServer]:
    binary, why = prometheus_binary()
    if binary is None and not docker_engine_answers():
        pytest.skip(f"no Prometheus server for integration tests: {why}; "
                    f"install it with `{' '.join(PROMETHEUS_INSTALL)}`")
    with tempfile.TemporaryDirectory(prefix="slaplanner-test-prometheus-") as tmp:
        server = PrometheusServer(Path(tmp), targets, binary)
        try:
            yield server.start()
        finally:
            server.stop()


# ---------------------------------------------------------------------------------------------
# Real /metrics endpoints: a Dynamo frontend and vLLM workers
# ---------------------------------------------------------------------------------------------

TOKEN_BUCKETS = (1000, 2000, 4000, 8000)
OSL_BUCKETS = (100, 200, 400)
TTFT_BUCKETS = (0.1, 0.25, 0.5, 1.0)
ITL_BUCKETS = (0.01, 0.02, 0.05)


class Frontend:
    """Dynamo frontend metrics, both the current names and the older ones."""

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        r, labels = self.registry, ["model", "dynamo_namespace"]
        self.requests = prometheus_client.Counter("dynamo_frontend_requests", "", labels,
                                                  registry=r)
        self.isl = prometheus_client.Histogram("dynamo_frontend_input_sequence_tokens", "",
                                               labels, registry=r, buckets=TOKEN_BUCKETS)
        self.osl = prometheus_client.Histogram("dynamo_frontend_output_sequence_tokens", "",
                                               labels, registry=r, buckets=OSL_BUCKETS)
        self.ttft = prometheus_client.Histogram("dynamo_frontend_time_to_first_token_seconds",
                                                "", labels, registry=r, buckets=TTFT_BUCKETS)
        self.itl = prometheus_client.Histogram("dynamo_frontend_inter_token_latency_seconds", "",
                                               labels, registry=r, buckets=ITL_BUCKETS)
        self.duration = prometheus_client.Histogram("dynamo_frontend_request_duration_seconds",
                                                    "", labels, registry=r)
        self.inflight = prometheus_client.Gauge("dynamo_frontend_inflight_requests", "", labels,
                                                registry=r)
        self.queued = prometheus_client.Gauge("dynamo_frontend_queued_requests", "", labels,
                                              registry=r)
        self.legacy_requests = prometheus_client.Counter("nv_llm_http_service_requests", "",
                                                         ["model"], registry=r)
        self.legacy_isl = prometheus_client.Histogram(
            "nv_llm_http_service_input_sequence_tokens", "", ["model"], registry=r,
            buckets=TOKEN_BUCKETS)

    def serve(self, model: str, n: int, isl: float, osl: float, ttft: float, itl: float,
              duration: float) -> None:
        labels = (model, f"prod-{model}")
        for _ in range(n):
            self.isl.labels(*labels).observe(isl)
            self.osl.labels(*labels).observe(osl)
            self.ttft.labels(*labels).observe(ttft)
            self.itl.labels(*labels).observe(itl)
            self.duration.labels(*labels).observe(duration)
        self.requests.labels(*labels).inc(n)  # last: once it shows, all of the above does


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


def serve(registry: prometheus_client.CollectorRegistry, openmetrics: bool) -> WSGIServer:
    """A /metrics endpoint on a free port. Text format only (``openmetrics=False``) is what
    Dynamo's workers serve; with OpenMetrics negotiated, prometheus-client writes ``vllm:x``
    as ``vllm_x`` (prometheus/client_python#1177), which a direct vLLM scrape then stores."""
    app = prometheus_client.make_wsgi_app(registry)

    def text_only(environ: dict[str, Any], start_response: Any) -> Any:
        environ.pop("HTTP_ACCEPT", None)
        return app(environ, start_response)

    server = make_server("127.0.0.1", free_port(), app if openmetrics else text_only,
                         handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Worker:
    """One vLLM engine's metrics, as a Dynamo worker re-exposes them (dynamo_* labels)."""

    def __init__(self, role: str, old_names: bool = False, openmetrics: bool = False) -> None:
        self.openmetrics = openmetrics
        self.registry = prometheus_client.CollectorRegistry()
        self.labels = ("llama", "prod-llama", role)
        r, labels = self.registry, ["model", "dynamo_namespace", "dynamo_component"]
        self.success = prometheus_client.Counter("vllm:request_success", "", labels, registry=r)
        self.prompt = prometheus_client.Histogram("vllm:request_prompt_tokens", "", labels,
                                                  registry=r, buckets=TOKEN_BUCKETS)
        self.generation = prometheus_client.Histogram("vllm:request_generation_tokens", "",
                                                      labels, registry=r, buckets=OSL_BUCKETS)
        self.ttft = prometheus_client.Histogram("vllm:time_to_first_token_seconds", "", labels,
                                                registry=r, buckets=TTFT_BUCKETS)
        itl = "vllm:time_per_output_token_seconds" if old_names else \
            "vllm:inter_token_latency_seconds"
        self.itl = prometheus_client.Histogram(itl, "", labels, registry=r, buckets=ITL_BUCKETS)
        self.e2e = prometheus_client.Histogram("vllm:e2e_request_latency_seconds", "", labels,
                                               registry=r)
        self.running = prometheus_client.Gauge("vllm:num_requests_running", "", labels,
                                               registry=r)
        self.waiting = prometheus_client.Gauge("vllm:num_requests_waiting", "", labels,
                                               registry=r)
        kv = "vllm:gpu_cache_usage_perc" if old_names else "vllm:kv_cache_usage_perc"
        self.kv = prometheus_client.Gauge(kv, "", labels, registry=r)
        for metric in (self.success, self.prompt, self.generation, self.ttft, self.itl,
                       self.e2e, self.running, self.waiting, self.kv):
            metric.labels(*self.labels)  # the series exist from the start, as in vLLM

    def prefill(self, n: int, ttft: float) -> None:
        for _ in range(n):
            self.ttft.labels(*self.labels).observe(ttft)

    def decode(self, n: int, isl: float, osl: float, itl: float, e2e: float) -> None:
        for _ in range(n):
            self.prompt.labels(*self.labels).observe(isl)
            self.generation.labels(*self.labels).observe(osl)
            self.itl.labels(*self.labels).observe(itl)
            self.e2e.labels(*self.labels).observe(e2e)
        self.success.labels(*self.labels).inc(n)


def prometheus_quantile(q: float, edges: Sequence[float], observations: Sequence[float]) -> float:
    """Prometheus' histogram_quantile for these observations, written out independently."""
    counts = [sum(1 for o in observations if o <= edge) for edge in edges]
    rank = q * len(observations)
    lower, below = 0.0, 0
    for edge, count in zip(edges, counts, strict=True):
        if count >= rank:
            return lower + (edge - lower) * (rank - below) / (count - below)
        lower, below = edge, count
    return edges[-1]  # in the +Inf bucket


def bucket_of(value: float, edges: Sequence[float]) -> tuple[float, float]:
    lower = 0.0
    for edge in edges:
        if value <= edge:
            return lower, edge
        lower = edge
    return lower, math.inf


# What the burst holds (the frontend's view), worked out by hand:
#   30 requests: ISL 3000, OSL 300, TTFT 0.2 s, ITL 0.015 s, duration 4.7 s
#   20 requests: ISL 6000, OSL 100, TTFT 0.7 s, ITL 0.030 s, duration 3.7 s
BURST = [(30, 3000.0, 300.0, 0.2, 0.015, 4.7), (20, 6000.0, 100.0, 0.7, 0.030, 3.7)]
ISL = [isl for n, isl, *_ in BURST for _ in range(n)]
OSL = [osl for n, _, osl, *_ in BURST for _ in range(n)]
TTFT = [t for n, _, _, t, *_ in BURST for _ in range(n)]
ITL = [i for n, *_, i, _ in BURST for _ in range(n)]
FRONTEND_EXPECTED = {
    "num_requests": 50.0,
    "isl_avg": 4200.0,  # (30 * 3000 + 20 * 6000) / 50
    "osl_avg": 220.0,  # (30 * 300 + 20 * 100) / 50
    "ttft_avg_s": 0.4,  # (30 * 0.2 + 20 * 0.7) / 50
    "itl_avg_s": 0.021,  # (30 * 0.015 + 20 * 0.03) / 50
    "request_duration_avg_s": 4.3,  # (30 * 4.7 + 20 * 3.7) / 50
    "isl_p90": 7000.0,  # rank 45 of 50 in (4000, 8000] holding 30..50: 4000 + 4000 * 15 / 20
    "osl_p90": 200.0 + 200.0 * 25 / 30,  # rank 45 in (200, 400] holding 20..50
    "ttft_p90_s": 0.875,  # rank 45 in (0.5, 1.0] holding 30..50: 0.5 + 0.5 * 15 / 20
    "ttft_p99_s": 0.9875,  # rank 49.5: 0.5 + 0.5 * 19.5 / 20
    "itl_p90_s": 0.0425,  # rank 45 in (0.02, 0.05] holding 30..50: 0.02 + 0.03 * 15 / 20
    "itl_p99_s": 0.04925,  # 0.02 + 0.03 * 19.5 / 20
    "requests_running": 7.0,
    "requests_waiting": 3.0,
    # from the workers (the Dynamo dialect reads the engines for these)
    "kv_cache_usage": 0.5,  # decode workers only: (0.2 + 0.4 + 0.9) / 3
    "prefill_workers": 2,
    "decode_workers": 3,
}
# The workers' view of the same deployment:
#   prefill p0: 6 first tokens at 0.12 s; p1: 4 at 0.32 s
#   decode d0: 4 requests ISL 2000, OSL 100, ITL 0.012, e2e 2.0; d1: 3 x (3000, 200, 0.018, 3.0);
#   d2 (older vLLM names): 3 x (5000, 300, 0.030, 5.0)
VLLM_EXPECTED = {
    "num_requests": 10.0,  # 4 + 3 + 3 finished on the decode workers
    "isl_avg": 3200.0,  # (4 * 2000 + 3 * 3000 + 3 * 5000) / 10
    "osl_avg": 190.0,  # (4 * 100 + 3 * 200 + 3 * 300) / 10
    "ttft_avg_s": 0.2,  # prefill workers: (6 * 0.12 + 4 * 0.32) / 10
    "itl_avg_s": 0.0192,  # (4 * 0.012 + 3 * 0.018 + 3 * 0.03) / 10, old name included
    "request_duration_avg_s": 3.2,  # (4 * 2 + 3 * 3 + 3 * 5) / 10
    "ttft_p90_s": 0.4375,  # rank 9 of 10 in (0.25, 0.5] holding 6..10: 0.25 + 0.25 * 3 / 4
    "ttft_p99_s": 0.49375,  # rank 9.9: 0.25 + 0.25 * 3.9 / 4
    "requests_running": 19.0,  # 1 + 0 + 5 + 6 + 7, every worker
    "requests_waiting": 3.0,  # 2 + 1 + 0 + 0 + 0
    "kv_cache_usage": 0.5,  # decode: 0.2, 0.4 and 0.9 under the older name; not prefill's 0.7
    "prefill_workers": 2,
    "decode_workers": 3,
}


# Fields of metrics the endpoints of this module do not export (the recorded expositions of
# tests/data/expositions do): the engines' queue, prefill and decode times, their per-request
# ITL, and the KV router's prefill tokens.
NOT_EXPORTED = {"queue_time_avg_s", "queue_time_p90_s", "prefill_time_avg_s",
                "prefill_time_p90_s", "decode_time_avg_s", "itl_under_target_share",
                "prefill_tokens_pending"}


@dataclass
class Stack:
    prometheus: PrometheusServer
    frontend: Frontend
    workers: dict[str, Worker]
    burst_start: float = 0.0  # the burst's window is [burst_start, burst_end]; it opens with
    burst_end: float = 0.0  # 2 s of quiet, so that increase() has samples before the burst too
    quiet_end: float = 0.0  # the quiet window is [burst_end, quiet_end]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    frontend = Frontend()
    # p1 and d2 are stored as vllm_* (OpenMetrics escaping), the others as vllm:*; d2 also
    # has the older vLLM names
    workers = {"p0": Worker("prefill"), "p1": Worker("prefill", openmetrics=True),
               "d0": Worker("backend"), "d1": Worker("backend"),
               "d2": Worker("backend", old_names=True, openmetrics=True)}
    servers = [serve(frontend.registry, True)]
    servers += [serve(w.registry, w.openmetrics) for w in workers.values()]
    targets = [f"127.0.0.1:{server.server_port}" for server in servers]
    # History before the burst: the counters are not new when the burst's window starts.
    frontend.serve("llama", 100, 1500.0, 150.0, 0.3, 0.02, 2.0)
    frontend.serve("mistral-7b", 10, 500.0, 50.0, 0.1, 0.01, 1.0)
    frontend.legacy_requests.labels("legacy").inc(4)
    for _ in range(4):
        frontend.legacy_isl.labels("legacy").observe(900)
    for name, worker in workers.items():
        if name.startswith("d"):
            worker.decode(5, 1000.0, 50.0, 0.01, 1.0)
        else:
            worker.prefill(5, 0.2)
    try:
        with running_prometheus(targets) as prometheus:
            s = Stack(prometheus, frontend, workers)
            # every target scraped at least twice before anything happens
            prometheus.wait_for("count((count_over_time(up[1m]) >= 2) and (up == 1))",
                                float(len(targets)))
            _play_the_timeline(s)
            yield s
    finally:
        for server in servers:
            server.shutdown()


def _play_the_timeline(s: Stack) -> None:
    f, w, prom = s.frontend, s.workers, s.prometheus
    s.burst_start = time.time()
    time.sleep(2.0)  # quiet: increase() only sees what changes between samples in its window
    for n, isl, osl, ttft, itl, duration in BURST:
        f.serve("llama", n, isl, osl, ttft, itl, duration)
    f.serve("mistral-7b", 5, 100.0, 10.0, 0.05, 0.005, 0.5)
    f.inflight.labels("llama", "prod-llama").set(7)
    f.queued.labels("llama", "prod-llama").set(3)
    for _ in range(8):
        f.legacy_isl.labels("legacy").observe(500)
    f.legacy_requests.labels("legacy").inc(8)
    w["p0"].prefill(6, 0.12)
    w["p1"].prefill(4, 0.32)
    w["d0"].decode(4, 2000.0, 100.0, 0.012, 2.0)
    w["d1"].decode(3, 3000.0, 200.0, 0.018, 3.0)
    w["d2"].decode(3, 5000.0, 300.0, 0.030, 5.0)
    for name, running, waiting, kv in (("p0", 1, 2, 0.7), ("p1", 0, 1, 0.7), ("d0", 5, 0, 0.2),
                                       ("d1", 6, 0, 0.4), ("d2", 7, 0, 0.9)):
        w[name].running.labels(*w[name].labels).set(running)
        w[name].waiting.labels(*w[name].labels).set(waiting)
        w[name].kv.labels(*w[name].labels).set(kv)
    # the burst is over once Prometheus has scraped its end from every target
    prom.wait_for('sum(dynamo_frontend_requests_total{model="llama"})', 150.0)
    prom.wait_for('sum(dynamo_frontend_requests_total{model="mistral-7b"})', 15.0)
    prom.wait_for('sum(nv_llm_http_service_requests_total{model="legacy"})', 12.0)
    # (vllm[:_] matches both the vllm:* and the escaped vllm_* names)
    prom.wait_for('sum({__name__=~"vllm.request_success_total",dynamo_component="backend"})',
                  25.0)
    prom.wait_for('sum({__name__=~"vllm.time_to_first_token_seconds_count",'
                  'dynamo_component="prefill"})', 20.0)
    prom.wait_for('sum({__name__=~"vllm.kv_cache_usage_perc",dynamo_component="prefill"})', 1.4)
    prom.wait_for('sum({__name__=~"vllm.gpu_cache_usage_perc"})', 0.9)
    # the quiet window after it must hold a few scrapes for increase() too
    s.burst_end = time.time()
    s.quiet_end = s.burst_end + 3.0
    while time.time() < s.quiet_end + SCRAPE_INTERVAL_S:
        time.sleep(0.05)


def settings_for(stack: Stack, window_s: float, **overrides: Any) -> CollectorSettings:
    values: dict[str, Any] = {
        "source": "prometheus", "prometheus_url": stack.prometheus.url, "interval_s": window_s,
        "namespace": "prod", "deployment": "llama", "selector": 'model="llama"',
        "dialect": "dynamo", "prometheus_timeout_s": 5.0, **overrides,
    }
    return CollectorSettings(**values)


def read(settings: CollectorSettings, end: float,
         config: query_config.QueryConfig | None = None) -> list[MetricSnapshot]:
    collector = prometheus_source.Collector(settings, config or query_config.QueryConfig(),
                                            prometheus_source.HttpReader(settings))
    try:
        return collector.window(end)
    finally:
        collector.close()


def burst(stack: Stack, **overrides: Any) -> MetricSnapshot:
    settings = settings_for(stack, stack.burst_end - stack.burst_start, **overrides)
    (snap,) = read(settings, stack.burst_end)
    return snap


def assert_fields(snap: MetricSnapshot, expected: dict[str, float]) -> None:
    for name, value in expected.items():
        assert getattr(snap, name) == pytest.approx(value, rel=1e-9), (name, snap.gaps)


# ---------------------------------------------------------------------------------------------
# Windows read at chosen evaluation times
# ---------------------------------------------------------------------------------------------


def test_the_dynamo_frontend_window_matches_the_values_worked_out_by_hand(stack: Stack) -> None:
    snap = burst(stack)
    assert snap.source == "prometheus" and not snap.stale
    assert snap.deployment == DeploymentKey(namespace="prod", name="llama")
    assert snap.window_end == stack.burst_end
    assert_fields(snap, FRONTEND_EXPECTED)
    assert snap.requests_failed == 0.0, "no error series yet: a real zero"
    # every field was observed but those of metrics this stack does not export, and the
    # arrivals, whose bins of 1 s do not divide this window of a fraction of seconds
    assert set(snap.gaps) == NOT_EXPORTED | {"arrival_dispersion"}, snap.gaps


def test_the_quantiles_are_within_the_true_values_bucket(stack: Stack) -> None:
    snap = burst(stack)
    # the estimate is Prometheus' linear interpolation, and it lies in the bucket of the truth
    for name, edges, observations, q in (
        ("isl_p90", TOKEN_BUCKETS, ISL, 0.9), ("osl_p90", OSL_BUCKETS, OSL, 0.9),
        ("ttft_p90_s", TTFT_BUCKETS, TTFT, 0.9), ("ttft_p99_s", TTFT_BUCKETS, TTFT, 0.99),
        ("itl_p90_s", ITL_BUCKETS, ITL, 0.9), ("itl_p99_s", ITL_BUCKETS, ITL, 0.99),
    ):
        value = getattr(snap, name)
        assert value == pytest.approx(prometheus_quantile(q, edges, observations)), name
        truth = sorted(observations)[math.ceil(q * len(observations)) - 1]
        lower, upper = bucket_of(truth, edges)
        assert lower <= value <= upper, (name, value, truth)


def test_dynamos_increase_method_agrees_on_averages_and_quantiles(stack: Stack) -> None:
    snap = burst(stack, window_method="increase")
    # increase() extrapolates both _sum and _count by the same factor: ratios are exact ...
    assert_fields(snap, {k: v for k, v in FRONTEND_EXPECTED.items() if k != "num_requests"})
    # ... but the count is extrapolated to the window's edges, never below what was seen
    assert snap.num_requests is not None and snap.num_requests >= 50.0


def test_the_vllm_dialect_tells_prefill_from_decode_and_reads_both_metric_names(
    stack: Stack,
) -> None:
    snap = burst(stack, dialect="vllm")
    assert_fields(snap, VLLM_EXPECTED)
    # one decode worker exposes vllm:time_per_output_token_seconds; buckets all (0.01, 0.02]
    # except its three at 0.03: 7 of 10 below 0.02, p90 rank 9 in (0.02, 0.05]: 0.02 + 0.03*2/3
    assert snap.itl_p90_s == pytest.approx(0.04)
    assert snap.isl_p90 == pytest.approx(4000.0 + 4000.0 * (9 - 7) / 3)  # 7 of 10 <= 4000
    # vLLM has no failed count, no frontend queue, no router: those say why
    assert set(snap.gaps) == NOT_EXPORTED | {"arrival_dispersion", "requests_failed",
                                             "requests_before_first_token"}, snap.gaps


def test_an_idle_window_is_a_real_zero_with_undefined_averages(stack: Stack) -> None:
    for method in ("exact", "increase"):
        settings = settings_for(stack, stack.quiet_end - stack.burst_end, window_method=method)
        (snap,) = read(settings, stack.quiet_end)
        assert not snap.stale
        assert snap.num_requests == 0.0, method  # idle: a real 0
        for name in set(window.AVERAGE_FIELDS + window.QUANTILE_FIELDS) - NOT_EXPORTED:
            assert getattr(snap, name) is None, (method, name)
            assert snap.gaps[name] == window.UNDEFINED  # 0/0, not unknown
        assert snap.requests_running == 7.0  # gauges keep their value
        assert snap.prefill_workers == 2


def test_a_deployment_without_series_is_unknown_and_the_check_says_what_to_check(
    stack: Stack, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "slaplanner.collector")
    settings = settings_for(stack, 3.0, selector='model="ghost"', deployment="ghost")
    collector = prometheus_source.Collector(settings, query_config.QueryConfig(),
                                            prometheus_source.HttpReader(settings))
    try:
        (snap,) = collector.window(stack.quiet_end)
        # a Prometheus that just started may not have the series yet: no warning at once
        assert not any(r.levelno == logging.WARNING for r in caplog.records)
        assert any("checking again" in r.getMessage() for r in caplog.records)
        collector.window(stack.quiet_end)
    finally:
        collector.close()
    assert not snap.stale, "Prometheus answered: nothing is stale, the series are absent"
    assert snap.num_requests is None and snap.num_requests != 0
    assert snap.gaps["num_requests"].startswith("no data")
    assert snap.gaps["prefill_workers"].startswith("no data: no worker")
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert re.match(r"prod/ghost: (\d+) of \1 queries have no series to read", warning)
    assert ('dynamo_frontend_requests_total exists, but no series has the labels '
            '{model=~"(?i)ghost"}') in warning


def test_the_check_names_a_missing_metric_and_a_role_selector_that_matches_nothing(
    stack: Stack, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "slaplanner.collector")
    config = query_config.parse('[metrics]\nttft = "dynamo_frontend_ttft_seconds"\n', "q.toml")
    settings = settings_for(stack, 3.0, prefill_selector='dynamo_component="prefil"')
    collector = prometheus_source.Collector(settings, config,
                                            prometheus_source.HttpReader(settings))
    try:
        (snap,) = collector.window(stack.quiet_end)
        collector.window(stack.quiet_end)
    finally:
        collector.close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert ("ttft_p99_s: no series named dynamo_frontend_ttft_seconds_bucket in Prometheus: "
            "check the metric name") in text
    assert "[metrics].ttft in q.toml" in text
    assert ("prefill_workers: vllm:num_requests_running or vllm_num_requests_running exists for "
            '{model=~"(?i)llama"} but not for its prefill workers (dynamo_component="prefil" or '
            'role="prefill"): check --prefill-selector and --prefill-fallback-selector') in text
    # the workers a role selector found are named with it
    assert ('workers counted: decode_workers by vllm:num_requests_running or '
            'vllm_num_requests_running{dynamo_component=~"backend|decode"}') in text
    assert text.count("queries have no series") == 1, "checked once, when the deployment appears"
    assert snap.num_requests == 0.0 and snap.ttft_avg_s is None
    # the queries in use are printed
    assert 'num_requests [dialect dynamo]: sum (' in text
    assert "ttft_avg_s [[metrics].ttft in q.toml]: " in text


def test_deployments_are_discovered_from_label_values(stack: Stack) -> None:
    settings = settings_for(stack, stack.burst_end - stack.burst_start, selector="",
                            discover_labels=["model"], namespace="prod")
    snaps = {s.deployment.name: s for s in read(settings, stack.burst_end)}
    assert set(snaps) == {"llama", "mistral-7b"}  # from dynamo_frontend_* label values
    assert all(s.subject() == f"slaplanner.metrics.prod.{n}" for n, s in snaps.items())
    assert snaps["llama"].num_requests == 50.0
    assert snaps["llama"].isl_avg == pytest.approx(4200.0)
    assert snaps["mistral-7b"].num_requests == 5.0
    assert snaps["mistral-7b"].isl_avg == pytest.approx(100.0)
    # its engines are not labelled model="mistral-7b": no workers, and it says so
    assert snaps["mistral-7b"].decode_workers is None
    assert snaps["mistral-7b"].gaps["decode_workers"].startswith("no data")


def test_the_older_frontend_names_are_read_by_the_legacy_dialect(stack: Stack) -> None:
    snap = burst(stack, dialect="dynamo-legacy", selector='model="legacy"')
    assert snap.num_requests == 8.0
    assert snap.isl_avg == pytest.approx(500.0)
    # its queue gauge is renamed with the rest (this endpoint has none)
    assert snap.requests_before_first_token is None
    assert snap.gaps["requests_before_first_token"].startswith("no data")


def test_auto_detection_prefers_the_dynamo_frontend_over_the_engines(stack: Stack) -> None:
    settings = settings_for(stack, 3.0, dialect="auto")
    collector = prometheus_source.Collector(settings, query_config.QueryConfig(),
                                            prometheus_source.HttpReader(settings))
    try:
        collector.window(stack.quiet_end)
    finally:
        collector.close()
    assert collector.dialect is not None and collector.dialect.name == "dynamo"


def test_a_query_from_the_file_replaces_the_dialects_and_a_refused_one_is_a_gap(
    stack: Stack, caplog: pytest.LogCaptureFixture,
) -> None:
    config = query_config.parse(
        "[queries]\n"
        "requests_running = 'max(dynamo_frontend_inflight_requests{$selector}) * 2'\n"
        "ttft_p99_s = 'histogram_quantile(0.99, sum by (le, $by) ('\n"   # unbalanced
        "prefill_workers = ''\n", "q.toml")
    settings = settings_for(stack, stack.burst_end - stack.burst_start)
    with caplog.at_level(logging.ERROR, "slaplanner.collector"):
        (snap,) = read(settings, stack.burst_end, config)
    assert snap.requests_running == 14.0
    assert not snap.stale, "a refused query is a configuration problem, not an outage"
    assert snap.gaps["ttft_p99_s"].startswith("Prometheus refused the query ([queries] in q.toml)")
    assert snap.gaps["prefill_workers"] == "query disabled in q.toml"
    assert snap.ttft_p90_s == pytest.approx(FRONTEND_EXPECTED["ttft_p90_s"])
    assert any("refused the ttft_p99_s query" in r.getMessage() for r in caplog.records)


def test_an_unreachable_prometheus_gives_stale_snapshots_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = CollectorSettings(source="prometheus", interval_s=1.0, dialect="dynamo",
                                 prometheus_url=f"http://127.0.0.1:{free_port()}",
                                 prometheus_timeout_s=1.0)
    collector = prometheus_source.Collector(settings, query_config.QueryConfig(),
                                            prometheus_source.HttpReader(settings))
    with caplog.at_level(logging.INFO, "slaplanner.collector"):
        snaps = [collector.window(1_800_000_000.0 + i) for i in range(3)]
    collector.close()
    for (snap,) in snaps:
        assert snap.stale and snap.num_requests is None
        assert snap.gaps == {"all": "Prometheus cannot be read: connection refused"}
    assert sum("cannot be read" in r.getMessage() for r in caplog.records) == 1


def test_a_slow_prometheus_gives_stale_snapshots_after_the_timeout() -> None:
    class Slow(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(1.5)
            with contextlib.suppress(OSError):
                self.send_response(200)
                self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = CollectorSettings(source="prometheus", interval_s=1.0, dialect="dynamo",
                                 prometheus_url=f"http://127.0.0.1:{server.server_port}",
                                 prometheus_timeout_s=0.3)
    collector = prometheus_source.Collector(settings, query_config.QueryConfig(),
                                            prometheus_source.HttpReader(settings))
    started = time.monotonic()
    try:
        (snap,) = collector.window(1_800_000_000.0)
    finally:
        collector.close()
        server.shutdown()
    assert time.monotonic() - started < 1.4, "one slow query ends the window's reading"
    assert snap.stale
    assert snap.gaps == {"all": "Prometheus cannot be read: no answer within 0.3 s"}


# ---------------------------------------------------------------------------------------------
# The service: aligned windows on the bus, Prometheus stopped and started again
# ---------------------------------------------------------------------------------------------


async def test_the_service_publishes_every_window_and_survives_a_prometheus_restart(
    nc: NATS, services: dict[str, ServiceProcess],
) -> None:
    frontend = Frontend()
    port = free_port()
    exporter = prometheus_client.start_http_server(port, "127.0.0.1", frontend.registry)[0]
    frontend.serve("llama", 3, 1000.0, 10.0, 0.1, 0.01, 1.0)  # history
    snapshots: list[MetricSnapshot] = []

    async def on_snapshot(msg: Any) -> None:
        snapshots.append(MetricSnapshot.from_json(msg.data))

    await nc.subscribe("slaplanner.metrics.prod.llama", cb=on_snapshot)

    async def wait_for(predicate: Any, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, f"timed out; {collector.log()}"
            await asyncio.sleep(0.05)

    with running_prometheus([f"127.0.0.1:{port}"]) as prometheus:
        # the history's series has samples from before the collector's first window (else it
        # would be new in that window, and all of it would count)
        await asyncio.to_thread(
            prometheus.wait_for,
            "count(count_over_time(dynamo_frontend_requests_total[1m]) >= 3)", 1.0)
        collector = services["collector"]
        collector.env.update({
            "SLAPLANNER_SOURCE": "prometheus", "SLAPLANNER_PROMETHEUS_URL": prometheus.url,
            "SLAPLANNER_NAMESPACE": "prod", "SLAPLANNER_DEPLOYMENT": "llama",
            "SLAPLANNER_SELECTOR": 'model="llama"', "SLAPLANNER_INTERVAL_S": "1s",
            "SLAPLANNER_PROMETHEUS_QUERY_DELAY_S": "500ms",
            "SLAPLANNER_PROMETHEUS_TIMEOUT_S": "1s",
        })
        collector.start()
        try:
            # t0: fresh windows; 40 identical requests land in one or two of them
            await wait_for(lambda: any(not s.stale for s in snapshots))
            frontend.serve("llama", 40, 3000.0, 300.0, 0.2, 0.015, 4.7)
            await wait_for(lambda: sum(s.num_requests or 0 for s in snapshots) >= 40
                           and snapshots[-1].num_requests == 0)
            fresh = [s for s in snapshots if not s.stale]
            assert sum(s.num_requests or 0 for s in fresh) == 40.0, "windows tile: none twice"
            for s in fresh:
                if s.num_requests:
                    assert s.isl_avg == pytest.approx(3000.0)
                    assert s.ttft_avg_s == pytest.approx(0.2)
                    assert s.itl_avg_s == pytest.approx(0.015)
                else:
                    assert s.isl_avg is None and s.gaps["isl_avg"] == window.UNDEFINED
            # t1: Prometheus stops: stale snapshots, one warning
            before = len(snapshots)
            await asyncio.to_thread(prometheus.stop)
            await wait_for(lambda: sum(s.stale for s in snapshots[before:]) >= 3)
            stale = [s for s in snapshots[before:] if s.stale]
            assert all(s.num_requests is None and "cannot be read" in s.gaps["all"]
                       for s in stale)
            assert collector.log().count("cannot be read (") == 1, "an outage is logged once"
            # t2: it comes back (same storage): fresh snapshots again, and it says so
            await asyncio.to_thread(prometheus.start)
            after = len(snapshots)
            await wait_for(lambda: any(not s.stale for s in snapshots[after:]))
            await wait_for(lambda: "Prometheus answers again" in collector.log())
        finally:
            assert collector.stop() == 0, collector.log()
            exporter.shutdown()
    log = collector.log()
    for name in ("num_requests", "isl_avg", "ttft_p99_s", "kv_cache_usage", "decode_workers"):
        assert re.search(rf"  {name} \[dialect dynamo\]: ", log), f"{name} query printed"
    assert "dialect dynamo auto-detected" in log
    ends = [s.window_end for s in snapshots]
    assert ends == sorted(set(ends)), "each window once, in order"
    assert all(e == int(e) for e in ends), "windows end on whole seconds"
    assert all(b - a == 1.0 for a, b in itertools.pairwise(ends)), "no window skipped"


# ---------------------------------------------------------------------------------------------
# Label values that name no deployment
# ---------------------------------------------------------------------------------------------


def test_a_label_value_that_is_no_name_is_skipped_with_a_reason_and_never_stops_the_collector(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = prometheus_client.CollectorRegistry()
    requests = prometheus_client.Counter("dynamo_frontend_requests", "", ["namespace",
                                                                            "deployment"],
                                         registry=registry)
    # Python's re.match("...$") accepts "llama\n": $ matches before a trailing newline
    for deployment, n in (("llama", 3), ("llama\n", 5), ("", 1), ("bad\x00name", 2)):
        requests.labels("prod", deployment).inc(n)
    server = serve(registry, openmetrics=False)
    skipped_before = prometheus_source.metrics.LABEL_VALUES_SKIPPED.labels(
        "control characters")._value.get()
    try:
        with running_prometheus([f"127.0.0.1:{server.server_port}"]) as prometheus:
            prometheus.wait_for("count(dynamo_frontend_requests_total)", 4.0)
            settings = CollectorSettings(
                source="prometheus", prometheus_url=prometheus.url, interval_s=2.0,
                dialect="dynamo", discover_labels=["namespace", "deployment"],
                prometheus_timeout_s=5.0)
            caplog.set_level(logging.INFO, "slaplanner.collector")
            snaps = [s for _ in range(2) for s in read(settings, time.time())]
    finally:
        server.shutdown()
    assert {str(s.deployment) for s in snaps} == {"prod/llama"}, "the others name nothing"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "skipped" in r.getMessage()]
    assert any(repr("llama\n") in w and "control characters" in w for w in warnings), warnings
    skipped = prometheus_source.metrics.LABEL_VALUES_SKIPPED.labels(
        "control characters")._value.get()
    assert skipped >= skipped_before + 2  # "llama\n" and "bad\x00name", in each window read
