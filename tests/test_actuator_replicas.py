"""Actuator replicas as real processes over a real NATS and the Kubernetes test server: they
share the deployments by rendezvous hashing (one owner each), a replica killed with SIGKILL and
restarted, as a StatefulSet does during a rollout, applies what it missed exactly once; and the
process's health while the Kubernetes API is away."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from shared import partition
from shared.messages import DeploymentKey, Outcome, ReplicaTarget, ScaleEvent
from tests import k8s_api_server as srv
from tests.conftest import NatsEndpoint, ServiceProcess, wait_for_consumers, wait_until
from tests.conftest_k8s import NS, dgd

T0 = 1_700_000_000.0
NAMES = [f"model-{n}" for n in range(8)]
# Waits that include a process start: importing the service takes half a minute when other
# processes hold both cores; a deadline only costs time when the test fails anyway.
STARTUP_S = 120.0
GRACE_PERIOD_S = 30.0  # the actuator pod's terminationGracePeriodSeconds (deploy/base)


def owner(name: str) -> int:
    return partition.owner_of_subject(f"slaplanner.target.{NS}.{name}", 2)


def mapping_file(path: Path, names: list[str]) -> Path:
    lines = []
    for name in names:
        lines += ['[[allow]]', f'namespace = "{NS}"', 'kind = "DynamoGraphDeployment"',
                  f'name = "{name}"', '']
    path.write_text("\n".join(lines) + "\n")
    return path


def target(name: str, decode: int, interval: int) -> ReplicaTarget:
    return ReplicaTarget(deployment=DeploymentKey(namespace=NS, name=name),
                         window_end=T0 + 60 * interval, policy="slaplanner",
                         prefill_replicas=1, decode_replicas=decode)


async def publish_round(url: str, interval: int, decode: int) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for name in NAMES:
            message = target(name, decode, interval)
            await js.publish(message.subject(), message.to_json(),
                             headers={"Nats-Msg-Id": message.id})
    finally:
        await nc.close()


async def consumers_exist(url: str, names: set[str]) -> None:
    nc = await nats.connect(url)
    try:
        await wait_for_consumers(nc, names, STARTUP_S)
    finally:
        await nc.close()


async def scale_events(url: str, timeout_s: float = 60.0) -> list[ScaleEvent]:
    """Every ScaleEvent the stream holds: read until the consumer has nothing pending (a fetch
    that times out on a busy machine is no proof that the stream is read to the end)."""
    nc = await nats.connect(url)
    found: list[ScaleEvent] = []
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe("slaplanner.scaled.>", stream="SLAPLANNER")
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    msgs = await sub.fetch(batch=256, timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    info = await sub.consumer_info()
                    if info.num_pending == 0 and info.num_ack_pending == 0:
                        return found
                    continue
                for msg in msgs:
                    found.append(ScaleEvent.from_json(msg.data))
                    await msg.ack()
    finally:
        await nc.close()


def reported(url: str) -> set[str]:
    """The ids of the targets that a ScaleEvent reports."""
    return {e.target_id for e in asyncio.run(scale_events(url))}


@pytest.fixture
def k8s() -> Iterator[srv.KubeApiServer]:
    with srv.KubeApiServer(bookmark_interval_s=0.5) as server:
        for name in NAMES:
            server.add(srv.DGDS, dgd(name, 1, 1))
        yield server


def replica(services: dict[str, ServiceProcess], tmp_path: Path, index: int, mapping: Path,
            k8s: srv.KubeApiServer) -> ServiceProcess:
    env = {**services["actuator"].env,
           "SLAPLANNER_BACKEND": "dynamo", "SLAPLANNER_CONFIG_FILE": str(mapping),
           "SLAPLANNER_KUBE_API_URL": k8s.url, "SLAPLANNER_REPLICA_COUNT": "2",
           # the StatefulSet pod's name, as the manifest passes it
           "SLAPLANNER_REPLICA_INDEX": f"slaplanner-actuator-{index}",
           # tells the two apart in the API server's log
           "SLAPLANNER_FIELD_MANAGER": f"slaplanner-actuator-{index}",
           "SLAPLANNER_RECORD_EVENTS": "false"}
    folder = tmp_path / f"replica-{index}"
    folder.mkdir(exist_ok=True)
    return ServiceProcess("actuator", env, folder)


def of_replicas(body: object) -> bool:
    """A patch that sets replicas (a JSON patch of components, or a merge patch of services),
    not the conditions annotation written alone when an outcome changes without a scale."""
    if isinstance(body, list):
        return any(str(op.get("path", "")).endswith("/replicas") for op in body)
    return isinstance(body, dict) and "spec" in body


def decode_patches(k8s: srv.KubeApiServer) -> Counter[tuple[str, str]]:
    """(DGD, field manager) of every successful patch of replicas."""
    return Counter((r.path.rsplit("/", 1)[-1], r.query["fieldManager"][0])
                   for r in k8s.requests if r.method == "PATCH" and r.status == 200
                   and of_replicas(r.body))


def test_two_replicas_share_the_deployments_and_a_killed_one_catches_up_once(
        services: dict[str, ServiceProcess], nats_server: NatsEndpoint, tmp_path: Path,
        k8s: srv.KubeApiServer) -> None:
    assert {owner(n) for n in NAMES} == {0, 1}  # both replicas own some
    mapping = mapping_file(tmp_path / "actuator.toml", NAMES)
    replicas = [replica(services, tmp_path, i, mapping, k8s).start() for i in range(2)]
    try:
        def decode_of(name: str) -> int:
            return int(k8s.get(srv.DGDS, NS, name)["spec"]["services"]["VllmDecodeWorker"]
                       ["replicas"])

        asyncio.run(consumers_exist(nats_server.url, {"actuator-0", "actuator-1"}))
        asyncio.run(publish_round(nats_server.url, 1, 2))
        wait_until(lambda: all(decode_of(n) == 2 for n in NAMES), STARTUP_S)
        # Reported too: a replica killed between its write and its report would report that
        # target again as "unchanged" after its restart (docs/reliability.md).
        wait_until(lambda: len(asyncio.run(scale_events(nats_server.url))) == len(NAMES), 30.0)

        replicas[1].kill()  # SIGKILL, in the middle of a rollout
        asyncio.run(publish_round(nats_server.url, 2, 3))
        wait_until(lambda: all(decode_of(n) == 3 for n in NAMES if owner(n) == 0), 60.0)
        time.sleep(1.0)  # the other replica's share waits in its durable consumer
        assert all(decode_of(n) == 2 for n in NAMES if owner(n) == 1)
        replicas[1].start()  # the StatefulSet brings the pod back with its name
        wait_until(lambda: all(decode_of(n) == 3 for n in NAMES), STARTUP_S)

        replicas[0].stop(GRACE_PERIOD_S)  # the rollout goes on to the other pod (SIGTERM)
        replicas[0].start()
        asyncio.run(publish_round(nats_server.url, 3, 4))
        wait_until(lambda: all(decode_of(n) == 4 for n in NAMES), STARTUP_S)
        # The write comes before the report: killed now, a replica that has patched but not yet
        # reported would report that target only after its next start.
        wait_until(lambda: len(reported(nats_server.url)) == 3 * len(NAMES), 60.0)
    finally:
        for proc in replicas:
            proc.kill()
    logs = "\n".join(p.log() for p in replicas)
    # Each DGD patched once per round, always by its owner.
    patched = decode_patches(k8s)
    assert sorted(patched.items()) == sorted(
        ((name, f"slaplanner-actuator-{owner(name)}"), 3) for name in NAMES), logs
    events = asyncio.run(scale_events(nats_server.url))
    per_target = Counter(e.target_id for e in events)
    assert len(per_target) == 3 * len(NAMES) and set(per_target.values()) == {1}, logs
    assert {e.outcome for e in events} == {Outcome.APPLIED}, logs
    assert "respected for" not in logs  # no write of its own taken for someone else's


def http_port(proc: ServiceProcess) -> int:
    return int(re.findall(r"/metrics and /healthz on [0-9.]+:([0-9]+)", proc.log())[-1])


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5.0) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_readyz_fails_while_the_kubernetes_api_is_away_and_the_log_says_so_once(
        services: dict[str, ServiceProcess], nats_server: NatsEndpoint, tmp_path: Path,
        k8s: srv.KubeApiServer) -> None:
    mapping = mapping_file(tmp_path / "actuator.toml", NAMES)
    actuator = services["actuator"]
    actuator.env.update({"SLAPLANNER_BACKEND": "dynamo", "SLAPLANNER_CONFIG_FILE": str(mapping),
                         "SLAPLANNER_KUBE_API_URL": k8s.url,
                         "SLAPLANNER_LEASE_NAMESPACE": "slaplanner",
                         "SLAPLANNER_LEASE_RETRY_PERIOD_S": "200ms",
                         "SLAPLANNER_KUBE_RETRY_ATTEMPTS": "2",
                         "SLAPLANNER_KUBE_REQUEST_TIMEOUT_S": "1s"})
    actuator.start()
    try:
        wait_until(lambda: "/metrics and /healthz on" in actuator.log(), 30.0)
        port = http_port(actuator)
        asyncio.run(consumers_exist(nats_server.url, {"actuator"}))
        asyncio.run(publish_round(nats_server.url, 1, 2))  # the watches start, all is well
        wait_until(lambda: all(
            k8s.get(srv.DGDS, NS, n)["spec"]["services"]["VllmDecodeWorker"]["replicas"] == 2
            for n in NAMES), 60.0)
        # every target reported (its Events recorded before), nothing left in flight
        wait_until(lambda: len(asyncio.run(scale_events(nats_server.url))) == len(NAMES), 30.0)
        assert status(port, "/readyz") == 200
        k8s.stop()
        wait_until(lambda: status(port, "/readyz") == 503, 30.0)
        assert status(port, "/healthz") == 200  # alive: liveness must not restart it
        time.sleep(6.0)  # retries go on in the background, quietly
        log = actuator.log()
        assert log.count("does not answer") == 1, log
        assert log.count("cannot read the lease") <= 1, log
        k8s.start()  # the same port
        wait_until(lambda: status(port, "/readyz") == 200, 60.0)
        assert actuator.log().count("the Kubernetes API answers again") == 1
    finally:
        actuator.kill()
