"""The ``auto`` predictor: a model per deployment and series, chosen by rolling backtest, with
the upper quantile from the chosen model's own errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from services.forecaster import backtest, predictors
from services.forecaster.core import Forecaster, trace_windows
from services.forecaster.history import SeriesView
from services.forecaster.settings import ForecasterSettings
from shared.messages import DeploymentKey, MetricSnapshot
from sim import synth

T0 = 1_700_000_000.0
SINE = DeploymentKey(namespace="bench", name="sine")


def times(points: int, window_s: float) -> np.ndarray:
    return T0 + window_s * np.arange(1, points + 1, dtype=np.float64)


def sine_counts(points: int, window_s: float, period_s: float, seed: int = 0) -> np.ndarray:
    """Poisson counts per window of a rate from 12 to 36 requests/s (Dynamo's sine)."""
    t = times(points, window_s) - T0
    rate = 24.0 + 12.0 * np.sin(2 * np.pi * t / period_s - np.pi / 2)
    return np.random.default_rng(seed).poisson(rate * window_s).astype(np.float64)


def daily_counts(points: int, window_s: float, seed: int = 0) -> np.ndarray:
    """A daily shape: a trough at night, a peak in the afternoon, a shoulder in the evening."""
    day = 2 * np.pi * (times(points, window_s) - T0) / 86_400.0
    rate = 20.0 * (1.0 + 0.6 * np.sin(day - np.pi / 2 - 1.0) + 0.2 * np.sin(2 * day))
    return np.random.default_rng(seed).poisson(np.maximum(rate, 0.5) * window_s).astype(float)


def view(values: np.ndarray, window_s: float) -> SeriesView:
    return SeriesView(values, times(values.size, window_s), values.size, window_s)


# --- finding the season ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("series", "window_s", "expected"),
    [
        pytest.param(np.sqrt(sine_counts(720, 10.0, 600.0)), 10.0, 60,
                     id="the sine's 600 s at 10 s windows is 60 points"),
        pytest.param(np.sqrt(sine_counts(180, 60.0, 600.0)), 60.0, 10,
                     id="the sine's 600 s at 60 s windows is 10 points"),
        pytest.param(np.sqrt(daily_counts(3 * 1440, 60.0)), 60.0, 1440,
                     id="three days of minutes show a day, exactly 1440 points"),
        pytest.param(np.tile([4.0, 9.0], 60) + np.random.default_rng(1).normal(0, 0.3, 120), 60.0,
                     2, id="a load that alternates from one window to the next has a period of 2"),
        pytest.param(np.sqrt(np.random.default_rng(2).poisson(100, 720).astype(float)), 60.0, 0,
                     id="Poisson noise around a level has no season"),
        pytest.param(np.cumsum(np.random.default_rng(3).normal(0, 1, 720)) + 100, 60.0, 0,
                     id="a random walk has no season"),
        pytest.param(np.sqrt(sine_counts(15, 60.0, 600.0)), 60.0, 0,
                     id="under two seasons of history there is no season to find"),
    ],
)
def test_the_season_is_found_in_the_history(series, window_s, expected):
    assert backtest.detect_period(series, times(series.size, window_s), window_s) == expected


def test_a_season_is_not_trusted_across_missing_windows():
    series = np.sqrt(sine_counts(720, 10.0, 600.0))
    stamps = times(720, 10.0)
    stamps[400:] += 10.0 * 30  # thirty windows missing: more than 2 % of the points
    assert backtest.detect_period(series, stamps, 10.0) == 0


