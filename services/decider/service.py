"""Decider shell: forecasts in, replica targets out; snapshots for the fast path, ScaleEvents to
learn from; gauges recorded. Three durable consumers, one core.

Each consumer handles the messages of different deployments side by side and those of one
deployment strictly in order, so that publishing a target and acking its forecast (round trips to
the server) overlap with deciding the next deployment instead of following it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from nats.aio.msg import Msg

from services.decider import gauges
from services.decider.core import Decider
from shared.messages import Envelope, LoadForecast, MetricSnapshot, ScaleEvent
from shared.service import Runtime

CONSUMES = "slaplanner.forecast.>"
FAST_PATH_CONSUMES = "slaplanner.metrics.>"
SCALED_CONSUMES = "slaplanner.scaled.>"
# A collector publishes every deployment's snapshot at the same tick, so one message per
# deployment arrives at once on each subject family. Measured with bench/load.py (1,000
# deployments, docs/benchmarks.md, Load): large fetches take the burst in a few round trips, and
# a few dozen messages in flight let the publications and acks of one batch share writes.
FETCH_BATCH = 256
MAX_IN_FLIGHT = 64


def deployment_of(msg: Msg) -> str:
    """The ordering key: ``namespace.name``, the last two tokens of every stage subject."""
    return msg.subject.split(".", 2)[-1]


async def run(runtime: Runtime, decider: Decider) -> None:
    async def on_forecast(forecast: LoadForecast) -> Iterable[Envelope]:
        target = decider.decide(forecast)
        gauges.record(target)
        return [target]

    async def on_snapshot(snapshot: MetricSnapshot) -> Iterable[Envelope]:
        target = decider.on_snapshot(snapshot)
        if target is None:
            return []
        gauges.record(target)
        return [target]

    async def on_scaled(event: ScaleEvent) -> Iterable[Envelope]:
        decider.on_scale_event(event)
        return []

    # Snapshots and ScaleEvents are read only if some deployment's policy uses them (dynamo does
    # not), so a dynamo-only decider neither does the work nor reports bad snapshots twice.
    consumers = [runtime.consume(CONSUMES, LoadForecast, on_forecast, batch=FETCH_BATCH,
                                 ordered_by=deployment_of, max_in_flight=MAX_IN_FLIGHT)]
    if decider.has_fast_path():
        consumers.append(runtime.consume(
            FAST_PATH_CONSUMES, MetricSnapshot, on_snapshot, durable=f"{runtime.name}-fast-path",
            batch=FETCH_BATCH, ordered_by=deployment_of, max_in_flight=MAX_IN_FLIGHT))
    if decider.learns_from_scale_events():
        consumers.append(runtime.consume(
            SCALED_CONSUMES, ScaleEvent, on_scaled, durable=f"{runtime.name}-scaled",
            batch=FETCH_BATCH, ordered_by=deployment_of, max_in_flight=MAX_IN_FLIGHT))
    await asyncio.gather(*consumers)
