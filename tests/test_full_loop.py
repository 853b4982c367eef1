"""The whole loop without Docker: load rises, the DGD gets more workers, latency recovers.

Real parts: nats-server (the ``nats_server`` fixture), the Debian ``prometheus`` binary scraping
``sim/frontend.py`` (a prometheus-client endpoint whose Dynamo frontend and vLLM worker metrics
come from the simulated deployment), the four services as subprocesses, and the Kubernetes test
server holding the DynamoGraphDeployment that the actuator patches and the frontend reads its
worker counts from. Its authorizer is the actuator's RBAC as deploy/ ships it (the base Role and
the dynamo overlay's), so a call the manifests do not grant fails the loop.

The services' environment is the ConfigMap of ``deploy/overlays/dynamo`` (``planner.env`` of the
base, the overlay's ``actuator.toml``), read by ``tests/test_deploy_manifests.py``; only
endpoints, ports and time scales are overridden (``ENDPOINTS`` and ``TIME_SCALES`` below).

Timeline of the trace, in seconds since the frontend started (simulated time runs at the wall
clock's pace, see ``sim/frontend.py``): 3 requests/s, 50 from ``RISE_AT_S`` (one prefill worker
serves about 16 at ISL 3000, so TTFT climbs), Prometheus stopped at ``OUTAGE_AT_S`` for
``OUTAGE_S`` (five planning intervals), during which the load falls back to 3 requests/s: with
no metrics nothing may be scaled down; once Prometheus is back the planner sees the low load and
scales down, which shows that only the missing metrics held it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client.parser import text_string_to_metric_families

from shared.embedded_nats import free_port
from shared.messages import ReplicaTarget, ScaleEvent
from shared.perf_model import default_profile_path, load_profile
from sim import frontend, synth
from sim.cluster import ClusterConfig
from tests import k8s_rbac
from tests import test_deploy_manifests as deploy
from tests.conftest import REPO, ServiceProcess
from tests.conftest_k8s import dgd
from tests.k8s_api_server import DGDS, KubeApiServer
from tests.test_collector_prometheus import PrometheusServer
from tests.test_services_e2e import start_and_wait_ready

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the full-loop test needs the prometheus binary (Debian package `prometheus`; "
    "CI installs it)",
)

# The DGD of deploy/overlays/dynamo/actuator.toml; Prometheus labels the frontend's series with
# its namespace and name as deploy/base/prometheus/prometheus.yml does for Dynamo's pods.
NAMESPACE, NAME = "dynamo", "vllm-disagg"
INTERVAL_S = 2.0
SCRAPE_INTERVAL_S = 0.5
STARTUP_DELAY_S = 3.0  # of a simulated worker, and what the decider is told

# Everything else comes from the ConfigMap; these are time scales (a minute-long interval
# becomes 2 s, the 3 min start-up 3 s) ...
TIME_SCALES = {
    "SLAPLANNER_INTERVAL_S": f"{INTERVAL_S:g}s",
    "SLAPLANNER_ADJUSTMENT_INTERVAL_S": f"{INTERVAL_S:g}s",
    "SLAPLANNER_WARM_START_WINDOW_S": f"{INTERVAL_S:g}s",
    "SLAPLANNER_HORIZON_S": "10s",
    "SLAPLANNER_WORKER_STARTUP_S": f"{STARTUP_DELAY_S:g}s",
    # not in the ConfigMap (defaults 5 s and 300 s): a window is read once the last scrape
    # before its end is in, and a scale-down can follow a drop within the test
    "SLAPLANNER_PROMETHEUS_QUERY_DELAY_S": "500ms",
    "SLAPLANNER_SCALE_DOWN_WINDOW_S": "4s",
}


def endpoints(nats_url: str, prometheus_url: str, kube_url: str) -> dict[str, str]:
    """... and these are endpoints and ports (in a pod: Services, in-cluster config)."""
    return {
        "SLAPLANNER_NATS_URL": nats_url,
        "SLAPLANNER_HTTP_PORT": "0",
        "SLAPLANNER_PROMETHEUS_URL": prometheus_url,
        "SLAPLANNER_KUBE_API_URL": kube_url,
        # in a pod, the namespace of its service account (the Role grants Leases there)
        "SLAPLANNER_LEASE_NAMESPACE": "slaplanner",
    }


RISE_AT_S = 3.0
# The rise builds a backlog of a few seconds of prefill work before the added workers are up;
# draining it at 50 requests/s took until about 20 s on a busy machine, so the recovery is judged
# on the window before 28 s.
OUTAGE_AT_S = 28.0
DROP_AT_S = 31.0
OUTAGE_S = 5 * INTERVAL_S
LOW_RATE, HIGH_RATE = 3.0, 50.0
ISL, OSL = 3000, 300
TTFT_TARGET_S, ITL_TARGET_S = 0.5, 0.05  # planner.env's (asserted below)


# --- the parts --------------------------------------------------------------------------------


@dataclass
class LoopPrometheus(PrometheusServer):
    """The test's Prometheus: one job for the simulated frontend, labelled like a Dynamo pod."""

    def _config(self) -> Path:
        path = self.workdir / "prometheus.yml"
        path.write_text(
            "global:\n"
            f"  scrape_interval: {SCRAPE_INTERVAL_S * 1000:.0f}ms\n"
            f"  scrape_timeout: {SCRAPE_INTERVAL_S * 1000:.0f}ms\n"
            "scrape_configs:\n"
            "  - job_name: dynamo-frontend\n"
            # the simulated workers' series carry their own `instance`: keep it, so that
            # Prometheus counts one instance per worker, as with one target per pod
            "    honor_labels: true\n"
            "    static_configs:\n"
            f"      - targets: ['{self.targets[0]}']\n"
            f"        labels: {{namespace: {NAMESPACE}, deployment: {NAME}}}\n"
        )
        return path


