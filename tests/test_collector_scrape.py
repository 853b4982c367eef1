"""The collector scraping a real prometheus-client endpoint with Dynamo frontend metric names."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from typing import Any

import orjson
import prometheus_client
import pytest
from nats.aio.client import Client as NATS

from shared.embedded_nats import free_port
from shared.messages import MetricSnapshot
from tests.conftest import ServiceProcess


def frontend_registry() -> tuple[prometheus_client.CollectorRegistry, dict[str, Any]]:
    registry = prometheus_client.CollectorRegistry()
    labels = ["model"]
    metrics = {
        "requests": prometheus_client.Counter("dynamo_frontend_requests", "requests", labels,
                                              registry=registry),
        "isl": prometheus_client.Histogram("dynamo_frontend_input_sequence_tokens", "isl",
                                           labels, registry=registry,
                                           buckets=(1000, 2000, 4000, 8000)),
        "osl": prometheus_client.Histogram("dynamo_frontend_output_sequence_tokens", "osl",
                                           labels, registry=registry, buckets=(100, 200, 400)),
        "ttft": prometheus_client.Histogram("dynamo_frontend_time_to_first_token_seconds",
                                            "ttft", labels, registry=registry,
                                            buckets=(0.1, 0.25, 0.5, 1.0)),
        "itl": prometheus_client.Histogram("dynamo_frontend_inter_token_latency_seconds", "itl",
                                           labels, registry=registry,
                                           buckets=(0.01, 0.02, 0.05)),
        "duration": prometheus_client.Histogram("dynamo_frontend_request_duration_seconds",
                                                "duration", labels, registry=registry),
        "inflight": prometheus_client.Gauge("dynamo_frontend_inflight_requests", "inflight",
                                            labels, registry=registry),
        "queued": prometheus_client.Gauge("dynamo_frontend_queued_requests", "queued", labels,
                                          registry=registry),
    }
    return registry, metrics


def http_port(proc: ServiceProcess) -> int:
    for _ in range(100):
        match = re.search(r"/metrics and /healthz on [\d.]+:(\d+)", proc.log())
        if match:
            return int(match.group(1))
        import time

        time.sleep(0.05)
    raise AssertionError(proc.log())


async def test_snapshots_match_the_values_served(
    nc: NATS, services: dict[str, ServiceProcess]
) -> None:
    registry, m = frontend_registry()
    port = free_port()
    server, _thread = prometheus_client.start_http_server(port, "127.0.0.1", registry=registry)
    snapshots: list[MetricSnapshot] = []

    async def on_snapshot(msg: Any) -> None:
        snapshots.append(MetricSnapshot.from_json(msg.data))

    await nc.subscribe("slaplanner.metrics.prod.llama", cb=on_snapshot)
    collector = services["collector"]
    collector.env.update({
        "SLAPLANNER_NAMESPACE": "prod", "SLAPLANNER_DEPLOYMENT": "llama",
        "SLAPLANNER_INTERVAL_S": "1s",
        "SLAPLANNER_SCRAPE_URLS": f"http://127.0.0.1:{port}/metrics",
        "SLAPLANNER_SCRAPE_LABELS": "model=llama",
    })
    collector.start()
    try:
        while not snapshots:
            await asyncio.sleep(0.05)
        assert snapshots[0].stale, "the first scrape is only a baseline"
        # 50 identical requests: whichever windows they fall in, every average is exact.
        for _ in range(50):
            m["requests"].labels("llama").inc()
            m["isl"].labels("llama").observe(3000)
            m["osl"].labels("llama").observe(300)
            m["ttft"].labels("llama").observe(0.2)
            m["itl"].labels("llama").observe(0.015)
            m["duration"].labels("llama").observe(4.7)
        m["inflight"].labels("llama").set(7)
        m["requests"].labels("other").inc(1000)
        for _ in range(200):
            fresh = [s for s in snapshots if not s.stale]
            if sum(s.num_requests or 0 for s in fresh) >= 50 and len(fresh) >= 2:
                break
            await asyncio.sleep(0.05)
        fresh = [s for s in snapshots if not s.stale]
        assert sum(s.num_requests or 0 for s in fresh) == 50.0  # "other" model excluded
        busy = [s for s in fresh if s.num_requests]
        for s in busy:
            assert s.isl_avg == pytest.approx(3000.0)
            assert s.osl_avg == pytest.approx(300.0)
            assert s.ttft_avg_s == pytest.approx(0.2)
            assert s.itl_avg_s == pytest.approx(0.015)
            assert s.request_duration_avg_s == pytest.approx(4.7)
            # all in the (0.1, 0.25] bucket: p99 interpolates to 0.1 + 0.15 * 0.99
            assert s.ttft_p99_s == pytest.approx(0.1 + 0.15 * 0.99)
        idle = [s for s in fresh if s.num_requests == 0]
        for s in idle:
            assert s.isl_avg is None and s.gaps["isl_avg"] == "no samples in window"
        ends = [s.window_end for s in snapshots]
        assert all(e == int(e) for e in ends), "ticks align to whole seconds"
        assert ends == sorted(set(ends)), "no window skipped twice or doubled"

        health_port = http_port(collector)
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz") as response:
            assert response.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/metrics") as response:
            text = response.read().decode()
        assert 'slaplanner_messages_published_total{service="collector"' in text
    finally:
        assert collector.stop() == 0, collector.log()
        server.shutdown()


async def test_an_unreachable_endpoint_gives_stale_snapshots_not_zeros(
    nc: NATS, services: dict[str, ServiceProcess]
) -> None:
    snapshots: list[MetricSnapshot] = []

    async def on_snapshot(msg: Any) -> None:
        snapshots.append(MetricSnapshot.from_json(msg.data))

    await nc.subscribe("slaplanner.metrics.default.llm", cb=on_snapshot)
    collector = services["collector"]
    collector.env.update({"SLAPLANNER_INTERVAL_S": "500ms",
                          "SLAPLANNER_SCRAPE_URLS": f"http://127.0.0.1:{free_port()}/metrics"})
    collector.start()
    try:
        while len(snapshots) < 3:
            await asyncio.sleep(0.05)
        for s in snapshots:
            assert s.stale and s.num_requests is None
            assert "scrape failed" in s.gaps["all"]
        assert collector.log().count("scrape failed") == 1, "an outage is logged once"
    finally:
        assert collector.stop() == 0
    assert orjson.loads(snapshots[0].to_json())["num_requests"] is None
