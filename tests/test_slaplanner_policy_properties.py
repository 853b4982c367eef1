"""Properties of the slaplanner policy for any finite input (hypothesis)."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.decider.knobs import DeploymentKnobs
from services.decider.policies import slaplanner as slaplanner_policy
from services.decider.policies.contract import PlannedLoad, PolicyDecision, PolicyState
from services.decider.settings import DeciderSettings
from shared.messages import ForecastStep, LoadForecast, MetricSnapshot
from tests.test_slaplanner_policy_support import LLAMA, PROFILE, T0

PROPERTY_SETTINGS = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

finite = st.floats(min_value=0.0, max_value=1e9, allow_nan=False, allow_infinity=False)
requests = st.floats(min_value=0.0, max_value=1e7, allow_nan=False, allow_infinity=False)
tokens = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)
maybe = st.one_of(st.none(), finite)
workers = st.one_of(st.none(), st.integers(min_value=0, max_value=200))


@st.composite
def knobs(draw: st.DrawFn) -> dict[str, Any]:
    to_zero = draw(st.booleans())
    min_endpoint = 0 if to_zero else draw(st.integers(min_value=0, max_value=3))
    min_p = 0 if to_zero else draw(st.integers(min_value=0, max_value=4))
    min_d = 0 if to_zero else draw(st.integers(min_value=0, max_value=4))
    low = draw(st.one_of(st.none(), st.floats(min_value=0.1, max_value=3.0)))
    high = draw(st.one_of(st.none(), st.floats(min_value=0.1, max_value=3.0)))
    if low is not None and high is not None and low > high:
        low, high = high, low
    values = {
        "policy": "slaplanner",
        "ttft_target_s": draw(st.floats(min_value=0.01, max_value=10.0)),
        "itl_target_s": draw(st.floats(min_value=0.001, max_value=1.0)),
        "min_endpoint": min_endpoint,
        "min_prefill_replicas": min_p,
        "min_decode_replicas": min_d,
        "max_prefill_replicas": draw(st.integers(min_value=max(min_p, min_endpoint, 1),
                                                 max_value=64)),
        "max_decode_replicas": draw(st.integers(min_value=max(min_d, min_endpoint, 1),
                                                max_value=64)),
        "prefill_engine_num_gpu": draw(st.integers(min_value=1, max_value=4)),
        "decode_engine_num_gpu": draw(st.integers(min_value=1, max_value=4)),
        "max_total_gpus": draw(st.integers(min_value=1, max_value=200)),
        "no_correction": draw(st.booleans()),
        "scale_to_zero": to_zero,
        "scale_to_zero_idle_s": draw(st.floats(min_value=1.0, max_value=1000.0)),
        "min_prefill_decode_ratio": low,
        "max_prefill_decode_ratio": high,
        "load_confidence": draw(st.floats(min_value=0.5, max_value=0.99)),
        "worker_startup_s": draw(st.floats(min_value=0.0, max_value=1000.0)),
        "scale_down_window_s": draw(st.floats(min_value=0.0, max_value=1000.0)),
        "prefill_service_cv2": draw(st.one_of(st.none(), st.floats(0.0, 10.0))),
        "arrival_cv2": draw(st.one_of(st.none(), st.floats(0.0, 10.0))),
    }
    return values


def policy_config(values: dict[str, Any]) -> DeploymentKnobs:
    try:
        return DeciderSettings(**values).knobs()
    except ValidationError:
        assume(False)  # e.g. floors that the budget cannot hold: refused at start, not planned
        raise


@st.composite
def snapshots(draw: st.DrawFn, t: float) -> MetricSnapshot:
    window = draw(st.floats(min_value=1.0, max_value=3600.0))
    return MetricSnapshot(
        deployment=LLAMA,
        window_end=T0 + t,
        window_s=window,
        stale=draw(st.booleans()) and draw(st.booleans()),
        num_requests=draw(st.one_of(st.none(), requests)),
        isl_avg=draw(st.one_of(st.none(), tokens)),
        osl_avg=draw(st.one_of(st.none(), tokens)),
        isl_p90=draw(st.one_of(st.none(), tokens)),
        ttft_avg_s=draw(maybe),
        itl_avg_s=draw(maybe),
        ttft_p99_s=draw(maybe),
        itl_p99_s=draw(maybe),
        request_duration_avg_s=draw(maybe),
        requests_waiting=draw(maybe),
        requests_running=draw(maybe),
        kv_cache_usage=draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
        prefill_workers=draw(workers),
        decode_workers=draw(workers),
    )


@st.composite
def forecasts(draw: st.DrawFn, t: float, observed: MetricSnapshot) -> LoadForecast:
    window = draw(st.floats(min_value=1.0, max_value=3600.0))
    steps = []
    for k in range(draw(st.integers(min_value=1, max_value=6))):
        point = draw(requests)
        isl, osl = draw(tokens), draw(tokens)
        steps.append(
            ForecastStep(
                window_end=T0 + t + (k + 1) * window,
                num_requests=point,
                num_requests_upper=point + draw(requests),
                isl_avg=isl,
                isl_avg_upper=isl + draw(st.floats(0.0, 1e4)),
                osl_avg=osl,
                osl_avg_upper=osl + draw(st.floats(0.0, 1e3)),
            )
        )
    return LoadForecast(deployment=LLAMA, window_end=T0 + t, window_s=window, model="any",
                        steps=steps, observed=observed)


def decide(forecast: LoadForecast, cfg: DeploymentKnobs, state: PolicyState) -> PolicyDecision:
    step = forecast.steps[0]
    load = PlannedLoad(step.num_requests, step.isl_avg, step.osl_avg, forecast.window_s, forecast)
    return slaplanner_policy.decide(load, forecast.observed, PROFILE, cfg, state)


def lowest(cfg: DeploymentKnobs) -> tuple[int, int]:
    return (cfg.prefill_floor, cfg.decode_floor)


def check(prefill: int, decode: int, cfg: DeploymentKnobs) -> None:
    low_p, low_d = lowest(cfg)
    assert low_p <= prefill <= max(cfg.max_prefill_replicas, low_p)
    assert low_d <= decode <= max(cfg.max_decode_replicas, low_d)
    assert prefill * cfg.prefill_engine_num_gpu + decode * cfg.decode_engine_num_gpu <= \
        cfg.max_total_gpus


def no_nan(value: Any) -> None:
    if isinstance(value, float):
        assert not math.isnan(value)
    elif isinstance(value, dict):
        for item in value.values():
            no_nan(item)
    elif isinstance(value, list | tuple):
        for item in value:
            no_nan(item)


@st.composite
def runs(draw: st.DrawFn) -> tuple[DeploymentKnobs, list[Any]]:
    """A configuration and a sequence of forecasts and fast-path snapshots in time order."""
    cfg = policy_config(draw(knobs()))
    messages: list[Any] = []
    t = 0.0
    for _ in range(draw(st.integers(min_value=1, max_value=5))):
        t += draw(st.floats(min_value=0.0, max_value=400.0))
        observed = draw(snapshots(t))
        if draw(st.booleans()):
            messages.append(observed)
        else:
            messages.append(draw(forecasts(t, observed)))
    return cfg, messages


@PROPERTY_SETTINGS
@given(runs())
def test_replicas_stay_within_bounds_and_budget_with_no_nan_for_any_finite_input(
    run: tuple[DeploymentKnobs, list[Any]],
) -> None:
    cfg, messages = run
    state = PolicyState()
    for message in messages:
        if isinstance(message, LoadForecast):
            decision = decide(message, cfg, state)
        else:
            result = slaplanner_policy.fast_path(message, PROFILE, cfg, state)
            state = result.state
            if result.decision is None:
                continue
            decision = result.decision
        check(decision.prefill_replicas, decision.decode_replicas, cfg)
        no_nan(decision.explanation)
        state = decision.state


@PROPERTY_SETTINGS
@given(runs(), st.floats(min_value=1.0, max_value=100.0), st.data())
def test_more_load_never_gives_fewer_replicas_in_the_same_state(
    run: tuple[DeploymentKnobs, list[Any]], factor: float, data: st.DataObject
) -> None:
    cfg, messages = run
    cfg = cfg.model_copy(update=dict(max_total_gpus=10_000, prefill_engine_num_gpu=1,
                                     decode_engine_num_gpu=1))
    state = PolicyState()
    for message in messages[:-1]:  # some history first
        if isinstance(message, LoadForecast):
            state = decide(message, cfg, state).state
        else:
            state = slaplanner_policy.fast_path(message, PROFILE, cfg, state).state
    t = (messages[-1].window_end - T0) + 1.0
    observed = data.draw(snapshots(t))
    base = data.draw(forecasts(t, observed))
    more = base.model_copy(update={"steps": [
        step.model_copy(update={"num_requests": step.num_requests * factor,
                                "num_requests_upper": step.num_requests_upper * factor})
        for step in base.steps
    ]})
    less, most = decide(base, cfg, state), decide(more, cfg, state)
    assert most.prefill_replicas >= less.prefill_replicas
    assert most.decode_replicas >= less.decode_replicas


@PROPERTY_SETTINGS
@given(runs(), st.floats(min_value=1.0, max_value=100.0), st.data())
def test_more_load_never_gives_fewer_gpus_when_the_budget_binds(
    run: tuple[DeploymentKnobs, list[Any]], factor: float, data: st.DataObject
) -> None:
    cfg, _ = run
    cfg = cfg.model_copy(update=dict(prefill_engine_num_gpu=1, decode_engine_num_gpu=1))
    observed = data.draw(snapshots(0.0))
    base = data.draw(forecasts(0.0, observed))
    more = base.model_copy(update={"steps": [
        step.model_copy(update={"num_requests": step.num_requests * factor,
                                "num_requests_upper": step.num_requests_upper * factor})
        for step in base.steps
    ]})
    less, most = decide(base, cfg, PolicyState()), decide(more, cfg, PolicyState())
    assert most.prefill_replicas + most.decode_replicas >= \
        less.prefill_replicas + less.decode_replicas
    check(most.prefill_replicas, most.decode_replicas, cfg)


def test_the_fast_path_lifts_a_role_found_below_its_minimum() -> None:
    # A counterexample the bounds property found: one decode worker running, a floor of two,
    # a budget that fits exactly the floors; the fast path used to hold the single worker.
    base = DeciderSettings().knobs()
    cfg = base.model_copy(update=dict(
        ttft_target_s=1.0, itl_target_s=1.0, min_endpoint=0, max_total_gpus=2,
        min_prefill_replicas=0, max_prefill_replicas=1, min_decode_replicas=2,
        max_decode_replicas=2, worker_startup_s=0.0, load_confidence=0.5,
        scale_down_window_s=0.0, scale_to_zero_idle_s=1.0))
    snapshot = MetricSnapshot(deployment=LLAMA, window_end=1_700_000_000.0, window_s=1.0,
                              num_requests=1.0, isl_avg=0.0, prefill_workers=0,
                              decode_workers=1)
    result = slaplanner_policy.fast_path(snapshot, PROFILE, cfg, PolicyState())
    assert result.decision is not None
    check(result.decision.prefill_replicas, result.decision.decode_replicas, cfg)
    assert result.decision.decode_replicas == 2
