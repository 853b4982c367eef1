"""The upper quantile of horizon-smoothing: a conformal rank of its in-sample errors, measured
again at every new point so that a trend that sets in between refits widens it."""

from __future__ import annotations

import numpy as np
import pytest

from services.forecaster import predictors
from services.forecaster.history import SeriesView

T0 = 1_700_000_000.0


def view(values: np.ndarray) -> SeriesView:
    times = T0 + 60.0 * np.arange(values.size, dtype=np.float64)
    return SeriesView(values, times, values.size, 60.0)


@pytest.mark.parametrize(
    ("errors", "confidence", "expected"),
    [
        pytest.param(np.arange(1.0, 20.0), 0.9, 18.0,  # rank ceil(20 x 0.9) = 18 of 19
                     id="nineteen errors at 0.9 give the 18th smallest"),
        pytest.param(np.arange(1.0, 100.0), 0.9, 90.0,  # ceil(100 x 0.9) = 90 of 99
                     id="ninety-nine errors at 0.9 give the 90th smallest"),
        pytest.param(np.arange(1.0, 10.0), 0.9, 9.0,  # ceil(10 x 0.9) = 9 of 9
                     id="nine errors at 0.9 give the largest"),
        pytest.param(np.arange(1.0, 6.0), 0.9, 5.0,  # ceil(6 x 0.9) = 6 > 5: the largest
                     id="too few errors for the rank give the largest"),
        pytest.param(np.array([5.0, -3.0, 2.0, 9.0, -1.0]), 0.5, 2.0,  # ceil(6 x 0.5) = 3
                     id="order of the errors does not matter"),
    ],
)
def test_the_conformal_quantile_is_the_ceil_of_n_plus_one_times_confidence_smallest(
    errors: np.ndarray, confidence: float, expected: float
) -> None:
    assert predictors.conformal_quantiles(errors[:, None], confidence)[0] == expected


def test_the_conformal_quantile_is_never_below_the_sample_quantile() -> None:
    rng = np.random.default_rng(3)
    for size in (8, 20, 50, 200):
        errors = rng.normal(size=(size, 3))
        conformal = predictors.conformal_quantiles(errors, 0.9)
        assert np.all(conformal >= np.quantile(errors, 0.9, axis=0))


def test_a_trend_after_the_last_refit_widens_the_upper_quantile_before_the_next_refit() -> None:
    predictor = predictors.HorizonSmoothingPredictor(
        0.9, predictors.RefitSchedule(6 * 3600.0), fit_points=720
    )
    rng = np.random.default_rng(0)
    flat = 100.0 + rng.normal(0.0, 2.0, 200)
    at_refit = predictor.predict(view(flat), 5, now=T0 + 60 * 200)
    assert at_refit.refitted
    # 100 more points (under the 400 that would trigger a refit, within the 6 h), rising 1 a step.
    rising = np.concatenate([flat, flat[-1] + np.arange(1.0, 101.0) + rng.normal(0.0, 2.0, 100)])
    later = predictor.predict(view(rising), 5, now=T0 + 60 * 300)
    assert not later.refitted
    spread_at_refit = at_refit.upper - at_refit.point
    spread_later = later.upper - later.point
    # A level lagging a 1-per-step rise misses by more than 5 per step ahead; noise alone, ~3.
    assert np.all(spread_later > spread_at_refit + 5.0), (spread_at_refit, spread_later)
    assert later.upper[-1] >= rising[-1], "the upper quantile reaches the latest value"
