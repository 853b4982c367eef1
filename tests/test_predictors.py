"""Predictors: every model's contract, and what real traffic throws at them."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from statsmodels.tsa.holtwinters import ExponentialSmoothing

from services.forecaster import predictors
from services.forecaster.history import SeriesView

MODELS = ["constant", "arima", "kalman", "holt-winters", "horizon-smoothing", "auto"]
# statsmodels' estimation warnings are silenced by the predictors module, but pytest restores the
# default filters around each test.
pytestmark = [
    pytest.mark.filterwarnings("ignore::statsmodels.tools.sm_exceptions.ConvergenceWarning"),
    pytest.mark.filterwarnings("ignore::statsmodels.tools.sm_exceptions.EstimationWarning"),
]

T0 = 1_700_000_000.0


def view(values: Sequence[float] | np.ndarray, window_s: float = 60.0) -> SeriesView:
    array = np.asarray(values, dtype=np.float64)
    times = T0 + window_s * np.arange(array.size, dtype=np.float64)
    return SeriesView(array, times, array.size, window_s)


def noisy_level(points: int, level: float = 100.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(level, points).astype(np.float64)


def assert_well_formed(prediction: predictors.Prediction, steps: int) -> None:
    assert prediction.point.shape == prediction.upper.shape == (steps,)
    assert np.all(np.isfinite(prediction.point)) and np.all(np.isfinite(prediction.upper))
    assert np.all(prediction.point >= 0.0)
    assert np.all(prediction.upper >= prediction.point)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_forecasts_every_step_with_an_upper_quantile(name):
    prediction = predictors.make_predictor(name).predict(view(noisy_level(40)), 5, now=T0)
    assert_well_formed(prediction, 5)
    assert prediction.model == name and prediction.fallback is None
    # Around a level of 100 with Poisson noise, every model stays in a sane range.
    assert np.all((prediction.point > 60) & (prediction.point < 140))
    assert np.all(prediction.upper > prediction.point) or name == "constant"


def test_constant_repeats_the_last_value_and_widens_its_quantile_with_the_square_root_of_steps():
    prediction = predictors.make_predictor("constant").predict(view([100, 144, 121]), 4, now=T0)
    assert list(prediction.point) == [121.0] * 4
    # On the square-root scale the one-step changes are +2, -1: spread 1.5, z(0.9) = 1.2816.
    z, spread = 1.2815516, 1.5
    expected = (11.0 + z * spread * np.sqrt([1, 2, 3, 4])) ** 2
    np.testing.assert_allclose(prediction.upper, expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("name", "points", "reason"),
    [
        ("arima", 3, "3 points, arima needs 12"),
        ("kalman", 7, "7 points, kalman needs 8"),
        ("holt-winters", 9, "9 points, holt-winters needs 10"),
        ("horizon-smoothing", 1, "1 points, horizon-smoothing needs 12"),
        ("auto", 11, "11 points, auto needs 12"),
    ],
    ids=[
        "arima with three points falls back",
        "kalman one point short falls back",
        "holt-winters one point short falls back",
        "horizon-smoothing with a single point falls back",
        "auto one point short falls back",
    ],
)
def test_too_few_points_falls_back_to_constant_and_says_why(name, points, reason):
    prediction = predictors.make_predictor(name).predict(view(noisy_level(points)), 3, now=T0)
    assert prediction.model == "constant"
    assert prediction.fallback == reason
    assert_well_formed(prediction, 3)


@pytest.mark.parametrize("name", MODELS)
def test_no_observations_at_all_forecast_zero_and_say_so(name):
    prediction = predictors.make_predictor(name).predict(view([]), 2, now=T0)
    assert list(prediction.point) == [0.0, 0.0]
    assert prediction.fallback == "no observations yet"


@pytest.mark.parametrize(
    "name", ["arima", "kalman", "holt-winters", "horizon-smoothing", "auto"]
)
def test_an_idle_deployment_forecasts_zero(name):
    prediction = predictors.make_predictor(name).predict(view(np.zeros(30)), 3, now=T0)
    assert list(prediction.point) == [0.0] * 3 and list(prediction.upper) == [0.0] * 3
    assert prediction.fallback == "flat history (every point 0)"


@pytest.mark.parametrize("name", MODELS)
def test_idle_windows_among_busy_ones_do_not_break_a_model(name):
    values = noisy_level(36)
    values[[5, 6, 7, 20, 21, 35]] = 0.0
    assert_well_formed(predictors.make_predictor(name).predict(view(values), 5, now=T0), 5)


@pytest.mark.parametrize("name", MODELS)
def test_a_sudden_spike_gives_a_bounded_forecast(name):
    values = np.append(noisy_level(35), 50_000.0)
    prediction = predictors.make_predictor(name).predict(view(values), 5, now=T0)
    assert_well_formed(prediction, 5)
    assert np.all(prediction.upper <= predictors.RUNAWAY_FACTOR * 50_000.0)


def test_nan_and_infinite_points_are_dropped_not_propagated():
    values = noisy_level(30)
    values[[3, 10]] = np.nan
    values[12] = np.inf
    prediction = predictors.make_predictor("horizon-smoothing").predict(view(values), 3, now=T0)
    assert_well_formed(prediction, 3)
    assert prediction.fallback is None


class _Scripted:
    """A model that returns or raises what the test asks for."""

    name = "scripted"
    min_points = 2

    def __init__(self, point: float = 0.0, upper: float = 0.0, error: Exception | None = None):
        self.point, self.upper, self.error = point, upper, error

    def predict(self, series: SeriesView, steps: int, now: float) -> predictors.Prediction:
        if self.error is not None:
            raise self.error
        return predictors.Prediction(
            np.full(steps, self.point), np.full(steps, self.upper), self.name
        )


@pytest.mark.parametrize(
    ("model", "fallback"),
    [
        (_Scripted(error=np.linalg.LinAlgError("singular matrix")), "scripted fit failed"),
        (_Scripted(point=np.nan, upper=1.0), "scripted gave a non-finite forecast"),
        (_Scripted(point=1.0, upper=np.inf), "scripted gave a non-finite forecast"),
    ],
    ids=["a failed fit", "a NaN point", "an infinite upper quantile"],
)
def test_a_model_that_fails_falls_back_to_constant_with_the_reason(model, fallback):
    prediction = predictors.RobustPredictor(model, 0.9).predict(view([4.0, 9.0]), 2, now=T0)
    assert prediction.model == "constant"
    assert prediction.fallback is not None and prediction.fallback.startswith(fallback)
    assert list(prediction.point) == [9.0, 9.0]


def test_a_runaway_trend_is_capped_and_a_negative_one_floored():
    runaway = predictors.RobustPredictor(_Scripted(point=1e6, upper=2e6), 0.9)
    capped = runaway.predict(view([4.0, 9.0]), 2, now=T0)
    assert list(capped.point) == list(capped.upper) == [36.0, 36.0]  # 4 x the history's max
    below_zero = predictors.RobustPredictor(_Scripted(point=-3.0, upper=-1.0), 0.9)
    floored = below_zero.predict(view([4.0, 9.0]), 2, now=T0)
    assert list(floored.point) == list(floored.upper) == [0.0, 0.0]


@pytest.mark.parametrize(
    ("fitted_at", "fitted_points", "now", "points", "due"),
    [
        (None, 0, T0, 12, True),
        (T0, 12, T0 + 60, 13, False),
        (T0, 12, T0 + 60, 24, True),
        (T0, 1440, T0 + 6 * 3600 - 1, 1440, False),
        (T0, 1440, T0 + 6 * 3600, 1440, True),
    ],
    ids=[
        "never fitted: fit",
        "one more point a minute later: update only",
        "history doubled since the fit: refit",
        "full history, a second short of the interval: update only",
        "full history, interval reached: refit",
    ],
)
def test_refit_schedule(fitted_at, fitted_points, now, points, due):
    schedule = predictors.RefitSchedule(interval_s=6 * 3600)
    assert schedule.due(fitted_at, fitted_points, now, points) is due


@pytest.mark.parametrize(
    "name", ["arima", "kalman", "holt-winters", "horizon-smoothing", "auto"]
)
def test_a_new_point_between_refits_updates_the_forecast_without_a_refit(name):
    predictor = predictors.make_predictor(name)
    values = noisy_level(30)
    first = predictor.predict(view(values), 3, now=T0)
    assert first.refitted
    following = np.append(values, 400.0)
    second = predictor.predict(view(following), 3, now=T0 + 60)
    assert not second.refitted
    assert second.point[0] > first.point[0]  # the jump to 400 pulled the forecast up


def test_state_space_update_matches_a_filter_over_the_whole_series():
    predictor = predictors.KalmanPredictor(0.9, predictors.RefitSchedule(), fit_points=720)
    values = np.sqrt(noisy_level(40))
    predictor.predict(view(values[:30]), 3, now=T0)
    updated = predictor.predict(view(values), 3, now=T0 + 60)
    assert not updated.refitted
    results = predictor._results
    assert results is not None
    # The same parameters filtered over all 40 points from the start.
    whole = results.model.clone(values).filter(results.params)
    np.testing.assert_allclose(updated.point, whole.forecast(3), rtol=1e-6)


@pytest.mark.parametrize("season_points", [0, 12], ids=["damped Holt", "with a season"])
def test_holt_winters_update_matches_statsmodels_with_the_parameters_held(season_points):
    rng = np.random.default_rng(1)
    t = np.arange(120)
    values = 10 + 0.05 * t + rng.normal(0, 0.5, t.size)
    if season_points:
        values += 3 * np.sin(2 * np.pi * t / season_points)
    state = predictors._fit_holt_winters(values[:100], season_points)
    ours, _ = predictors._holt_winters_forecast(predictors._smooth(state, values[100:]), 5)
    seasonal = "add" if season_points else None
    fitted = ExponentialSmoothing(
        values[:100],
        trend="add",
        damped_trend=True,
        seasonal=seasonal,
        seasonal_periods=season_points or None,
        initialization_method="heuristic" if season_points else "estimated",
    ).fit()
    params = fitted.params
    held = ExponentialSmoothing(
        values,
        trend="add",
        damped_trend=True,
        seasonal=seasonal,
        seasonal_periods=season_points or None,
        initialization_method="known",
        initial_level=params["initial_level"],
        initial_trend=params["initial_trend"],
        initial_seasonal=params["initial_seasons"] if season_points else None,
    ).fit(
        smoothing_level=params["smoothing_level"],
        smoothing_trend=params["smoothing_trend"],
        damping_trend=params["damping_trend"],
        smoothing_seasonal=params["smoothing_seasonal"] if season_points else None,
        optimized=False,
    )
    np.testing.assert_allclose(ours, held.forecast(5), rtol=1e-8)


def test_holt_winters_uses_a_daily_season_once_the_history_covers_two_days():
    hourly = 3600.0
    t = np.arange(24 * 3)
    daily = 100 + 60 * np.sin(2 * np.pi * t / 24)
    predictor = predictors.HoltWintersPredictor(0.9, predictors.RefitSchedule(), 720)
    assert predictor.season_points(view(daily[:47], hourly)) == 0
    assert predictor.season_points(view(daily, hourly)) == 24
    prediction = predictors.make_predictor("holt-winters").predict(view(daily, hourly), 6, T0)
    expected = 100 + 60 * np.sin(2 * np.pi * np.arange(72, 78) / 24)
    np.testing.assert_allclose(prediction.point, expected, rtol=0.05)


def test_holt_winters_drops_the_season_when_a_gap_breaks_the_phase():
    hourly = 3600.0
    series = view(np.full(72, 100.0), hourly)
    gapped = SeriesView(
        series.values,
        series.times + (series.times > T0 + 36 * hourly) * 7200.0,
        series.total_recorded,
        hourly,
    )
    predictor = predictors.HoltWintersPredictor(0.9, predictors.RefitSchedule(), 720)
    assert predictor.season_points(gapped) == 0


def test_horizon_smoothing_averages_noise_instead_of_chasing_the_last_value():
    values = noisy_level(200, level=100.0, seed=3)
    values[-1] = 150.0  # a noisy last window
    prediction = predictors.make_predictor("horizon-smoothing").predict(view(values), 5, T0)
    assert abs(prediction.point[0] - 100.0) < 15.0


def test_horizon_smoothing_follows_a_random_walk_closely():
    walk = 400.0 + np.cumsum(np.random.default_rng(4).normal(0, 10, 200))
    prediction = predictors.make_predictor("horizon-smoothing").predict(view(walk), 5, T0)
    assert abs(prediction.point[0] - walk[-1]) < 10.0


def test_prophet_without_the_extra_installed_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "prophet", None)  # makes `import prophet` fail
    quoted = r"pip install 'slaplanner\[prophet\]'"  # quoted for zsh
    with pytest.raises(predictors.PredictorUnavailable, match=quoted):
        predictors.make_predictor("prophet")
    with pytest.raises(predictors.PredictorUnavailable):
        predictors.ensure_available("prophet")


def test_an_unknown_predictor_is_refused():
    with pytest.raises(KeyError, match="unknown predictor 'lstm'"):
        predictors.make_predictor("lstm")


def test_confidence_outside_its_range_is_refused():
    with pytest.raises(ValueError, match="confidence"):
        predictors.make_predictor("constant", confidence=0.3)


finite_histories = st.lists(
    st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=finite_histories,
    steps=st.integers(min_value=1, max_value=6),
    name=st.sampled_from(["constant", "holt-winters", "horizon-smoothing", "auto"]),
)
def test_cheap_models_never_raise_nor_give_nan_or_negative(values, steps, name):
    assert_well_formed(predictors.make_predictor(name).predict(view(values), steps, T0), steps)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=finite_histories, name=st.sampled_from(["arima", "kalman"]))
def test_state_space_models_never_raise_nor_give_nan_or_negative(values, name):
    assert_well_formed(predictors.make_predictor(name).predict(view(values), 3, T0), 3)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(
        st.one_of(st.just(0.0), st.floats(min_value=0, max_value=1e9, allow_nan=False)),
        min_size=12, max_size=240,
    ),
    steps=st.integers(min_value=1, max_value=40),
)
def test_auto_never_raises_nor_gives_nan_or_negative_on_long_histories(values, steps):
    # Long enough for every candidate, seasons included, to be fitted and backtested.
    assert_well_formed(predictors.make_predictor("auto").predict(view(values), steps, T0), steps)
