"""The slaplanner policy through the decider core, as timelines: each step is a message at
``T0 + t`` and the replicas the decider answers with."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from services.decider.core import Decider
from services.decider.policies.slaplanner import sizing
from shared.messages import Outcome, ReplicaTarget
from tests.test_slaplanner_policy_support import (
    LLAMA,
    PROFILE,
    T0,
    config,
    forecast,
    make_decider,
    scale_event,
    snapshot,
)


def counts(target: ReplicaTarget | None) -> tuple[int, int] | None:
    return None if target is None else (target.prefill_replicas, target.decode_replicas)


def test_a_burst_is_met_by_the_fast_path_before_the_next_forecast() -> None:
    decider = make_decider(no_correction=True)
    # t=0: 30 requests/s, ISL 3000, TTFT 100 ms: 1.82 erlangs of prefill -> 6 engines, 3 decode
    assert counts(decider.decide(forecast(0, 1800.0, observed=snapshot(0, prefill=6, decode=3)))) \
        == (6, 3)
    # t=5: 750 requests in 5 s (150/s; lower 90 % bound 143/s) -> 14 prefill wanted; one step
    # may add max(4, 100 % of 6) = 6 -> 12; decode 3 + 4 = 7
    burst = decider.on_snapshot(snapshot(5, 750.0, prefill=6, decode=3, window_s=5.0))
    assert counts(burst) == (12, 7)
    assert burst is not None and burst.id != decider.decide(forecast(0, 1800.0)).id
    why = burst.explanation
    assert why["trigger"] == "fast_path" and why["prefill_bound_by"] == "step_limit_up"
    assert {"fast_path", "step_limit"} <= set(why["rules"])
    assert "needs 14 prefill replicas, 6 requested" in why["fast_path"]["prefill"]["triggers"][0]
    # t=10: the burst goes on: the next step reaches the need (rate over the last 10 s)
    assert counts(decider.on_snapshot(snapshot(10, 750.0, prefill=6, decode=3, window_s=5.0))) \
        == (14, 10)
    # t=15: nothing more is needed: no target at all
    assert decider.on_snapshot(snapshot(15, 750.0, prefill=6, decode=3, window_s=5.0)) is None
    # t=60: the planning decision sees the burst too and does not undo the fast path
    planned = decider.decide(forecast(60, 9000.0, observed=snapshot(60, 9000.0, 6, 3)))
    assert planned.prefill_replicas >= 14 and planned.decode_replicas >= 10


def test_a_slow_ramp_is_planned_at_now_plus_startup_and_never_scaled_down() -> None:
    decider = make_decider(no_correction=True, worker_startup_s=180.0)
    history: list[tuple[int, int]] = []
    for k in range(10):
        # the forecast rises 10 % a window; the lookahead covers now + 180 s + 60 s: 4 steps
        ramp = [1200.0 * 1.1 ** (k + j) for j in range(5)]
        target = decider.decide(forecast(60.0 * k, ramp))
        history.append((target.prefill_replicas, target.decode_replicas))
        why = target.explanation
        assert why["load"]["forecast_steps_used"] == 4
        # sized for the busiest step, the last: the replicas asked for now serve from then on
        assert target.prefill_replicas == why["load"]["steps"][3]["prefill_replicas"]
        assert why["load"]["steps"][0]["prefill_replicas"] <= target.prefill_replicas
        assert "lookahead" in why["rules"]
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(history))
    assert history[-1][0] > history[0][0]


def test_a_drop_and_a_rebound_inside_the_stabilisation_window_do_not_flap() -> None:
    decider = make_decider(no_correction=True, scale_down_window_s="300s")  # down by max(1, 50 %)
    timeline = [
        (0, 3600.0, (8, 5), "queueing_model"),  # 60 requests/s
        (60, 300.0, (8, 5), "scale_down_stabilised"),  # 5/s needs 3 + 2: held
        (120, 300.0, (8, 5), "scale_down_stabilised"),
        (180, 3600.0, (8, 5), "queueing_model"),  # the rebound finds its replicas there
        (240, 300.0, (8, 5), "scale_down_stabilised"),
        (480, 300.0, (8, 5), "scale_down_stabilised"),  # t=180's 8 is 300 s old: still in
        (540, 300.0, (4, 3), "step_limit_down"),  # out of the window; down by 50 % at most
        (600, 300.0, (3, 2), "queueing_model"),  # and to the need
    ]
    for t, requests, expected, bound_by in timeline:
        target = decider.decide(forecast(t, requests))
        assert (t, counts(target)) == (t, expected)
        assert target.explanation["prefill_bound_by"] == bound_by
        if t == 480:  # held by t=180's 8: the window lets go 300 s after it
            assert target.explanation["stabilisation"]["prefill_release_at_s"] == T0 + 480.0


def test_a_budget_that_binds_on_one_role_takes_from_the_role_that_costs_least() -> None:
    decider = make_decider(no_correction=True, max_total_gpus=20)
    # 200/s of 3000-token prompts with 20-token answers: prefill needs 18, decode 2
    target = decider.decide(
        forecast(0, 12_000.0, osl=20.0, observed=snapshot(0, 12_000.0, osl=20.0))
    )
    assert counts(target) == (18, 2)  # 20 GPUs: fits
    tight = make_decider(no_correction=True, max_total_gpus=16)
    target = tight.decide(forecast(0, 12_000.0, osl=20.0, observed=snapshot(0, 12_000.0, osl=20.0)))
    # 16 GPUs: the split with the best predicted attainment gives 3 from prefill, 1 from decode
    assert counts(target) == (15, 1)
    why = target.explanation
    assert why["prefill_bound_by"] == "gpu_budget_sla_split"
    budget = why["gpu_budget"]
    assert budget["binds"] and budget["final_gpus"] == 16
    assert set(budget["short_of_wanted"]) == {"prefill", "decode"}
    assert "16 GPUs cannot hold 18 prefill + 2 decode" in budget["why"]
    assert "budget" in why["rules"]


def test_a_worker_slower_to_start_than_configured_stretches_the_lookahead() -> None:
    decider = make_decider(no_correction=True, worker_startup_s=60.0)
    steps = [1800.0] * 8

    def startup_at(t: float, ready: int) -> dict[str, Any]:
        target = decider.decide(forecast(t, steps, observed=snapshot(t, prefill=ready, decode=3)))
        return target.explanation["startup"] | {"steps": target.explanation["load"][
            "forecast_steps_used"]}

    assert startup_at(0, 3)["startup_s"] == 60.0  # configured: now + 60 s + one window: 2 steps
    # t=0: the actuator raised prefill from 3 to 5; 3 are ready
    decider.on_scale_event(scale_event(0, (3, 5, 3), (3, 3, 3)))
    seen = startup_at(60, 3)  # 60 s later: not ready yet, as long as configured
    assert (seen["source"], seen["startup_s"]) == ("configured", 60.0)
    seen = startup_at(120, 3)  # 120 s: longer than configured; the pending start says so
    assert (seen["source"], seen["startup_s"], seen["steps"]) == ("pending", 120.0, 3)
    seen = startup_at(300, 5)  # ready after 300 s: learnt
    assert (seen["source"], seen["startup_s"], seen["steps"]) == ("learnt", 300.0, 6)
    assert seen["recent_samples_s"] == [300.0]


def test_replicas_already_starting_are_not_asked_for_twice() -> None:
    decider = make_decider(no_correction=True)
    decider.decide(forecast(0, 1800.0, observed=snapshot(0, prefill=6, decode=3)))  # (6, 3)
    slow_queue = {"ttft_p99_s": 2.0, "ttft_avg_s": 0.5}
    # t=5: queue long (40 waiting x 0.06 s / 6 engines = 0.4 s to clear > 0.04 s) and growing
    first = decider.on_snapshot(
        snapshot(5, 150.0, 6, 3, window_s=5.0, requests_waiting=40.0, **slow_queue)
    )
    assert counts(first) == (7, 3)  # one more engine
    # t=10: the queue still grows, but the seventh engine is on the way: nothing asked
    assert decider.on_snapshot(
        snapshot(10, 150.0, 6, 3, window_s=5.0, requests_waiting=60.0, **slow_queue)
    ) is None
    # t=185: it is ready and the queue still grows: one more
    again = decider.on_snapshot(
        snapshot(185, 150.0, 7, 3, window_s=5.0, requests_waiting=80.0, **slow_queue)
    )
    assert counts(again) == (8, 3)


def test_two_requests_with_a_huge_latency_barely_move_the_corrections() -> None:
    decider = make_decider()
    prefill_s = PROFILE.prefill.ttft_s(3000.0)
    profiled = {"ttft_avg_s": prefill_s * 1.02, "itl_avg_s": 0.0056}
    first = decider.decide(forecast(0, 1800.0, observed=snapshot(0, 1800.0, 5, 3, **profiled)))
    before = first.explanation["correction"]
    spike = snapshot(60, 2.0, 5, 3, ttft_avg_s=30.0, itl_avg_s=1.0)
    second = decider.decide(forecast(60, 1800.0, observed=spike))
    after = second.explanation["correction"]
    # each observation clamps to 3; the factor already weighs >= 50 requests: it moves by at
    # most 2 / 52 of the distance to 3. Prefill's is not even moved: no engine slowdown up to
    # 3x explains a 30 s TTFT at this load, so the window is read as a backlog
    for role in ("prefill", "decode"):
        moved = after[f"{role}_factor"] - before[f"{role}_factor"]
        assert 0 <= moved <= 2 / 52 * (3.0 - before[f"{role}_factor"]) + 1e-9
    assert after["decode_factor"] > before["decode_factor"]
    assert "backlog" in after["prefill"]["note"]
    assert counts(second) == counts(first)


def test_stale_or_missing_load_holds_the_last_target_and_says_why() -> None:
    decider = make_decider(no_correction=True)
    assert counts(decider.decide(forecast(0, 3600.0))) == (8, 5)
    stale = snapshot(60, 600.0, 8, 5, stale=True, gaps={"num_requests": "prometheus down"})
    held = decider.decide(forecast(60, 600.0, observed=stale))
    assert counts(held) == (8, 5) and held.explanation["held"]
    assert held.explanation["hold_reason"] == "held_stale_metrics"
    assert "prometheus down" in held.explanation["hold_detail"]
    missing = snapshot(120, None, 8, 5, gaps={"num_requests": "no such series"})
    held = decider.decide(forecast(120, 600.0, observed=missing))
    assert counts(held) == (8, 5) and held.explanation["hold_reason"] == "held_missing_metrics"
    assert "num_requests (no such series)" in held.explanation["hold_detail"]


def test_missing_latencies_while_requests_flow_let_the_deployment_grow_but_not_shrink() -> None:
    decider = make_decider()  # corrections on: they need TTFT and ITL
    assert counts(decider.decide(forecast(0, 3600.0))) == (8, 5)
    quiet = decider.decide(forecast(400, 600.0, observed=snapshot(400, 600.0, 8, 5)))
    assert counts(quiet) == (8, 5) and "ttft_avg_s" in quiet.explanation["no_shrink"]
    busy = decider.decide(forecast(460, 7200.0, observed=snapshot(460, 7200.0, 8, 5)))
    assert busy.prefill_replicas > 8


def test_scale_to_zero_after_the_idle_cooldown_and_back_at_the_first_request() -> None:
    decider = make_decider(no_correction=True, scale_to_zero=True, min_endpoint=0,
                           scale_to_zero_idle_s=600.0, scale_down_window_s="300s")
    assert counts(decider.decide(forecast(0, 600.0))) == (4, 1)
    idle: dict[str, Any] = {"requests": 0.0, "requests_waiting": 0.0, "requests_running": 0.0}
    # the need drops to the floor (1, 1) at once; stabilisation and step limits bring the
    # replicas down; 600 s after the last request both roles go to zero
    timeline = [(300, (4, 1)), (540, (2, 1)), (599, (1, 1)), (600, (0, 0)), (660, (0, 0))]
    for t, expected in timeline:
        target = decider.decide(forecast(t, 0.0, observed=snapshot(t, **idle)))
        assert (t, counts(target)) == (t, expected)
    assert target.explanation["prefill_bound_by"] == "scale_to_zero"
    # t=665: one request queued: straight back to the minimum, between planning intervals
    woken = decider.on_snapshot(snapshot(665, 0.0, 0, 0, window_s=5.0, requests_waiting=1.0))
    assert counts(woken) == (1, 1)
    assert woken is not None and woken.explanation["trigger"] == "wake_from_zero"
    assert decider.decide(forecast(720, 60.0)).prefill_replicas >= 1


def test_a_restarted_decider_does_not_scale_down_before_one_window() -> None:
    decider = make_decider(no_correction=True, scale_down_window_s="300s")  # knows nothing of it
    timeline = [(0, (8, 4)), (240, (8, 4)), (300, (8, 4)), (360, (4, 2))]
    for t, expected in timeline:
        target = decider.decide(forecast(t, 600.0, observed=snapshot(t, 600.0, 8, 4)))
        assert (t, counts(target)) == (t, expected)
    first = make_decider(no_correction=True).decide(
        forecast(0, 600.0, observed=snapshot(0, 600.0, 8, 4))
    )
    assert first.explanation["stabilisation"]["seeded_with_current"] is True


def test_ratio_bounds_move_both_sets_together_and_are_named() -> None:
    decider = make_decider(no_correction=True, max_prefill_decode_ratio=1.5)
    target = decider.decide(forecast(0, 3600.0))  # needs 8 prefill, 4 decode
    assert counts(target) == (8, 6)  # ceil(8 / 1.5) = 6
    assert target.explanation["decode_bound_by"] == "prefill_decode_ratio_max"
    assert "ratio" in target.explanation["rules"]


def test_the_explanation_names_every_rule_and_is_plain_json() -> None:
    decider = make_decider(no_correction=True, load_confidence=0.9)
    target = decider.decide(forecast(0, 1800.0, upper=2400.0))
    why = target.explanation
    assert why["policy"] == "slaplanner" and why["held"] is False
    assert {"queueing", "itl_curve", "quantile"} <= set(why["rules"])
    assert why["load"]["num_requests"] == pytest.approx(2400.0)  # the upper quantile at 0.9
    assert why["prefill"]["model"].startswith("GI/G/c")
    assert why["decode"]["model"].startswith("Little's law")
    assert ReplicaTarget.from_json(target.to_json()) == target


def test_scale_events_are_learnt_once_per_id_and_ignored_by_dynamo() -> None:
    decider = make_decider(no_correction=True)
    event = scale_event(0, (2, 4, 2), (2, 2, 2))
    decider.on_scale_event(event)
    state = decider.state_of(LLAMA)
    decider.on_scale_event(event)
    assert decider.state_of(LLAMA) == state
    dynamo = make_decider(policy="dynamo")
    dynamo.on_scale_event(event)
    assert dynamo.state_of(LLAMA) is None
    assert dynamo.on_snapshot(snapshot(5, 9000.0, 1, 1, window_s=5.0)) is None
    refused = scale_event(60, (2, 9, 2), (2, 2, 2), outcome=Outcome.REFUSED)
    decider.on_scale_event(refused)  # nothing started: no clock


def test_a_redelivered_snapshot_gets_the_same_answer() -> None:
    decider: Decider = make_decider(no_correction=True)
    decider.decide(forecast(0, 1800.0, observed=snapshot(0, prefill=5, decode=3)))
    burst = snapshot(5, 750.0, 5, 3, window_s=5.0)
    first = decider.on_snapshot(burst)
    state = decider.state_of(LLAMA)
    assert decider.on_snapshot(burst) == first and decider.state_of(LLAMA) == state
    assert first is not None and first.window_end == T0 + 5


def test_the_arrival_burstiness_of_short_snapshots_is_measured_and_used() -> None:
    decider = make_decider(no_correction=True)
    decider.decide(forecast(0, 1800.0, observed=snapshot(0, prefill=5, decode=3)))
    for k in range(1, 12):  # bunched arrivals: 0 or 300 requests every other 5 s
        decider.on_snapshot(snapshot(5 * k, 300.0 * (k % 2), 5, 3, window_s=5.0))
    why = decider.decide(forecast(60, 1800.0)).explanation["variability"]
    assert why["arrival_source"] == "measured" and why["arrival_cv2"] > 1.0
    assert sizing.DEFAULT_ARRIVAL_CV2 == 1.0


def test_the_budget_is_never_exceeded_by_the_fast_path() -> None:
    decider = make_decider(no_correction=True, max_total_gpus=12)
    decider.decide(forecast(0, 1800.0, observed=snapshot(0, prefill=5, decode=3)))
    burst = decider.on_snapshot(snapshot(5, 750.0, 5, 3, window_s=5.0))
    assert burst is not None and burst.prefill_replicas + burst.decode_replicas <= 12
    assert burst.explanation["gpu_budget"]["binds"]
    assert config(max_total_gpus=12).max_total_gpus == 12


def test_a_load_without_a_forecast_or_an_observation_is_sized_and_says_nothing_was_held() -> None:
    from services.decider.policies import slaplanner as slaplanner_policy
    from services.decider.policies.contract import PlannedLoad, PolicyState

    decision = slaplanner_policy.decide(
        PlannedLoad(1800, 3000, 300, 60), None, PROFILE, config(), PolicyState()
    )
    assert (decision.prefill_replicas, decision.decode_replicas) == (6, 3)
    assert "nothing to hold" in decision.explanation["note"]


def test_bunched_arrivals_are_not_read_as_slow_engines_when_the_ttft_p90_says_otherwise() -> None:
    # 1,800 requests in a minute on 5 engines (36 % busy): Poisson arrivals would hardly queue,
    # yet the mean TTFT is twice the prefill time. Bunched arrivals or engines twice as slow? The
    # p90 answers: 90 % of first tokens came within 1.15 x the prefill time, and no TTFT is
    # shorter than its prefill, so the engines are at most 1.15 x slower.
    prefill_s = PROFILE.prefill.ttft_s(3000.0)
    window = {"ttft_avg_s": 2 * prefill_s, "itl_avg_s": 0.0056, "isl_p90": 3000.0}
    seen_p90 = make_decider(ttft_target_s=0.5)
    no_p90 = make_decider(ttft_target_s=0.5)
    capped = seen_p90.decide(forecast(0, 1800.0, observed=snapshot(
        0, 1800.0, 5, 3, ttft_p90_s=1.15 * prefill_s, **window)))
    uncapped = no_p90.decide(forecast(0, 1800.0, observed=snapshot(0, 1800.0, 5, 3, **window)))
    observed = capped.explanation["correction"]["prefill"]
    assert observed["slowdown_cap"] == pytest.approx(1.15)
    assert observed["capped_from"] > 1.6  # the mean-TTFT model alone: some wait, the rest slow
    assert 1.0 < capped.explanation["correction"]["prefill_factor"] <= 1.15
    assert uncapped.explanation["correction"]["prefill_factor"] > 1.4
    # the need (before stabilisation holds the 5 running): fewer engines for the same load
    need = [t.explanation["load"]["steps"][0]["prefill_replicas"] for t in (capped, uncapped)]
    assert need[0] < need[1]


def _steady_then_drop(miss_at: float | None) -> list[tuple[int, int, str, bool]]:
    """60 requests/s for 300 s, forecast with an upper quantile 10 % above (exceeded at
    ``miss_at``), then 10/s with its upper quantile at 11.7/s."""
    decider = make_decider(no_correction=True)  # lookahead: 180 s startup + 60 s = 4 steps
    answers = []
    current = (8, 4)
    for t in range(0, 540, 60):
        seen = 600.0 if t >= 360 else 3600.0
        if t == miss_at:
            seen = 4200.0  # above every upper quantile forecast for this window
        point = 600.0 if t >= 360 else 3600.0
        target = decider.decide(forecast(
            t, point, upper=point * (1.17 if t >= 360 else 1.1),
            observed=snapshot(t, seen, prefill=current[0], decode=current[1]),
        ))
        current = counts(target) or current
        why = target.explanation
        answers.append((*current, why["prefill_bound_by"], why["load"]["forecast_band_trusted"]))
    return answers


def test_a_drop_goes_through_the_window_when_the_forecast_band_has_held() -> None:
    held = _steady_then_drop(miss_at=None)
    # t=0-300: the band (upper 3960 a window) is never exceeded; t=360: the load drops to 10/s
    # and its upper quantile over the whole lookahead needs 4 prefill + 2 decode: the window's
    # 8 + 5 are not held; prefill falls to its need at once (50 % of 8), decode by the step
    # limit (trusted from t=240 on: four windows checked, a lookahead's worth)
    assert held[:6] == [(8, 5, "queueing_model", t >= 240) for t in range(0, 360, 60)]
    assert held[6:] == [(4, 3, "queueing_model", True), (4, 2, "queueing_model", True),
                        (4, 2, "queueing_model", True)]


def test_a_drop_is_held_by_the_window_when_the_forecast_band_was_exceeded() -> None:
    answers = _steady_then_drop(miss_at=240)
    # t=240's 4200 requests exceeded the band forecast for it: the upper quantile is not
    # trusted to release capacity for the next 300 s, and the HPA's window holds the 8 + 5
    assert answers[6:] == [(8, 5, "scale_down_stabilised", False)] * 3
