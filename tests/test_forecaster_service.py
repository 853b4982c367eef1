"""The forecaster service over a real NATS: history rebuilt from the stream after a restart."""

from __future__ import annotations

import asyncio

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared.messages import LoadForecast
from tests.conftest import ServiceProcess
from tests.test_services_e2e import start_and_wait_ready


def snapshot(i: int) -> bytes:
    return orjson.dumps({
        "schema_version": 1, "deployment": {"namespace": "prod", "name": "llama"},
        "window_end": 1_732_345_200.0 + 60 * i, "window_s": 60.0,
        "num_requests": 100.0 + 10 * (i % 5), "isl_avg": 3000.0 + 7 * (i % 3),
        "osl_avg": 300.0 + (i % 4),
    })


async def test_a_restarted_forecaster_forecasts_from_the_history_in_the_stream(
    nc: NATS, services: dict[str, ServiceProcess]
) -> None:
    forecasts: list[LoadForecast] = []

    async def on_forecast(msg: Msg) -> None:
        forecasts.append(LoadForecast.from_json(msg.data))

    await nc.subscribe("slaplanner.forecast.>", cb=on_forecast)
    forecaster = services["forecaster"]
    await start_and_wait_ready(nc, [forecaster])
    await nc.publish("slaplanner.metrics.prod.llama", snapshot(0))
    while not forecasts:
        await asyncio.sleep(0.05)
    assert forecasts[0].fallback is not None and "point" in forecasts[0].fallback, (
        "one point is too few for the default model: it must say it fell back"
    )
    for i in range(1, 30):
        await nc.publish("slaplanner.metrics.prod.llama", snapshot(i))
    while len(forecasts) < 30:
        await asyncio.sleep(0.05)
    assert forecasts[-1].fallback is None, forecasts[-1].fallback
    assert forecaster.stop() == 0

    forecaster.start()
    while "consuming slaplanner.metrics" not in forecaster.log().split("stopped")[-1]:
        await asyncio.sleep(0.05)  # the rebuild runs before consuming
    await nc.publish("slaplanner.metrics.prod.llama", snapshot(30))
    while len(forecasts) < 31:
        await asyncio.sleep(0.05)
    after_restart = forecasts[-1]
    assert after_restart.window_end == 1_732_345_200.0 + 60 * 30
    assert after_restart.fallback is None, "the history came back from the stream"
    assert after_restart.model == forecasts[-2].model
    assert "rebuilt history from 30 snapshots" in forecaster.log()
