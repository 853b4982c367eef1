"""Forecaster core and its history: snapshots in, LoadForecasts out, memory bounded."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from pydantic import ValidationError

from services.forecaster import predictors
from services.forecaster.core import Forecaster, trace_windows
from services.forecaster.history import DeploymentHistory, SeriesName, SkipReason
from services.forecaster.settings import ForecasterSettings
from shared import traces
from shared.messages import DeploymentKey, LoadForecast, MetricSnapshot, derived_id

# statsmodels' estimation warnings are silenced by the predictors module, but pytest restores the
# default filters around each test.
pytestmark = [
    pytest.mark.filterwarnings("ignore::statsmodels.tools.sm_exceptions.ConvergenceWarning"),
    pytest.mark.filterwarnings("ignore::statsmodels.tools.sm_exceptions.EstimationWarning"),
]

T0 = 1_700_000_000.0
LLAMA = DeploymentKey(namespace="prod", name="llama")
MISTRAL = DeploymentKey(namespace="prod", name="mistral")


def snapshot(
    i: int,
    requests: float | None = 100.0,
    key: DeploymentKey = LLAMA,
    window_s: float = 60.0,
    **fields: object,
) -> MetricSnapshot:
    values: dict[str, object] = {"isl_avg": 3000.0 + 10 * (i % 7), "osl_avg": 150.0 + (i % 5)}
    values.update(fields)
    return MetricSnapshot.model_validate(
        {
            "id": f"{key.name}-{i}",
            "deployment": key,
            "window_end": T0 + i * window_s,
            "window_s": window_s,
            "num_requests": requests,
        }
        | values
    )


def poisson_stream(points: int, key: DeploymentKey = LLAMA, seed: int = 0) -> list[MetricSnapshot]:
    counts = np.random.default_rng(seed).poisson(100, points)
    return [snapshot(i, float(c), key) for i, c in enumerate(counts)]


def forecaster(**overrides: object) -> Forecaster:
    return Forecaster(ForecasterSettings.model_validate(overrides))


# --- history -----------------------------------------------------------------------------------


def test_history_records_a_snapshot_under_its_time():
    history = DeploymentHistory(capacity_points=10)
    result = history.record(T0, snapshot(0, isl_p90=9000.0))
    assert set(result.recorded) == {
        SeriesName.NUM_REQUESTS,
        SeriesName.ISL_AVG,
        SeriesName.OSL_AVG,
        SeriesName.ISL_P90,
    }
    assert result.skipped == {SeriesName.OSL_P90: SkipReason.MISSING}
    assert list(history.series(SeriesName.ISL_P90).values) == [9000.0]


def test_a_window_without_requests_records_the_zero_but_not_isl_or_osl():
    history = DeploymentHistory(capacity_points=10)
    result = history.record(T0, snapshot(0, requests=0.0, isl_avg=0.0, osl_avg=0.0))
    assert result.recorded == (SeriesName.NUM_REQUESTS,)
    assert result.skipped[SeriesName.ISL_AVG] is SkipReason.NO_REQUESTS
    assert result.skipped[SeriesName.OSL_AVG] is SkipReason.NO_REQUESTS
    assert len(history.series(SeriesName.ISL_AVG)) == 0


def test_a_stale_snapshot_records_nothing():
    history = DeploymentHistory(capacity_points=10)
    result = history.record(T0, snapshot(0, stale=True))
    assert result.recorded == ()
    assert set(result.skipped.values()) == {SkipReason.STALE}


def test_a_duplicate_or_late_snapshot_records_nothing():
    history = DeploymentHistory(capacity_points=10)
    history.record(T0 + 60, snapshot(1))
    assert history.record(T0 + 60, snapshot(1)).recorded == ()
    late = history.record(T0, snapshot(0))
    assert late.skipped[SeriesName.NUM_REQUESTS] is SkipReason.NOT_AFTER_LAST
    assert len(history) == 1


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (float("nan"), SkipReason.NOT_FINITE),
        (float("inf"), SkipReason.NOT_FINITE),
        (-1.0, SkipReason.NEGATIVE),
        (None, SkipReason.MISSING),
    ],
    ids=["NaN", "infinity", "a negative count", "null"],
)
def test_values_that_are_not_measurements_are_skipped(value, reason):
    history = DeploymentHistory(capacity_points=10)
    result = history.record_values(T0, 60.0, {SeriesName.NUM_REQUESTS: value})
    assert result.skipped[SeriesName.NUM_REQUESTS] is reason
    assert len(history.series(SeriesName.NUM_REQUESTS)) == 0


def test_history_memory_is_bounded_and_keeps_the_latest_points_in_order():
    history = DeploymentHistory(capacity_points=50)
    for i in range(500):
        history.record(T0 + 60 * i, snapshot(i, requests=float(i)))
    view = history.series(SeriesName.NUM_REQUESTS)
    assert list(view.values) == [float(i) for i in range(450, 500)]
    assert np.all(np.diff(view.times) == 60.0)
    assert view.total_recorded == 500
    assert history._rings[SeriesName.NUM_REQUESTS]._values.size == 50  # preallocated, fixed


def test_a_new_window_length_starts_the_history_afresh():
    history = DeploymentHistory(capacity_points=10)
    history.record(T0, snapshot(0))
    result = history.record(
        T0 + 15, snapshot(0, window_s=15.0).model_copy(update={"window_end": T0 + 15})
    )
    assert result.reset_reason == "window_s changed from 60 to 15"
    view = history.series(SeriesName.NUM_REQUESTS)
    assert len(view) == 1 and view.total_recorded == 2  # totals keep counting across the reset


def test_a_late_snapshot_of_another_window_length_does_not_reset_the_history():
    history = DeploymentHistory(capacity_points=10)
    history.record(T0 + 60, snapshot(1))
    late = history.record(T0, snapshot(0, window_s=15.0))
    assert late.reset_reason is None and late.recorded == ()
    assert len(history.series(SeriesName.NUM_REQUESTS)) == 1


# --- forecasts ---------------------------------------------------------------------------------


def test_a_forecast_covers_the_horizon_in_steps_of_the_window():
    core = forecaster()
    for s in poisson_stream(30)[:-1]:
        core.observe(s)
    last = poisson_stream(30)[-1]
    forecast = core.forecast(last)
    assert isinstance(forecast, LoadForecast)
    assert forecast.id == derived_id("forecast", last.id)
    assert forecast.observed == last
    assert forecast.deployment == LLAMA
    assert (forecast.window_end, forecast.window_s) == (last.window_end, 60.0)
    assert [step.window_end for step in forecast.steps] == [
        last.window_end + 60.0 * k
        for k in range(1, 6)  # ceil(300 s / 60 s) = 5 steps
    ]
    assert forecast.model == "auto" and forecast.fallback is None
    assert forecast.step_s == 60.0
    assert forecast.selection is not None
    chosen = forecast.selection["num_requests"]
    assert chosen.backtest_origins > 0 and chosen.backtest_mae_constant is not None
    assert forecast.fit_s > 0.0
    for step in forecast.steps:
        assert 60 < step.num_requests <= step.num_requests_upper < 200
        assert 2990 <= step.isl_avg <= step.isl_avg_upper
        assert 150 <= step.osl_avg <= step.osl_avg_upper


@pytest.mark.parametrize(
    ("horizon_s", "window_s", "steps"),
    [(300.0, 60.0, 5), (300.0, 15.0, 20), (300.0, 45.0, 7), (30.0, 60.0, 1)],
    ids=[
        "5 min of 1 min windows",
        "5 min of 15 s windows",
        "rounded up to cover 5 min",
        "a horizon shorter than a window still forecasts one step",
    ],
)
def test_horizon_steps(horizon_s, window_s, steps):
    assert ForecasterSettings(horizon_s=horizon_s).horizon_steps(window_s) == steps


def test_a_new_deployment_falls_back_to_constant_and_says_so():
    forecast = forecaster(predictor="kalman").forecast(snapshot(0, requests=42.0))
    assert forecast.model == "constant"
    assert forecast.fallback is not None
    assert forecast.fallback.startswith("num_requests: 1 points, kalman needs 8")
    assert [step.num_requests for step in forecast.steps] == [42.0] * 5


def test_isl_never_observed_is_forecast_as_zero_with_the_reason():
    core = forecaster()
    forecast = core.forecast(snapshot(0, requests=0.0, isl_avg=None, osl_avg=None))
    assert forecast.steps[0].isl_avg == 0.0
    assert forecast.fallback is not None and "isl_avg: no observations yet" in forecast.fallback


def test_observe_then_forecast_of_the_same_snapshot_records_it_once():
    core = forecaster()
    stream = poisson_stream(20)
    for s in stream:
        core.observe(s)
        core.forecast(s)
    assert core.series(LLAMA, SeriesName.NUM_REQUESTS).total_recorded == 20


def test_an_idle_then_busy_deployment_forecasts_without_negative_values():
    core = forecaster()
    stream = [snapshot(i, requests=0.0, isl_avg=None, osl_avg=None) for i in range(20)]
    stream += [snapshot(20 + i, requests=float(r)) for i, r in enumerate([5, 300, 0, 12, 800])]
    for s in stream:
        forecast = core.forecast(s)
        assert all(step.num_requests >= 0 for step in forecast.steps)


def test_a_stale_snapshot_still_gets_a_forecast_from_the_history():
    core = forecaster()
    for s in poisson_stream(20):
        core.forecast(s)
    stale = snapshot(20, requests=None, isl_avg=None, osl_avg=None, stale=True)
    forecast = core.forecast(stale)
    assert 60 < forecast.steps[0].num_requests < 140


def test_rebuild_restores_the_history_a_live_forecaster_had():
    stream = poisson_stream(40)
    live = forecaster()
    for s in stream[:-1]:
        live.forecast(s)
    rebuilt = forecaster()
    shuffled = list(reversed(stream[:-1])) + stream[:5]  # any order, with redeliveries
    assert rebuilt.rebuild(shuffled) == 39
    for series in SeriesName:
        restored = rebuilt.series(LLAMA, series)
        original = live.series(LLAMA, series)
        assert np.array_equal(restored.values, original.values)
        assert np.array_equal(restored.times, original.times)
    # Its models are fitted afresh at the first forecast, exactly as after observing the stream.
    observed = forecaster()
    for s in stream[:-1]:
        observed.observe(s)
    assert rebuilt.forecast(stream[-1]).steps == observed.forecast(stream[-1]).steps


def test_warm_start_fills_a_new_deployment_from_a_trace():
    trace = traces.load_trace(traces.bundled_trace_path("mooncake_conversation.jsonl"))
    core = forecaster(predictor="kalman")
    windows = core.warm_start(LLAMA, trace.arrival_s, trace.isl_tokens, trace.osl_tokens)
    assert windows == 58  # 3,537 s of trace: 58 complete minutes
    forecast = core.forecast(snapshot(0, requests=210.0))
    assert forecast.model == "kalman" and forecast.fallback is None
    assert 150 < forecast.steps[0].num_requests < 260
    # A deployment with a history is left alone.
    assert core.warm_start(LLAMA, trace.arrival_s, trace.isl_tokens, trace.osl_tokens) == 0


def test_a_warm_start_trace_fills_deployments_first_seen_live_but_not_rebuilt_ones():
    trace = traces.load_trace(traces.bundled_trace_path("azure_llm_2023_code.csv"))
    core = forecaster()
    core.warm_start_new_deployments(trace.arrival_s, trace.isl_tokens, trace.osl_tokens)
    core.rebuild([snapshot(0, key=MISTRAL)])
    first = core.forecast(snapshot(100, requests=80.0, window_s=30.0))
    assert first.fallback is None  # 114 trace windows of 30 s, ending just before this one
    times = core.series(LLAMA, SeriesName.NUM_REQUESTS).times
    assert len(times) == 115 and np.all(np.diff(times) == 30.0)
    assert len(core.series(MISTRAL, SeriesName.NUM_REQUESTS)) == 1


def test_trace_windows_count_idle_windows_as_zero_and_carry_the_spread():
    arrival = np.array([0.5, 1.0, 1.5, 130.0, 200.0])
    isl = np.array([100, 200, 1000, 50, 70])
    windows = trace_windows(traces.Trace(arrival, isl, np.array([1, 2, 3, 4, 5])), 60.0)
    assert list(windows.window_end_s) == [60.0, 120.0, 180.0]  # the cut-short last one dropped
    first, idle, third = windows.values
    assert first[SeriesName.NUM_REQUESTS] == 3.0
    assert first[SeriesName.ISL_AVG] == pytest.approx(433.333, rel=1e-4)
    assert first[SeriesName.ISL_P90] == pytest.approx(840.0)
    assert idle == {SeriesName.NUM_REQUESTS: 0.0}
    assert third[SeriesName.NUM_REQUESTS] == 1.0


def test_per_deployment_override_picks_another_predictor():
    core = forecaster(predictor_overrides="prod/llama=constant")
    for i, s in enumerate(poisson_stream(20)):
        core.forecast(s)
        core.forecast(snapshot(i, requests=float(100 + i), key=MISTRAL))
    assert core.forecast(snapshot(20)).model == "constant"
    assert core.forecast(snapshot(20, key=MISTRAL)).model == "auto"


@pytest.mark.parametrize(
    "entry",
    ["prod/llama", "llama=constant", "prod/llama=lstm", "/llama=arima"],
    ids=["no predictor", "no namespace", "unknown predictor", "empty namespace"],
)
def test_a_malformed_override_is_refused_at_start(entry):
    with pytest.raises(ValidationError):
        ForecasterSettings.model_validate({"predictor_overrides": entry})


def test_prophet_configured_without_the_extra_fails_at_start(monkeypatch):
    def missing() -> None:
        raise predictors.PredictorUnavailable(predictors.PROPHET_INSTALL_HINT)

    monkeypatch.setattr(predictors, "import_prophet", missing)
    with pytest.raises(predictors.PredictorUnavailable, match="slaplanner"):
        forecaster(predictor_overrides="prod/llama=prophet")


def test_deployments_forecast_in_parallel_threads_as_they_would_one_by_one():
    keys = [DeploymentKey(namespace="prod", name=f"model-{i}") for i in range(6)]
    streams = {key: poisson_stream(30, key, seed=i) for i, key in enumerate(keys)}

    def run(core: Forecaster, key: DeploymentKey) -> list[LoadForecast]:
        return [core.forecast(s) for s in streams[key]]

    sequential_core = forecaster()
    sequential = {key: run(sequential_core, key) for key in keys}
    parallel_core = forecaster()
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = dict(zip(keys, pool.map(lambda k: run(parallel_core, k), keys), strict=True))
    for key in keys:
        assert [f.steps for f in parallel[key]] == [f.steps for f in sequential[key]]
