"""The decider core decides the same whichever of two parallel services' messages comes first:
a ScaleEvent of interval k (from the actuator) and forecast k (from the forecaster)."""

from __future__ import annotations

from services.decider.core import MAX_DEFERRED_EVENTS
from services.decider.policies.contract import PolicyState
from shared.messages import ReplicaTarget, ScaleEvent
from tests.test_slaplanner_policy_support import (
    LLAMA,
    forecast,
    make_decider,
    scale_event,
    snapshot,
)

RAMP = [1800.0 * 1.4**j for j in range(6)]  # a rising forecast: the lookahead's length matters


def run(event_first: bool, event: ScaleEvent) -> tuple[ReplicaTarget, ReplicaTarget, PolicyState]:
    """Forecast 0 decided; the actuator raised prefill 3 -> 5 at t=0; at t=60 the snapshot still
    counts 3 ready, while the actuator, a moment later, already saw 5 (``event``). Then forecast
    60 and, one interval on, forecast 120."""
    decider = make_decider(no_correction=True, worker_startup_s=180.0)
    decider.decide(forecast(0, RAMP, observed=snapshot(0, prefill=3, decode=3)))
    decider.on_scale_event(scale_event(0, (3, 5, 3), (3, 3, 3)))
    if event_first:
        decider.on_scale_event(event)
    planned = decider.decide(forecast(60, RAMP, observed=snapshot(60, prefill=3, decode=3)))
    if not event_first:
        decider.on_scale_event(event)
    later = decider.decide(forecast(120, RAMP, observed=snapshot(120, prefill=5, decode=3)))
    state = decider.state_of(LLAMA)
    assert state is not None
    return planned, later, state


def test_a_scale_event_before_or_after_its_intervals_forecast_gives_the_same_targets() -> None:
    event = scale_event(60, (5, 5, 5), (3, 3, 3))  # the start of t=0 is ready: 60 s
    reference = run(event_first=False, event=event)
    raced = run(event_first=True, event=event)
    assert [t.model_dump() for t in raced[:2]] == [t.model_dump() for t in reference[:2]]
    assert raced[2] == reference[2]
    planned, later, _ = reference
    # Planned at t=60 with the configured 180 s; the 60 s start is learnt for t=120 on.
    assert planned.explanation["startup"]["startup_s"] == 180.0
    assert later.explanation["startup"]["source"] == "learnt"
    assert later.explanation["startup"]["recent_samples_s"] == [60.0]


def test_learning_the_start_before_planning_would_have_changed_the_numbers() -> None:
    """Why the order matters: the same news dated one second earlier (an event of the previous
    interval, which is learnt at once) shortens the lookahead of the t=60 decision."""
    reference, _, _ = run(event_first=False, event=scale_event(60, (5, 5, 5), (3, 3, 3)))
    earlier, _, _ = run(event_first=True, event=scale_event(59, (5, 5, 5), (3, 3, 3)))
    assert earlier.explanation["startup"]["startup_s"] == 59.0
    assert (earlier.prefill_replicas, earlier.decode_replicas) != (
        reference.prefill_replicas, reference.decode_replicas
    )


def test_a_waiting_event_is_learnt_at_a_later_snapshot_if_no_forecast_comes() -> None:
    decider = make_decider(no_correction=True, worker_startup_s=180.0)
    decider.decide(forecast(0, RAMP, observed=snapshot(0, prefill=3, decode=3)))
    decider.on_scale_event(scale_event(0, (3, 5, 3), (3, 3, 3)))
    event = scale_event(60, (5, 5, 5), (3, 3, 3))
    decider.on_scale_event(event)
    decider.on_scale_event(event)  # redelivered: waits once
    assert decider.deferred_events(LLAMA) == (event,)
    decider.on_snapshot(snapshot(60, 300.0, prefill=3, decode=3, window_s=5.0))
    assert decider.deferred_events(LLAMA) == (event,)  # its own interval's snapshot: still waits
    decider.on_snapshot(snapshot(65, 300.0, prefill=5, decode=3, window_s=5.0))
    assert decider.deferred_events(LLAMA) == ()
    after = decider.decide(forecast(120, RAMP, observed=snapshot(120, prefill=5, decode=3)))
    assert after.explanation["startup"]["recent_samples_s"] == [60.0]


def test_events_waiting_for_ever_are_bounded_and_learnt_not_dropped() -> None:
    decider = make_decider(no_correction=True)
    events = [scale_event(t, (3, 3, 3), (3, 3, 3)) for t in range(MAX_DEFERRED_EVENTS + 3)]
    for event in events:
        decider.on_scale_event(event)
    assert decider.deferred_events(LLAMA) == tuple(events[3:])
