"""The collector killed with SIGKILL and started again, against a real Prometheus and nats-server.

After a start, the collector reads from the stream the last window it published for each
deployment and reads the windows that came due while it was down, each evaluated at its own end
(Prometheus keeps their samples), before it goes on with the live ones. So the stream holds every
window once, in order, with the requests of the downtime in the windows they happened in. Beyond
``--max-backlog-windows`` the oldest missed windows are given up: a gap, of the size it logs.

Timeline of the service test (1 s windows, read 0.5 s after their end, Prometheus scraping every
1 s):

    t0  collector up; 10 requests (ISL 1000) land in a window it publishes
    t1  kill -9; while it is down 20 requests (ISL 2000), then 30 (ISL 3000) in a later window
    t2  started again: the windows of t1 are back-filled; then 40 requests (ISL 4000)
    t3  kill -9 again; down for ~5 windows; started with --max-backlog-windows 2: 2 back-filled,
        the older ones given up
"""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import time
from typing import Any

import prometheus_client
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.collector import snapshot, ticks
from shared.embedded_nats import free_port
from shared.messages import DeploymentKey, MetricSnapshot
from shared.service_settings import ServiceSettings
from tests.conftest import ServiceProcess
from tests.test_collector_prometheus import Frontend, PrometheusServer, running_prometheus

KEY = DeploymentKey(namespace="prod", name="llama")
SUBJECT = "slaplanner.metrics.prod.llama"
INTERVAL_S = 1.0
DELAY_S = 0.5

# ---------------------------------------------------------------------------------------------
# Where a restarted collector begins (pure)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last_end", "now", "interval_s", "delay_s", "expected"),
    [
        pytest.param(None, 1000.2, 10.0, 5.0, ticks.Resume(index=100, missed=0, given_up=0),
                     # floor((1000.2 - 5) / 10) + 1 = 100, the window ending at 1000
                     id="nothing published yet: the first window not yet due, as before"),
        pytest.param(990.0, 1000.2, 10.0, 5.0, ticks.Resume(index=100, missed=0, given_up=0),
                     id="the last window published is the one before the next due: none missed"),
        pytest.param(960.0, 1005.2, 10.0, 5.0,
                     ticks.Resume(index=97, missed=4, given_up=0),
                     # first = floor(1000.2 / 10) + 1 = 101; 970, 980, 990 and 1000 came due
                     id="the windows due while it was down are read, from the one after the last"),
        pytest.param(800.0, 1005.2, 10.0, 5.0,
                     ticks.Resume(index=96, missed=5, given_up=15),
                     # after 800 comes 81; the backlog of 5 starts at 101 - 5 = 96; 81..95 given up
                     id="beyond the backlog the oldest missed windows are given up"),
        pytest.param(1020.0, 1005.2, 10.0, 5.0,
                     ticks.Resume(index=101, missed=0, given_up=0),
                     id="a last window not due yet (the clock stepped back) reads nothing old"),
        pytest.param(ticks.end_of(3, 0.7), 2.75, 0.7, 0.0,
                     ticks.Resume(index=4, missed=0, given_up=0),
                     # 3 * 0.7 = 2.0999999999999996, and that / 0.7 = 2.9999999999999996, not 3
                     id="a window end computed in floating point still names its own window"),
    ],
)
def test_where_a_restarted_collector_begins(last_end: float | None, now: float,
                                            interval_s: float, delay_s: float,
                                            expected: ticks.Resume) -> None:
    assert ticks.resume(last_end, now, interval_s, delay_s, max_backlog=5) == expected


# ---------------------------------------------------------------------------------------------
# The service, killed and started again
# ---------------------------------------------------------------------------------------------


async def stream_snapshots(nc: NATS) -> list[MetricSnapshot]:
    """Every snapshot of the deployment the stream holds, in stream order."""
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        SUBJECT, stream=ServiceSettings().stream_name,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE))
    try:
        pending = (await sub.consumer_info()).num_pending or 0
        snapshots: list[MetricSnapshot] = []
        while len(snapshots) < pending:
            for msg in await sub.fetch(batch=pending - len(snapshots), timeout=5.0):
                snapshots.append(MetricSnapshot.from_json(msg.data))
        return snapshots
    finally:
        await sub.unsubscribe()


def kill_9(service: ServiceProcess) -> float:
    assert service.process is not None and service.process.poll() is None, \
        f"{service.name} died by itself:\n{service.log()}"
    service.process.send_signal(signal.SIGKILL)
    service.process.wait()
    return time.time()


