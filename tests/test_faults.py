"""Faults during a replay, on real servers: a short trace replayed through the forecaster, decider
and actuator processes on a real nats-server, the actuator scaling a DynamoGraphDeployment on the
Kubernetes test server through the official client, the simulator in place of the cluster.

One undisturbed run is the reference. Each fault case replays the same trace while a fault
strikes mid-run: a service killed with SIGKILL and started again, the snapshot publisher (the
collector's role in the replay) dying after a publication and publishing the window again, the
nats-server restarted, or the Kubernetes API answering 500, 409 or nothing for a while. Afterwards
the stream must hold exactly one ScaleEvent per interval, in order, for that interval's target;
every service must still be running, started no more often than the case did; and the decisions,
the simulated cluster and the DynamoGraphDeployment must end as in the reference, except where
the fault withheld data (an outage longer than the retries), whose difference is asserted.

Starting the three services takes most of a run's time, so the cases share one set of servers and
services, each case replaying the trace for a deployment of its own (its own subjects, durable
state in the services and DGD): a fault still hits the processes every deployment shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import nats
import nats.errors
import nats.js.errors
import pytest
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.actuator import service as actuator_service
from shared import bus, embedded_nats
from shared.messages import (
    DeploymentKey,
    LoadForecast,
    MetricSnapshot,
    Outcome,
    ReplicaTarget,
    ScaleEvent,
)
from shared.perf_model import Profile, default_profile_path, load_profile
from shared.service_settings import ServiceSettings
from shared.traces import Trace
from sim.cluster import ClusterConfig
from sim.loop import DEPLOYMENT, ClosedLoop, PlanningSetup, Step, cut, step_from_events
from sim.synth import SineLoad, generate
from tests import k8s_api_server as srv
from tests.conftest import ServiceProcess
from tests.conftest_k8s import (
    JSON,
    Clock,
    api_client,
    assemble,
    dgd,
    dynamo_mapping,
    kube_for,
    target,
)

T = TypeVar("T")
INTERVALS = 16
SERVICES = ("forecaster", "decider", "actuator")
STREAM = "SLAPLANNER"
DGD_PATH = "dynamographdeployments"
T0 = 1_700_000_000.0
NS = DEPLOYMENT.namespace
# One deployment per case; the reference first.
CASES = ("reference", "kill-forecaster", "kill-decider", "kill-actuator", "kill-publisher",
         "restart-nats-between", "restart-nats-in-flight", "kube-500", "kube-409",
         "kube-timeout", "kube-outage", "kill-actuator-after-write")
# Generous: the machine is shared; a healthy interval takes well under a second. A message a
# killed service was handling comes back after its consumer's ack wait (60 s for the
# forecaster and the decider), plus the restart: an interval may take that long.
INTERVAL_TIMEOUT_S = 150.0
APPLIED = (Outcome.APPLIED, Outcome.UNCHANGED)
# Kubernetes client budget of the actuator: a request that hangs is given up after
# KUBE_TIMEOUT_S and retried, up to KUBE_ATTEMPTS times, with short backoffs.
KUBE_TIMEOUT_S = 1.0
KUBE_ATTEMPTS = 6
# The actuator's ack wait in these runs (see shorten_actuator_ack_wait): longer than any handling
# here (the longest, through Kubernetes timeouts, takes about 2 s).
ACK_WAIT_S = 5.0


def scenario() -> tuple[Trace, Profile, PlanningSetup, ClusterConfig]:
    """The replay of tests/test_sim_replay.py, shortened: decisions change often."""
    profile = load_profile(default_profile_path())
    trace = generate(SineLoad(INTERVALS * 30.0, 4, 24, 300, 3000, 300, isl_cv=0.5, osl_cv=0.5,
                              seed=3))
    setup = PlanningSetup.build(
        policy="dynamo", predictor="kalman", ttft_target_s=0.3, itl_target_s=0.02,
        adjustment_interval_s=30.0, max_total_gpus=16, worker_startup_s=60.0,
    )
    config = ClusterConfig(startup_delay_s=60.0, perf_skew=1.2, noise_cv=0.1, seed=5)
    return trace, profile, setup, config


# ----------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    """A nats-server, the Kubernetes test server with a DGD per case, and the services."""

    nats: embedded_nats.NatsServer
    k8s: srv.KubeApiServer
    services: dict[str, ServiceProcess]
    restarts: dict[str, int] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)  # killed on purpose, not yet started again

    def kill(self, name: str) -> None:
        """SIGKILL: no drain, no ack, no goodbye to NATS or the Lease."""
        process = self.services[name].process
        assert process is not None and process.poll() is None, f"{name} is not running"
        self.down.add(name)
        process.kill()
        process.wait()

    def start_again(self, name: str) -> None:
        self.services[name].start()
        self.restarts[name] = self.restarts.get(name, 0) + 1
        self.down.discard(name)

    def exited(self) -> list[str]:
        """Services that stopped without being killed on purpose."""
        return [name for name, service in self.services.items()
                if name not in self.down and service.process is not None
                and service.process.poll() is not None]

    def dgd_replicas(self, name: str) -> tuple[int, int]:
        services = self.k8s.get(srv.DGDS, NS, name)["spec"]["services"]
        return (int(services["VllmPrefillWorker"]["replicas"]),
                int(services["VllmDecodeWorker"]["replicas"]))

    def reconnects(self) -> dict[str, int]:
        return {name: service.log().count("reconnected to NATS")
                for name, service in self.services.items()}

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{service.log()[-4000:]}"
                         for name, service in self.services.items())


def actuator_mapping(path: Path, names: tuple[str, ...]) -> Path:
    """Each case's deployment on the dynamo backend, its DGD (named alike) allowlisted."""
    path.write_text("".join(
        f'[[allow]]\nnamespace = "{NS}"\nkind = "DynamoGraphDeployment"\nname = "{name}"\n\n'
        f'[[deployment]]\nnamespace = "{NS}"\nname = "{name}"\nbackend = "dynamo"\n\n'
        for name in names))
    return path


