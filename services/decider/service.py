"""Decider shell: forecasts in, replica targets out, gauges recorded."""

from __future__ import annotations

from collections.abc import Iterable

from services.decider import gauges
from services.decider.core import Decider
from shared.messages import Envelope, LoadForecast
from shared.service import Runtime

CONSUMES = "slaplanner.forecast.>"


async def run(runtime: Runtime, decider: Decider) -> None:
    async def on_forecast(forecast: LoadForecast) -> Iterable[Envelope]:
        target = decider.decide(forecast)
        gauges.record(target)
        return [target]

    await runtime.consume(CONSUMES, LoadForecast, on_forecast)