# --- what each candidate forecasts --------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "values", "expected"),
    [
        pytest.param(backtest.Constant(), [3.0, 5.0, 4.0], [4.0, 4.0, 4.0],
                     id="constant repeats the last value"),
        pytest.param(backtest.Smoothing(0.5), [2.0, 4.0, 6.0], [4.5, 4.5, 4.5],
                     # levels 2, 3, 4.5
                     id="smoothing holds its level"),
        pytest.param(backtest.Arima((1, 0, 0), 4.0, np.array([0.5]), np.array([])),
                     [4.0, 10.0], [7.0, 5.5, 4.75],
                     # 4 + 0.5^h (10 - 4)
                     id="AR(1) decays to its mean by phi per step"),
        pytest.param(backtest.Arima((0, 1, 1), 0.0, np.array([]), np.array([0.5])),
                     [10.0, 12.0], [13.0, 13.0, 13.0],
                     # changes 0, 2; innovations 0, 2; next change 0.5 x 2 = 1, then 0
                     id="ARIMA(0,1,1) adds theta times the last innovation, then holds"),
        pytest.param(backtest.Seasonal(1.0, np.array([-1.0, 0.0, 1.0]), 60.0),
                     [9.0, 11.0], [12.0, 13.0, 11.0],
                     # rint(time / 60) mod 3 of T0 + 120 is phase 0, so the level (alpha 1) is
                     # 11 - (-1) = 12; then phases 1, 2, 0: 12 + 0, 12 + 1, 12 - 1
                     id="seasonal is the level plus the profile at the coming phases"),
    ],
)
def test_each_candidate_forecasts_from_its_parameters(model, values, expected):
    array = np.asarray(values, dtype=np.float64)
    stamps = times(array.size, 60.0)
    forecast = model.forecasts(array, stamps, np.array([array.size - 1]), 3)[0]
    np.testing.assert_allclose(forecast, expected)


@pytest.mark.parametrize(
    ("alpha", "beta", "phi"),
    [(0.3, 0.2, 0.9), (1.0, 0.05, 0.98), (0.05, 0.2, 0.8)],
    ids=["a middling level and trend", "the last value with a slow trend",
         "a heavy level with a strongly damped trend"],
)
def test_the_damped_trend_filters_equal_its_smoothing_equations(alpha, beta, phi):
    values = np.cumsum(np.random.default_rng(7).normal(0.5, 1.0, 200)) + 10.0
    level, trend = values[0], 0.0  # a flat past at the first value
    expected_level, expected_trend = [], []
    for value in values:  # Hyndman et al. 2008, table 2.1, error-correction form
        error = value - (level + phi * trend)
        level, trend = level + phi * trend + alpha * error, phi * trend + alpha * beta * error
        expected_level.append(level)
        expected_trend.append(trend)
    got_level, got_trend = backtest.DampedTrend(alpha, beta, phi).states(values)
    np.testing.assert_allclose(got_level, expected_level, atol=1e-9)
    np.testing.assert_allclose(got_trend, expected_trend, atol=1e-9)


def arma_series(points: int, seed: int = 6) -> np.ndarray:
    """ARMA(1,1) around 20: phi 0.6, theta 0.3."""
    noise = np.random.default_rng(seed).normal(0.0, 1.0, points)
    series = np.zeros(points)
    for i in range(1, points):
        series[i] = 0.6 * series[i - 1] + noise[i] + 0.3 * noise[i - 1]
    return series + 20.0


@pytest.mark.parametrize(
    ("fit", "values"),
    [
        (backtest.smoothing_fit(5), np.sqrt(sine_counts(200, 60.0, 600.0))),
        (backtest.seasonal_fit(10, 60.0, 5), np.sqrt(sine_counts(200, 60.0, 600.0))),
        (backtest.damped_trend_fit(5), np.sqrt(daily_counts(200, 60.0))),
        *((backtest.arima_fit(order), arma_series(200)) for order in backtest.ARIMA_ORDERS),
    ],
    ids=["smoothing", "seasonal", "damped trend",
         *(f"arima{order}" for order in backtest.ARIMA_ORDERS)],
)
def test_forecasts_from_every_origin_use_only_the_points_up_to_each(fit, values):
    stamps = times(values.size, 60.0)
    model = fit(values, stamps)
    assert model is not None
    origins = (50, 120, values.size - 1)
    together = model.forecasts(values, stamps, np.array(origins), 5)
    for row, origin in enumerate(origins):
        # Points after the origin must not change what was forecast from it.
        alone = model.forecasts(values[: origin + 1], stamps[: origin + 1], np.array([origin]), 5)
        np.testing.assert_allclose(together[row], alone[0], err_msg=model.label)


