"""Forecaster shell: snapshots in, forecasts out; fits run in a thread pool so the loop stays free.

Snapshots of different deployments are forecast side by side (``fit_threads`` at a time, at most
``max_in_flight`` taken from the bus), those of one deployment strictly in order, each acked only
once its forecast is published. With ``replica_count`` > 1 this replica handles only the
deployments that ``partition`` gives its ``replica_index`` and acks the others unread.

On start it rebuilds its deployments' histories from the stream, so a restarted pod forecasts
as well as before (reading the stream in batches and keeping only numbers, so that a day of
snapshots fits the pod), and optionally arms a warm start from a recorded trace for deployments
it has never seen. While it runs, deployments idle for ``idle_forget_s`` are forgotten.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import prometheus_client
import prometheus_client.registry
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from prometheus_client.core import CounterMetricFamily

from services.forecaster.core import Forecaster
from services.forecaster.settings import ForecasterSettings
from shared import partition, traces
from shared.messages import Envelope, MetricSnapshot
from shared.service import Runtime, forget_idle_periodically

log = logging.getLogger("slaplanner.forecaster")
CONSUMES = "slaplanner.metrics.>"

FIT_SECONDS = prometheus_client.Histogram(
    "slaplanner_forecaster_fit_seconds", "Time to forecast one deployment, seconds", ["model"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)
FALLBACKS = prometheus_client.Counter(
    "slaplanner_forecaster_fallbacks", "Forecasts that fell back from the configured model"
)


class _RefitsTotal(prometheus_client.registry.Collector):
    """Model refits so far, a counter read from the forecaster core when scraped."""

    def __init__(self) -> None:
        self.source: Callable[[], int] | None = None

    def collect(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily(
            "slaplanner_forecaster_refits", "Model refits so far, all deployments and series",
            value=float(self.source()) if self.source is not None else 0.0,
        )


REFITS = _RefitsTotal()
prometheus_client.REGISTRY.register(REFITS)
DEPLOYMENTS = prometheus_client.Gauge(
    "slaplanner_forecaster_deployments", "Deployments whose history this forecaster holds"
)
FORGOTTEN = prometheus_client.Counter(
    "slaplanner_forecaster_deployments_forgotten",
    "Deployments forgotten after idle_forget_s without a snapshot",
)


def owned_by(settings: ForecasterSettings) -> Callable[[str], bool]:
    """Whether a subject's deployment belongs to this replica."""
    def owns(subject: str) -> bool:
        return partition.owner_of_subject(subject, settings.replica_count) == settings.replica_index

    return owns


def deployment_of(msg: Msg) -> str:
    # The subject names the deployment; snapshots of one deployment must be forecast in order.
    return msg.subject


async def rebuild_from_stream(
    runtime: Runtime, forecaster: Forecaster, max_age_s: float,
    owns: Callable[[str], bool] = lambda subject: True,
) -> int:
    """Replay the snapshots the stream still holds (up to ``max_age_s`` old) of the deployments
    this replica owns into the history. Read in batches; each snapshot is cut to numbers as it
    arrives and let go, so memory stays bounded by the histories."""
    since = datetime.now(UTC) - timedelta(seconds=max_age_s)
    rebuild = forecaster.rebuilder()
    read = 0
    async for msg in runtime.read_stream(CONSUMES, DeliverPolicy.BY_START_TIME, since):
        if owns(msg.subject):
            snapshot = runtime.stored(MetricSnapshot, msg.subject, msg.data)
            if snapshot is not None:  # valid, and not from the future
                rebuild.add(snapshot)
                read += 1
    recorded = await asyncio.to_thread(rebuild.finish)
    log.info("rebuilt history from %d snapshots in the stream (%d recorded)", read, recorded)
    return recorded


async def forget_idle_deployments(
    runtime: Runtime, forecaster: Forecaster, idle_forget_s: float,
    clock: Callable[[], float] = time.time,
) -> None:
    """Forget the deployments idle for ``idle_forget_s`` (``forget_idle_periodically``)."""

    def forget(now_s: float) -> None:
        forgotten = forecaster.forget_idle(now_s)
        if forgotten:
            FORGOTTEN.inc(forgotten)
            log.info("forgot %d deployments idle for %g s or more", forgotten, idle_forget_s)

    await forget_idle_periodically(runtime.stop, idle_forget_s, forecaster.newest_seen_s,
                                   forget, clock)


async def run(runtime: Runtime, forecaster: Forecaster, settings: ForecasterSettings) -> None:
    loop = asyncio.get_running_loop()
    owns = owned_by(settings)
    REFITS.source = forecaster.refits_total
    DEPLOYMENTS.set_function(lambda: float(forecaster.deployment_count()))
    if settings.warm_start_trace:
        trace = await asyncio.to_thread(traces.load_trace, settings.warm_start_trace)
        forecaster.warm_start_new_deployments(trace.arrival_s, trace.isl_tokens, trace.osl_tokens)
        log.info("new deployments start from %s (%d requests)", settings.warm_start_trace,
                 len(trace))
    if settings.replica_count > 1:
        log.info("replica %d of %d: forecasting only the deployments it owns",
                 settings.replica_index, settings.replica_count)
    await rebuild_from_stream(runtime, forecaster, settings.rebuild_max_age_s, owns)

    fits = ThreadPoolExecutor(settings.fit_threads, thread_name_prefix="fit")
    forgetting = asyncio.create_task(
        forget_idle_deployments(runtime, forecaster, settings.idle_forget_s)
    )

    async def on_snapshot(snapshot: MetricSnapshot) -> Iterable[Envelope]:
        forecast = await loop.run_in_executor(fits, forecaster.forecast, snapshot)
        FIT_SECONDS.labels(forecast.model).observe(forecast.fit_s)
        if forecast.fallback is not None:
            FALLBACKS.inc()
        return [forecast]

    try:
        await runtime.consume(
            CONSUMES, MetricSnapshot, on_snapshot, durable=settings.durable_name(),
            ordered_by=deployment_of, max_in_flight=settings.max_in_flight,
            owns=owns if settings.replica_count > 1 else None,
        )
    finally:
        forgetting.cancel()
        # Not waiting: a fit still running must not block the loop while the service drains.
        fits.shutdown(wait=False, cancel_futures=True)
