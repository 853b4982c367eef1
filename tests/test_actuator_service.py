"""The actuator's shell over a real NATS server: the dry-run default as a real process, the
virtual backend, two actuators sharing one Lease, and memory restored from the stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.actuator import service
from services.actuator.settings import ActuatorSettings
from shared import bus
from shared.messages import (
    DeploymentKey,
    Outcome,
    ReplicaTarget,
    RoleChange,
    ScaleEvent,
)
from shared.service import Runtime
from tests import k8s_api_server as srv
from tests.conftest import NatsEndpoint, ServiceProcess
from tests.conftest_k8s import NS, assemble, dgd, dynamo_mapping, kube_for, settings

KEY = DeploymentKey(namespace=NS, name="llama")
T0 = 1_700_000_000.0


def a_target(prefill: int, decode: int, window_end: float) -> ReplicaTarget:
    return ReplicaTarget(deployment=KEY, window_end=window_end, policy="slaplanner",
                         prefill_replicas=prefill, decode_replicas=decode)


class Inbox:
    """Messages received on a subject, to wait for."""

    def __init__(self) -> None:
        self.messages: list[Msg] = []
        self.arrived = asyncio.Event()

    async def receive(self, msg: Msg) -> None:
        self.messages.append(msg)
        self.arrived.set()

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> list[Msg]:
        async def enough() -> None:
            while len(self.messages) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(enough(), timeout_s)
        return self.messages


async def consumer_ready(js: Any, stream: str = "SLAPLANNER", name: str = "actuator",
                         timeout_s: float = 20.0) -> None:
    async def exists() -> None:
        while True:
            with contextlib.suppress(Exception):
                await js.consumer_info(stream, name)
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(exists(), timeout_s)


@contextlib.asynccontextmanager
async def running_actuator(url: str, assembly_for: Callable[[Any], Any],
                           **overrides: Any) -> AsyncIterator[Runtime]:
    """An actuator shell in this process, on its own NATS connection."""
    actuator_settings = settings(nats_url=url, **overrides)
    nc = await bus.connect(actuator_settings, "actuator")
    js = nc.jetstream()
    await bus.ensure_stream(js, actuator_settings)
    runtime = Runtime(name="actuator", settings=actuator_settings, nc=nc, js=js)
    publisher = service.NatsPublisher()
    assembly = assembly_for(publisher)
    task = asyncio.create_task(service.run(runtime, actuator_settings, assembly, publisher))
    try:
        yield runtime
    finally:
        runtime.stop.set()
        await asyncio.wait_for(task, 10.0)
        await nc.drain()


async def publish_target(nc: NATS, target: ReplicaTarget) -> None:
    await nc.jetstream().publish(target.subject(), target.to_json(),
                                 headers={"Nats-Msg-Id": target.id})


def test_with_only_the_nats_url_the_actuator_runs_the_dry_run(
        services: dict[str, ServiceProcess], nats_server: NatsEndpoint) -> None:
    actuator = services["actuator"]
    assert not any(k.startswith("SLAPLANNER_") and k not in (
        "SLAPLANNER_NATS_URL", "SLAPLANNER_HTTP_PORT", "SLAPLANNER_HTTP_HOST",
        "SLAPLANNER_NATS_RECONNECT_WAIT_S") for k in actuator.env)
    actuator.start()

    async def scenario() -> dict[str, Any]:
        nc = await nats.connect(nats_server.url)
        try:
            inbox = Inbox()
            await nc.subscribe("slaplanner.scaled.prod.llama", cb=inbox.receive)
            await consumer_ready(nc.jetstream())
            body = json.dumps({"deployment": {"namespace": "prod", "name": "llama"},
                               "window_end": T0, "policy": "slaplanner",
                               "prefill_replicas": 2, "decode_replicas": 3}).encode()
            await nc.jetstream().publish("slaplanner.target.prod.llama", body)
            [msg] = await inbox.wait_for(1, 15.0)
            parsed: dict[str, Any] = json.loads(msg.data)
            return parsed
        finally:
            await nc.close()

    event = asyncio.run(scenario())
    assert event["outcome"] == "dry-run" and event["backend"] == "dry-run"
    # a dry run reports no readiness: no replicas exist
    assert (event["prefill"], event["decode"]) == (
        {"from": None, "to": 2, "ready": None, "via": None},
        {"from": None, "to": 3, "ready": None, "via": None})
    assert actuator.stop() == 0, actuator.log()


async def test_the_virtual_backend_publishes_for_an_outside_orchestrator(
        nats_server: NatsEndpoint, nc: NATS) -> None:
    virtual, scaled = Inbox(), Inbox()
    await nc.subscribe("slaplanner.virtual.prod.llama", cb=virtual.receive)
    await nc.subscribe("slaplanner.scaled.prod.llama", cb=scaled.receive)
    async with running_actuator(nats_server.url,
                                lambda publish: assemble(None, {}, publish=publish,
                                                         backend="virtual")):
        await consumer_ready(nc.jetstream())
        await publish_target(nc, a_target(2, 3, T0))
        [sent] = await virtual.wait_for(1)
        [event_msg] = await scaled.wait_for(1)
    order = ReplicaTarget.from_json(sent.data)
    event = ScaleEvent.from_json(event_msg.data)
    assert (order.prefill_replicas, order.decode_replicas) == (2, 3)
    # de-duplicated by the keyed header of its subject and id (shared.bus.dedup_header)
    assert sent.headers is not None
    assert sent.headers["Nats-Msg-Id"] == bus.dedup_header(b"", sent.subject, order.id)
    assert event.outcome is Outcome.APPLIED and event.backend == "virtual"
    assert order.explanation["source_target_id"] == event.target_id


async def test_two_actuators_on_one_lease_apply_each_target_once_and_fail_over(
        nats_server: NatsEndpoint, nc: NATS) -> None:
    with srv.KubeApiServer() as k8s:
        k8s.add(srv.DGDS, dgd("llama", 1, 1))
        election: dict[str, Any] = {"leader_election": "on", "lease_namespace": NS,
                                    "lease_duration_s": 1.0, "lease_renew_deadline_s": 0.6,
                                    "lease_retry_period_s": 0.1}
        scaled = Inbox()
        await nc.subscribe("slaplanner.scaled.prod.llama", cb=scaled.receive)

        def assembly(identity: str) -> Callable[[Any], Any]:
            return lambda publish: assemble(kube_for(k8s), dynamo_mapping(), publish=publish,
                                            identity=identity, **election)

        def holder() -> str:
            with contextlib.suppress(KeyError):
                return str(k8s.get(srv.LEASES, NS, "slaplanner-actuator")["spec"]
                           ["holderIdentity"])
            return ""

        async with running_actuator(nats_server.url, assembly("a"), **election) as a, \
                running_actuator(nats_server.url, assembly("b"), **election) as b:
            await until(lambda: holder() in ("a", "b"))
            first = holder()
            await publish_target(nc, a_target(1, 2, T0))
            await scaled.wait_for(1)
            await publish_target(nc, a_target(1, 3, T0 + 60))
            await scaled.wait_for(2)
            assert len([r for r in k8s.requests if r.method == "PATCH"]) == 2

            leader = a if first == "a" else b
            leader.stop.set()  # the leader shuts down and releases the Lease
            await until(lambda: holder() not in ("", first))
            await publish_target(nc, a_target(2, 3, T0 + 120))
            events = [ScaleEvent.from_json(m.data) for m in await scaled.wait_for(3)]

    assert [e.outcome for e in events] == [Outcome.APPLIED] * 3
    assert [(e.prefill.to, e.decode.to) for e in events] == [(1, 2), (1, 3), (2, 3)]
    assert len([r for r in k8s.requests if r.method == "PATCH"]) == 3  # each target once
    services = k8s.get(srv.DGDS, NS, "llama")["spec"]["services"]
    assert (services["VllmPrefillWorker"]["replicas"], services["VllmDecodeWorker"]["replicas"]) \
        == (2, 3)


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout_s)


async def test_the_last_scale_event_in_the_stream_keeps_older_targets_ignored(
        nats_server: NatsEndpoint, nc: NATS) -> None:
    await bus.ensure_stream(nc.jetstream(), ActuatorSettings())
    earlier = ScaleEvent(deployment=KEY, target_id="t9", window_end=T0 + 120,
                         outcome=Outcome.APPLIED, backend="dynamo",
                         prefill=RoleChange(from_=1, to=2), decode=RoleChange(from_=1, to=4))
    await bus.publish(nc.jetstream(), earlier)  # what the previous leader did
    scaled = Inbox()
    await nc.subscribe("slaplanner.scaled.prod.llama", cb=scaled.receive)
    async with running_actuator(nats_server.url,
                                lambda publish: assemble(None, {}, publish=publish,
                                                         backend="dry-run")):
        await consumer_ready(nc.jetstream())
        await publish_target(nc, a_target(5, 5, T0 + 60))
        [msg] = await scaled.wait_for(1)
    event = ScaleEvent.from_json(msg.data)
    assert event.outcome is Outcome.UNCHANGED
    assert "older than the last applied" in (event.reason or "")


def test_the_actuator_process_scales_a_cluster_and_releases_its_lease_on_sigterm(
        services: dict[str, ServiceProcess], nats_server: NatsEndpoint, tmp_path: Path) -> None:
    mapping = tmp_path / "actuator.toml"
    mapping.write_text('[[allow]]\nnamespace = "prod"\nkind = "DynamoGraphDeployment"\n'
                       'name = "llama"\n\n[[deployment]]\nnamespace = "prod"\nname = "llama"\n'
                       'backend = "dynamo"\n')
    with srv.KubeApiServer() as k8s:
        k8s.add(srv.DGDS, dgd("llama", 1, 1))
        actuator = services["actuator"]
        actuator.env.update({"SLAPLANNER_CONFIG_FILE": str(mapping),
                             "SLAPLANNER_KUBE_API_URL": k8s.url,
                             "SLAPLANNER_LEASE_NAMESPACE": "slaplanner",
                             "SLAPLANNER_LEASE_RETRY_PERIOD_S": "200ms"})
        actuator.start()

        async def scenario() -> ScaleEvent:
            nc = await nats.connect(nats_server.url)
            try:
                inbox = Inbox()
                await nc.subscribe("slaplanner.scaled.prod.llama", cb=inbox.receive)
                await consumer_ready(nc.jetstream())
                await publish_target(nc, a_target(2, 3, T0))
                [msg] = await inbox.wait_for(1, 20.0)
                return ScaleEvent.from_json(msg.data)
            finally:
                await nc.close()

        event = asyncio.run(scenario())
        assert event.outcome is Outcome.APPLIED, actuator.log()
        assert actuator.stop() == 0, actuator.log()
        lease = k8s.get(srv.LEASES, "slaplanner", "slaplanner-actuator")
    assert lease["spec"]["holderIdentity"] == ""  # released: a successor need not wait
    services_ = k8s.get(srv.DGDS, NS, "llama")["spec"]["services"]
    assert services_["VllmDecodeWorker"]["replicas"] == 3


def test_a_bad_mapping_file_stops_the_process_naming_the_field(
        services: dict[str, ServiceProcess], tmp_path: Path) -> None:
    mapping = tmp_path / "actuator.toml"
    mapping.write_text('[[deployment]]\nnamespace = "prod"\nname = "llama"\nbackend = "scale"\n')
    actuator = services["actuator"]
    actuator.env["SLAPLANNER_CONFIG_FILE"] = str(mapping)
    actuator.start()
    assert actuator.process is not None
    assert actuator.process.wait(timeout=30) == 2
    assert f"{mapping}: deployment[0]: Value error, backend 'scale' needs a scale table" in \
        actuator.log()

