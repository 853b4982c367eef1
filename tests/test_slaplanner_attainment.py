"""Planning v2's mechanisms one at a time: the prompt mix, engine speed from compute time, the
warm-up, decode at its own batch's ITL, the SLA feedback, the lookahead's binding step and the
hold window."""

from __future__ import annotations

import math
from itertools import pairwise
from statistics import NormalDist

import pytest

from services.decider.policies.slaplanner import attainment, memory, sizing
from services.decider.policies.slaplanner.load import binding_step, hold_window_s
from shared.messages import MetricSnapshot
from tests.test_slaplanner_policy_support import PROFILE, config, snapshot


def test_a_measured_mix_keeps_the_windows_mean_and_spreads_as_its_quantiles() -> None:
    mix = attainment.measured_mix(4000.0, 2500.0, 9000.0, 16000.0)
    assert mix.mean == pytest.approx(4000.0)
    assert mix.measured and len(mix.isl_tokens) == len(mix.weights)
    assert sum(mix.weights) == pytest.approx(1.0)
    # sigma from p90 / p50 = 3.6 and p99 / p50 = 6.4: between log(3.6)/1.28 and log(6.4)/2.33
    sigma = attainment.lognormal_sigma(2500.0, 9000.0, 16000.0)
    assert sigma is not None and math.log(6.4) / 2.33 < sigma < math.log(3.6) / 1.28
    assert attainment.measured_mix(3000.0, None, None, None).isl_tokens == (3000.0,)


def test_a_spread_of_prompts_needs_more_engines_than_their_mean_alone() -> None:
    knobs = config(ttft_target_s=0.5)
    alone = sizing.size_prefill(100.0, 3000.0, PROFILE, knobs, 1.0,
                                sizing.Variability(1.0, 0.0))
    mixed = sizing.size_prefill(100.0, 3000.0, PROFILE, knobs, 1.0, sizing.Variability(
        1.0, 0.0, attainment.lognormal_mix(1.0)))
    assert mixed.replicas > alone.replicas
    assert mixed.detail["predicted_ttft_miss_share"] <= sizing.ttft_miss_budget(knobs)


def test_bursty_arrivals_need_more_engines_than_poisson_ones() -> None:
    knobs = config(ttft_target_s=0.5)
    poisson = sizing.size_prefill(100.0, 3000.0, PROFILE, knobs, 1.0, sizing.Variability(1.0))
    bursty = sizing.size_prefill(100.0, 3000.0, PROFILE, knobs, 1.0, sizing.Variability(20.0))
    assert bursty.replicas > poisson.replicas


def test_prefill_speed_is_read_from_compute_time_whatever_the_queueing() -> None:
    profiled = PROFILE.prefill.ttft_s(3000.0)
    window = snapshot(60.0, prefill=2, decode=2, prefill_time_avg_s=1.2 * profiled,
                      ttft_avg_s=40 * profiled, requests_waiting=500.0)
    factor, detail = sizing.prefill_factor_from_compute_time(window, PROFILE, None)
    assert factor == pytest.approx(1.2)
    assert detail["profiled_prefill_time_s"] == pytest.approx(profiled)


def test_windows_right_after_new_workers_do_not_correct_the_profile() -> None:
    knobs = config()
    profiled = PROFILE.prefill.ttft_s(3000.0)
    mem = memory.PlannerMemory()
    mem = memory.observe(mem, snapshot(60.0, prefill=2, decode=2), 60.0)
    mem = memory.observe(mem, snapshot(120.0, prefill=3, decode=2), 120.0)  # a worker joins
    cold = snapshot(180.0, prefill=3, decode=2, prefill_time_avg_s=2.0 * profiled)
    mem, detail = memory.update_corrections(mem, cold, PROFILE, knobs, 180.0)
    assert mem.prefill_correction.factor == 1.0 and "warm-up" in detail["prefill"]["note"]
    warm = snapshot(300.0, prefill=3, decode=2, prefill_time_avg_s=1.3 * profiled)
    mem, _ = memory.update_corrections(mem, warm, PROFILE, knobs, 300.0)
    assert mem.prefill_correction.factor > 1.0


