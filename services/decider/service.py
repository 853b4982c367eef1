"""Decider shell: forecasts in, replica targets out; snapshots for the fast path, ScaleEvents to
learn from; gauges recorded. Three durable consumers, one core."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from services.decider import gauges
from services.decider.core import Decider
from shared.messages import Envelope, LoadForecast, MetricSnapshot, ScaleEvent
from shared.service import Runtime

CONSUMES = "slaplanner.forecast.>"
FAST_PATH_CONSUMES = "slaplanner.metrics.>"
SCALED_CONSUMES = "slaplanner.scaled.>"


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
    consumers = [runtime.consume(CONSUMES, LoadForecast, on_forecast)]
    if decider.has_fast_path():
        consumers.append(runtime.consume(FAST_PATH_CONSUMES, MetricSnapshot, on_snapshot,
                                         durable=f"{runtime.name}-fast-path"))
    if decider.learns_from_scale_events():
        consumers.append(runtime.consume(SCALED_CONSUMES, ScaleEvent, on_scaled,
                                         durable=f"{runtime.name}-scaled"))
    await asyncio.gather(*consumers)
