"""The ``dynamo`` policy: Dynamo's arithmetic, hand-computed on the real H200 profile.

Capacities used in the comments (from the profile, see tests/test_perf_model.py):
  prefill at ISL 3000: 49,481.09 tokens/s/GPU; at ISL 16,372 (clamp): 43,602.55; at 100: 5,121.58
  decode, best point within ITL at context 3150 (ISL 3000 + OSL 300/2), grid row 23:
    10 ms: 4,555.68   5 ms: 668.06   20 ms: 5,804.89   1 ms (unmet, lowest point): 223.73
  decode at context 3015 (OSL 30), row 22, 10 ms: 4,679.64
  decode at context 20,150 (beyond 13,585: last row), 10 ms: 1,188.29
  decode at context 200 (ISL 50 + 150), row 1, 10 ms: 226.92
Interval 60 s; targets TTFT 100 ms, ITL 10 ms; GPU budget 100 unless a case says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.decider.knobs import DeploymentKnobs
from services.decider.policies import dynamo as dynamo_policy
from services.decider.policies.contract import PlannedLoad, PolicyState
from shared.explanation import Rule
from shared.messages import DeploymentKey, MetricSnapshot
from shared.perf_model import Profile, default_profile_path, load_profile

PROFILE: Profile = load_profile(default_profile_path())
DEPLOYMENT = DeploymentKey(namespace="prod", name="llama")
INTERVAL_S = 60.0


def config(**overrides: Any) -> DeploymentKnobs:
    values: dict[str, Any] = {
        "policy": "dynamo",
        "ttft_target_s": 0.1,
        "itl_target_s": 0.01,
        "max_total_gpus": 100,
        "no_correction": True,
    }
    if "correction_enabled" in overrides:
        values["no_correction"] = not overrides.pop("correction_enabled")
    values.update(overrides)
    return DeploymentKnobs(**values)


def snapshot(**fields: Any) -> MetricSnapshot:
    values: dict[str, Any] = {
        "deployment": DEPLOYMENT,
        "window_end": 1_700_000_000.0,
        "window_s": INTERVAL_S,
        "num_requests": 1800.0,
        "isl_avg": 3000.0,
        "osl_avg": 300.0,
        "prefill_workers": 1,
        "decode_workers": 1,
    }
    values.update(fields)
    return MetricSnapshot(**values)


@dataclass(frozen=True)
class Case:
    num_requests: float
    prefill: int
    decode: int
    isl: float = 3000.0
    osl: float = 300.0
    knobs: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    prefill_bound_by: Rule = Rule.PROFILE_CAPACITY
    decode_bound_by: Rule = Rule.PROFILE_CAPACITY


CASES = [
    pytest.param(
        Case(
            1800,
            prefill=2,  # ceil(1800 * 3000 / 60 / 49,481.09) = ceil(90,000 / 49,481.09 = 1.819)
            decode=2,  # ceil(1800 * 300 / 60 / 4,555.68) = ceil(9,000 / 4,555.68 = 1.976)
        ),
        id="a steady load needs its profiled capacity rounded up",
    ),
    pytest.param(
        Case(
            0,
            prefill=1,  # ceil(0) = 0 -> min_endpoint 1
            decode=1,
            prefill_bound_by=Rule.MIN_ENDPOINT,
            decode_bound_by=Rule.MIN_ENDPOINT,
        ),
        id="no requests still keep min_endpoint of each role",
    ),
    pytest.param(
        Case(
            1800,
            prefill=3,  # max(2, 3)
            decode=3,  # max(2, 3)
            knobs={"min_endpoint": 3},
            prefill_bound_by=Rule.MIN_ENDPOINT,
            decode_bound_by=Rule.MIN_ENDPOINT,
        ),
        id="a larger min_endpoint lifts both roles",
    ),
    pytest.param(
        Case(
            9000,
            # need ceil(450,000 / 49,481.09 = 9.094) = 10 and ceil(45,000 / 4,555.68 = 9.878) = 10
            # 20 GPUs > 8: scale = 8 / 20 = 0.4
            prefill=4,  # max(1, round(10 * 0.4)) = 4
            decode=4,  # max(1, round((8 - 4 * 1) / 1)) = 4
            knobs={"max_total_gpus": 8},
            prefill_bound_by=Rule.GPU_BUDGET,
            decode_bound_by=Rule.GPU_BUDGET,
        ),
        id="the gpu budget cuts both roles in proportion",
    ),
    pytest.param(
        Case(
            4500,
            # need ceil(225,000 / 49,481.09 = 4.547) = 5 and ceil(22,500 / 4,555.68 = 4.939) = 5
            # 10 GPUs > 5: scale = 0.5
            prefill=2,  # round(2.5) = 2: Python rounds half to even
            decode=3,  # round(5 - 2) = 3
            knobs={"max_total_gpus": 5},
            prefill_bound_by=Rule.GPU_BUDGET,
            decode_bound_by=Rule.GPU_BUDGET,
        ),
        id="the budget cut rounds half to even as Dynamo's python does",
    ),
    pytest.param(
        Case(
            9000,
            osl=30,
            # need ceil(9.094) = 10 and ceil(9000 * 30 / 60 / 4,679.64 = 0.962) = 1 -> 2
            # 12 GPUs > 6: scale = 0.5
            prefill=5,  # max(2, round(10 * 0.5)) = 5
            decode=2,  # max(2, round(6 - 5) = 1) = 2: 7 GPUs, Dynamo's own overshoot
            knobs={"min_endpoint": 2, "max_total_gpus": 6, "enforce_gpu_budget": False},
            prefill_bound_by=Rule.GPU_BUDGET,
            decode_bound_by=Rule.MIN_ENDPOINT,
        ),
        id="dynamo's cut exceeds the budget when min_endpoint binds and we can keep that exactly",
    ),
    pytest.param(
        Case(
            9000,
            osl=30,
            prefill=4,  # Dynamo's 5 + 2 = 7 GPUs > 6: one prefill (the larger role) removed
            decode=2,
            knobs={"min_endpoint": 2, "max_total_gpus": 6},
            prefill_bound_by=Rule.GPU_BUDGET_ENFORCED,
            decode_bound_by=Rule.MIN_ENDPOINT,
        ),
        id="by default the guard brings dynamo's overshoot back within the budget",
    ),
    pytest.param(
        Case(
            9000,
            # prefill 2 GPUs per engine: ceil(450,000 / 49,481.09 / 2 = 4.547) = 5 (10 GPUs)
            # decode: 10 (10 GPUs); 20 GPUs > 16: scale = 0.8
            prefill=4,  # round(5 * 0.8) = 4 (8 GPUs)
            decode=8,  # round((16 - 4 * 2) / 1) = 8
            knobs={"prefill_engine_num_gpu": 2, "max_total_gpus": 16},
            prefill_bound_by=Rule.GPU_BUDGET,
            decode_bound_by=Rule.GPU_BUDGET,
        ),
        id="the budget cut counts gpus per engine",
    ),
    pytest.param(
        Case(
            600,
            isl=20_000,
            prefill=5,  # ISL clamped to 16,372: ceil(200,000 / 43,602.55 = 4.587)
            decode=3,  # context 20,150 -> last row: ceil(3,000 / 1,188.29 = 2.525)
        ),
        id="an isl above the profiled range is read at 16372",
    ),
    pytest.param(
        Case(
            600,
            isl=50,
            prefill=1,  # ISL clamped to 100: ceil(600 * 50 / 60 / 5,121.58 = 0.098)
            decode=14,  # context 200, row 1: ceil(3,000 / 226.92 = 13.22)
        ),
        id="an isl below the profiled range is read at 100",
    ),
    pytest.param(
        Case(
            1800,
            prefill=1,  # ceil(90,000 * min(1, 0.5) / 49,481.09 = 0.909)
            decode=2,
            state={"prefill_correction": 0.5},
        ),
        id="a ttft better than profiled shrinks the prefill demand by its factor",
    ),
    pytest.param(
        Case(
            1800,
            prefill=2,  # ceil(90,000 * min(1, 2.0) / 49,481.09 = 1.819)
            decode=2,
            state={"prefill_correction": 2.0},
        ),
        id="a ttft worse than profiled is ignored through min of 1 and the factor",
    ),
    pytest.param(
        Case(
            1800,
            prefill=2,
            decode=14,  # ITL target 10 ms / 2 = 5 ms: ceil(9,000 / 668.06 = 13.47)
            state={"decode_correction": 2.0},
        ),
        id="a decode factor of 2 halves the itl target",
    ),
    pytest.param(
        Case(
            5400,
            prefill=6,  # ceil(270,000 / 49,481.09 = 5.457)
            decode=5,  # 10 ms / 0.5 = 20 ms: ceil(27,000 / 5,804.89 = 4.651) (6 at 10 ms)
            state={"decode_correction": 0.5},
        ),
        id="a decode factor of one half doubles the itl target",
    ),
    pytest.param(
        Case(
            1800,
            prefill=2,
            decode=2,  # factor 0 (nothing observed): Dynamo keeps the 10 ms target
            state={"decode_correction": 0.0},
        ),
        id="a decode factor of zero leaves the itl target as it is",
    ),
    pytest.param(
        Case(
            1800,
            prefill=2,
            decode=41,  # no point meets 1 ms: the lowest point, ceil(9,000 / 223.73 = 40.23)
            knobs={"itl_target_s": 0.001},
        ),
        id="an unreachable itl target is sized at the lowest load point",
    ),
    pytest.param(
        Case(
            3600,
            prefill=2,  # ceil(180,000 / 49,481.09 / 2 GPUs = 1.819)
            decode=4,  # ceil(18,000 / 4,555.68 = 3.951)
            knobs={"prefill_engine_num_gpu": 2},
        ),
        id="two gpus per prefill engine halve the prefill replicas",
    ),
    pytest.param(
        Case(
            1800,
            prefill=2,
            decode=1,  # min(2, max_decode_replicas 1)
            knobs={"max_decode_replicas": 1},
            decode_bound_by=Rule.MAX_REPLICAS,
        ),
        id="max decode replicas caps decode",
    ),
    pytest.param(
        Case(
            1800,
            prefill=4,  # max(2, min_prefill_replicas 4)
            decode=2,
            knobs={"min_prefill_replicas": 4},
            prefill_bound_by=Rule.MIN_REPLICAS,
        ),
        id="min prefill replicas lifts prefill",
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_dynamo_arithmetic(case: Case) -> None:
    load = PlannedLoad(case.num_requests, case.isl, case.osl, INTERVAL_S)
    decision = dynamo_policy.decide(
        load, snapshot(), PROFILE, config(**case.knobs), PolicyState(**case.state)
    )
    assert (decision.prefill_replicas, decision.decode_replicas) == (case.prefill, case.decode)
    assert decision.explanation["prefill_bound_by"] == case.prefill_bound_by
    assert decision.explanation["decode_bound_by"] == case.decode_bound_by
    assert decision.explanation["held"] is False
    orjson.dumps(decision.explanation)  # what goes on the bus


def test_the_explanation_carries_every_input_and_intermediate_number() -> None:
    load = PlannedLoad(1800, 3000, 300, INTERVAL_S)
    why = dynamo_policy.decide(load, snapshot(), PROFILE, config(), PolicyState()).explanation
    assert why["load"]["request_rate_per_s"] == 30.0
    assert why["prefill"]["demand_tokens_per_s"] == 90_000.0
    assert why["prefill"]["capacity_per_replica_tokens_per_s"] == pytest.approx(49_481.09)
    assert why["prefill"]["raw_replicas"] == pytest.approx(1.8189, abs=1e-4)
    assert why["prefill"]["profile"]["isl_clamp"] == "within_range"
    assert why["decode"]["operating_point"]["grid_kv_usage_fraction"] == pytest.approx(0.1616, 1e-3)
    assert why["decode"]["corrected_itl_target_s"] == 0.01
    assert [s["step"] for s in why["decode"]["steps"]] == [
        "profile_capacity",
        "min_endpoint",
        "role_bounds",
        "gpu_budget",
        "role_bounds_after_budget",
        "gpu_budget_guard",
    ]
    assert why["gpu_budget"] == {
        "max_gpus": 100,
        "required_gpus": 4,
        "cut": False,
        "gpus_after_dynamo_cut": 4,
        "dynamo_cut_exceeds_budget": False,
        "final_gpus": 4,
    }
    assert why["observed"]["num_requests"] == 1800.0


def test_the_isl_clamp_is_reported_in_the_explanation() -> None:
    load = PlannedLoad(600, 20_000, 300, INTERVAL_S)
    why = dynamo_policy.decide(load, snapshot(), PROFILE, config(), PolicyState()).explanation
    assert why["prefill"]["isl_clamped"] is True
    assert why["prefill"]["profile"]["isl_clamp"] == "above_range"
    assert why["prefill"]["profile"]["isl_used_tokens"] == 16_372.0
    assert why["decode"]["operating_point"]["context_clamped"] is True


# --- correction factors ----------------------------------------------------------------------


def test_the_prefill_factor_is_observed_over_profiled_ttft_at_the_observed_isl() -> None:
    observed = snapshot(
        ttft_avg_s=0.030, itl_avg_s=0.0097, request_duration_avg_s=3.0, decode_workers=2
    )
    decision = dynamo_policy.decide(
        PlannedLoad(1800, 3000, 300, INTERVAL_S),
        observed,
        PROFILE,
        config(correction_enabled=True),
        PolicyState(),
    )
    # 0.030 s / 0.0604587 s (profiled at ISL 3000) = 0.4962
    assert decision.state.prefill_correction == pytest.approx(0.030 / 0.06045866867507648)
    # ceil(90,000 * 0.4962 / 49,481.09 = 0.902) = 1
    assert decision.prefill_replicas == 1
    assert decision.explanation["correction"]["updated"] is True


def test_the_decode_factor_is_observed_over_profiled_itl_at_the_observed_concurrency() -> None:
    # concurrency per engine = 1800 requests / 2 workers * 3 s / 60 s = 45; context 3150
    profiled_itl = PROFILE.decode.itl_s(45, 3150)
    observed = snapshot(
        ttft_avg_s=0.06, itl_avg_s=2 * profiled_itl, request_duration_avg_s=3.0, decode_workers=2
    )
    decision = dynamo_policy.decide(
        PlannedLoad(1800, 3000, 300, INTERVAL_S),
        observed,
        PROFILE,
        config(correction_enabled=True),
        PolicyState(),
    )
    assert decision.state.decode_correction == pytest.approx(2.0)
    assert decision.explanation["correction"]["decode"]["concurrency_per_engine"] == 45.0
    # ITL target 10 ms / 2 = 5 ms: ceil(9,000 / 668.06 = 13.47) = 14
    assert decision.decode_replicas == 14


# --- missing and stale metrics: a timeline ---------------------------------------------------


def test_missing_or_stale_metrics_hold_the_last_target_and_say_why() -> None:
    cfg = config(correction_enabled=True)
    good = snapshot(ttft_avg_s=0.06, itl_avg_s=0.0097, request_duration_avg_s=3.0)
    busy = PlannedLoad(9000, 3000, 300, INTERVAL_S)
    quiet = PlannedLoad(0, 3000, 300, INTERVAL_S)

    # t0: a good observation -> 10 prefill, 8 decode (the observed ITL is below the profiled
    # one at that load, so the decode factor < 1 loosens the ITL target)
    t0 = dynamo_policy.decide(busy, good, PROFILE, cfg, PolicyState())
    assert (t0.prefill_replicas, t0.decode_replicas) == (10, 8)
    assert t0.state.decode_correction < 1

    # t0 + 60: the forecast says quiet but carries no observation -> hold 10/8
    t1 = dynamo_policy.decide(quiet, None, PROFILE, cfg, t0.state)
    assert (t1.prefill_replicas, t1.decode_replicas) == (10, 8)
    assert t1.explanation["hold_reason"] == Rule.HELD_NO_OBSERVATION
    assert t1.explanation["held_from"] == "last target"

    # t0 + 120: the collector marked the snapshot stale -> still 10/8
    stale = snapshot(stale=True, gaps={"num_requests": "prometheus unreachable"})
    t2 = dynamo_policy.decide(quiet, stale, PROFILE, cfg, t1.state)
    assert (t2.prefill_replicas, t2.decode_replicas) == (10, 8)
    assert "prometheus unreachable" in t2.explanation["hold_detail"]

    # t0 + 180: no requests, so no TTFT: Dynamo skips the adjustment -> still 10/8
    no_ttft = snapshot(num_requests=0.0, gaps={"ttft_avg_s": "no samples in window"})
    t3 = dynamo_policy.decide(quiet, no_ttft, PROFILE, cfg, t2.state)
    assert (t3.prefill_replicas, t3.decode_replicas) == (10, 8)
    assert t3.explanation["hold_reason"] == Rule.HELD_MISSING_METRICS
    assert "ttft_avg_s (no samples in window)" in t3.explanation["hold_detail"]
    assert t3.state.prefill_correction == t0.state.prefill_correction

    # t0 + 240: metrics are back and the load is gone -> min_endpoint
    t4 = dynamo_policy.decide(quiet, good, PROFILE, cfg, t3.state)
    assert (t4.prefill_replicas, t4.decode_replicas) == (1, 1)


def test_with_no_earlier_target_the_reported_worker_counts_are_held() -> None:
    observed = snapshot(isl_avg=None, prefill_workers=3, decode_workers=20)
    decision = dynamo_policy.decide(
        PlannedLoad(0, 3000, 300, INTERVAL_S),
        observed,
        PROFILE,
        config(max_decode_replicas=8, max_total_gpus=16),
        PolicyState(),
    )
    # 3 prefill held; 20 decode held but capped at max_decode_replicas 8
    assert (decision.prefill_replicas, decision.decode_replicas) == (3, 8)
    assert decision.explanation["held_from"] == "observed workers"
    assert decision.explanation["decode_bound_by"] == Rule.MAX_REPLICAS


def test_with_nothing_to_hold_the_first_decision_is_sized_from_the_forecast() -> None:
    decision = dynamo_policy.decide(
        PlannedLoad(1800, 3000, 300, INTERVAL_S), None, PROFILE, config(), PolicyState()
    )
    assert (decision.prefill_replicas, decision.decode_replicas) == (2, 2)
    assert "nothing to hold" in decision.explanation["note"]


# --- properties ------------------------------------------------------------------------------

finite = st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False)
huge = st.floats(min_value=0.0, max_value=1e300, allow_nan=False, allow_infinity=False)


@st.composite
def configs(draw: st.DrawFn) -> DeploymentKnobs:
    gp = draw(st.integers(1, 8))
    gd = draw(st.integers(1, 8))
    min_endpoint = draw(st.integers(0, 3))
    min_p = draw(st.integers(0, 4))
    min_d = draw(st.integers(0, 4))
    max_p = draw(st.integers(max(min_p, min_endpoint), 50))
    max_d = draw(st.integers(max(min_d, min_endpoint), 50))
    floors = max(min_endpoint, min_p) * gp + max(min_endpoint, min_d) * gd
    budget = draw(st.integers(max(floors, 1), floors + 200))  # settings refuse smaller ones
    return DeploymentKnobs(
        policy="dynamo",
        ttft_target_s=draw(st.floats(1e-4, 10.0)),
        itl_target_s=draw(st.floats(1e-4, 1.0)),
        min_endpoint=min_endpoint,
        max_total_gpus=budget,
        prefill_engine_num_gpu=gp,
        decode_engine_num_gpu=gd,
        min_prefill_replicas=min_p,
        max_prefill_replicas=max_p,
        min_decode_replicas=min_d,
        max_decode_replicas=max_d,
        no_correction=draw(st.booleans()),
        enforce_gpu_budget=True,
    )


@st.composite
def observations(draw: st.DrawFn) -> MetricSnapshot | None:
    if draw(st.booleans()):
        return None
    optional = st.none() | finite
    return snapshot(
        stale=draw(st.booleans()),
        window_s=draw(st.floats(1.0, 3600.0)),
        num_requests=draw(optional),
        isl_avg=draw(optional),
        osl_avg=draw(optional),
        ttft_avg_s=draw(optional),
        itl_avg_s=draw(optional),
        request_duration_avg_s=draw(optional),
        prefill_workers=draw(st.none() | st.integers(0, 10_000)),
        decode_workers=draw(st.none() | st.integers(0, 10_000)),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_requests=huge,
    isl=huge,
    osl=huge,
    window_s=st.floats(1.0, 86_400.0),
    cfg=configs(),
    observed=observations(),
    prefill_correction=finite,
    decode_correction=finite,
    last=st.none() | st.tuples(st.integers(0, 10_000), st.integers(0, 10_000)),
)
def test_any_finite_input_gives_bounded_counts_within_budget_and_a_serialisable_explanation(
    num_requests: float,
    isl: float,
    osl: float,
    window_s: float,
    cfg: DeploymentKnobs,
    observed: MetricSnapshot | None,
    prefill_correction: float,
    decode_correction: float,
    last: tuple[int, int] | None,
) -> None:
    state = PolicyState(
        prefill_correction=prefill_correction,
        decode_correction=decode_correction,
        last_prefill_replicas=None if last is None else last[0],
        last_decode_replicas=None if last is None else last[1],
    )
    decision = dynamo_policy.decide(
        PlannedLoad(num_requests, isl, osl, window_s), observed, PROFILE, cfg, state
    )
    p, d = decision.prefill_replicas, decision.decode_replicas
    assert isinstance(p, int) and isinstance(d, int)
    assert cfg.prefill_floor <= p <= cfg.max_prefill_replicas
    assert cfg.decode_floor <= d <= cfg.max_decode_replicas
    assert p * cfg.prefill_engine_num_gpu + d * cfg.decode_engine_num_gpu <= cfg.max_total_gpus
    assert math.isfinite(decision.state.prefill_correction)
    assert math.isfinite(decision.state.decode_correction)
    orjson.dumps(decision.explanation)
