"""Decider shell: forecasts in, replica targets out; snapshots for the fast path, ScaleEvents to
learn from; gauges recorded. One durable consumer, ``decider``, for all three, one core.

One consumer, not one per subject family, because the core must see a deployment's inputs in the
order the stream holds them, which is their causal order: snapshot k before forecast k (made from
it), the ScaleEvents of interval k-1 before snapshot k. Three consumers would race, and a fast
path that ran after the forecast it should precede would decide differently. The consumer handles
the messages of different deployments side by side and those of one deployment strictly in
order, so that publishing a target and acking its input (round trips to the server) overlap with
deciding the next deployment instead of following it.

On start it restores each deployment's memory from the stream (``restore``); with
``replica_count`` > 1 it decides only the deployments ``partition`` gives its ``replica_index``,
through a durable of its own (``decider-<i>``), and acks the others unread. Deployments idle for
``idle_forget_s`` are forgotten.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import prometheus_client
from nats.aio.msg import Msg

from services.decider import gauges, restore
from services.decider.core import Decider, decision_line
from services.decider.settings import DeciderSettings
from shared import partition
from shared.messages import Envelope, LoadForecast, MetricSnapshot, ScaleEvent
from shared.service import Route, Runtime, forget_idle_periodically

CONSUMES = "slaplanner.forecast.>"
FAST_PATH_CONSUMES = "slaplanner.metrics.>"
SCALED_CONSUMES = "slaplanner.scaled.>"
# Durables of earlier versions, which read snapshots and ScaleEvents on consumers of their own;
# removed at start so that an upgraded deployment does not keep them (and their backlog) around.
RETIRED_DURABLES = ("fast-path", "scaled")
# A collector publishes every deployment's snapshot at the same tick, so one message per
# deployment arrives at once on each subject family. Measured with bench/load.py (1,000
# deployments, docs/benchmarks.md, Load): large fetches take the burst in a few round trips, and
# a few dozen messages in flight let the publications and acks of one batch share writes.
FETCH_BATCH = 256
MAX_IN_FLIGHT = 64
log = logging.getLogger("slaplanner.decider")
DEPLOYMENTS = prometheus_client.Gauge(
    "slaplanner_decider_deployments", "Deployments whose policy memory this decider holds")
FORGOTTEN = prometheus_client.Counter(
    "slaplanner_decider_deployments_forgotten",
    "Deployments forgotten after idle_forget_s without an input")


def deployment_of(msg: Msg) -> str:
    """The ordering key: ``namespace.name``, the last two tokens of every stage subject."""
    return msg.subject.split(".", 2)[-1]


def owned_by(settings: DeciderSettings) -> Callable[[str], bool]:
    """Whether a subject's deployment belongs to this replica (all of them for a single one)."""
    def owns(subject: str) -> bool:
        return partition.owns(subject, settings.replica_count, settings.replica_index)

    return owns


def routes(decider: Decider, held: restore.Held | None = None) -> list[Route[Any]]:
    """What the decider reads: forecasts always; snapshots and ScaleEvents only if some
    deployment's policy uses them (dynamo does not), so a dynamo-only decider neither does the
    work nor rejects bad snapshots that nothing of it reads. A message the restore replayed
    (taken, not acked, by the instance before) gets the replay's answer, ``held``."""
    held = held if held is not None else restore.Held()

    async def on_forecast(forecast: LoadForecast) -> Iterable[Envelope]:
        if (answer := held.take(forecast)) is not None:
            return answer
        target = decider.decide(forecast)
        gauges.record(target, forecast.observed)
        log.info("%s", decision_line(target))
        return [target]

    async def on_snapshot(snapshot: MetricSnapshot) -> Iterable[Envelope]:
        if (answer := held.take(snapshot)) is not None:
            return answer
        target = decider.on_snapshot(snapshot)
        if target is None:
            return []
        gauges.record(target, snapshot)
        log.info("%s", decision_line(target))
        return [target]

    async def on_scaled(event: ScaleEvent) -> Iterable[Envelope]:
        if held.take(event) is not None:
            return []
        decider.on_scale_event(event)
        return []

    chosen: list[Route[Any]] = [Route(CONSUMES, LoadForecast, on_forecast)]
    if decider.has_fast_path():
        chosen.append(Route(FAST_PATH_CONSUMES, MetricSnapshot, on_snapshot))
    if decider.learns_from_scale_events():
        chosen.append(Route(SCALED_CONSUMES, ScaleEvent, on_scaled))
    return chosen


async def forget_idle_deployments(
    runtime: Runtime, decider: Decider, idle_forget_s: float,
    clock: Callable[[], float] = time.time,
) -> None:
    """Forget the deployments idle for ``idle_forget_s`` (``forget_idle_periodically``), with
    their gauge series."""

    def forget(now_s: float) -> None:
        forgotten = decider.forget_idle(now_s, idle_forget_s)
        for deployment in forgotten:
            gauges.forget(deployment)
        if forgotten:
            FORGOTTEN.inc(len(forgotten))
            log.info("forgot %d deployments idle for %g s or more", len(forgotten),
                     idle_forget_s)

    await forget_idle_periodically(runtime.stop, idle_forget_s, decider.newest_seen_s, forget,
                                   clock)


async def run(runtime: Runtime, decider: Decider) -> None:
    settings = decider.settings
    sharing = settings.replica_count > 1
    owns = owned_by(settings)
    durable = settings.durable_name()
    DEPLOYMENTS.set_function(lambda: float(decider.deployment_count()))
    if sharing:
        log.info("replica %d of %d: deciding only the deployments it owns",
                 settings.replica_index, settings.replica_count)
    held = restore.Held()
    if settings.restore_from_stream:
        held = await restore.from_stream(runtime, decider, routes(decider), durable,
                                         settings.restore_max_age_s, owns)
    forgetting = asyncio.create_task(
        forget_idle_deployments(runtime, decider, settings.idle_forget_s))
    try:
        await asyncio.gather(
            runtime.consume_routes(routes(decider, held), durable=durable, batch=FETCH_BATCH,
                                   ordered_by=deployment_of, max_in_flight=MAX_IN_FLIGHT,
                                   owns=owns if sharing else None),
            runtime.retire_durables(f"{runtime.name}-{suffix}" for suffix in RETIRED_DURABLES),
        )
    finally:
        forgetting.cancel()