@pytest.mark.parametrize(
    ("window", "period", "expected"),
    [
        (720, 0, 180),  # a quarter
        (20, 0, 8),  # at least MIN_ERRORS
        (720, 60, 180),  # a quarter already covers a season, two seasons left to fit
        (4320, 1440, 1440),  # stretched to a whole season: 2880 left = two seasons
        (36, 10, 10),  # a quarter is 9, stretched to the season (10), under the room of 16
        (28, 10, 8),  # room for two seasons leaves exactly 8
        (24, 10, 8),  # too short for a seasonal candidate: the usual quarter (at least 8)
    ],
    ids=[
        "no season: the last quarter is forecast",
        "a short window still scores MIN_ERRORS origins",
        "a season shorter than the quarter changes nothing",
        "a daily season is scored over a whole day",
        "a season longer than the quarter is scored over one season",
        "the backtest shrinks to leave two seasons to fit on",
        "a window without room for two seasons keeps the usual backtest",
    ],
)
def test_the_backtest_window(window, period, expected):
    assert backtest.backtest_points(window, period) == expected


@pytest.mark.parametrize(
    ("incumbent", "challenger", "wins"),
    [
        ([10.0] * 40, [5.0] * 39 + [6.0], True),
        ([10.0, 2.0] * 20, [2.0, 10.0] * 20, False),
        ([5.0] * 40, [10.0] * 40, False),
        ([10.0, 9.0, 11.0, 10.0] * 2, [9.0, 9.8, 10.2, 10.6] * 2, False),
    ],
    ids=[
        "half the error at every origin wins",
        "as often better as worse does not win",
        "worse does not win",
        "slightly better on eight origins is within noise",
    ],
)
def test_a_challenger_must_beat_smoothing_beyond_noise(incumbent, challenger, wins):
    def scored(errors: list[float]) -> backtest.Backtest:
        return backtest.Backtest(np.asarray(errors)[:, None], reach=1)

    assert backtest.better_beyond_noise(scored(challenger), scored(incumbent)) is wins


# --- the choice ---------------------------------------------------------------------------------


def chosen(series: SeriesView, steps: int, now: float = T0) -> predictors.Prediction:
    """The forecast of a fresh ``auto`` predictor once it has chosen for a long history (which
    it first forecasts with smoothing, as after a restart, and chooses for within a minute)."""
    predictor = predictors.make_predictor("auto")
    predictor.predict(series, steps, now)
    return predictor.predict(series, steps, now + predictors.AutoPredictor.RESTART_SPREAD_S)


def test_a_seasonal_load_gets_the_seasonal_model_and_says_its_period():
    counts = sine_counts(720, 10.0, 600.0)
    prediction = chosen(view(counts, 10.0), 30)
    assert prediction.model == "auto" and prediction.fallback is None
    assert prediction.selection is not None
    assert prediction.selection.model == "seasonal"
    assert prediction.selection.period_s == 600.0
    # The season is the whole error of a level model; the seasonal one is left with the noise.
    assert prediction.selection.backtest_mae < 0.3 * prediction.selection.constant_mae


@pytest.mark.parametrize(
    ("series", "allowed"),
    [
        pytest.param(np.random.default_rng(4).poisson(100, 400).astype(float),
                     {"smoothing", "arima(1,0,0)", "arima(2,0,0)", "arima(1,0,1)"},
                     id="noise around a level keeps a level model"),
        pytest.param(np.square(10 + np.cumsum(np.random.default_rng(5).normal(0, 0.3, 400))),
                     {"smoothing", "constant", "arima(0,1,1)", "arima(1,1,1)"},
                     id="a random walk gets a model that follows the last value"),
    ],
)
def test_a_load_without_a_season_gets_no_seasonal_model(series, allowed):
    prediction = chosen(view(series, 60.0), 5)
    assert prediction.selection is not None
    assert prediction.selection.period_s is None
    assert prediction.selection.model in allowed


def test_a_steady_ramp_gets_the_damped_trend_which_stays_ahead_of_a_level():
    # A rise of 10 requests a window per window, with Poisson noise: a level lags it by its
    # delay plus the horizon, some 60 requests, well over the noise (about 60 at 4,000).
    ramp = np.random.default_rng(8).poisson(200 + 10.0 * np.arange(400)).astype(float)
    prediction = chosen(view(ramp, 60.0), 5)
    assert prediction.selection is not None
    assert prediction.selection.model == "damped-trend"
    # Five windows ahead of the last, the ramp is at 200 + 10 x 404 = 4,240.
    assert abs(prediction.point[-1] - 4240.0) < 100.0, prediction.point


