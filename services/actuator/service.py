"""Actuator shell: targets in, scale events out, only while this instance holds the Lease.

It reads the targets through the service's durable JetStream consumer, but fetches only while it
leads: a follower leaves every message to the leader, and a message that reaches an instance that
has just lost the Lease is handed back (nak) unapplied. On becoming leader it first reads the last
ScaleEvent of each deployment from the stream, so that a target older than one applied by the
previous leader stays ignored. The clock is read here and passed to the core as ``now``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import nats.errors
import nats.js.errors
import prometheus_client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from services.actuator import election
from services.actuator.core import Actuator
from services.actuator.settings import ActuatorSettings
from services.actuator.wiring import Assembly
from shared import partition
from shared import service as shell
from shared.messages import SUBJECT_PREFIX, Envelope, ReplicaTarget, ScaleEvent
from shared.service import Runtime, forget_idle_periodically

log = logging.getLogger("slaplanner.actuator")
OUTCOMES = prometheus_client.Counter(
    "slaplanner_actuator_outcomes", "Targets handled, by deployment, backend and outcome",
    ["namespace", "deployment", "backend", "outcome"])
LEADER = prometheus_client.Gauge(
    "slaplanner_actuator_leader", "1 while this actuator holds the Lease (or needs none)")
CONSUMES = "slaplanner.target.>"
SCALED = "slaplanner.scaled.>"
Clock = Callable[[], float]


class NatsPublisher:
    """The virtual backend's way out: bound to the runtime once it is connected."""

    def __init__(self) -> None:
        self.runtime: Runtime | None = None

    async def __call__(self, subject: str, body: bytes, msg_id: str) -> None:
        runtime = self.runtime
        if runtime is None:
            raise RuntimeError("the publisher is not bound to a connected runtime yet")
        if subject.startswith(SUBJECT_PREFIX + "."):  # inside the stream: stored, deduplicated
            await runtime.publish_body(subject, body, msg_id)
        else:
            await runtime.nc.publish(subject, body, headers={"Nats-Msg-Id": msg_id})
            await runtime.nc.flush()
        shell.MESSAGES_PUBLISHED.labels(runtime.name, "virtual").inc()


def owned_by(settings: ActuatorSettings) -> Callable[[str], bool]:
    """Whether a subject's deployment belongs to this replica (all of them for a single one)."""
    def owns(subject: str) -> bool:
        return partition.owns(subject, settings.replica_count, settings.replica_index)

    return owns


def durable_name(settings: ActuatorSettings) -> str:
    return "actuator" if settings.replica_count == 1 else f"actuator-{settings.replica_index}"


async def restore(runtime: Runtime, actuator: Actuator,
                  owns: Callable[[str], bool] = lambda subject: True) -> int:
    """Feed the last ScaleEvent of every deployment to the actuator's memory, then the last
    target (one a previous instance may have written and died before reporting)."""
    count = 0
    async for msg in runtime.read_stream(SCALED, DeliverPolicy.LAST_PER_SUBJECT):
        if owns(msg.subject) and (
                event := runtime.stored(ScaleEvent, msg.subject, msg.data)) is not None:
            actuator.restore(event)
            count += 1
    async for msg in runtime.read_stream(CONSUMES, DeliverPolicy.LAST_PER_SUBJECT):
        if owns(msg.subject) and (
                target := runtime.stored(ReplicaTarget, msg.subject, msg.data)) is not None:
            actuator.restore_unconfirmed(target)
    log.info("restored the last scale event of %d deployments from the stream", count)
    return count


async def consume(runtime: Runtime, assembly: Assembly, settings: ActuatorSettings,
                  clock: Clock) -> None:
    actuator, elector = assembly.actuator, assembly.elector
    owns = owned_by(settings)
    leading = False

    async def gate() -> bool:
        nonlocal leading
        if elector is not None and not elector.is_leader(clock()):
            leading = False
            LEADER.set(0)
            return False
        if not leading:
            leading = True
            LEADER.set(1)
            if settings.restore_from_stream:
                try:
                    await restore(runtime, actuator, owns)
                except (nats.errors.Error, nats.js.errors.Error) as exc:
                    log.warning("could not restore from the stream (%s)", exc)
        return True

    async def on_target(target: ReplicaTarget) -> list[Envelope] | None:
        event = await actuator.handle(target, clock())
        if event is None:  # lost the lease meanwhile: leave it to the leader
            return None
        # One line per target: the outcome and what was written (or why not).
        log.info("%s %s: %s", target.deployment, event.outcome, event.reason)
        OUTCOMES.labels(event.deployment.namespace, event.deployment.name, event.backend,
                        event.outcome.value).inc()
        return [event]

    try:
        sharing = settings.replica_count > 1
        if sharing:
            log.info("replica %d of %d: applying only the deployments it owns",
                     settings.replica_index, settings.replica_count)
        await runtime.consume(CONSUMES, ReplicaTarget, on_target, durable=durable_name(settings),
                              batch=16, gate=gate, owns=owns if sharing else None,
                              ordered_by=deployment_of, max_in_flight=settings.max_in_flight)
    finally:
        LEADER.set(0)


async def lead(assembly: Assembly, stop: asyncio.Event, period_s: float, clock: Clock) -> None:
    """Acquire and renew the Lease until stopped; then release it for a fast takeover."""
    assert assembly.elector is not None and assembly.lock is not None
    try:
        while not stop.is_set():
            await election.step(assembly.elector, assembly.lock, clock())
            await _wait(stop, period_s)
    finally:
        await election.release(assembly.elector, assembly.lock)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def forget_idle_deployments(runtime: Runtime, actuator: Actuator, idle_forget_s: float,
                                  clock: Clock = time.time) -> None:
    """Forget the deployments idle for ``idle_forget_s`` (``forget_idle_periodically``), with
    their outcome counters."""

    def forget(now_s: float) -> None:
        forgotten = actuator.forget_idle(now_s, idle_forget_s)
        for key in forgotten:
            OUTCOMES.remove_by_labels({"namespace": key.namespace, "deployment": key.name})
        if forgotten:
            log.info("forgot %d deployments idle for %g s or more", len(forgotten),
                     idle_forget_s)

    await forget_idle_periodically(runtime.stop, idle_forget_s, actuator.newest_seen_s, forget,
                                   clock)


def deployment_of(msg: Msg) -> str:
    # Targets of one deployment are applied in order; different deployments side by side.
    return msg.subject


async def run(runtime: Runtime, settings: ActuatorSettings, assembly: Assembly,
              publisher: NatsPublisher | None = None, clock: Clock = time.time) -> None:
    if publisher is not None:
        publisher.runtime = runtime
    runtime.readiness_checks.append(assembly.not_ready)
    tasks = [asyncio.create_task(consume(runtime, assembly, settings, clock)),
             asyncio.create_task(forget_idle_deployments(runtime, assembly.actuator,
                                                         settings.idle_forget_s, clock))]
    if assembly.elector is not None:
        tasks.append(asyncio.create_task(
            lead(assembly, runtime.stop, settings.lease_retry_period_s, clock)))
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assembly.close()
