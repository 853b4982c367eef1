"""Forecaster shell: snapshots in, forecasts out; fits run in a thread so the loop stays free."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from services.forecaster.core import Forecaster
from shared.messages import Envelope, MetricSnapshot
from shared.service import Runtime

log = logging.getLogger("slaplanner.forecaster")
CONSUMES = "slaplanner.metrics.>"


async def run(runtime: Runtime, forecaster: Forecaster) -> None:
    loop = asyncio.get_running_loop()

    async def on_snapshot(snapshot: MetricSnapshot) -> Iterable[Envelope]:
        forecaster.observe(snapshot)
        forecast = await loop.run_in_executor(None, forecaster.forecast, snapshot)
        return [forecast]

    await runtime.consume(CONSUMES, MetricSnapshot, on_snapshot)