def test_the_model_is_chosen_again_only_on_the_refit_schedule():
    predictor = predictors.make_predictor("auto", schedule=predictors.RefitSchedule(3600.0))
    counts = sine_counts(400, 10.0, 600.0)
    for n in range(12, 300):  # a live deployment, chosen for at 12, 24, 48, 96 and 192 points
        first = predictor.predict(view(counts[:n], 10.0), 30, now=T0 + 10.0 * n)
    later = [
        predictor.predict(view(counts[:n], 10.0), 30, now=T0 + 10.0 * n) for n in range(300, 384)
    ]
    assert not any(p.refitted for p in later), "under an hour and under twice the points"
    assert {p.selection for p in later} == {first.selection}
    assert first.selection is not None and first.selection.model == "seasonal"
    assert predictor.predict(view(counts, 10.0), 30, now=T0 + 10.0 * 384).refitted, "doubled"


def test_after_a_restart_each_deployment_starts_with_smoothing_and_chooses_within_a_minute():
    # A rebuilt history of 720 points: choosing at once for a thousand of them would be half a
    # minute of CPU in one interval.
    counts = sine_counts(800, 10.0, 600.0)
    predictor = predictors.make_predictor("auto")
    at_restart = predictor.predict(view(counts[:720], 10.0), 30, now=T0 + 7200)
    assert at_restart.selection is not None and at_restart.selection.model == "smoothing"
    models = []
    for n in range(721, 728):  # six windows of 10 s: the minute of the spread
        models.append(predictor.predict(view(counts[:n], 10.0), 30, now=T0 + 10.0 * n))
    assert models[-1].selection is not None and models[-1].selection.model == "seasonal"
    assert sum(p.refitted for p in models) == 1, "chosen once, at a moment of its own"
    auto = predictors.AutoPredictor(0.9, predictors.RefitSchedule(), 720)
    delays = {
        auto.choice_delay_s(view(sine_counts(720, 10.0, 600.0, seed), 10.0)) for seed in range(20)
    }
    assert len(delays) == 20 and all(0.0 <= d < 60.0 for d in delays), "spread, not in step"


def forecasts_of(stream: list[MetricSnapshot], **settings: object) -> list[tuple[float, float]]:
    """(point, upper) of the request count one step ahead, for each snapshot of the stream."""
    forecaster = Forecaster(ForecasterSettings.model_validate(settings))
    out = []
    for snapshot in stream:
        step = forecaster.forecast(snapshot).steps[0]
        out.append((step.num_requests, step.num_requests_upper))
    return out


def sine_stream(window_s: float, duration_s: float) -> list[MetricSnapshot]:
    trace = synth.generate(replace(synth.DYNAMO_SINE, duration_s=duration_s))
    windows = trace_windows(trace, window_s)
    return [
        MetricSnapshot.model_validate(
            {"id": f"w{i}", "deployment": SINE, "window_end": T0 + float(end),
             "window_s": window_s} | {s.value: v for s, v in values.items()}
        )
        for i, (end, values) in enumerate(zip(windows.window_end_s, windows.values, strict=True))
    ]


def test_on_the_sine_the_default_band_follows_the_period_instead_of_covering_the_peak():
    # Dynamo's sine scenario (12 to 36 requests/s, period 600 s) at 60 s windows: the peak is
    # 2,160 requests a window. A level model's band sat at 2,300-2,800 all the time.
    stream = sine_stream(60.0, 3 * 3600.0)
    actual = np.array([s.num_requests for s in stream])
    bands = np.array(forecasts_of(stream))
    # From the second hour on (the season is learnt after about 48 windows, two refits).
    later = slice(60, len(stream) - 1)
    upper, point = bands[later, 1], bands[later, 0]
    assert upper.min() < 0.6 * 2160, "at the trough, the band is far below the peak"
    assert np.corrcoef(upper, actual[61:])[0, 1] > 0.9, "the band rises and falls with the load"
    covered = np.mean(actual[61:] <= upper)
    assert 0.8 <= covered <= 0.98, covered
    old = np.array(forecasts_of(stream, predictor="horizon-smoothing"))[later]
    assert np.mean(np.abs(point - actual[61:])) < 0.3 * np.mean(np.abs(old[:, 0] - actual[61:]))
