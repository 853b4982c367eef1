"""Decider replicas share the deployments as the forecaster's and the actuator's do: each
deployment is decided by exactly one replica (rendezvous hashing of namespace/name), through a
durable of its own (``decider-<i>``), and a replica killed with SIGKILL during a rollout and
started again takes its deployments back without losing or repeating a decision.

Two real decider processes on a real nats-server, fed in lockstep: every interval a forecast per
deployment, then wait until every deployment has its target. A rollout restarts the replicas one
after the other; each is killed with SIGKILL right after its interval's forecasts are published
(while it decides them). Afterwards the stream must hold exactly one target per deployment and
interval, equal to what one undisturbed decider decides.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.decider.knobs import knob_environment
from services.decider.settings import DeciderSettings
from shared import bus, partition
from shared.messages import DeploymentKey, LoadForecast, ReplicaTarget
from shared.service_settings import ServiceSettings
from tests.conftest import NatsEndpoint, ServiceProcess, until
from tests.test_slaplanner_policy_support import (
    WINDOW_S,
    forecast,
    make_decider,
    settings,
    snapshot,
)

STREAM = "SLAPLANNER"
REPLICAS = 2
DEPLOYMENTS = [DeploymentKey(namespace="prod", name=f"model-{d}") for d in range(8)]
LOAD = [600.0, 1500.0, 3000.0, 4000.0, 4000.0, 900.0, 900.0, 900.0, 900.0]
# The rollout: replica 1 is replaced while interval 3 is decided, replica 0 during interval 5.
KILLED_AT = {3: 1, 5: 0}
INTERVAL_TIMEOUT_S = 60.0
ACK_WAIT_S = 3.0  # a forecast the killed replica took unacked comes back after this


def test_the_deciders_settings_name_a_durable_per_replica() -> None:
    assert DeciderSettings().durable_name() == "decider"
    assert DeciderSettings(replica_count=3, replica_index="slaplanner-decider-2"
                           ).durable_name() == "decider-2"
    with pytest.raises(ValueError, match="not below replica_count"):
        DeciderSettings(replica_count=2, replica_index=2)
    names = [spec.name for spec in bus.pipeline_consumers(decider_replicas=2)]
    assert {"decider-0", "decider-0-history", "decider-1", "decider-1-history"} <= set(names)
    assert "decider" not in names


def the_forecast(deployment: DeploymentKey, k: int) -> LoadForecast:
    observed = snapshot(k * WINDOW_S, LOAD[k], ttft_avg_s=0.06, itl_avg_s=0.008).model_copy(
        update={"deployment": deployment})
    return forecast(k * WINDOW_S, LOAD[k], observed=observed).model_copy(
        update={"deployment": deployment})


async def planned_targets(js: JetStreamContext) -> list[ReplicaTarget]:
    sub = await js.pull_subscribe("slaplanner.target.>", stream=STREAM, config=ConsumerConfig(
        ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL))
    found: list[ReplicaTarget] = []
    try:
        while True:
            try:
                msgs = await sub.fetch(batch=256, timeout=1.0)
            except TimeoutError:
                return [t for t in found if t.forecast_id is not None]
            found += [ReplicaTarget.from_json(m.data) for m in msgs]
    finally:
        await sub.unsubscribe()


@pytest.mark.filterwarnings("ignore::Warning:statsmodels")
async def test_two_decider_replicas_decide_each_deployment_once_through_a_rollout(
    nats_server: NatsEndpoint, nc: NATS, tmp_path: Path,
    services: dict[str, ServiceProcess],
) -> None:
    owners = {d: partition.owner_of_subject(f"slaplanner.forecast.{d.namespace}.{d.name}",
                                            REPLICAS) for d in DEPLOYMENTS}
    assert set(owners.values()) == set(range(REPLICAS)), "both replicas must own deployments"
    js = nc.jetstream()
    await bus.ensure_stream(js, ServiceSettings(nats_url=[nats_server.url]))
    for index in range(REPLICAS):
        spec = bus.ConsumerSpec(f"decider-{index}", bus.DECIDER_FAMILIES)
        await js.add_consumer(STREAM, config=dataclasses.replace(spec.config(),
                                                                 ack_wait=ACK_WAIT_S))
    replicas = []
    for index in range(REPLICAS):
        log_dir = tmp_path / f"decider-{index}"
        log_dir.mkdir()
        env = services["decider"].env | knob_environment(settings().knobs()) | {
            "SLAPLANNER_REPLICA_COUNT": str(REPLICAS), "SLAPLANNER_REPLICA_INDEX": str(index)}
        replicas.append(ServiceProcess("decider", env, log_dir).start())

    try:
        for k in range(len(LOAD)):
            for deployment in DEPLOYMENTS:
                await bus.publish(js, the_forecast(deployment, k))
            if k in KILLED_AT:
                victim = replicas[KILLED_AT[k]]
                assert victim.process is not None
                victim.process.kill()  # SIGKILL while it decides this interval
                victim.process.wait()
                victim.start()  # the rollout's new pod, same ordinal

            async def decided(k: int = k) -> bool:
                window = snapshot(k * WINDOW_S).window_end
                done = {t.deployment for t in await planned_targets(js)
                        if t.window_end == window}
                return done == set(DEPLOYMENTS)

            await until(decided, INTERVAL_TIMEOUT_S, f"every target of interval {k}")
        await asyncio.sleep(ACK_WAIT_S + 1.0)  # anything taken unacked came back by now
        published = await planned_targets(js)
    finally:
        for replica in replicas:
            replica.kill()

    counts = Counter((t.deployment, t.window_end) for t in published)
    assert set(counts.values()) == {1}, [k for k, n in counts.items() if n > 1]
    assert len(counts) == len(DEPLOYMENTS) * len(LOAD)
    # The same decisions as one decider that never stopped, deployment by deployment.
    reference = make_decider()
    expected = {(d, t.window_end): (t.prefill_replicas, t.decode_replicas)
                for d in DEPLOYMENTS for t in
                (reference.decide(the_forecast(d, k)) for k in range(len(LOAD)))}
    assert {(t.deployment, t.window_end): (t.prefill_replicas, t.decode_replicas)
            for t in published} == expected
    for index, replica in enumerate(replicas):
        mine = sum(1 for owner in owners.values() if owner == index)
        assert f"replica {index} of {REPLICAS}" in replica.log()
        # Each decided its own deployments only (the same target from two replicas would have
        # the same id, and the stream would hide the second one as a duplicate).
        decided_here = {d for d in DEPLOYMENTS if f"{d} planned" in replica.log()}
        assert decided_here == {d for d, owner in owners.items() if owner == index}
        assert f"restored {mine} deployments" in replica.log(), replica.log()[-3000:]
