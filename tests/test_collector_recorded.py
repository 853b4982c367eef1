"""Recorded expositions of a Dynamo frontend and vLLM prefill and decode workers
(tests/data/expositions, built by make.py there from the upstream metric definitions), read
live through a real Prometheus and directly (pure, and by the scrape source as a service); the
expected fields are worked out here from the requests of the window, not from the files.

The engines' series carry no dynamo_component label (as under Dynamo 0.9 and earlier): their
role comes from the scrape job (Prometheus) or from the URL list they are given in (scrape).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from nats.aio.client import Client as NATS

from services.collector import exposition, prometheus_source, promql, query_config
from services.collector.exposition import Endpoint
from services.collector.settings import CollectorSettings
from shared.messages import MetricSnapshot
from tests.conftest import ServiceProcess, serve_exposition
from tests.test_collector_prometheus import PrometheusServer, prometheus_binary

DATA = Path(__file__).parent / "data" / "expositions"

# The window's requests, as make.py records them: (TTFT, mean ITL, queue, prefill, decode) s
WINDOW = ([(0.45, 0.02, 0.2, 0.22, 4.0)] * 6 + [(0.8, 0.06, 0.5, 0.25, 6.0)] * 3
          + [(0.1, 0.03, 0.01, 0.08, 1.5)])
ISL = [3000] * 6 + [6000] * 3 + [500]
FAILED = 2


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def share_interpolated(values: list[float], target: float, lower: float, upper: float) -> float:
    """Prometheus-style linear share inside the bucket (lower, upper] holding the target."""
    below = sum(1 for v in values if v <= lower)
    inside = sum(1 for v in values if lower < v <= upper)
    return (below + inside * (target - lower) / (upper - lower)) / len(values)


EXPECTED = {
    "num_requests": 10.0,
    "requests_failed": float(FAILED),
    "isl_avg": mean([float(i) for i in ISL]),  # 3650
    "queue_time_avg_s": mean([r[2] for r in WINDOW]),  # 0.271, from the prefill engine
    "prefill_time_avg_s": mean([r[3] for r in WINDOW]),  # 0.215
    "decode_time_avg_s": mean([r[4] for r in WINDOW]),  # 4.35, from the decode engine
    # Dynamo's TTFT buckets around 0.5 s are 0.47 and 1 (about 2.1x apart): interpolated
    "ttft_under_target_share": share_interpolated([r[0] for r in WINDOW], 0.5, 0.47, 1.0),
    "ttft_target_bucket_s": 1.0,
    # vLLM's per-request ITL buckets have 0.05 as a bound: exact (7 of 10 at or below)
    "itl_under_target_share": sum(1 for r in WINDOW if r[1] <= 0.05) / len(WINDOW),
    "itl_target_bucket_s": 0.05,
    "requests_waiting": 3.0,  # the engines' queues: 2 on prefill, 1 on decode
    "requests_before_first_token": 3.0,  # the frontend's queued_requests
    "prefill_tokens_pending": 9000.0,
    "kv_cache_usage": 0.6,  # decode engine only
    "prefill_workers": 1,
    "decode_workers": 1,
}


class Recorded:
    """Serves a before file until told to switch, then the after file."""

    def __init__(self, name: str) -> None:
        self.texts = [(DATA / f"{name}.{when}.prom").read_bytes() for when in ("before", "after")]
        self.state = 0
        self.server = serve_exposition(lambda: self.texts[self.state])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.server_port}"


class RolePrometheus(PrometheusServer):
    """Prometheus scraping the frontend, and the workers with their role as a target label, as
    deploy's relabelling gives them from the pod label nvidia.com/dynamo-sub-component-type
    (their vLLM metrics carry no dynamo_* labels)."""

    roles: ClassVar[dict[str, str]] = {}

    def _config(self) -> Path:
        path = self.workdir / "prometheus.yml"
        groups = "".join(
            f"      - targets: ['{t}']\n" + (f"        labels: {{role: {r}}}\n" if r else "")
            for t, r in self.roles.items())
        path.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                        "scrape_configs:\n  - job_name: serving\n    static_configs:\n"
                        + groups)
        return path


@pytest.fixture(scope="module")
def recorded() -> Iterator[tuple[RolePrometheus, dict[str, Recorded], float, float]]:
    binary, why = prometheus_binary()
    if binary is None:
        pytest.skip(f"no Prometheus: {why}")
    servers = {name: Recorded(name) for name in ("frontend", "prefill", "decode")}
    with tempfile.TemporaryDirectory(prefix="slaplanner-recorded-") as tmp:
        prometheus = RolePrometheus(Path(tmp), [], binary)
        RolePrometheus.roles = {servers["frontend"].target: "",
                            servers["prefill"].target: "prefill",
                            servers["decode"].target: "decode"}
        try:
            prometheus.start()
            prometheus.wait_for("count((count_over_time(up[1m]) >= 2) and (up == 1))", 3.0)
            start = time.time()
            time.sleep(0.3)
            for server in servers.values():
                server.state = 1
            prometheus.wait_for('sum(dynamo_frontend_requests_total{status="success"})', 14.0)
            prometheus.wait_for("sum(vllm:request_decode_time_seconds_count)", 14.0)
            prometheus.wait_for("sum(vllm:request_prefill_time_seconds_count)", 14.0)
            end = time.time()
            yield prometheus, servers, start, end
        finally:
            prometheus.stop()
            for server in servers.values():
                server.server.shutdown()


def test_the_recorded_dynamo_and_vllm_window_through_prometheus(
    recorded: tuple[RolePrometheus, dict[str, Recorded], float, float],
    caplog: pytest.LogCaptureFixture,
) -> None:
    prometheus, _, start, end = recorded
    settings = CollectorSettings(
        source="prometheus", prometheus_url=prometheus.url, interval_s=end - start,
        namespace="prod", deployment="qwen",
        # the operator writes the model as it is spelled; the frontend lower-cases it
        selector='model="Qwen/Qwen3-0.6B"', dialect="dynamo", prometheus_timeout_s=5.0,
        ttft_target_s=0.5, itl_target_s=0.05)
    collector = prometheus_source.Collector(settings, query_config.QueryConfig(),
                                            prometheus_source.HttpReader(settings))
    try:
        with caplog.at_level(logging.INFO, logger="slaplanner.collector"):
            collector.start(end)
            (snap,) = collector.window(end)
    finally:
        collector.close()
    for name, value in EXPECTED.items():
        assert getattr(snap, name) == pytest.approx(value), (name, snap.gaps.get(name))
    assert snap.ttft_share_method == "interpolated" and snap.itl_share_method == "bucket_edge"
    assert snap.ttft_target_s == 0.5 and snap.itl_target_s == 0.05
    # the workers were found by the fallback matchers, and the log says so
    assert ('prefill_workers by vllm:num_requests_running or vllm_num_requests_running'
            '{role="prefill"}') in caplog.text
    assert 'decode_workers by vllm:num_requests_running or vllm_num_requests_running' \
           '{role="decode"}' in caplog.text
    # the KV router's gauge has no model label: no warning that it has no series
    assert "prefill_tokens_pending:" not in caplog.text


def targets(*names: str) -> list[exposition.Target]:
    endpoints = {"frontend": Endpoint.FRONTEND, "prefill": Endpoint.PREFILL,
                 "decode": Endpoint.DECODE}
    return [exposition.Target(name, endpoints[name],
                              exposition.parse((DATA / f"{name}.after.prom").read_text()),
                              exposition.parse((DATA / f"{name}.before.prom").read_text()))
            for name in names]


def test_the_recorded_frontend_and_workers_read_directly_agree() -> None:
    values = exposition.window_values(
        promql.DYNAMO, targets("frontend", "prefill", "decode"), 'model="Qwen/Qwen3-0.6B"',
        {"ttft_under_target_share": 0.5, "itl_under_target_share": 0.05})
    for name, value in EXPECTED.items():
        assert values.values[name] == pytest.approx(value), (name, values.gaps.get(name))
    assert values.values["ttft_share_method"] == "interpolated"
    assert values.values["itl_share_method"] == "bucket_edge"


def test_the_recorded_workers_alone_are_read_in_the_vllm_dialect() -> None:
    values = exposition.window_values(promql.VLLM, targets("prefill", "decode"), "",
                                      {"itl_under_target_share": 0.05})
    for name in ("kv_cache_usage", "prefill_workers", "decode_workers", "requests_waiting",
                 "queue_time_avg_s", "prefill_time_avg_s", "decode_time_avg_s",
                 "itl_under_target_share"):
        assert values.values[name] == pytest.approx(EXPECTED[name]), name
    # the recorded engines export no request counter: unknown, and said so
    assert values.values["num_requests"] is None and "no data" in values.gaps["num_requests"]


async def test_the_scrape_source_reads_the_recorded_endpoints_live(
    nc: NATS, services: dict[str, ServiceProcess]
) -> None:
    servers = {name: Recorded(name) for name in ("frontend", "prefill", "decode")}
    snapshots: list[MetricSnapshot] = []

    async def on_snapshot(msg: Any) -> None:
        snapshots.append(MetricSnapshot.from_json(msg.data))

    await nc.subscribe("slaplanner.metrics.prod.qwen", cb=on_snapshot)
    collector = services["collector"]
    url = "http://{}/metrics"
    collector.env.update({
        "SLAPLANNER_SOURCE": "scrape", "SLAPLANNER_NAMESPACE": "prod",
        "SLAPLANNER_DEPLOYMENT": "qwen", "SLAPLANNER_INTERVAL_S": "4s",
        "SLAPLANNER_ARRIVAL_BIN_S": "1s", "SLAPLANNER_DIALECT": "auto",
        "SLAPLANNER_SCRAPE_URLS": url.format(servers["frontend"].target),
        # a name that resolves to its addresses, one endpoint each
        "SLAPLANNER_SCRAPE_PREFILL_URLS": "dns+" + url.format(
            f"localhost:{servers['prefill'].server.server_port}"),
        "SLAPLANNER_SCRAPE_DECODE_URLS": url.format(servers["decode"].target),
        "SLAPLANNER_SCRAPE_LABELS": "model=Qwen/Qwen3-0.6B",
        "SLAPLANNER_TTFT_TARGET_S": "500ms", "SLAPLANNER_ITL_TARGET_S": "50ms",
    })
    collector.start()
    try:
        deadline = time.monotonic() + 60.0
        while not snapshots:
            assert time.monotonic() < deadline, collector.log()
            await asyncio.sleep(0.05)
        assert snapshots[0].stale, "the first scrape is the baseline"
        # right after a window's scrapes, so that the whole window moves in the next one
        for server in servers.values():
            server.state = 1
        while not [s for s in snapshots if not s.stale]:
            assert time.monotonic() < deadline, collector.log()
            await asyncio.sleep(0.05)
        snap = next(s for s in snapshots if not s.stale)
        for name, value in EXPECTED.items():
            assert getattr(snap, name) == pytest.approx(value), (name, snap.gaps.get(name))
        # every request the frontend accepted arrived in one scrape's bin: 10 + 2 + 3 (unless
        # this busy machine made the collector miss a bin's scrape: then it says so)
        if snap.arrival_signal is None:
            assert "arrival scrapes were missed" in snap.gaps["arrival_dispersion"]
        else:
            assert snap.arrival_signal == "request_start" and snap.arrival_bin_s == 1.0
            assert snap.arrivals_peak_1s == 15.0
            assert snap.gaps["arrivals_peak_10s"] == "window shorter than 10 s"
        # the windows after it: no arrival (a real zero), so no dispersion
        while not [s for s in snapshots[snapshots.index(snap) + 1:]
                   if s.arrival_signal is not None]:
            assert time.monotonic() < deadline, collector.log()
            await asyncio.sleep(0.05)
        idle = next(s for s in snapshots[snapshots.index(snap) + 1:]
                    if s.arrival_signal is not None)
        assert idle.num_requests == 0.0 and idle.arrivals_peak_1s == 0.0
        assert idle.gaps["arrival_dispersion"] == "no arrivals in window"
    finally:
        assert collector.stop() == 0, collector.log()
        for server in servers.values():
            server.server.shutdown()