@dataclass(frozen=True)
class FrontendSample:
    """One read of the frontend's /metrics by the test (independent of the code under test)."""

    sim_s: float
    requests: float
    ttft_sum: float
    ttft_count: float
    itl_sum: float
    itl_count: float
    prefill_serving: int
    decode_serving: int


def read_frontend(url: str) -> FrontendSample:
    with urllib.request.urlopen(url, timeout=2.0) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    serving = {frontend.PREFILL_COMPONENT: 0, frontend.DECODE_COMPONENT: 0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:num_requests_running":
                serving[sample.labels["dynamo_component"]] += 1
            elif not sample.labels:
                values[sample.name] = sample.value
    ttft = "dynamo_frontend_time_to_first_token_seconds"
    itl = "dynamo_frontend_inter_token_latency_seconds"
    return FrontendSample(
        values["slaplanner_sim_time_seconds"], values["dynamo_frontend_requests_total"],
        values[f"{ttft}_sum"], values[f"{ttft}_count"], values[f"{itl}_sum"],
        values[f"{itl}_count"], serving[frontend.PREFILL_COMPONENT],
        serving[frontend.DECODE_COMPONENT])


@dataclass(frozen=True)
class Window:
    start: FrontendSample
    end: FrontendSample

    @property
    def rate_per_s(self) -> float:
        return (self.end.requests - self.start.requests) / (self.end.sim_s - self.start.sim_s)

    @property
    def ttft_avg_s(self) -> float | None:
        count = self.end.ttft_count - self.start.ttft_count
        return (self.end.ttft_sum - self.start.ttft_sum) / count if count else None

    @property
    def itl_avg_s(self) -> float | None:
        count = self.end.itl_count - self.start.itl_count
        return (self.end.itl_sum - self.start.itl_sum) / count if count else None

    def within_targets(self) -> bool:
        ttft, itl = self.ttft_avg_s, self.itl_avg_s
        return ttft is not None and itl is not None and ttft < TTFT_TARGET_S and \
            itl < ITL_TARGET_S


@dataclass
class Observed:
    """What the test saw, with wall-clock times: frontend samples, DGD replicas, bus messages."""

    samples: list[tuple[float, FrontendSample]] = field(default_factory=list)
    replicas: list[tuple[float, int, int]] = field(default_factory=list)
    targets: list[tuple[float, ReplicaTarget]] = field(default_factory=list)
    events: list[tuple[float, ScaleEvent]] = field(default_factory=list)

    @property
    def sim_s(self) -> float:
        return self.samples[-1][1].sim_s if self.samples else 0.0

    def window(self, start_s: float, end_s: float) -> Window:
        """The samples closest after ``start_s`` and before ``end_s`` (simulated seconds)."""
        points = [s for _, s in self.samples]
        first = next(s for s in points if s.sim_s >= start_s)
        last = next(s for s in reversed(points) if s.sim_s <= end_s)
        assert last.sim_s - first.sim_s >= INTERVAL_S / 2, (start_s, end_s)
        return Window(first, last)

    def windows(self, length_s: float) -> list[Window]:
        """Consecutive windows of about ``length_s`` simulated seconds."""
        points = [s for _, s in self.samples]
        out: list[Window] = []
        start = points[0]
        for point in points[1:]:
            if point.sim_s - start.sim_s >= length_s:
                out.append(Window(start, point))
                start = point
        return out

    def replicas_between(self, start: float, end: float) -> list[tuple[int, int]]:
        return [(p, d) for t, p, d in self.replicas if start <= t <= end]


def rbac_authorizer(server: KubeApiServer) -> None:
    """The actuator's rights as deploy/ grants them: the base Role and the dynamo overlay's."""
    rules = k8s_rbac.rules(k8s_rbac.documents()
                           + k8s_rbac.documents(deploy.OVERLAYS["dynamo"] / "workload-rbac.yaml"))
    server.authorizer = lambda attrs: k8s_rbac.permitted(attrs, rules)


@pytest.fixture
def kube() -> Iterator[KubeApiServer]:
    server = KubeApiServer().start()
    rbac_authorizer(server)
    server.add(DGDS, dgd(NAME, prefill=1, decode=1, namespace=NAMESPACE))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    trace = frontend.step_trace(
        [(0.0, LOW_RATE), (RISE_AT_S, HIGH_RATE), (DROP_AT_S, LOW_RATE)], 120.0, ISL, OSL)
    path = tmp_path / "load.jsonl"
    synth.write_mooncake(trace, path)
    return path


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[LoopPrometheus]:
    binary = shutil.which("prometheus")
    assert binary is not None  # the module is skipped without it
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    server = LoopPrometheus(workdir, [f"127.0.0.1:{free_port()}"], binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def running_frontend(trace_file: Path, port: int, kube_url: str,
                     log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sim.frontend", "--trace-file", str(trace_file),
             "--port", str(port), "--kube-api-url", kube_url, "--namespace", NAMESPACE,
             "--name", NAME, "--startup-delay-s", str(STARTUP_DELAY_S)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def dgd_replicas(server: KubeApiServer) -> tuple[int, int]:
    counts = frontend.dgd_replicas(server.get(DGDS, NAMESPACE, NAME))
    assert counts is not None
    return counts


@contextlib.asynccontextmanager
async def watching(nc: NATS, server: KubeApiServer, metrics_url: str) -> AsyncIterator[Observed]:
    observed = Observed()

    async def on_message(msg: Msg) -> None:
        family = msg.subject.split(".")[1]
        if family == "target":
            observed.targets.append((time.time(), ReplicaTarget.from_json(msg.data)))
        elif family == "scaled":
            observed.events.append((time.time(), ScaleEvent.from_json(msg.data)))

    async def poll() -> None:
        while True:
            with contextlib.suppress(OSError):
                sample = await asyncio.to_thread(read_frontend, metrics_url)
                observed.samples.append((time.time(), sample))
            observed.replicas.append((time.time(), *dgd_replicas(server)))
            await asyncio.sleep(0.25)

    sub = await nc.subscribe("slaplanner.>", cb=on_message)
    task = asyncio.create_task(poll())
    try:
        yield observed
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await sub.unsubscribe()


async def until_sim(observed: Observed, sim_s: float, procs: list[ServiceProcess],
                    frontend_process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while observed.sim_s < sim_s:
        for proc in procs:
            assert proc.process is not None and proc.process.poll() is None, \
                f"{proc.name} died:\n{proc.log()[-3000:]}"
        assert frontend_process.poll() is None, "the frontend died"
        assert time.monotonic() < deadline, f"the frontend's clock did not reach {sim_s} s"
        await asyncio.sleep(0.1)


def describe(observed: Observed, procs: list[ServiceProcess], frontend_log: Path) -> str:
    """What to read when an assertion fails: the windows, the replicas, the processes' logs."""
    lines = [f"sim {w.end.sim_s:5.1f}: {w.rate_per_s:5.1f} req/s ttft={w.ttft_avg_s} "
             f"itl={w.itl_avg_s} serving={w.end.prefill_serving}/{w.end.decode_serving}"
             for w in observed.windows(INTERVAL_S)]
    lines += [f"target {t.window_end:.0f}: {t.prefill_replicas}/{t.decode_replicas} "
              f"held={t.explanation.get('held')} {t.explanation.get('hold_reason', '')}"
              for _, t in observed.targets]
    lines += [f"--- {p.name}\n{p.log()[-1500:]}" for p in procs]
    lines.append(f"--- frontend\n{frontend_log.read_text(errors='replace')[-1500:]}")
    return "\n".join(lines)


# --- the frontend's core ----------------------------------------------------------------------


def small_core(startup_delay_s: float = 3.0) -> frontend.FrontendCore:
    trace = frontend.step_trace([(0.0, 5.0), (4.0, 30.0)], 20.0, ISL, OSL, seed=1)
    return frontend.FrontendCore(trace, load_profile(default_profile_path()),
                                 ClusterConfig(startup_delay_s=startup_delay_s))


def test_the_frontend_counts_each_request_once_as_the_simulator_does() -> None:
    core = small_core()
    steps = [core.advance(0.1 * k) for k in range(1, 151)]  # 15 s in the shell's 0.1 s ticks
    view = core.exposition()
    hist = view.histograms
    assert view.requests_total == sum(s.num_requests for s in steps) > 100
    ttft = hist["time_to_first_token_seconds"]
    assert ttft.count == sum(s.first_tokens for s in steps)
    assert ttft.total == pytest.approx(
        sum(s.ttft_avg_s * s.first_tokens for s in steps if s.ttft_avg_s is not None))
    assert hist["request_duration_seconds"].count == sum(s.finished for s in steps) > 50
    assert hist["input_sequence_tokens"].total == ISL * view.requests_total
    # ITL is observed once per token gap: its sum / count is the token-weighted mean
    itl = hist["inter_token_latency_seconds"]
    assert itl.count == (OSL - 1) * hist["request_duration_seconds"].count
    for h in hist.values():
        assert h.buckets()[-1] == ("+Inf", pytest.approx(h.count))
        cumulative = [count for _, count in h.buckets()]
        assert cumulative == sorted(cumulative)


def test_new_workers_are_exposed_once_they_serve_and_each_as_its_own_instance() -> None:
    core = small_core(startup_delay_s=3.0)
    core.advance(5.0)
    assert core.apply(3, 2) is True
    assert core.apply(3, 2) is False  # already asked for

    def serving() -> tuple[int, int]:
        workers = core.exposition().workers
        return (sum(w.component == frontend.PREFILL_COMPONENT for w in workers),
                sum(w.component == frontend.DECODE_COMPONENT for w in workers))

    core.advance(7.9)
    assert serving() == (1, 1)  # t0 + 2.9 s: the new ones are still starting
    core.advance(8.1)
    assert serving() == (3, 2)  # t0 + 3.1 s: serving
    instances = [w.instance for w in core.exposition().workers]
    assert len(set(instances)) == len(instances) == 5


@pytest.mark.parametrize(
    ("services", "expected"),
    [
        pytest.param(dgd(NAME, 2, 5)["spec"]["services"], (2, 5),
                     id="prefill and decode found by subComponentType"),
        pytest.param({"Frontend": {"componentType": "frontend", "replicas": 1},
                      "Decode": {"subComponentType": "decode", "replicas": 3}}, None,
                     id="no prefill service: nothing to follow"),
    ],
)
def test_the_frontend_follows_the_dgds_prefill_and_decode_services(
    services: dict[str, Any], expected: tuple[int, int] | None
) -> None:
    assert frontend.dgd_replicas({"spec": {"services": services}}) == expected


# --- the loop ---------------------------------------------------------------------------------


@needs_prometheus
async def test_rising_load_scales_the_dgd_up_and_a_prometheus_outage_scales_nothing_down(
    nc: NATS, services: dict[str, ServiceProcess], kube: KubeApiServer,
    prometheus: LoopPrometheus, trace_file: Path, tmp_path: Path,
) -> None:
    configmap = deploy.local_env("dynamo")
    assert configmap["SLAPLANNER_TTFT_TARGET_S"] == "500ms"
    assert configmap["SLAPLANNER_ITL_TARGET_S"] == "50ms"
    frontend_port = int(prometheus.targets[0].rsplit(":", 1)[1])
    for proc in services.values():
        overrides = endpoints(proc.env["SLAPLANNER_NATS_URL"], prometheus.url, kube.url)
        proc.env.update({**configmap, **TIME_SCALES, **overrides})
    procs = list(services.values())
    # what the NATS pod's bus-admin container does in the deployment (SLAPLANNER_BUS_SETUP=admin)
    admin = subprocess.run([sys.executable, "-m", "services.cli", "bus", "setup",
                            "--nats-url", procs[0].env["SLAPLANNER_NATS_URL"]],
                           env={**os.environ, **configmap}, cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert admin.returncode == 0, admin.stdout + admin.stderr
    await start_and_wait_ready(nc, procs)

    metrics_url = f"http://127.0.0.1:{frontend_port}/metrics"
    frontend_log = tmp_path / "frontend.log"
    with running_frontend(trace_file, frontend_port, kube.url, frontend_log) as fe:
        async with watching(nc, kube, metrics_url) as seen:
            # 1. the load rises; the actuator adds workers; latency comes back under target
            await until_sim(seen, OUTAGE_AT_S, procs, fe, timeout_s=OUTAGE_AT_S + 20)
            report = describe(seen, procs, frontend_log)
            before, after = seen.window(0.5, RISE_AT_S), seen.window(RISE_AT_S + 1, OUTAGE_AT_S)
            assert after.rate_per_s > 5 * before.rate_per_s, report
            most_prefill = max(p for _, p, _ in seen.replicas)
            most_decode = max(d for _, _, d in seen.replicas)
            assert most_prefill > 1 and most_decode > 1, f"the DGD was not scaled up\n{report}"
            patches = [r for r in kube.writes() if NAME in r.path and r.method == "PATCH"]
            assert patches, "the actuator never patched the DGD"
            rise = [w for w in seen.windows(INTERVAL_S) if w.end.sim_s > RISE_AT_S]
            assert any(w.ttft_avg_s is not None and w.ttft_avg_s > TTFT_TARGET_S
                       for w in rise), f"the rise never hurt TTFT: nothing to recover\n{report}"
            last = seen.window(OUTAGE_AT_S - 2 * INTERVAL_S, OUTAGE_AT_S)
            assert last.end.prefill_serving + last.end.decode_serving > 2, report
            assert last.within_targets(), f"latency did not recover\n{report}"

            # 2. Prometheus is down for five intervals while the load falls
            held_counts = dgd_replicas(kube)
            outage_start = time.time()
            await asyncio.to_thread(prometheus.stop)
            await asyncio.sleep(OUTAGE_S)
            outage_end = time.time()
            await asyncio.to_thread(prometheus.start)

            # 3. planning resumes on fresh metrics, and only then scales down
            deadline = time.monotonic() + 25.0
            while time.monotonic() < deadline and sum(dgd_replicas(kube)) >= sum(held_counts):
                await asyncio.sleep(0.2)
            seen.replicas.append((time.time(), *dgd_replicas(kube)))
            report = describe(seen, procs, frontend_log)

    during = [t for _, t in seen.targets
              if outage_start + INTERVAL_S < t.window_end < outage_end]
    assert len(during) >= 3, f"the decider published no decision during the outage\n{report}"
    # Windows read while Prometheus was down are stale; the last ones of the outage, read once it
    # was back, have no samples (nothing was scraped then): both hold, and say so.
    reasons = {t.explanation.get("hold_reason") for t in during}
    assert "held_stale_metrics" in reasons, report
    assert reasons <= {"held_stale_metrics", "held_missing_metrics"}, report
    for target in during:
        assert target.explanation["held"] is True, report
        if target.explanation["hold_reason"] == "held_stale_metrics":
            assert "Prometheus cannot be read" in target.explanation["hold_detail"], report
        assert (target.prefill_replicas, target.decode_replicas) == held_counts, report
    resumed = [t for _, t in seen.targets if t.window_end > outage_end
               and not t.explanation.get("held")]
    assert resumed, f"planning did not resume after Prometheus came back\n{report}"
    first_fresh = min(when for when, t in seen.targets if t.id == resumed[0].id)
    for prefill, decode in seen.replicas_between(outage_start, first_fresh):
        assert prefill >= held_counts[0] and decode >= held_counts[1], \
            f"scaled down while metrics were missing\n{report}"
    assert all(p >= 1 and d >= 1 for _, p, d in seen.replicas), "a role was scaled to zero"
    # the drop was real: once metrics were back, the planner did scale down
    after_return = seen.replicas_between(first_fresh, time.time())
    assert any(p + d < sum(held_counts) for p, d in after_return), report
