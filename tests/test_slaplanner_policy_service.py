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


async def test_the_default_service_plans_with_slaplanner_and_scales_up_on_a_burst_at_once(
    nc: NATS, services: dict[str, ServiceProcess], targets: Targets
) -> None:
    # Nothing but the bus (and a free port) for the decider: its defaults are the product's.
    assert "SLAPLANNER_POLICY" not in services["decider"].env
    procs = [services[name] for name in ("forecaster", "decider", "actuator")]
    for proc in procs:
        proc.start()
    wanted = {"forecaster", "decider", "decider-fast-path", "decider-scaled", "actuator"}
    for _ in range(400):
        if wanted <= await consumers(nc):
            break
        await asyncio.sleep(0.05)
    else:
        logs = "\n".join(f"--- {p.name}\n{p.log()[-2000:]}" for p in procs)
        raise AssertionError(f"consumers missing:\n{logs}")

    await nc.publish("slaplanner.metrics.prod.llama", snapshot_body(T0, 60.0, 1800.0))
    planned = (await targets.wait_for(1))[0]
    assert planned.policy == "slaplanner" and planned.forecast_id is not None
    # Dynamo's default targets (TTFT 0.5 s, ITL 50 ms): the KV cache binds decode before the ITL
    assert {"queueing", "kv_capacity"} <= set(planned.explanation["rules"])

    # 750 requests in 5 s: far more than the planned replicas serve. The fast path answers the
    # snapshot itself (its target's id derives from the snapshot's), before any forecast of it.
    await nc.publish("slaplanner.metrics.prod.llama",
                     snapshot_body(T0 + 5, 5.0, 750.0, id="burst-at-5s"))
    await targets.wait_for(3)  # the fast path's target and the forecast's
    fast = next(t for t in targets.seen if t.id == derived_id("fast-path", "burst-at-5s"))
    assert fast.explanation["trigger"] == "fast_path" and fast.forecast_id is None
    assert fast.prefill_replicas > planned.prefill_replicas
    assert targets.rejected == []
    for proc in procs:
        assert proc.stop() == 0, proc.log()
    assert "handler failed" not in services["decider"].log()
