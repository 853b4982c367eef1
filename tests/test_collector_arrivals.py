"""Arrivals inside a window through a real Prometheus (1 s scrapes): bursts counted in the bins
they were scraped in, from the truest counter each deployment has.

A Dynamo frontend serves two models: "current" as Dynamo 1.3 and later count it (a counter at
each request's start, ``requests_started_total``), "older" as before 1.3 (only the first-token
histogram and the counter at each request's end). Three bursts of 20, 5 and 3 requests come at
least 2 s apart, each once Prometheus has scraped the one before, so in 2 s bins each burst
lands in one bin whatever this machine's timing; the expected statistics follow from the bins'
counts alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import numpy as np
import prometheus_client
import pytest

from services.collector import prometheus_source, query_config
from services.collector.settings import CollectorSettings
from shared.messages import DeploymentKey, MetricSnapshot
from tests.test_collector_prometheus import PrometheusServer, running_prometheus, serve

BURSTS = (20, 5, 3)


class Frontend:
    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        r = self.registry
        self.started = prometheus_client.Counter("dynamo_frontend_requests_started", "",
                                                 ["model"], registry=r)
        self.ended = prometheus_client.Counter("dynamo_frontend_requests", "",
                                               ["model", "status"], registry=r)
        self.ttft = prometheus_client.Histogram("dynamo_frontend_time_to_first_token_seconds",
                                                "", ["model"], registry=r, buckets=(0.5, 1.0))

    def burst(self, n: int) -> None:
        self.started.labels("current").inc(n)
        for model in ("current", "older"):
            for _ in range(n):
                self.ttft.labels(model).observe(0.3)
            self.ended.labels(model, "success").inc(n)


@pytest.fixture(scope="module")
def window() -> Iterator[tuple[PrometheusServer, float, float]]:
    frontend = Frontend()
    for model in ("current", "older"):  # history before the window, and the series exist
        frontend.ttft.labels(model).observe(0.3)
        frontend.ended.labels(model, "success").inc()
    frontend.started.labels("current").inc()
    server = serve(frontend.registry, openmetrics=False)
    try:
        with running_prometheus([f"127.0.0.1:{server.server_port}"]) as prometheus:
            prometheus.wait_for("count(count_over_time(up[1m]) >= 2)", 1.0)
            start = float(math.ceil(time.time()))
            time.sleep(max(start - time.time(), 0.0) + 1.0)
            total = 1
            for n in BURSTS:
                frontend.burst(n)
                total += n
                prometheus.wait_for('sum(dynamo_frontend_requests_started_total)', total)
                time.sleep(2.0)
            end = float(math.ceil(time.time())) + 1.0
            end += (end - start) % 2.0  # a whole number of 2 s bins
            time.sleep(max(end - time.time(), 0.0) + 1.5)  # the scrape at the end is in
            yield prometheus, start, end
    finally:
        server.shutdown()


def read(prometheus: PrometheusServer, start: float, end: float, bin_s: float
         ) -> dict[str, MetricSnapshot]:
    settings = CollectorSettings(
        source="prometheus", prometheus_url=prometheus.url, interval_s=end - start,
        namespace="prod", dialect="dynamo", discover_labels=["model"], arrival_bin_s=bin_s,
        prometheus_timeout_s=5.0)
    collector = prometheus_source.Collector(settings, query_config.QueryConfig(),
                                            prometheus_source.HttpReader(settings))
    try:
        return {s.deployment.name: s for s in collector.window(end)}
    finally:
        collector.close()


def test_bursts_are_counted_per_bin_from_the_truest_counter_of_each_deployment(
    window: tuple[PrometheusServer, float, float],
) -> None:
    prometheus, start, end = window
    snaps = read(prometheus, start, end, 2.0)
    counts = np.zeros(round((end - start) / 2.0))
    counts[: len(BURSTS)] = BURSTS  # where the bursts fell does not change these
    for name, signal in (("current", "request_start"), ("older", "first_token")):
        snap = snaps[name]
        assert snap.deployment == DeploymentKey(namespace="prod", name=name)
        assert snap.arrival_signal == signal, snap.gaps
        assert snap.arrival_bin_s == 2.0
        assert snap.arrival_dispersion == pytest.approx(counts.var() / counts.mean())
        # 2 s bins: the busiest second held at least half of the busiest bin
        assert snap.arrivals_peak_1s == pytest.approx(10.0)
        assert snap.arrival_peaks_exact is False
        assert 20.0 <= (snap.arrivals_peak_10s or 0.0) <= 28.0
        assert snap.num_requests == sum(BURSTS)


def test_bins_finer_than_the_scrapes_give_way_to_the_finest_the_scrapes_hold(
    window: tuple[PrometheusServer, float, float],
) -> None:
    prometheus, start, end = window
    snap = read(prometheus, start, end, 0.5)["current"]
    # 1 s scrapes hold at most one sample per second: never bins of half a second
    assert snap.arrival_bin_s is not None and snap.arrival_bin_s >= 1.0
    assert snap.arrival_signal == "request_start"
    assert (snap.arrivals_peak_1s or 0.0) <= 20.0
