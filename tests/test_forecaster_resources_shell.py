"""The forecaster shell over a real NATS: a forecast the bus can never take is rejected once, not
redelivered forever; the restart's rebuild reads the stream in batches and holds numbers; idle
deployments are forgotten while it runs."""

from __future__ import annotations

import asyncio
import contextlib
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.forecaster import service
from services.forecaster.core import Forecaster
from services.forecaster.history import SeriesName
from services.forecaster.settings import ForecasterSettings
from shared import bus, embedded_nats
from shared.messages import DeploymentKey, LoadForecast, Rejected
from shared.service import Runtime
from tests.conftest import NatsEndpoint
from tests.test_forecaster_concurrency import Shell, close, start, wait_for

T0 = 1_732_345_200.0
SMALL_PAYLOAD = 64 * 1024


def snapshot_body(name: str, i: int, window_s: float = 60.0) -> bytes:
    return orjson.dumps({
        "schema_version": 1, "deployment": {"namespace": "prod", "name": name},
        "window_end": T0 + window_s * i, "window_s": window_s,
        "num_requests": 100.0 + 10 * (i % 5), "isl_avg": 3000.0 + i % 7, "osl_avg": 300.0,
        "isl_p90": 5000.0 + i % 11, "osl_p90": 500.0 + i % 3,
    })


@contextlib.asynccontextmanager
async def shell_on(url: str, **settings: object) -> AsyncIterator[tuple[Shell, NATS]]:
    """An in-process forecaster shell and a client, both on the server at ``url``."""
    config = ForecasterSettings.model_validate(
        {"nats_url": [url], "http_port": 0, "fit_threads": 2, "max_in_flight": 16} | settings
    )
    runtime_nc = await bus.connect(config, "forecaster")
    js = runtime_nc.jetstream()
    await bus.ensure_stream(js, config)
    client = await nats.connect(url)
    forecasts: list[LoadForecast] = []

    async def on_forecast(msg: Msg) -> None:
        forecasts.append(LoadForecast.from_json(msg.data))

    await client.subscribe("slaplanner.forecast.>", cb=on_forecast)
    shell = Shell(Runtime("forecaster", config, runtime_nc, js), config, forecasts)
    try:
        yield shell, client
    finally:
        await close(shell)
        await client.close()


@pytest.fixture
def small_payload_server(tmp_path: Path) -> Iterator[embedded_nats.NatsServer]:
    """A nats-server whose max_payload (64 KiB) a 300-step forecast does not fit."""
    server = embedded_nats.start(tmp_path / "nats", max_payload_bytes=SMALL_PAYLOAD)
    try:
        yield server
    finally:
        server.stop()


async def test_a_forecast_too_large_for_the_bus_is_rejected_once_and_holds_up_nothing(
    small_payload_server: embedded_nats.NatsServer,
) -> None:
    async with shell_on(small_payload_server.url) as (shell, client):
        rejected: list[Rejected] = []

        async def on_rejected(msg: Msg) -> None:
            rejected.append(Rejected.model_validate_json(msg.data))

        await client.subscribe("slaplanner.rejected.forecaster", cb=on_rejected)
        await start(shell, Forecaster(shell.settings))
        # 1 s windows: 300 steps of eleven numbers, about 100 kB; the server takes 64 KiB.
        for i in range(3):
            await client.publish("slaplanner.metrics.prod.big", snapshot_body("big", i, 1.0))
        for i in range(5):
            await client.publish("slaplanner.metrics.prod.small", snapshot_body("small", i))

        await wait_for(lambda: len(shell.forecasts) == 5 and len(rejected) == 3)
        assert {f.deployment.name for f in shell.forecasts} == {"small"}
        assert all(r.subject == "slaplanner.metrics.prod.big" for r in rejected)
        assert "LoadForecast of" in rejected[0].reason
        assert f"max_payload of {SMALL_PAYLOAD} bytes" in rejected[0].reason
        await asyncio.sleep(2.5)  # a nak'ed message would be redelivered after 1 s
        assert len(rejected) == 3, "each rejected once, not redelivered"
        info = await client.jetstream().consumer_info("SLAPLANNER", "forecaster")
        assert (info.num_ack_pending, info.num_pending, info.num_redelivered) == (0, 0, 0)


async def test_the_rebuild_from_the_stream_holds_numbers_not_snapshots(
    nats_server: NatsEndpoint,
) -> None:
    # 3,000 snapshots of 6 deployments in the stream. Held as models until the end (the rebuild
    # before), they took over 6 MB; read in batches and cut to numbers, well under that.
    async with shell_on(nats_server.url, history_points=100) as (shell, client):
        js = client.jetstream()
        names = [f"model-{d}" for d in range(6)]
        for i in range(500):
            await asyncio.gather(*(
                js.publish(f"slaplanner.metrics.prod.{name}", snapshot_body(name, i))
                for name in names
            ))
        forecaster = Forecaster(shell.settings)
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            recorded = await service.rebuild_from_stream(shell.runtime, forecaster, 3600.0)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak - before < 3_000_000, f"{(peak - before) / 1e6:.1f} MB at the peak"
        assert recorded == 6 * 100  # the latest 100 windows of each deployment, as kept
        assert forecaster.deployment_count() == 6


async def test_a_running_forecaster_forgets_deployments_that_went_quiet(
    nats_server: NatsEndpoint,
) -> None:
    async with shell_on(nats_server.url, idle_forget_s=30.0) as (shell, client):
        forecaster = Forecaster(shell.settings)
        await start(shell, forecaster)
        await client.publish("slaplanner.metrics.prod.quiet", snapshot_body("quiet", 0))
        for i in range(4):  # three windows (180 s) later than the quiet one's only snapshot
            await client.publish("slaplanner.metrics.prod.busy", snapshot_body("busy", i))
        await wait_for(lambda: len(shell.forecasts) == 5)
        # The sweep runs every tenth of idle_forget_s (3 s): well within the deadline.
        await wait_for(lambda: forecaster.deployment_count() == 1, timeout_s=30.0)
        assert forecaster.newest_seen_s() == T0 + 180.0
        busy = DeploymentKey(namespace="prod", name="busy")
        assert forecaster.series(busy, SeriesName.NUM_REQUESTS).times[-1] == T0 + 180.0