async def test_a_killed_collector_back_fills_the_windows_it_missed_once_each_in_order(
    nc: NATS, services: dict[str, ServiceProcess],
) -> None:
    frontend = Frontend()
    port = free_port()
    exporter = prometheus_client.start_http_server(port, "127.0.0.1", frontend.registry)[0]
    frontend.serve("llama", 3, 500.0, 10.0, 0.1, 0.01, 1.0)  # history before the first window
    live: list[MetricSnapshot] = []

    async def on_snapshot(msg: Any) -> None:
        live.append(MetricSnapshot.from_json(msg.data))

    await nc.subscribe(SUBJECT, cb=on_snapshot)
    collector = services["collector"]

    async def wait_for(predicate: Any, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, f"timed out; {collector.log()}"
            await asyncio.sleep(0.05)

    async def serve(prometheus: PrometheusServer, n: int, isl: float) -> None:
        """``n`` requests, returned once Prometheus has stored them."""
        total = (prometheus.value('sum(dynamo_frontend_requests_total{model="llama"})') or 0.0)
        frontend.serve("llama", n, isl, 100.0, 0.2, 0.02, 2.0)
        await asyncio.to_thread(prometheus.wait_for,
                                'sum(dynamo_frontend_requests_total{model="llama"})', total + n)

    with running_prometheus([f"127.0.0.1:{port}"]) as prometheus:
        await asyncio.to_thread(prometheus.wait_for, "count(up == 1)", 1.0)
        # the history's series has samples from before the collector's first window (a series
        # that first appears inside a window counts whole, so the history would land in it)
        await asyncio.to_thread(
            prometheus.wait_for,
            "count(count_over_time(dynamo_frontend_requests_total[1m]) >= 3)", 1.0)
        collector.env.update({
            "SLAPLANNER_SOURCE": "prometheus", "SLAPLANNER_PROMETHEUS_URL": prometheus.url,
            "SLAPLANNER_NAMESPACE": "prod", "SLAPLANNER_DEPLOYMENT": "llama",
            "SLAPLANNER_SELECTOR": 'model="llama"', "SLAPLANNER_DIALECT": "dynamo",
            "SLAPLANNER_INTERVAL_S": f"{INTERVAL_S:g}s",
            "SLAPLANNER_PROMETHEUS_QUERY_DELAY_S": f"{DELAY_S * 1000:g}ms",
            "SLAPLANNER_PROMETHEUS_TIMEOUT_S": "3s",
        })
        try:
            # t0: up, publishing; 10 requests in a window it publishes
            collector.start()
            await wait_for(lambda: len(live) >= 2)
            await serve(prometheus, 10, 1000.0)
            await wait_for(lambda: any(s.num_requests == 10 for s in live))
            # t1: killed; 50 requests while it is down, in two windows that come due meanwhile
            killed = kill_9(collector)
            await serve(prometheus, 20, 2000.0)
            await asyncio.sleep(2 * INTERVAL_S)
            await serve(prometheus, 30, 3000.0)
            # the window of the last scrape ends within a window of it and is due DELAY_S later
            await asyncio.sleep(INTERVAL_S + DELAY_S + 0.5)
            restarted = time.time()
            collector.start()
            # t2: back; the first live window after the restart, then 40 requests
            await wait_for(lambda: any(s.window_end > restarted + INTERVAL_S for s in live))
            await serve(prometheus, 40, 4000.0)
            await wait_for(lambda: any(s.num_requests == 40 for s in live))
            # t3: killed again, down 4 windows and its start-up, started with a backlog of 2
            first_log = collector.log()
            killed_again = kill_9(collector)
            await asyncio.sleep(4 * INTERVAL_S)
            collector.env["SLAPLANNER_MAX_BACKLOG_WINDOWS"] = "2"
            restarted_again = time.time()
            collector.start()
            await wait_for(lambda: any(s.window_end > restarted_again + INTERVAL_S for s in live))
            assert collector.process is not None and collector.process.poll() is None, \
                "no crash loop: the collector is still running"
        finally:
            assert collector.stop() == 0, collector.log()
            exporter.shutdown()

    snapshots = await stream_snapshots(nc)
    log = collector.log()
    ends = [s.window_end for s in snapshots]

    # Exactly once, in order: one id and one window end per snapshot, ids derived from the window
    assert len({s.id for s in snapshots}) == len(snapshots), "no id twice"
    assert ends == sorted(set(ends)), "each window once, in stream order"
    assert all(s.id == snapshot.window_id("prometheus", KEY, s.window_end) for s in snapshots)
    assert all(s.source == "prometheus" and not s.stale for s in snapshots), \
        [s.gaps for s in snapshots if s.stale]

    # t1-t2: no window missing across the first restart; the downtime's windows were read after it
    gaps = [(a, b) for a, b in itertools.pairwise(ends) if b - a != INTERVAL_S]
    assert all(a > killed for a, _ in gaps), f"no window skipped across the first restart: {gaps}"
    assert len([e for e in ends if killed < e <= restarted]) >= 3, \
        "the windows that came due while it was down are in the stream"

    # Every request counted once, in the window it happened in: the windows tile
    busy = [(s.num_requests, s.isl_avg) for s in snapshots if s.num_requests]
    assert busy == [(10, 1000.0), (20, 2000.0), (30, 3000.0), (40, 4000.0)], busy
    assert all(s.num_requests == 0 for s in snapshots if (s.num_requests, s.isl_avg) not in busy)
    downtime = [s.num_requests for s in snapshots if killed < s.window_end <= restarted]
    assert sorted(n for n in downtime if n) == [20, 30], "the downtime's requests, in its windows"
    back_filled = re.search(r"back-filling (\d+) windows missed", first_log)
    assert back_filled is not None and int(back_filled[1]) >= 3, first_log

    # t3: beyond the backlog, the oldest missed windows are given up: one gap, of the size logged
    given = re.search(r"(\d+) windows came due since the last one published \(.*\); the oldest "
                      r"(\d+) are beyond", log)
    assert given is not None, log
    missed, given_up = int(given[1]), int(given[2])
    assert missed - given_up == 2 and given_up >= 1, log
    assert len(gaps) == 1, gaps
    (before_gap, after_gap), = gaps
    assert before_gap < killed_again < after_gap
    assert round((after_gap - before_gap) / INTERVAL_S) - 1 == given_up
    assert log.count("back-filling 2 windows missed") == 1, "the 2 newest missed windows"
