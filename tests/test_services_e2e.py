"""The four services as real processes on a real nats-server with JetStream."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator

import nats.js.api
import nats.js.errors
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared.messages import Rejected, ReplicaTarget, ScaleEvent
from tests.conftest import NatsEndpoint, ServiceProcess, async_true, until

# The published worked example on the bundled H200 profile (Dynamo docs, see
# shared/profiles/h200_llama31_8b_fp8_tp1/README.md): at ISL 3000 one prefill GPU does
# 49,481.09 tokens/s; at context 3000 + 300 / 2 the best decode point within a 10 ms ITL does
# 4,555.68 tokens/s/GPU.
PREFILL_TOKENS_PER_S_PER_GPU = 49_481.09
DECODE_TOKENS_PER_S_PER_GPU = 4_555.68

DECIDER_ENV = {
    "SLAPLANNER_POLICY": "dynamo",  # the arithmetic worked out by hand below is Dynamo's
    "SLAPLANNER_TTFT_TARGET_S": "100ms",
    "SLAPLANNER_ITL_TARGET_S": "10ms",
    "SLAPLANNER_MAX_TOTAL_GPUS": "64",
}
ACTUATOR_ENV = {"SLAPLANNER_MAX_PREFILL_REPLICAS": "64", "SLAPLANNER_MAX_DECODE_REPLICAS": "64"}


def snapshot_body(window_end: float, num_requests: float = 12_000.0, **extra: object) -> bytes:
    """Exactly what an operator would type after `nats pub slaplanner.metrics.prod.llama`."""
    return orjson.dumps({
        "schema_version": 1, "deployment": {"namespace": "prod", "name": "llama"},
        "window_end": window_end, "window_s": 60.0, "num_requests": num_requests,
        "isl_avg": 3000.0, "osl_avg": 300.0, **extra,
    })


class Collected:
    """Every message on slaplanner.> seen by a plain core-NATS subscriber."""

    def __init__(self) -> None:
        self.by_family: dict[str, list[bytes]] = {}
        self.arrived = asyncio.Event()

    async def on_message(self, msg: Msg) -> None:
        family = msg.subject.split(".")[1]
        self.by_family.setdefault(family, []).append(msg.data)
        self.arrived.set()

    async def wait_for(self, family: str, count: int, timeout_s: float = 30.0) -> list[bytes]:
        async def enough() -> None:
            while len(self.by_family.get(family, [])) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(enough(), timeout_s)
        return self.by_family[family]


@pytest.fixture
async def collected(nc: NATS) -> AsyncIterator[Collected]:
    sink = Collected()
    sub = await nc.subscribe("slaplanner.>", cb=sink.on_message)
    yield sink
    with contextlib.suppress(Exception):
        await sub.unsubscribe()


async def start_and_wait_ready(nc: NATS, procs: list[ServiceProcess]) -> None:
    for proc in procs:
        proc.start()
    # Ready means each consumer exists: a message published now will reach it.
    js = nc.jetstream()
    wanted = {p.name for p in procs} - {"collector"}
    for _ in range(400):
        try:
            names = {c.name for c in await js.consumers_info("SLAPLANNER")}
        except Exception:
            names = set()
        if wanted <= names:
            return
        await asyncio.sleep(0.05)
    logs = "\n".join(f"--- {p.name}\n{p.log()[-2000:]}" for p in procs)
    raise AssertionError(f"services not ready:\n{logs}")


def pipeline(services: dict[str, ServiceProcess]) -> list[ServiceProcess]:
    services["decider"].env.update(DECIDER_ENV)
    services["actuator"].env.update(ACTUATOR_ENV)
    return [services[n] for n in ("forecaster", "decider", "actuator")]


async def test_a_typed_snapshot_becomes_the_scale_event_computed_by_hand(
    nc: NATS, services: dict[str, ServiceProcess], collected: Collected
) -> None:
    await start_and_wait_ready(nc, pipeline(services))
    await nc.publish("slaplanner.metrics.prod.llama", snapshot_body(1_732_345_200.0))

    event = ScaleEvent.from_json((await collected.wait_for("scaled", 1))[0])
    # 12,000 requests in 60 s at ISL 3000 = 600,000 prefill tokens/s:
    expected_prefill = math.ceil(12_000 * 3000 / 60 / PREFILL_TOKENS_PER_S_PER_GPU)  # 13
    # 12,000 requests in 60 s at OSL 300 = 60,000 decode tokens/s:
    expected_decode = math.ceil(12_000 * 300 / 60 / DECODE_TOKENS_PER_S_PER_GPU)  # 14
    assert (expected_prefill, expected_decode) == (13, 14)
    assert (event.prefill.to, event.decode.to) == (expected_prefill, expected_decode)
    assert event.outcome == "dry-run"
    target = ReplicaTarget.from_json((await collected.wait_for("target", 1))[0])
    assert target.explanation, "a target must explain itself"
    assert event.target_id == target.id
    for proc in services.values():
        if proc.process is not None:
            assert proc.stop() == 0, proc.log()


HOSTILE_BODIES = {
    "invalid JSON": b'{"schema_version": 1, "deployment": ',
    "a wrong type": snapshot_body(1.0, num_requests="many"),  # type: ignore[arg-type]
    "a negative rate": snapshot_body(1.0, num_requests=-5.0),
    "NaN": snapshot_body(1.0).replace(b"12000.0", b"NaN"),
    "an unknown schema version": snapshot_body(1.0, schema_version=99),
    "a 512 KB body": b'{"pad": "' + b"x" * (512 << 10) + b'"}',
}
# The services refuse bodies over this themselves; the stream takes up to 1 MiB.
SERVICE_MAX_BODY_BYTES = 256 << 10


async def test_malformed_bodies_are_rejected_with_reasons_and_valid_ones_still_flow(
    nc: NATS, services: dict[str, ServiceProcess], collected: Collected
) -> None:
    for proc in services.values():
        proc.env["SLAPLANNER_MAX_BODY_BYTES"] = str(SERVICE_MAX_BODY_BYTES)
    await start_and_wait_ready(nc, pipeline(services))
    for raw in HOSTILE_BODIES.values():
        await nc.publish("slaplanner.metrics.prod.llama", raw)
    # A body larger than the stream's max_msg_size is refused by JetStream itself.
    with pytest.raises(nats.js.errors.APIError, match="maximum"):
        await nc.jetstream().publish("slaplanner.metrics.prod.llama",
                                     b'{"pad": "' + b"x" * (10 << 20) + b'"}')
    # Each later stage refuses garbage on its own subject too.
    await nc.publish("slaplanner.forecast.prod.llama", b'{"steps": "soon"}')
    await nc.publish("slaplanner.target.prod.llama", b'{"prefill_replicas": -3}')
    # A body for one deployment on another deployment's subject is refused.
    await nc.publish("slaplanner.metrics.prod.other", snapshot_body(1.0))
    await nc.publish("slaplanner.metrics.prod.llama", snapshot_body(1_732_345_260.0))

    expected_by_forecaster = len(HOSTILE_BODIES) + 1

    def reasons_of(stage: str) -> list[str]:
        found = [Rejected.model_validate(orjson.loads(raw))
                 for raw in collected.by_family.get("rejected", [])]
        return [r.reason for r in found if r.stage == stage]

    # Any stage that reads a subject refuses its garbage (the decider may read snapshots too).
    await collected.wait_for("rejected", expected_by_forecaster + 2)
    for _ in range(200):
        if len(reasons_of("forecaster")) >= expected_by_forecaster and reasons_of("actuator"):
            break
        await asyncio.sleep(0.05)
    rejected = [Rejected.model_validate(orjson.loads(raw))
                for raw in collected.by_family["rejected"]]
    forecaster = reasons_of("forecaster")
    assert any("invalid JSON" in r for r in forecaster)
    assert any("num_requests" in r and "valid number" in r for r in forecaster)
    assert any("greater than or equal to 0" in r for r in forecaster)
    assert any("unknown schema_version 99" in r for r in forecaster)
    assert any("exceeds the limit" in r for r in forecaster)
    assert any("does not match the body's deployment" in r for r in forecaster)
    assert len(forecaster) == expected_by_forecaster
    assert any("LoadForecast invalid" in r for r in reasons_of("decider"))
    assert len(reasons_of("actuator")) == 1
    big = next(r for r in rejected if "exceeds the limit" in r.reason)
    assert big.truncated and big.raw_size_bytes > 512 << 10 and len(big.raw) <= 4096

    event = ScaleEvent.from_json((await collected.wait_for("scaled", 1))[0])
    assert event.window_end == 1_732_345_260.0
    for proc in services.values():
        if proc.process is not None:
            assert proc.process.poll() is None, f"{proc.name} died:\n{proc.log()[-3000:]}"


async def stream_bodies(nc: NATS, subject: str) -> list[bytes]:
    """Everything the stream holds on a subject, read with an ephemeral ordered consumer."""
    js = nc.jetstream()
    sub = await js.subscribe(subject, ordered_consumer=True,
                             config=nats.js.api.ConsumerConfig(
                                 deliver_policy=nats.js.api.DeliverPolicy.ALL))
    bodies = []
    with contextlib.suppress(TimeoutError):
        while True:
            msg = await sub.next_msg(timeout=1.0)
            bodies.append(msg.data)
    await sub.unsubscribe()
    return bodies


async def test_a_restarted_decider_resumes_without_loss_or_duplicate(
    nc: NATS, services: dict[str, ServiceProcess], collected: Collected
) -> None:
    await start_and_wait_ready(nc, pipeline(services))
    decider = services["decider"]
    count = 30
    for i in range(count):
        await nc.publish("slaplanner.metrics.prod.llama",
                         snapshot_body(1_732_345_200.0 + 60 * i, num_requests=1000.0 + i))
        if i == 10:
            assert decider.stop() == 0, decider.log()
        if i == 20:
            decider.start()
        await asyncio.sleep(0.05)
    await collected.wait_for("scaled", count, timeout_s=60)
    await asyncio.sleep(1.0)  # room for any duplicate to show up
    targets = [ReplicaTarget.from_json(b) for b in await stream_bodies(nc, "slaplanner.target.>")]
    windows = sorted(t.window_end for t in targets)
    assert windows == [1_732_345_200.0 + 60 * i for i in range(count)]
    assert len({t.id for t in targets}) == count


async def test_sigterm_drains_and_exits_cleanly(
    nc: NATS, services: dict[str, ServiceProcess]
) -> None:
    procs = pipeline(services)
    await start_and_wait_ready(nc, procs)
    for proc in procs:
        assert proc.stop(timeout_s=8.0) == 0, proc.log()


@pytest.mark.parametrize("name", ["collector", "forecaster", "decider", "actuator"])
async def test_a_sigterm_while_connecting_is_a_clean_stop(
    services: dict[str, ServiceProcess], name: str
) -> None:
    """A pod stopped as it starts. The server here accepts and never answers, so the service is
    still connecting when the signal comes; before, the signal's default action ended it (exit
    -15) when it came before the handlers, set only once the streams were checked."""
    silent: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc = services[name]
    proc.env.update({"SLAPLANNER_NATS_URL": f"nats://127.0.0.1:{port}",
                     "SLAPLANNER_CONNECT_DEADLINE_S": "120s"})
    proc.start()
    try:
        await until(async_true(lambda: bool(silent)), 60.0, f"{name} connecting")
        assert proc.stop(timeout_s=30.0) == 0, proc.log()
        assert f"{name}: stopped while connecting to NATS" in proc.log(), proc.log()
    finally:
        server.close()
        for writer in silent:
            writer.close()


async def test_services_reconnect_after_the_nats_server_restarts(
    nats_server: NatsEndpoint, nc: NATS, services: dict[str, ServiceProcess],
    collected: Collected,
) -> None:
    await start_and_wait_ready(nc, pipeline(services))
    await asyncio.to_thread(nats_server.restart)
    await asyncio.sleep(2.0)
    await nc.publish("slaplanner.metrics.prod.llama", snapshot_body(1_732_345_200.0))
    event = ScaleEvent.from_json((await collected.wait_for("scaled", 1, timeout_s=40))[0])
    assert event.window_end == 1_732_345_200.0
