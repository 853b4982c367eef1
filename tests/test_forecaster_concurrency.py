"""The forecaster shell over a real NATS with many deployments: a slow fit of one deployment does
not hold up the others, and one deployment's snapshots are still forecast in order and acked."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.forecaster import service
from services.forecaster.core import Forecaster
from services.forecaster.history import SeriesName
from services.forecaster.settings import ForecasterSettings
from shared import bus
from shared.messages import DeploymentKey, LoadForecast, MetricSnapshot
from shared.service import Runtime
from tests.conftest import NatsEndpoint

T0 = 1_732_345_200.0


def snapshot_body(name: str, i: int) -> bytes:
    return orjson.dumps({
        "schema_version": 1, "deployment": {"namespace": "prod", "name": name},
        "window_end": T0 + 60 * i, "window_s": 60.0,
        "num_requests": 100.0 + 10 * (i % 5), "isl_avg": 3000.0, "osl_avg": 300.0,
    })


class HeldForecaster(Forecaster):
    """Holds every forecast of one deployment until the test releases it."""

    def __init__(self, settings: ForecasterSettings, held: DeploymentKey) -> None:
        super().__init__(settings)
        self.held = held
        self.release = threading.Event()

    def forecast(self, snapshot: MetricSnapshot) -> LoadForecast:
        if snapshot.deployment == self.held:
            self.release.wait(timeout=30.0)
        return super().forecast(snapshot)


class JitteryForecaster(Forecaster):
    """Takes 0-20 ms longer per forecast at random, and counts how many run at once."""

    def __init__(self, settings: ForecasterSettings) -> None:
        super().__init__(settings)
        self._lock = threading.Lock()
        self._running = 0
        self.most_at_once = 0
        self._random = random.Random(7)

    def forecast(self, snapshot: MetricSnapshot) -> LoadForecast:
        with self._lock:
            self._running += 1
            self.most_at_once = max(self.most_at_once, self._running)
            delay_s = self._random.uniform(0.0, 0.02)
        try:
            threading.Event().wait(delay_s)
            return super().forecast(snapshot)
        finally:
            with self._lock:
                self._running -= 1


@dataclass
class Shell:
    runtime: Runtime
    settings: ForecasterSettings
    forecasts: list[LoadForecast]
    task: asyncio.Task[None] | None = None


@pytest.fixture
async def shell(nats_server: NatsEndpoint, nc: NATS) -> AsyncIterator[Shell]:
    settings = ForecasterSettings(nats_url=[nats_server.url], http_port=0, fit_threads=4,
                                  max_in_flight=32)
    runtime_nc = await bus.connect(settings, "forecaster")
    js = runtime_nc.jetstream()
    await bus.ensure_stream(js, settings)
    forecasts: list[LoadForecast] = []

    async def on_forecast(msg: Msg) -> None:
        forecasts.append(LoadForecast.from_json(msg.data))

    await nc.subscribe("slaplanner.forecast.>", cb=on_forecast)
    shell = Shell(Runtime("forecaster", settings, runtime_nc, js), settings, forecasts)
    yield shell
    await close(shell)


async def close(shell: Shell) -> None:
    """Stop the shell's service (cancelled if it does not stop) and close its connection."""
    shell.runtime.stop.set()
    if shell.task is not None and not shell.task.done():
        shell.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await shell.task
    await shell.runtime.nc.close()


async def start(shell: Shell, forecaster: Forecaster) -> asyncio.Task[None]:
    task = shell.task = asyncio.create_task(service.run(shell.runtime, forecaster, shell.settings))
    while shell.runtime.consuming == 0:
        assert not task.done(), task
        await asyncio.sleep(0.02)
    return task


async def wait_for(predicate: object, timeout_s: float = 30.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_a_held_fit_of_one_deployment_does_not_delay_the_forecasts_of_the_others(
    shell: Shell, nc: NATS
) -> None:
    held = DeploymentKey(namespace="prod", name="slow")
    forecaster = HeldForecaster(shell.settings, held)
    task = await start(shell, forecaster)
    await nc.publish("slaplanner.metrics.prod.slow", snapshot_body("slow", 0))
    await nc.publish("slaplanner.metrics.prod.slow", snapshot_body("slow", 1))
    for i in range(5):
        for name in ("fast-a", "fast-b", "fast-c"):
            await nc.publish(f"slaplanner.metrics.prod.{name}", snapshot_body(name, i))

    try:
        # Handled one message at a time, the 15 others would wait behind the held fit.
        await wait_for(lambda: len(shell.forecasts) == 15, timeout_s=20.0)
        assert all(f.deployment != held for f in shell.forecasts)
    finally:
        forecaster.release.set()
    await wait_for(lambda: len(shell.forecasts) == 17)
    held_forecasts = [f.window_end for f in shell.forecasts if f.deployment == held]
    assert held_forecasts == [T0, T0 + 60], "the held deployment's two, in order, after release"

    shell.runtime.stop.set()
    await asyncio.wait_for(task, timeout=10.0)
    info = await nc.jetstream().consumer_info("SLAPLANNER", "forecaster")
    assert (info.num_ack_pending, info.num_pending, info.num_redelivered) == (0, 0, 0)


async def test_each_deployment_is_forecast_in_order_while_deployments_run_side_by_side(
    shell: Shell, nc: NATS
) -> None:
    names = [f"model-{n}" for n in range(4)]
    rounds = 15
    forecaster = JitteryForecaster(shell.settings)
    task = await start(shell, forecaster)
    for i in range(rounds):
        for name in names:
            await nc.publish(f"slaplanner.metrics.prod.{name}", snapshot_body(name, i))

    await wait_for(lambda: len(shell.forecasts) == rounds * len(names))
    for name in names:
        published = [f.window_end for f in shell.forecasts if f.deployment.name == name]
        assert published == [T0 + 60 * i for i in range(rounds)], name
        # Out of order, a later snapshot would have been recorded first and the earlier skipped.
        key = DeploymentKey(namespace="prod", name=name)
        assert len(forecaster.series(key, SeriesName.NUM_REQUESTS)) == rounds, name
    assert forecaster.most_at_once > 1, "the fits of different deployments overlapped"
    assert forecaster.most_at_once <= shell.settings.fit_threads

    shell.runtime.stop.set()
    await asyncio.wait_for(task, timeout=10.0)
    info = await nc.jetstream().consumer_info("SLAPLANNER", "forecaster")
    assert (info.num_ack_pending, info.num_pending, info.num_redelivered) == (0, 0, 0)
