"""Decider shell: forecasts in, replica targets out; snapshots for the fast path, ScaleEvents to
learn from; gauges recorded. One durable consumer, ``decider``, for all three, one core.

One consumer, not one per subject family, because the core must see a deployment's inputs in the
order the stream holds them, which is their causal order: snapshot k before forecast k (made from
it), the ScaleEvents of interval k-1 before snapshot k. Three consumers would race, and a fast
path that ran after the forecast it should precede would decide differently. The consumer handles
the messages of different deployments side by side and those of one deployment strictly in
order, so that publishing a target and acking its input (round trips to the server) overlap with
deciding the next deployment instead of following it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from nats.aio.msg import Msg

from services.decider import gauges
from services.decider.core import Decider, decision_line
from shared.messages import Envelope, LoadForecast, MetricSnapshot, ScaleEvent
from shared.service import Route, Runtime

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


def deployment_of(msg: Msg) -> str:
    """The ordering key: ``namespace.name``, the last two tokens of every stage subject."""
    return msg.subject.split(".", 2)[-1]


def routes(decider: Decider) -> list[Route[Any]]:
    """What the decider reads: forecasts always; snapshots and ScaleEvents only if some
    deployment's policy uses them (dynamo does not), so a dynamo-only decider neither does the
    work nor rejects bad snapshots that nothing of it reads."""

    async def on_forecast(forecast: LoadForecast) -> Iterable[Envelope]:
        target = decider.decide(forecast)
        gauges.record(target, forecast.observed)
        log.info("%s", decision_line(target))
        return [target]

    async def on_snapshot(snapshot: MetricSnapshot) -> Iterable[Envelope]:
        target = decider.on_snapshot(snapshot)
        if target is None:
            return []
        gauges.record(target, snapshot)
        log.info("%s", decision_line(target))
        return [target]

    async def on_scaled(event: ScaleEvent) -> Iterable[Envelope]:
        decider.on_scale_event(event)
        return []

    chosen: list[Route[Any]] = [Route(CONSUMES, LoadForecast, on_forecast)]
    if decider.has_fast_path():
        chosen.append(Route(FAST_PATH_CONSUMES, MetricSnapshot, on_snapshot))
    if decider.learns_from_scale_events():
        chosen.append(Route(SCALED_CONSUMES, ScaleEvent, on_scaled))
    return chosen


async def run(runtime: Runtime, decider: Decider) -> None:
    await asyncio.gather(
        runtime.consume_routes(routes(decider), batch=FETCH_BATCH, ordered_by=deployment_of,
                               max_in_flight=MAX_IN_FLIGHT),
        runtime.retire_durables(f"{runtime.name}-{suffix}" for suffix in RETIRED_DURABLES),
    )