@contextlib.contextmanager
def stack(setup: PlanningSetup, config: ClusterConfig, names: tuple[str, ...]) -> Iterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="slaplanner-faults-") as tmp_name:
        tmp = Path(tmp_name)
        server = embedded_nats.start(tmp / "nats")
        k8s = srv.KubeApiServer(timeout_delay_s=2 * KUBE_TIMEOUT_S).start()
        for name in names:
            k8s.add(srv.DGDS, dgd(name, config.start_prefill, config.start_decode, namespace=NS))
        base = {
            **os.environ,
            "SLAPLANNER_NATS_URL": server.url,
            "SLAPLANNER_HTTP_PORT": "0",
            "SLAPLANNER_HTTP_HOST": "127.0.0.1",
            "SLAPLANNER_NATS_RECONNECT_WAIT_S": "200ms",
            "SLAPLANNER_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
        env = setup.service_env()
        env["actuator"] |= {
            # The replay's actuator, but on a Kubernetes backend: it scales the DGD on the test
            # server, elected leader with a Lease (a restarted container keeps its identity).
            "SLAPLANNER_BACKEND": "none",
            "SLAPLANNER_CONFIG_FILE": str(actuator_mapping(tmp / "actuator.toml", names)),
            "SLAPLANNER_KUBE_API_URL": k8s.url,
            "SLAPLANNER_LEADER_ELECTION": "on",
            "SLAPLANNER_IDENTITY": "actuator-0",
            "SLAPLANNER_LEASE_NAMESPACE": NS,
            "SLAPLANNER_LEASE_RETRY_PERIOD_S": "200ms",
            "SLAPLANNER_KUBE_REQUEST_TIMEOUT_S": f"{KUBE_TIMEOUT_S}s",
            "SLAPLANNER_KUBE_RETRY_ATTEMPTS": str(KUBE_ATTEMPTS),
            "SLAPLANNER_KUBE_RETRY_BASE_S": "50ms",
            "SLAPLANNER_KUBE_RETRY_MAX_S": "300ms",
        }
        services = {name: ServiceProcess(name, {**base, **env[name]}, tmp) for name in SERVICES}
        try:
            asyncio.run(shorten_actuator_ack_wait(server.url))
            for service in services.values():
                service.start()
            yield Stack(server, k8s, services)
        finally:
            for service in services.values():
                service.kill()
            k8s.stop()
            server.stop()


async def shorten_actuator_ack_wait(url: str) -> None:
    """Create the actuator's durable consumer as the service would, but with a short ack wait: a
    target the actuator took and died handling is delivered again after ``ACK_WAIT_S`` rather
    than the service's minute. The service binds to an existing durable as it is."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await bus.ensure_stream(js, ServiceSettings())
        await js.add_consumer(STREAM, ConsumerConfig(
            name="actuator", durable_name="actuator", filter_subject=actuator_service.CONSUMES,
            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.NEW,
            ack_wait=ACK_WAIT_S, max_ack_pending=1000))
    finally:
        await nc.close()


# ----------------------------------------------------------------------------- the stream


async def retrying(call: Callable[[], Awaitable[T]], deadline: float) -> T:
    """``call`` until it succeeds: while the nats-server restarts, requests fail for a moment."""
    while True:
        try:
            return await call()
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


@dataclass
class StreamLog:
    """One deployment's messages in the stream (and every rejection), read in order by sequence
    number from ``next_seq`` on: a direct read per message survives a server restart, where a
    subscription would miss what passed meanwhile."""

    js: JetStreamContext
    name: str
    next_seq: int
    forecasts: list[LoadForecast] = field(default_factory=list)
    targets: list[ReplicaTarget] = field(default_factory=list)
    events: list[ScaleEvent] = field(default_factory=list)
    snapshots: list[MetricSnapshot] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)

    async def catch_up(self) -> None:
        while True:
            try:
                msg = await self.js.get_msg(STREAM, self.next_seq)
            except nats.js.errors.NotFoundError:
                return
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
                return  # the server is restarting: read on at the next poll
            self.next_seq += 1
            parts = (msg.subject or "").split(".")
            data = msg.data or b""
            if parts[1] == "rejected":
                self.rejected.append(data.decode(errors="replace"))
            elif parts[2:] != [NS, self.name]:
                continue
            elif parts[1] == "metrics":
                self.snapshots.append(MetricSnapshot.from_json(data))
            elif parts[1] == "forecast":
                self.forecasts.append(LoadForecast.from_json(data))
            elif parts[1] == "target":
                self.targets.append(ReplicaTarget.from_json(data))
            elif parts[1] == "scaled":
                self.events.append(ScaleEvent.from_json(data))

    def of_window(self, window_end: float) -> tuple[list[ReplicaTarget], list[ScaleEvent]]:
        return ([t for t in self.targets if t.window_end == window_end],
                [e for e in self.events if e.window_end == window_end])

    def settled(self, window_end: float) -> bool:
        targets, events = self.of_window(window_end)
        return bool(targets) and {e.target_id for e in events} >= {t.id for t in targets}


async def consumers_idle(js: JetStreamContext) -> bool:
    infos = await js.consumers_info(STREAM)
    return not any(bus.works_through(c.config)
                   and ((c.num_pending or 0) or (c.num_ack_pending or 0)) for c in infos)


# ----------------------------------------------------------------------------- faults


class Fault:
    """What a case does around the publication of the snapshot of interval ``at``; this base
    does nothing (the reference)."""

    def __init__(self, at: int = -1) -> None:
        self.at = at

    async def before_publish(self, stack: Stack, index: int) -> None:
        return None

    async def after_publish(self, stack: Stack, index: int, publisher: Publisher) -> None:
        return None

    async def after_interval(self, stack: Stack, index: int) -> None:
        return None


class KillService(Fault):
    """SIGKILL the service, publish the interval's snapshot while it is down, start it again:
    what it missed waits in its durable consumers."""

    def __init__(self, at: int, victim: str) -> None:
        super().__init__(at)
        self.victim = victim

    async def before_publish(self, stack: Stack, index: int) -> None:
        if index == self.at:
            stack.kill(self.victim)

    async def after_publish(self, stack: Stack, index: int, publisher: Publisher) -> None:
        if index == self.at:
            stack.start_again(self.victim)


class KillPublisher(Fault):
    """The snapshot publisher dies right after publishing (not knowing whether the server stored
    it) and, started again, publishes the same window again, as a restarted collector would:
    the stream's duplicate window must drop the second copy."""

    async def after_publish(self, stack: Stack, index: int, publisher: Publisher) -> None:
        if index == self.at:
            await publisher.crash_and_publish_again()


class KillActuatorAfterWrite(Fault):
    """The actuator's write to the DGD lands and the actuator is SIGKILLed before the answer
    reaches it: no ScaleEvent, no ack. Started again, it gets the target once more."""

    def __init__(self, at: int, name: str) -> None:
        super().__init__(at)
        self.name = name
        self.fault: srv.Fault | None = None

    async def before_publish(self, stack: Stack, index: int) -> None:
        if index == self.at:
            self.fault = stack.k8s.inject(
                "lost-response", method="PATCH", path_contains=f"{DGD_PATH}/{self.name}",
                on_strike=lambda: stack.kill("actuator"))

    async def after_publish(self, stack: Stack, index: int, publisher: Publisher) -> None:
        if index == self.at:
            deadline = time.monotonic() + INTERVAL_TIMEOUT_S
            while "actuator" not in stack.down:
                assert time.monotonic() < deadline, "the actuator never wrote"
                await asyncio.sleep(0.01)
            stack.start_again("actuator")


class RestartNats(Fault):
    """Restart the nats-server (same port, same JetStream store) before the interval's snapshot
    is published, or (``in_flight``) right after, while the services handle it."""

    def __init__(self, at: int, in_flight: bool = False) -> None:
        super().__init__(at)
        self.in_flight = in_flight

    async def before_publish(self, stack: Stack, index: int) -> None:
        if index == self.at and not self.in_flight:
            await asyncio.to_thread(stack.nats.start_again)

    async def after_publish(self, stack: Stack, index: int, publisher: Publisher) -> None:
        if index == self.at and self.in_flight:
            await asyncio.to_thread(stack.nats.start_again)


class KubeFault(Fault):
    """The Kubernetes API answers ``kind`` to the actuator's requests for the case's DGD: the
    next ``count`` of them, or (``intervals``) every one for that many intervals."""

    def __init__(self, at: int, name: str, kind: str, count: int = 0, intervals: int = 0,
                 method: str | None = None) -> None:
        super().__init__(at)
        self.name, self.kind, self.count, self.intervals = name, kind, count, intervals
        self.method = method
        self.fault: srv.Fault | None = None

    async def before_publish(self, stack: Stack, index: int) -> None:
        if index == self.at:
            self.fault = stack.k8s.inject(self.kind, count=self.count or 1_000_000,
                                          method=self.method,
                                          path_contains=f"{DGD_PATH}/{self.name}")

    async def after_interval(self, stack: Stack, index: int) -> None:
        if self.intervals and index == self.at + self.intervals - 1:
            stack.k8s.clear_faults()


# ----------------------------------------------------------------------------- the replay


class Publisher:
    """The snapshot publisher, on a connection of its own as the collector has."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.nc: NATS | None = None
        self.last: MetricSnapshot | None = None
        self.duplicates = 0  # publications the stream reported as duplicates and dropped

    async def connect(self) -> None:
        self.nc = await nats.connect(self.url, max_reconnect_attempts=-1,
                                     reconnect_time_wait=0.1)

    async def publish(self, snapshot: MetricSnapshot, deadline: float) -> None:
        assert self.nc is not None
        js = self.nc.jetstream()
        self.last = snapshot
        ack = await retrying(lambda: js.publish(snapshot.subject(), snapshot.to_json(),
                                                headers={"Nats-Msg-Id": snapshot.id}), deadline)
        self.duplicates += bool(ack.duplicate)

    async def crash_and_publish_again(self) -> None:
        assert self.nc is not None and self.last is not None
        with contextlib.suppress(Exception):
            await self.nc.close()
        await self.connect()
        await self.publish(self.last, time.monotonic() + INTERVAL_TIMEOUT_S)

    async def close(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()


def scales(body: object) -> bool:
    """Whether a DGD patch writes replicas: the actuator also writes its conditions annotation
    alone when they move (after a restart, say), which scales nothing."""
    if isinstance(body, list):  # a JSON patch
        return any(not str(op.get("path", "")).startswith("/metadata/annotations")
                   for op in body if isinstance(op, dict))
    if isinstance(body, dict):  # a merge patch
        return any(key != "metadata" for key in body) or any(
            key != "annotations" for key in body.get("metadata", {}))
    return True


@dataclass
class Run:
    records: list[tuple[int, int, str | None]]  # simulated counts and outcome, per interval
    dgd: list[tuple[int, int]]  # the DGD's replicas after each interval
    log: StreamLog
    window_ends: list[float]  # the intervals whose snapshot was published
    dgd_writes: int  # successful writes of replicas to the DGD
    restarts: dict[str, int]  # services started again during the run
    duplicate_snapshots: int  # snapshot publications the stream dropped as duplicates
    reconnects: dict[str, int]  # times each service reconnected to NATS during the run


async def replay(stack: Stack, name: str, fault: Fault) -> Run:
    """The trace, replayed for deployment ``NS/name`` with ``fault`` striking."""
    trace, profile, setup, config = scenario()
    loop = ClosedLoop(cut(trace, setup.interval_s, INTERVALS), profile, config,
                      setup.interval_s, setup.ttft_target_s, setup.itl_target_s,
                      deployment=DeploymentKey(namespace=NS, name=name),
                      max_intervals=INTERVALS)
    restarts_before = dict(stack.restarts)
    reconnects_before = stack.reconnects()
    nc = await nats.connect(stack.nats.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    publisher = Publisher(stack.nats.url)
    await publisher.connect()
    js = nc.jetstream()
    dgd_after: list[tuple[int, int]] = []
    window_ends: list[float] = []
    try:
        await ready(js, {"forecaster", "decider", "actuator"})
        log = StreamLog(js, name, (await js.stream_info(STREAM)).state.last_seq + 1)
        index = 0
        while (observation := loop.next_window()) is not None:
            if loop.last_window:  # its ScaleEvent would act after the end of the trace
                loop.apply(Step(None, None))
                continue
            snapshot = observation.snapshot
            deadline = time.monotonic() + INTERVAL_TIMEOUT_S
            await fault.before_publish(stack, index)
            await publisher.publish(snapshot, deadline)
            window_ends.append(snapshot.window_end)
            await fault.after_publish(stack, index, publisher)
            await settle(stack, js, log, snapshot.window_end, deadline)
            targets, events = log.of_window(snapshot.window_end)
            forecasts = [f for f in log.forecasts if f.window_end == snapshot.window_end]
            loop.apply(step_from_events(events, targets, forecasts[-1] if forecasts else None))
            dgd_after.append(stack.dgd_replicas(name))
            await fault.after_interval(stack, index)
            index += 1
        await log.catch_up()
    finally:
        await publisher.close()
        with contextlib.suppress(Exception):
            await nc.close()
    writes = sum(1 for r in stack.k8s.writes()
                 if r.method == "PATCH" and r.path.endswith(f"/{DGD_PATH}/{name}")
                 and r.status == 200 and scales(r.body))
    restarts = {service: count - restarts_before.get(service, 0)
                for service, count in stack.restarts.items()
                if count != restarts_before.get(service, 0)}
    reconnects = {service: count - reconnects_before[service]
                  for service, count in stack.reconnects().items()}
    return Run([(r.prefill, r.decode, r.outcome) for r in loop.records], dgd_after, log,
               window_ends, writes, restarts, publisher.duplicates, reconnects)


async def ready(js: JetStreamContext, durables: set[str]) -> None:
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if durables <= {c.name for c in await js.consumers_info(STREAM)}:
                return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"services {sorted(durables)} did not become ready")


async def settle(stack: Stack, js: JetStreamContext, log: StreamLog, window_end: float,
                 deadline: float) -> None:
    """The interval's target has its ScaleEvent and every consumer is idle (the replay's
    lockstep); fails at once if a service stopped on its own."""
    while True:
        exited = stack.exited()
        assert not exited, f"{exited} exited during the replay\n{stack.logs()}"
        await log.catch_up()
        if log.settled(window_end):
            with contextlib.suppress(TimeoutError, nats.errors.Error, nats.js.errors.Error):
                if await consumers_idle(js):
                    return
        if time.monotonic() > deadline:
            raise AssertionError(f"interval {window_end} did not settle\n{stack.logs()}")
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def servers() -> Iterator[Stack]:
    _, _, setup, config = scenario()
    with stack(setup, config, CASES) as running:
        yield running


def run_case(stack: Stack, name: str, fault: Fault) -> Run:
    result = asyncio.run(replay(stack, name, fault))
    # No crash loop: every service runs at the end, started again only by the case itself.
    alive = {service: s.process is not None and s.process.poll() is None
             for service, s in stack.services.items()}
    assert all(alive.values()), f"not running at the end: {alive}\n{stack.logs()}"
    return result


# ----------------------------------------------------------------------------- checks


def assert_one_event_per_interval_in_order(run: Run) -> None:
    log = run.log
    assert log.rejected == []
    # Exactly one snapshot, forecast, target and ScaleEvent per interval: a message published
    # twice (same id) is dropped by the stream, one published again under a new id would show.
    assert [s.window_end for s in log.snapshots] == run.window_ends
    assert [f.window_end for f in log.forecasts] == run.window_ends
    assert [t.window_end for t in log.targets] == run.window_ends
    assert [e.window_end for e in log.events] == run.window_ends  # no gap, none twice, in order
    assert len({e.id for e in log.events}) == len(log.events)
    assert [e.target_id for e in log.events] == [t.id for t in log.targets]


def decisions(run: Run) -> list[tuple[float, int, int]]:
    return [(t.window_end, t.prefill_replicas, t.decode_replicas) for t in run.log.targets]


def outcomes(run: Run) -> list[tuple[Outcome, int, int]]:
    return [(e.outcome, e.prefill.to, e.decode.to) for e in run.log.events]


def assert_as_undisturbed(run: Run, reference: Run) -> None:
    assert decisions(run) == decisions(reference)
    assert outcomes(run) == outcomes(reference)
    assert run.records == reference.records
    assert run.dgd == reference.dgd  # the cluster took every step, once, in the same order
    assert run.dgd_writes == reference.dgd_writes


@pytest.fixture(scope="module")
def reference(servers: Stack) -> Run:
    run = run_case(servers, "reference", Fault())
    assert_one_event_per_interval_in_order(run)
    assert all(e.outcome in APPLIED for e in run.log.events)
    assert run.restarts == {}
    assert len(set(run.dgd)) > 2  # it did scale, several times
    return run


def strike_at(reference: Run) -> int:
    """The first interval after a few where the reference writes to the DGD: a fault there
    meets a read and a write."""
    for index, event in enumerate(reference.log.events):
        if index >= 5 and event.outcome is Outcome.APPLIED:
            return index
    raise AssertionError("the reference never scales after interval 5")


# ----------------------------------------------------------------------------- the cases


@pytest.mark.filterwarnings("ignore::Warning:statsmodels")
@pytest.mark.parametrize("victim", ["forecaster", "decider", "actuator"])
def test_a_service_killed_mid_run_picks_up_where_it_stopped(
        servers: Stack, reference: Run, victim: str) -> None:
    run = run_case(servers, f"kill-{victim}", KillService(strike_at(reference), victim))
    assert run.restarts == {victim: 1}  # started again once by the test, never by a crash
    assert_one_event_per_interval_in_order(run)
    assert_as_undisturbed(run, reference)


@pytest.mark.filterwarnings("ignore::Warning:statsmodels")
def test_an_actuator_killed_between_its_write_and_its_scale_event_takes_its_write_for_its_own(
        servers: Stack, reference: Run) -> None:
    at = strike_at(reference)
    fault = KillActuatorAfterWrite(at, "kill-actuator-after-write")
    run = run_case(servers, "kill-actuator-after-write", fault)
    assert fault.fault is not None and fault.fault.served == 1
    assert run.restarts == {"actuator": 1}
    assert_one_event_per_interval_in_order(run)
    assert decisions(run) == decisions(reference)
    # The one difference: the target delivered again finds its write done ("already at
    # target"), where the reference applied it; the cluster took the same steps, once each.
    event = run.log.events[at]
    assert reference.log.events[at].outcome is Outcome.APPLIED
    assert event.outcome is Outcome.UNCHANGED and "already at target" in (event.reason or "")
    expected = outcomes(reference)
    expected[at] = (Outcome.UNCHANGED, *expected[at][1:])
    assert outcomes(run) == expected
    assert [r[:2] for r in run.records] == [r[:2] for r in reference.records]
    assert run.dgd == reference.dgd
    assert run.dgd_writes == reference.dgd_writes
    # Started again, the actuator knew its last target had no ScaleEvent yet: it took the
    # replicas it found for its own write, not for someone else's change to respect.
    assert external_rescales(servers.k8s, "kill-actuator-after-write") == []


@pytest.mark.filterwarnings("ignore::Warning:statsmodels")
def test_a_snapshot_published_again_after_a_publisher_crash_is_decided_once(
        servers: Stack, reference: Run) -> None:
    run = run_case(servers, "kill-publisher", KillPublisher(strike_at(reference)))
    assert run.duplicate_snapshots == 1  # the window published again was dropped by the stream
    assert run.restarts == {}
    assert_one_event_per_interval_in_order(run)
    assert_as_undisturbed(run, reference)


@pytest.mark.filterwarnings("ignore::Warning:statsmodels")
@pytest.mark.parametrize("in_flight", [False, True])
def test_a_nats_server_restart_mid_run_loses_and_repeats_nothing(
        servers: Stack, reference: Run, in_flight: bool) -> None:
    name = f"restart-nats-{'in-flight' if in_flight else 'between'}"
    run = run_case(servers, name, RestartNats(strike_at(reference), in_flight))
    assert run.restarts == {}
    assert run.reconnects == dict.fromkeys(SERVICES, 1)  # each service lost the server once
    assert_one_event_per_interval_in_order(run)
    assert_as_undisturbed(run, reference)


@pytest.mark.filterwarnings("ignore::Warning:statsmodels")
@pytest.mark.parametrize(("kind", "count", "method"), [
    ("500", KUBE_ATTEMPTS - 1, None),  # reads and writes fail; the client retries through
    ("409", 3, "PATCH"),  # the write conflicts; the actuator reads again and writes again
    ("timeout", 2, None),  # no answer within the client's timeout; retried
])
def test_kubernetes_errors_within_the_retries_change_nothing(
        servers: Stack, reference: Run, kind: str, count: int, method: str | None) -> None:
    name = f"kube-{kind}"
    fault = KubeFault(strike_at(reference), name, kind, count=count, method=method)
    run = run_case(servers, name, fault)
    assert fault.fault is not None and fault.fault.served == count  # it did strike
    assert run.restarts == {}
    assert_one_event_per_interval_in_order(run)
    assert_as_undisturbed(run, reference)


@pytest.mark.filterwarnings("ignore::Warning:statsmodels")
def test_a_kubernetes_outage_longer_than_the_retries_fails_those_intervals_only(
        servers: Stack, reference: Run) -> None:
    at, intervals = strike_at(reference), 3
    fault = KubeFault(at, "kube-outage", "500", intervals=intervals)
    run = run_case(servers, "kube-outage", fault)
    assert run.restarts == {}
    assert_one_event_per_interval_in_order(run)
    after = at + intervals
    # Up to the outage, as undisturbed; during it, each interval's target that needs a change
    # gets one FAILED event (one that asks for what the watch cache last showed needs no call:
    # UNCHANGED), and the cluster keeps what it had.
    assert decisions(run)[:at + 1] == decisions(reference)[:at + 1]
    during = [e.outcome for e in run.log.events[at:after]]
    assert during[0] is Outcome.FAILED
    assert set(during) <= {Outcome.FAILED, Outcome.UNCHANGED}
    assert all(e.outcome in APPLIED for e in run.log.events[:at] + run.log.events[after:])
    assert run.records[:at] == reference.records[:at]
    assert {r[:2] for r in run.records[at:after]} == {run.records[at - 1][:2]}
    assert set(run.dgd[at:after]) == {run.dgd[at - 1]}
    # The missing data is the outage's applications, nothing else: the first target after it
    # is applied, and from then on the cluster follows the undisturbed run again.
    first = run.log.events[after]
    assert run.dgd[after] == (first.prefill.to, first.decode.to)
    assert run.dgd[after:] == reference.dgd[after:]
    assert [r[:2] for r in run.records[after:]] == [r[:2] for r in reference.records[after:]]


def external_rescales(k8s: srv.KubeApiServer, name: str) -> list[str]:
    """The "changed by someone else" Events recorded on the DGD ``name``."""
    found = []
    for rt in (srv.EVENTS, srv.EVENTS_V1):
        for event in k8s.objects_of(rt, NS):
            regarding = event.get("regarding") or event.get("involvedObject") or {}
            if event.get("reason") == "ExternalRescale" and regarding.get("name") == name:
                found.append(str(event.get("note") or event.get("message")))
    return found


async def test_an_actuator_started_after_an_unreported_write_is_not_held_by_it() -> None:
    """The previous actuator wrote a target and died before its ScaleEvent; the next target
    arrives before the old one is delivered again. Restored from the stream's last ScaleEvent
    alone, the new actuator took the write for someone else's and held the role for
    ``external_change_hold_s``; the last target, restored as unconfirmed, says it is its own."""
    with srv.running() as server:
        server.add(srv.DGDS, dgd("llama", 1, 1))
        clock = Clock()
        first = assemble(kube_for(server), dynamo_mapping()).actuator
        reported = await first.handle(target(2, 2, T0 + 60, id="t1"), clock())
        assert reported is not None and reported.outcome is Outcome.APPLIED
        unreported = target(3, 1, T0 + 120, id="t2")

        def written_by_the_dead_actuator(dgd_obj: JSON) -> None:
            services = dgd_obj["spec"]["services"]
            services["VllmPrefillWorker"]["replicas"] = unreported.prefill_replicas
            services["VllmDecodeWorker"]["replicas"] = unreported.decode_replicas

        server.mutate(srv.DGDS, "prod", "llama", written_by_the_dead_actuator,
                      run_controller=True)
        following = target(1, 3, T0 + 180, id="t3")

        events_only = assemble(kube_for(server), dynamo_mapping()).actuator
        events_only.restore(reported)
        held = await events_only.handle(following, clock.advance(60))
        assert held is not None and held.outcome is Outcome.REFUSED
        assert "someone else" in (held.reason or "")

        restored = assemble(kube_for(server), dynamo_mapping()).actuator
        restored.restore(reported)
        restored.restore_unconfirmed(unreported)
        applied = await restored.handle(following, clock())
        assert applied is not None and applied.outcome is Outcome.APPLIED, applied
        replicas = server.get(srv.DGDS, "prod", "llama")["spec"]["services"]
        assert (replicas["VllmPrefillWorker"]["replicas"],
                replicas["VllmDecodeWorker"]["replicas"]) == (1, 3)


# ----------------------------------------------------------------------------- the server's faults


def test_the_api_server_fails_every_matching_request_for_a_period_and_loses_responses() -> None:
    with srv.running(timeout_delay_s=0.5) as server:
        server.add(srv.DGDS, dgd("llama", 1, 1, namespace=NS))
        custom = client.CustomObjectsApi(api_client(server))

        def read() -> JSON:
            result = custom.get_namespaced_custom_object(
                "nvidia.com", "v1alpha1", NS, DGD_PATH, "llama")
            assert isinstance(result, dict)
            return result

        fault = server.inject("500", for_s=0.5, path_contains=f"{DGD_PATH}/llama")
        for _ in range(3):  # not a count: every request until the period ends
            with pytest.raises(ApiException) as error:
                read()
            assert error.value.status == 500
        time.sleep(0.6)
        assert read()["metadata"]["name"] == "llama"
        assert fault.served == 3

        struck: list[int] = []
        server.inject("lost-response", method="PATCH", on_strike=lambda: struck.append(1))
        patch = {"spec": {"services": {"VllmDecodeWorker": {"replicas": 4}}}}
        with pytest.raises(urllib3.exceptions.ReadTimeoutError):
            custom.patch_namespaced_custom_object(
                "nvidia.com", "v1alpha1", NS, DGD_PATH, "llama", patch, _request_timeout=0.2)
        assert struck == [1]
        # The write landed although its answer never came.
        assert read()["spec"]["services"]["VllmDecodeWorker"]["replicas"] == 4
        assert [r.status for r in server.writes()] == [200]
        server.inject("409", count=100)
        server.clear_faults()
        assert read()["spec"]["services"]["VllmDecodeWorker"]["replicas"] == 4
