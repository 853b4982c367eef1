"""Two forecaster replicas over a real NATS share the deployments: each deployment belongs to one,
every snapshot is forecast exactly once, also across a restart of one replica."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client.parser import text_string_to_metric_families

from services.forecaster.settings import ForecasterSettings
from shared import partition
from shared.messages import LoadForecast, derived_id
from tests.conftest import ServiceProcess

T0 = 1_732_345_200.0
NAMES = [f"svc-{n}" for n in range(8)]


def snapshot_body(name: str, i: int) -> bytes:
    return orjson.dumps({
        "schema_version": 1, "id": f"{name}-{i}",
        "deployment": {"namespace": "prod", "name": name},
        "window_end": T0 + 60 * i, "window_s": 60.0,
        "num_requests": 100.0 + 10 * (i % 5), "isl_avg": 3000.0, "osl_avg": 300.0,
    })


def owner(name: str) -> int:
    return partition.owner_of_subject(f"slaplanner.metrics.prod.{name}", 2)


async def publish_round(nc: NATS, i: int) -> None:
    for name in NAMES:
        await nc.publish(f"slaplanner.metrics.prod.{name}", snapshot_body(name, i))


async def wait_for_consumers(nc: NATS, names: set[str]) -> None:
    js = nc.jetstream()
    async with asyncio.timeout(30.0):
        while True:
            try:
                present = {c.name for c in await js.consumers_info("SLAPLANNER")}
            except Exception:
                present = set()
            if names <= present:
                return
            await asyncio.sleep(0.05)


async def wait_until(predicate: object, timeout_s: float = 30.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.05)


def counters(proc: ServiceProcess) -> tuple[float, float]:
    """(snapshots handled, snapshots left to the other replica) from the process's /metrics."""
    port = re.findall(r"/metrics and /healthz on [0-9.]+:([0-9]+)", proc.log())[-1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5.0) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    return tuple(  # type: ignore[return-value]
        sum(sample.value for sample in families[name].samples
            if sample.name.endswith("_total") and sample.labels["service"] == "forecaster")
        for name in ("slaplanner_messages_received", "slaplanner_messages_skipped")
    )


@pytest.fixture
def replicas(
    services: dict[str, ServiceProcess], tmp_path: Path
) -> Iterator[list[ServiceProcess]]:
    procs = []
    for index in range(2):
        env = {**services["forecaster"].env, "SLAPLANNER_REPLICA_COUNT": "2",
               # The pod name of a StatefulSet, as the manifest would pass it.
               "SLAPLANNER_REPLICA_INDEX": f"slaplanner-forecaster-{index}"}
        (tmp_path / f"replica-{index}").mkdir()
        procs.append(ServiceProcess("forecaster", env, tmp_path / f"replica-{index}"))
    yield procs
    for proc in procs:
        proc.kill()


def test_a_replica_index_is_read_from_a_statefulset_pod_name() -> None:
    settings = ForecasterSettings(replica_count=3, replica_index="slaplanner-forecaster-2")
    assert (settings.replica_index, settings.durable_name()) == (2, "forecaster-2")
    with pytest.raises(ValueError, match="not below replica_count"):
        ForecasterSettings(replica_count=2, replica_index=2)


def test_growing_from_two_to_three_replicas_moves_only_what_the_new_one_takes() -> None:
    subjects = [f"slaplanner.metrics.ns-{n % 7}.model-{n}" for n in range(600)]
    before = {s: partition.owner_of_subject(s, 2) for s in subjects}
    after = {s: partition.owner_of_subject(s, 3) for s in subjects}
    moved = [s for s in subjects if before[s] != after[s]]
    assert all(after[s] == 2 for s in moved), "a deployment only ever moves to the new replica"
    assert 150 < len(moved) < 250, len(moved)  # about 600 / 3
    assert 250 < Counter(before.values())[0] < 350, "an even split"


async def test_two_replicas_forecast_each_snapshot_exactly_once_across_a_restart(
    nc: NATS, replicas: list[ServiceProcess]
) -> None:
    owned = [[name for name in NAMES if owner(name) == index] for index in range(2)]
    assert owned[0] and owned[1], owned  # the names are chosen so that both replicas get some
    forecasts: list[LoadForecast] = []

    async def on_forecast(msg: Msg) -> None:
        # A core subscription sees every publication, also one the stream would drop as a
        # duplicate: a snapshot forecast twice shows up here twice.
        forecasts.append(LoadForecast.from_json(msg.data))

    await nc.subscribe("slaplanner.forecast.>", cb=on_forecast)
    for proc in replicas:
        proc.start()
    await wait_for_consumers(nc, {"forecaster-0", "forecaster-1"})
    for i in range(3):
        await publish_round(nc, i)
    await wait_until(lambda: len(forecasts) == 3 * len(NAMES))

    assert replicas[1].stop() == 0
    await publish_round(nc, 3)  # replica 1's share waits in its durable consumer
    await wait_until(lambda: len(forecasts) == 3 * len(NAMES) + len(owned[0]))
    replicas[1].start()
    await wait_until(lambda: "consuming" in replicas[1].log().split("stopped")[-1])
    await publish_round(nc, 4)
    await wait_until(lambda: len(forecasts) == 5 * len(NAMES))
    await asyncio.sleep(1.0)  # room for a doubled forecast to show up

    counts = Counter(f.id for f in forecasts)
    expected = {derived_id("forecast", f"{name}-{i}") for name in NAMES for i in range(5)}
    assert set(counts) == expected
    assert max(counts.values()) == 1, [f for f in forecasts if counts[f.id] > 1]
    # Who did what: replica 0 ran throughout (rounds 0 to 4); replica 1's counters restarted with
    # it (rounds 3, delivered after the restart, and 4).
    handled, skipped = await asyncio.to_thread(counters, replicas[0])
    assert (handled, skipped) == (5 * len(owned[0]), 5 * len(owned[1]))
    handled, skipped = await asyncio.to_thread(counters, replicas[1])
    assert (handled, skipped) == (2 * len(owned[1]), 2 * len(owned[0]))
    # The restarted replica took back the history of its own deployments only: rounds 0 to 3.
    restarted_log = replicas[1].log().split("stopped")[-1]
    assert f"rebuilt history from {4 * len(owned[1])} snapshots" in restarted_log
