"""A decider killed with SIGKILL and started again decides as one that never stopped: it restores
each deployment's memory (stabilisation window, corrections, startup learning) by replaying the
inputs the stream holds, publishing nothing for them.

The reference is the decider's core fed the same inputs in process, undisturbed. The decider
under test is a real process on a real nats-server, fed in lockstep (each interval's snapshot,
forecast and ScaleEvent, then wait until it has handled them), killed after the target of one
interval and started again. Load rises, holds and falls shortly before the kill, so that the
scale-down stabilisation window is what the restart would forget.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.decider import restore, service
from services.decider.core import Decider
from services.decider.knobs import knob_environment
from shared import bus
from shared.messages import Envelope, LoadForecast, MetricSnapshot, ReplicaTarget, ScaleEvent
from shared.service_settings import ServiceSettings
from tests.conftest import NatsEndpoint, ServiceProcess, until
from tests.test_slaplanner_policy_support import (
    LLAMA,
    WINDOW_S,
    forecast,
    make_decider,
    scale_event,
    settings,
    snapshot,
)

STREAM = "SLAPLANNER"
# The load per interval: low, a ramp to a plateau, and a fall just after the kill, which the
# scale-down window must still hold back.
LOAD = [600.0] * 10 + [1500.0, 3000.0] + [4000.0] * 3 + [900.0] * 8
KILL_AFTER = 14  # the interval whose target is the last before SIGKILL
# Workers that start in one interval, as the simulated actuator reports them (what is learnt
# equals what is configured), and corrections that forget within a few minutes. The horizon
# these give is 8 intervals, so the replay after KILL_AFTER intervals really is cut.
KNOBS = {"worker_startup_s": WINDOW_S, "correction_half_life_s": 60.0,
         "scale_down_window_s": 300.0, "sla_feedback_window_s": 300.0}
HORIZON_S = restore.replay_horizon_s(settings(**KNOBS).knobs())
# Generous: a busy 2-core machine; a healthy interval takes well under a second.
INTERVAL_TIMEOUT_S = 60.0
# The decider's durable, made before it starts with a short ack wait: a message the killed
# instance took without acking comes back after this, not the service's minute.
ACK_WAIT_S = 3.0


def test_the_replay_horizon_follows_the_knobs() -> None:
    # the SLA feedback's 30 min window outlasts the rest, plus the 60 s interval
    assert restore.replay_horizon_s(settings().knobs()) == 1860.0
    quiet = {"sla_feedback": False}
    # without it: the hold (180 s startup + 60 s) + 240 s lookahead + the 60 s interval
    assert restore.replay_horizon_s(settings(**quiet).knobs()) == 540.0
    assert restore.replay_horizon_s(settings(scale_down_window_s=900.0, **quiet).knobs()) == 1200.0
    # 4 half-lives of 240 s outlast the window and the lookahead: 960 + 60
    assert restore.replay_horizon_s(settings(correction_half_life_s=240.0, **quiet).knobs()) \
        == 1020.0
    assert restore.replay_horizon_s(settings(
        scale_to_zero=True, scale_to_zero_idle_s=1200.0, min_endpoint=0, **quiet
    ).knobs()) == 1260.0
    assert HORIZON_S == 300.0 + 60.0 + 60.0 + 60.0
    assert HORIZON_S < KILL_AFTER * WINDOW_S, "the test must cut the replay"


@dataclass
class Interval:
    """One interval's inputs, in the order the stream holds them."""

    inputs: list[MetricSnapshot | LoadForecast | ScaleEvent]


def reference_run() -> tuple[list[Interval], list[ReplicaTarget]]:
    """The inputs (the actuator's ScaleEvents apply each planned target) and the targets of a
    decider that never stops."""
    decider = make_decider(**KNOBS)
    applied = (1, 1)
    intervals, targets = [], []
    for k, load in enumerate(LOAD):
        t = k * WINDOW_S
        observed = snapshot(t, load, prefill=applied[0], decode=applied[1],
                            ttft_avg_s=0.06, itl_avg_s=0.008)
        inputs: list[MetricSnapshot | LoadForecast | ScaleEvent] = [observed]
        fast = decider.on_snapshot(observed)
        targets += [fast] if fast is not None else []
        planned_forecast = forecast(t, load, observed=observed)
        inputs.append(planned_forecast)
        planned = decider.decide(planned_forecast)
        targets.append(planned)
        new = (planned.prefill_replicas, planned.decode_replicas)
        event = scale_event(t, (applied[0], new[0], applied[0]), (applied[1], new[1], applied[1]))
        inputs.append(event)
        decider.on_scale_event(event)
        applied = new
        intervals.append(Interval(inputs))
    return intervals, targets


def window_end_of(k: int) -> float:
    return snapshot(k * WINDOW_S).window_end


def fresh_start(intervals: list[Interval]) -> list[ReplicaTarget]:
    """What a decider that starts empty after KILL_AFTER decides on the rest (the fault)."""
    decider: Decider = make_decider(**KNOBS)
    answers: list[Envelope] = []
    for interval in intervals[KILL_AFTER + 1:]:
        for message in interval.inputs:
            answers += restore.feed(decider, message)
    return [a for a in answers if isinstance(a, ReplicaTarget)]