def test_decode_misses_fall_as_engines_are_added_and_the_sizing_meets_its_budget() -> None:
    knobs = config(itl_target_s=0.03)
    sized = sizing.size_decode(50.0, 3000.0, 300.0, PROFILE, knobs, 1.0)
    shares = sized.hurt(list(range(1, sized.replicas + 6)))
    assert all(a >= b for a, b in pairwise(shares))  # more engines never hurt more
    assert shares[sized.replicas - 1] <= sizing.itl_miss_budget(knobs)
    assert sized.replicas == 1 or shares[sized.replicas - 2] > sizing.itl_miss_budget(knobs)


def test_an_itl_measured_beyond_the_kv_cache_is_not_an_engine_speed() -> None:
    overfull = snapshot(60.0, requests=6000.0, prefill=2, decode=1, itl_avg_s=2.0)
    factor, detail = sizing.observed_decode_factor(overfull, PROFILE)
    assert factor is None and "KV cache" in detail["note"]


def shares_window(
    t: float, ttft_share: float, itl_share: float, requests: float = 1000.0
) -> MetricSnapshot:
    return snapshot(t, requests=requests, prefill=4, decode=4, ttft_under_target_share=ttft_share,
                    itl_under_target_share=itl_share, ttft_target_s=0.1, itl_target_s=0.01)


def test_the_sla_feedback_raises_at_once_waits_a_startup_and_relaxes_slowly() -> None:
    knobs = config(load_confidence=0.75, sla_feedback_step=0.5, sla_feedback_relax_per_hour=1.0)
    mem = memory.PlannerMemory()
    mem, detail = memory.observe_sla(mem, shares_window(60.0, 0.97, 1.0), knobs, 180.0)
    p, d = memory.planning_confidences(mem, knobs)
    assert detail["prefill"]["move"] == "raised" and p > 0.75
    assert d <= 0.75  # decode met its target: only prefill moves up
    # still short one interval later: held, the raise has not had a startup delay to show
    mem, detail = memory.observe_sla(mem, shares_window(120.0, 0.97, 1.0), knobs, 180.0)
    assert memory.planning_confidences(mem, knobs)[0] == pytest.approx(p)
    assert detail["prefill"]["move"].startswith("held")
    # clean windows after the raise could show: down, by at most one sigma per hour
    for step in range(1, 31):
        mem, detail = memory.observe_sla(mem, shares_window(240.0 + 60.0 * step, 1.0, 1.0),
                                         knobs, 180.0)
    relaxed = memory.planning_confidences(mem, knobs)[0]
    assert relaxed < p and detail["prefill"]["move"] == "relaxed"
    z_drop = NormalDist().inv_cdf(p) - NormalDist().inv_cdf(relaxed)
    assert z_drop <= 1.0 * (30 * 60.0 + 120.0) / 3600 + 1e-9


def test_the_sla_feedback_stays_within_its_bounds_and_ignores_other_targets() -> None:
    knobs = config(load_confidence_max=0.9, sla_feedback_step=5.0)
    mem, _ = memory.observe_sla(memory.PlannerMemory(), shares_window(60.0, 0.5, 0.5), knobs,
                                0.0)
    assert memory.planning_confidences(mem, knobs) == pytest.approx((0.9, 0.9))
    other = shares_window(60.0, 0.5, 0.5).model_copy(update={"ttft_target_s": 0.2})
    mem, detail = memory.observe_sla(memory.PlannerMemory(), other, knobs, 0.0)
    assert memory.planning_confidences(mem, knobs) == (0.75, 0.75)
    assert "no observed share" in detail["note"]


def test_a_step_before_new_workers_could_be_ready_keeps_but_never_adds() -> None:
    needs = [9, 4, 5]  # step 0 comes before new workers could serve; steps 1, 2 after
    assert binding_step(needs, [1, 2], current=6) == (0, 6)  # keep 6 for step 0, not 9
    assert binding_step(needs, [1, 2], current=3) == (2, 5)  # add only what steps 1-2 need
    assert binding_step(needs, [1, 2], current=None) == (2, 5)


def test_the_hold_window_is_one_startup_and_one_interval_unless_configured() -> None:
    assert hold_window_s(config(), 180.0, 60.0) == 240.0
    assert hold_window_s(config(scale_down_window_s="5m"), 180.0, 60.0) == 300.0


def test_prompt_strata_cover_the_whole_distribution() -> None:
    assert sum(attainment.lognormal_mix(0.8).weights) == pytest.approx(1.0)
    assert attainment.lognormal_mix(0.8, 2000.0).mean == pytest.approx(2000.0)
