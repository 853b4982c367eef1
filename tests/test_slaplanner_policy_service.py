"""The decider service with its default policy (slaplanner) on a real nats-server: forecasts in,
targets out; snapshots for the fast path and ScaleEvents on their own durable consumers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared.messages import ReplicaTarget, derived_id
from tests.conftest import ServiceProcess

T0 = 1_732_345_200.0


def snapshot_body(window_end: float, window_s: float, num_requests: float, **extra: object
                  ) -> bytes:
    """What an operator would type after `nats pub slaplanner.metrics.prod.llama`."""
    return orjson.dumps({
        "schema_version": 1, "deployment": {"namespace": "prod", "name": "llama"},
        "window_end": window_end, "window_s": window_s, "num_requests": num_requests,
        "isl_avg": 3000.0, "osl_avg": 300.0, **extra,
    })


class Targets:
    def __init__(self) -> None:
        self.seen: list[ReplicaTarget] = []
        self.rejected: list[bytes] = []
        self.arrived = asyncio.Event()

    async def on_message(self, msg: Msg) -> None:
        if msg.subject.startswith("slaplanner.target."):
            self.seen.append(ReplicaTarget.from_json(msg.data))
        elif msg.subject.startswith("slaplanner.rejected."):
            self.rejected.append(msg.data)
        self.arrived.set()

    async def wait_for(self, count: int, timeout_s: float = 30.0) -> list[ReplicaTarget]:
        async def enough() -> None:
            while len(self.seen) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(enough(), timeout_s)
        return self.seen


@pytest.fixture
async def targets(nc: NATS) -> AsyncIterator[Targets]:
    sink = Targets()
    sub = await nc.subscribe("slaplanner.>", cb=sink.on_message)
    yield sink
    with contextlib.suppress(Exception):
        await sub.unsubscribe()


async def consumers(nc: NATS) -> set[str]:
    try:
        return {c.name for c in await nc.jetstream().consumers_info("SLAPLANNER")}
    except Exception:
        return set()


def forecast_body(window_end: float, num_requests: float) -> bytes:
    """A forecast as the forecaster publishes it (typed here: only the decider runs)."""
    step = {"num_requests": num_requests, "num_requests_upper": num_requests, "isl_avg": 3000.0,
            "isl_avg_upper": 3000.0, "osl_avg": 300.0, "osl_avg_upper": 300.0}
    return orjson.dumps({
        "schema_version": 1, "id": f"forecast-{int(window_end)}",
        "deployment": {"namespace": "prod", "name": "llama"},
        "window_end": window_end, "window_s": 60.0, "model": "typed",
        "steps": [{"window_end": window_end + 60.0 * (k + 1), **step} for k in range(5)],
        "observed": orjson.loads(snapshot_body(window_end, 60.0, num_requests,
                                               prefill_workers=2, decode_workers=2)),
    })


def scaled_body(window_end: float) -> bytes:
    return orjson.dumps({
        "schema_version": 1, "deployment": {"namespace": "prod", "name": "llama"},
        "window_end": window_end, "target_id": "t", "outcome": "applied", "backend": "typed",
        "prefill": {"from": 2, "to": 4, "ready": 2}, "decode": {"from": 2, "to": 2, "ready": 2},
    })


async def test_the_default_service_plans_with_slaplanner_and_scales_up_on_a_burst_at_once(
    nc: NATS, services: dict[str, ServiceProcess], targets: Targets
) -> None:
    decider = services["decider"]
    # Nothing but the bus (and a free port) for the decider: its defaults are the product's.
    assert "SLAPLANNER_POLICY" not in decider.env
    decider.start()
    wanted = {"decider"}
    for _ in range(400):
        if wanted <= await consumers(nc):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"consumers missing:\n{decider.log()[-3000:]}")

    await nc.publish("slaplanner.forecast.prod.llama", forecast_body(T0, 1800.0))
    planned = (await targets.wait_for(1))[0]
    assert planned.policy == "slaplanner" and planned.forecast_id == f"forecast-{int(T0)}"
    # Dynamo's default targets (TTFT 0.5 s, ITL 50 ms): the KV cache binds decode before the ITL
    assert {"queueing", "kv_capacity"} <= set(planned.explanation["rules"])
    await nc.publish("slaplanner.scaled.prod.llama", scaled_body(T0))

    # 750 requests in 5 s: far more than the planned replicas serve. The fast path answers the
    # snapshot itself (its target's id derives from the snapshot's), with no forecast of it.
    await nc.publish("slaplanner.metrics.prod.llama",
                     snapshot_body(T0 + 5, 5.0, 750.0, id="burst-at-5s"))
    fast = (await targets.wait_for(2))[1]
    assert fast.id == derived_id("fast-path", "burst-at-5s")
    assert fast.explanation["trigger"] == "fast_path" and fast.forecast_id is None
    assert fast.prefill_replicas > planned.prefill_replicas
    assert targets.rejected == []
    assert decider.stop() == 0, decider.log()
    assert "handler failed" not in decider.log()