async def read_targets(js: JetStreamContext) -> list[ReplicaTarget]:
    """Every target the stream holds, in order (duplicates the stream dropped are not there)."""
    sub = await js.pull_subscribe("slaplanner.target.>", stream=STREAM, config=ConsumerConfig(
        ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL))
    found: list[ReplicaTarget] = []
    try:
        while True:
            try:
                msgs = await sub.fetch(batch=256, timeout=1.0)
            except TimeoutError:
                return found
            found += [ReplicaTarget.from_json(m.data) for m in msgs]
    finally:
        await sub.unsubscribe()


async def handled_everything(js: JetStreamContext) -> bool:
    info = await js.consumer_info(STREAM, "decider")
    last = (await js.stream_info(STREAM)).state.last_seq
    return (info.num_pending == 0 and info.num_ack_pending == 0
            and info.ack_floor.stream_seq >= last - 1)  # the last may be the decider's own


@pytest.mark.filterwarnings("ignore::Warning:statsmodels")
async def test_a_decider_killed_mid_run_decides_after_restart_as_one_never_stopped(
    nats_server: NatsEndpoint, nc: NATS, services: dict[str, ServiceProcess]
) -> None:
    intervals, expected = reference_run()
    # The fault this guards against: an empty memory after the kill decides otherwise.
    after_kill = [t for t in expected if t.window_end > window_end_of(KILL_AFTER)]
    assert [(t.prefill_replicas, t.decode_replicas) for t in fresh_start(intervals)] != [
        (t.prefill_replicas, t.decode_replicas) for t in after_kill]

    js = nc.jetstream()
    await bus.ensure_stream(js, ServiceSettings(nats_url=[nats_server.url]))
    spec = bus.ConsumerSpec("decider", bus.DECIDER_FAMILIES)
    await js.add_consumer(STREAM, config=dataclasses.replace(spec.config(), ack_wait=ACK_WAIT_S))
    decider = services["decider"]
    decider.env |= knob_environment(settings(**KNOBS).knobs())
    decider.start()

    async def target_of(k: int) -> bool:
        return any(t.window_end == window_end_of(k) and t.forecast_id is not None
                   for t in await read_targets(js))

    for k, interval in enumerate(intervals):
        for message in interval.inputs:
            await bus.publish(js, message)
            if isinstance(message, LoadForecast):
                await until(lambda k=k: target_of(k), INTERVAL_TIMEOUT_S, f"target {k}")
        if k == KILL_AFTER:
            assert decider.process is not None
            decider.process.kill()  # SIGKILL: no drain, its last ack may be lost
            decider.process.wait()
            decider.start()
        else:
            await until(lambda: handled_everything(js), INTERVAL_TIMEOUT_S, f"interval {k}")
    await until(lambda: handled_everything(js), INTERVAL_TIMEOUT_S, "the last interval")
    await asyncio.sleep(ACK_WAIT_S + 1.0)  # anything taken and not acked came back by now

    published = await read_targets(js)
    assert [(t.id, t.window_end, t.prefill_replicas, t.decode_replicas) for t in published] == [
        (t.id, t.window_end, t.prefill_replicas, t.decode_replicas) for t in expected]
    assert all(t.deployment == LLAMA for t in published)
    assert "restored 1 deployments" in decider.log()




def test_the_replay_keeps_each_deployment_back_to_its_horizon_from_its_newest_input() -> None:
    # Horizon 480 s = 8 intervals: of 12 forecasts (t = 0 ... 660), those at 180 ... 660 stay
    # (660 - 480 = 180), whatever came between them for another deployment.
    replay = restore.Replay(lambda key: HORIZON_S)
    other = LLAMA.model_copy(update={"name": "other"})
    for k in range(12):
        replay.add(2 * k + 1, forecast(k * WINDOW_S))
        replay.add(2 * k + 2, forecast(k * WINDOW_S).model_copy(update={"deployment": other}))
    kept = [message.window_end - window_end_of(0) for _, message in replay.inputs[str(LLAMA)]]
    assert kept == [k * WINDOW_S for k in range(3, 12)]
    assert replay.count() == 2 * 9


async def test_a_replayed_message_delivered_again_gets_the_replays_answer_and_is_not_decided_twice(
) -> None:
    intervals, expected = reference_run()
    replay = restore.Replay(lambda key: HORIZON_S)
    sequence = 0
    for interval in intervals[:4]:
        for message in interval.inputs:
            sequence += 1
            replay.add(sequence, message)
    decider = make_decider(**KNOBS)
    held = replay.replay(decider, held_after=sequence - 3)  # interval 3: taken, not acked
    state = decider.state_of(LLAMA)
    snapshot_3, forecast_3, event_3 = intervals[3].inputs
    handlers = {route.model: route.handler for route in service.routes(decider, held)}

    async def answer(message: Envelope) -> list[Envelope]:
        published = await handlers[type(message)](message)
        assert published is not None  # handled, not handed back
        return list(published)

    assert await answer(forecast_3) == [
        t for t in expected if t.forecast_id == forecast_3.id]
    assert await answer(event_3) == []
    assert await answer(snapshot_3) == [
        t for t in expected if t.forecast_id is None and t.window_end == snapshot_3.window_end]
    assert decider.state_of(LLAMA) is state  # nothing learnt twice
    assert len(held) == 0
