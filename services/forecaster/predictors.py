"""Load predictors behind one small protocol.

Each predictor is a plain class, one instance per deployment and series (it may keep a fitted
model between calls), with no I/O and no clock: ``now`` is an argument, used only to schedule
refits. ``predict`` returns, for every step up to the horizon, a point value and an upper quantile
(``confidence``, one-sided).

``make_predictor`` wraps the chosen model in ``RobustPredictor``, which owns what real traffic
needs whatever the model: it works on the square root of the series (counts are roughly Poisson,
whose variance the square root stabilises; unlike a log it copes with idle windows of 0), falls
back to ``constant`` with the reason when a model cannot be used (too few points, a flat history,
a failed fit, a non-finite result), and keeps every forecast finite, non-negative, with the upper
quantile not below the point and both below a runaway cap.

Models: ``constant`` (next = last, the reference), ``arima`` (statsmodels SARIMAX, order by AIC on
a small grid), ``kalman`` (statsmodels UnobservedComponents, local level or local linear trend by
AIC), ``holt-winters`` (statsmodels ExponentialSmoothing, damped trend, with a daily or weekly
season when the history covers two of them), ``horizon-smoothing`` (exponential smoothing tuned
for the forecast horizon), ``auto`` (per series, the best of constant, smoothing, ARIMA and a
seasonal model with the period found in the history, by rolling backtest; the default, see
``backtest`` and docs/benchmarks.md) and ``prophet`` (optional extra).
"""

from __future__ import annotations

import importlib
import math
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any, Protocol

import numpy as np
from statsmodels.tools import sm_exceptions
from statsmodels.tsa.holtwinters import ExponentialSmoothing
from statsmodels.tsa.statespace.mlemodel import MLEModel, MLEResults
from statsmodels.tsa.statespace.sarimax import SARIMAX
from statsmodels.tsa.statespace.structural import UnobservedComponents

from services.forecaster import backtest
from services.forecaster.history import FloatArray, SeriesView

# Re-exported: the upper quantiles of every predictor that calibrates on its own errors.
conformal_quantiles = backtest.conformal_quantiles

# Fits run in worker threads, where warnings.catch_warnings() is not safe (it swaps a process-wide
# filter list). statsmodels' own estimation warnings say nothing the fallback reasons do not, so
# they are silenced by category, which touches no other library's warnings.
for _category in (
    sm_exceptions.ConvergenceWarning,
    sm_exceptions.EstimationWarning,
    sm_exceptions.ValueWarning,
    sm_exceptions.HessianInversionWarning,
):
    warnings.filterwarnings("ignore", category=_category)

# A forecast above this multiple of the largest value in the history is a trend running away (a
# trend fitted across a spike), not a forecast; the cap keeps it from asking for a fleet.
RUNAWAY_FACTOR = 4.0

# Quoted: unquoted, zsh reads the brackets as a glob and answers "no matches found".
PROPHET_INSTALL_HINT = "pip install 'slaplanner[prophet]'"


class PredictorUnavailable(RuntimeError):
    """A configured predictor whose optional dependency is not installed."""


@dataclass(frozen=True)
class Selection:
    """Which candidate a selecting predictor (``auto``) forecast with, and its backtest."""

    model: str
    period_s: float | None
    backtest_mae: float  # in the series' unit, mean over the steps up to the horizon
    constant_mae: float  # the same for constant, the reference
    origins: int


@dataclass(frozen=True)
class Prediction:
    """Forecast of one series for steps 1..n ahead."""

    point: FloatArray
    upper: FloatArray
    model: str
    fallback: str | None = None
    refitted: bool = False
    selection: Selection | None = None


class Predictor(Protocol):
    """Forecasts one series; may keep fitted state between calls on the same series."""

    @property
    def name(self) -> str: ...

    @property
    def min_points(self) -> int: ...

    def predict(self, series: SeriesView, steps: int, now: float) -> Prediction: ...


@dataclass(frozen=True)
class RefitSchedule:
    """When to re-estimate a model's parameters rather than only update its state.

    Refit every ``interval_s`` (window time), and also whenever the history has doubled since the
    last fit: parameters learnt from a dozen points are poor, and refitting at 12, 24, 48, ...
    points costs only a logarithmic number of fits.
    """

    interval_s: float = 6 * 3600.0

    def due(self, fitted_at: float | None, fitted_points: int, now: float, points: int) -> bool:
        if fitted_at is None:
            return True
        return now - fitted_at >= self.interval_s or points >= 2 * fitted_points


class _FitBookkeeping:
    """What a stateful predictor has seen of its series, and when it last fitted."""

    def __init__(self, schedule: RefitSchedule) -> None:
        self.schedule = schedule
        self.seen_total = 0
        self.fitted_at: float | None = None
        self.fitted_points = 0

    def new_points(self, series: SeriesView) -> int:
        return series.total_recorded - self.seen_total

    def refit_due(self, series: SeriesView, now: float) -> bool:
        """Never fitted, due on the schedule, or the series holds points the model cannot
        catch up with (they left the ring unseen, or the series restarted)."""
        new_points = self.new_points(series)
        due = self.schedule.due(self.fitted_at, self.fitted_points, now, len(series))
        return due or not 0 <= new_points < len(series)

    def caught_up(self, series: SeriesView, now: float, refitted: bool) -> None:
        self.seen_total = series.total_recorded
        if refitted:
            self.fitted_at, self.fitted_points = now, len(series)


def quantile_z(confidence: float) -> float:
    if not 0.5 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence!r}")
    return NormalDist().inv_cdf(confidence)


class ConstantPredictor:
    """Next = last. The upper quantile is the naive method's: the spread of one-step changes
    grows with the square root of the steps ahead (Hyndman & Athanasopoulos, Forecasting:
    Principles and Practice, section 5.5)."""

    name = "constant"
    min_points = 1

    def __init__(self, confidence: float = 0.9, spread_points: int = 240) -> None:
        self._z = quantile_z(confidence)
        # Recent volatility: the spread of the last few hundred changes, not of the whole day.
        self._spread_points = spread_points

    def predict(self, series: SeriesView, steps: int, now: float) -> Prediction:
        values = series.values
        last = float(values[-1]) if values.size else 0.0
        recent = values[-self._spread_points :]
        step_sd = float(np.std(np.diff(recent))) if recent.size > 2 else 0.0
        point = np.full(steps, last)
        upper = point + self._z * step_sd * np.sqrt(np.arange(1, steps + 1))
        return Prediction(point, upper, self.name)


class _StateSpacePredictor:
    """A statsmodels state-space model chosen by AIC among candidates, refitted on a schedule
    and between refits updated per new point with ``MLEResults.extend`` (the Kalman filter run
    over the new points only, parameters held; statsmodels docs, "Forecasting in statsmodels")."""

    name = "state-space"
    min_points = 12

    def __init__(self, confidence: float, schedule: RefitSchedule, fit_points: int) -> None:
        self._z = quantile_z(confidence)
        self._fit_points = fit_points
        self._results: MLEResults | None = None
        self._books = _FitBookkeeping(schedule)

    def candidates(self, values: FloatArray) -> Sequence[MLEModel]:
        raise NotImplementedError

    def predict(self, series: SeriesView, steps: int, now: float) -> Prediction:
        new_points = self._books.new_points(series)
        refit = self._results is None or self._books.refit_due(series, now)
        if refit:
            self._results = _lowest_aic(self.candidates(series.values[-self._fit_points :]))
        elif new_points and self._results is not None:
            self._results = self._results.extend(series.values[-new_points:])
        self._books.caught_up(series, now, refit)
        assert self._results is not None
        forecast = self._results.get_forecast(steps)
        mean = np.asarray(forecast.predicted_mean, dtype=np.float64)
        sd = np.sqrt(np.maximum(np.asarray(forecast.var_pred_mean, dtype=np.float64), 0.0))
        return Prediction(mean, mean + self._z * sd, self.name, refitted=refit)


def _lowest_aic(models: Sequence[MLEModel]) -> MLEResults:
    best: MLEResults | None = None
    failures: list[str] = []
    for model in models:
        try:
            # cov_type="none": the parameter covariance is not needed to forecast and costs as
            # much as the fit itself.
            results = model.fit(disp=False, cov_type="none")
        except (ValueError, ArithmeticError) as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            continue
        if _near_unit_root(results):
            failures.append(f"{model.__class__.__name__}: a root near the unit circle")
            continue
        if math.isfinite(results.aic) and (best is None or results.aic < best.aic):
            best = results
    if best is None:
        raise ValueError("no candidate model could be fitted: " + "; ".join(failures)[:200])
    return best


def _near_unit_root(results: MLEResults) -> bool:
    """An AR or MA root within 1.01 of the unit circle, as auto.arima rejects (Hyndman &
    Khandakar, "Automatic time series forecasting", JSS 27(3), 2008): such a fit sits on the
    stationarity or invertibility boundary and its forecasts oscillate or explode."""
    roots = [
        np.asarray(getattr(results, name, ()), dtype=np.complex128)
        for name in ("arroots", "maroots")  # absent (empty) for structural models
    ]
    return any(bool(np.any(np.abs(r) < 1.01)) for r in roots)


class ArimaPredictor(_StateSpacePredictor):
    """ARIMA with its order chosen by AIC on a small grid: stationary AR/ARMA around a mean, and
    the differenced ARIMA(0,1,1) / (1,1,1) that track a wandering level."""

    name = "arima"
    min_points = 12
    ORDERS: tuple[tuple[int, int, int], ...] = (
        (1, 0, 0),
        (2, 0, 0),
        (1, 0, 1),
        (0, 1, 1),
        (1, 1, 1),
    )

    def candidates(self, values: FloatArray) -> Sequence[MLEModel]:
        return [
            SARIMAX(values, order=order, trend="c" if order[1] == 0 else "n")
            for order in self.ORDERS
        ]


class KalmanPredictor(_StateSpacePredictor):
    """Local level or local linear trend (by AIC), the structural models of statsmodels'
    UnobservedComponents; the Kalman filter absorbs each new point between refits."""

    name = "kalman"
    min_points = 8
    LEVELS: tuple[str, ...] = ("llevel", "lltrend")

    def candidates(self, values: FloatArray) -> Sequence[MLEModel]:
        return [UnobservedComponents(values, level) for level in self.LEVELS]


@dataclass(frozen=True)
class _SmoothingFit:
    alpha: float
    level: float
    steps: int  # the horizon the constant was tuned for


class HorizonSmoothingPredictor:
    """Exponential smoothing whose smoothing constant is chosen for the horizon that matters.

    Simple exponential smoothing is the steady state of the local-level Kalman filter; fitted by
    likelihood it is tuned to forecast one step ahead, and on bursty traffic it smooths so much
    that its forecast several minutes ahead is no better than the last value. Here the constant
    is the one, on a grid from 0.05 to 1 (1 is the last value), with the smallest in-sample
    squared error ``steps`` ahead ("direct multi-step estimation", Chevillon, Journal of Economic
    Surveys 21(4), 2007). The upper quantile of step h is the level plus the conformal
    ``confidence`` quantile of the in-sample errors h steps ahead, so it follows the real shape of
    bursts rather than a Gaussian's. The constant is refitted on the schedule; between refits the
    level absorbs each new point and the errors are measured again on the latest points, so a
    trend that sets in after a refit widens the quantile at once (a level lags a trend).
    """

    name = "horizon-smoothing"
    min_points = 12

    def __init__(self, confidence: float, schedule: RefitSchedule, fit_points: int) -> None:
        quantile_z(confidence)  # the same range check as every predictor
        self._confidence = confidence
        self._fit_points = fit_points
        self._fit: _SmoothingFit | None = None
        self._books = _FitBookkeeping(schedule)

    def predict(self, series: SeriesView, steps: int, now: float) -> Prediction:
        new_points = self._books.new_points(series)
        values = series.values[-self._fit_points :]
        fit = self._fit
        refit = fit is None or fit.steps != steps or self._books.refit_due(series, now)
        if refit:
            alpha = backtest.tune_alpha(values, steps)
            fit = _SmoothingFit(alpha, float(backtest.smoothed_levels(values, alpha)[-1]), steps)
        elif new_points:
            assert fit is not None
            level = fit.level
            for value in series.values[-new_points:]:
                level += fit.alpha * (float(value) - level)
            fit = replace(fit, level=level)
        assert fit is not None
        self._fit = fit
        self._books.caught_up(series, now, refit)
        # The constant stays until the next refit, but the spread is measured again on the
        # latest points at every forecast: a spread learnt before a trend set in would
        # under-cover it.
        offsets = backtest.upper_offsets(
            backtest.Smoothing(fit.alpha), values, series.times[-self._fit_points :], steps,
            self._confidence,
        )
        point = np.full(steps, fit.level)
        return Prediction(point, point + offsets, self.name, refitted=refit)


class AutoPredictor:
    """Per series, the candidate (constant, smoothing, ARIMA orders, seasonal with the period
    found in the history) with the smallest error in a rolling-origin backtest over the latest
    points (``backtest.select``). The selection runs on the refit schedule, not at every
    forecast; between selections the winner runs over the latest points with its parameters
    held. The upper quantile of step h is the point plus the conformal ``confidence`` quantile of
    the winner's own errors h steps ahead over those points, measured again at every forecast
    (as ``horizon-smoothing`` does), so a seasonal winner's band follows the season.
    """

    name = "auto"
    min_points = 12
    # A history at least this long when first seen was rebuilt after a restart (a live
    # deployment is first chosen for at min_points). Choosing for every rebuilt deployment at its
    # first forecast would cost tens of ms each at once (half a minute of CPU for a thousand),
    # so each starts with smoothing, the incumbent, and is chosen for within RESTART_SPREAD_S of
    # window time, at a moment of its own.
    REBUILT_POINTS = 48
    RESTART_SPREAD_S = 60.0

    def __init__(self, confidence: float, schedule: RefitSchedule, fit_points: int) -> None:
        quantile_z(confidence)  # the same range check as every predictor
        self._confidence = confidence
        self._fit_points = fit_points
        self._choice: backtest.Choice | None = None
        self._steps = 0
        self._choose_at: float | None = None  # a deferred choice, in window time
        self._books = _FitBookkeeping(schedule)

    def predict(self, series: SeriesView, steps: int, now: float) -> Prediction:
        choice = self._choice
        deferred_due = self._choose_at is not None and now >= self._choose_at
        refit = (
            choice is None
            or deferred_due
            or self._steps != steps
            or self._books.refit_due(series, now)
        )
        if refit:
            rebuilt = choice is None and len(series) >= self.REBUILT_POINTS
            choice = backtest.select(
                series.values, series.times, series.window_s, steps, self._fit_points,
                challengers=not rebuilt,
            )
            self._choice, self._steps = choice, steps
            self._choose_at = now + self.choice_delay_s(series) if rebuilt else None
        assert choice is not None
        self._books.caught_up(series, now, refit)
        values = series.values[-choice.window_points :]
        times = series.times[-choice.window_points :]
        latest = np.array([values.size - 1])
        point = choice.model.forecasts(values, times, latest, steps)[0]
        offsets = backtest.upper_offsets(choice.model, values, times, steps, self._confidence)
        period = choice.period_points
        selection = Selection(
            model=choice.model.label,
            period_s=period * series.window_s if period else None,
            backtest_mae=choice.backtest_mae,
            constant_mae=choice.constant_mae,
            origins=choice.origins,
        )
        return Prediction(
            point, point + offsets, self.name, refitted=refit, selection=selection
        )

    def choice_delay_s(self, series: SeriesView) -> float:
        """A delay in [0, RESTART_SPREAD_S) that differs from one series to the next (a hash of
        its latest values) and not from one run to the next."""
        digest = zlib.crc32(series.values[-8:].tobytes())
        return self.RESTART_SPREAD_S * digest / 2**32


@dataclass(frozen=True)
class _HoltWintersState:
    alpha: float
    beta: float  # statsmodels' smoothing_trend: b = beta (l - l_prev) + (1 - beta) phi b_prev
    phi: float
    gamma: float
    level: float
    trend: float
    season: FloatArray  # the next len(season) seasonal terms, next one first; empty if none
    sigma: float  # standard deviation of the one-step errors of the fit


class HoltWintersPredictor:
    """Additive Holt-Winters with a damped trend (statsmodels ExponentialSmoothing), seasonal
    when the history covers two seasons without gaps, weekly preferred to daily; otherwise
    damped Holt without a season.

    statsmodels refits from scratch only; between refits the smoothing equations run over the new
    points with the fitted parameters held (the error-correction form of Hyndman et al.,
    Forecasting with Exponential Smoothing, 2008, table 2.1). The upper quantile uses the
    forecast variance of the equivalent ETS(A,Ad,A) model from the same book (chapter 6).
    """

    name = "holt-winters"
    min_points = 10
    SEASONS_S: tuple[float, ...] = (7 * 86_400.0, 86_400.0)

    def __init__(self, confidence: float, schedule: RefitSchedule, fit_points: int) -> None:
        self._z = quantile_z(confidence)
        self._fit_points = fit_points
        self._state: _HoltWintersState | None = None
        self._books = _FitBookkeeping(schedule)

    def predict(self, series: SeriesView, steps: int, now: float) -> Prediction:
        new_points = self._books.new_points(series)
        season_points = self.season_points(series)
        state = self._state
        refit = (
            state is None
            or season_points != state.season.size
            or self._books.refit_due(series, now)
        )
        if refit:
            fit_points = max(self._fit_points, 2 * season_points)
            state = _fit_holt_winters(series.values[-fit_points:], season_points)
        elif new_points:
            assert state is not None
            state = _smooth(state, series.values[-new_points:])
        assert state is not None
        self._state = state
        self._books.caught_up(series, now, refit)
        point, sd = _holt_winters_forecast(state, steps)
        return Prediction(point, point + self._z * sd, self.name, refitted=refit)

    def season_points(self, series: SeriesView) -> int:
        """Points per season of the longest season the history covers twice, else 0."""
        if len(series) < 2 or series.window_s <= 0:
            return 0
        span_s = float(series.times[-1] - series.times[0]) + series.window_s
        missing_windows = span_s / series.window_s - len(series)
        for season_s in self.SEASONS_S:
            points = round(season_s / series.window_s)
            # Missing windows shift the phase of every later point; more than 2 % of a season
            # (half an hour of a day) and the seasonal terms would be applied at the wrong time.
            in_phase = missing_windows <= max(1.0, 0.02 * points) + 1e-6
            if in_phase and points >= 2 and len(series) >= 2 * points:
                return points
        return 0


def _fit_holt_winters(values: FloatArray, season_points: int) -> _HoltWintersState:
    seasonal = season_points > 0
    model = ExponentialSmoothing(
        values,
        trend="add",
        damped_trend=True,
        seasonal="add" if seasonal else None,
        seasonal_periods=season_points if seasonal else None,
        # With hundreds of seasonal terms, estimating each initial value would dominate the
        # fit; the heuristic decomposition of the first two seasons is the usual choice.
        initialization_method="heuristic" if seasonal else "estimated",
    )
    fit = model.fit()
    params = fit.params
    residuals = values - np.asarray(fit.fittedvalues, dtype=np.float64)
    season = np.asarray(fit.season, dtype=np.float64)[-season_points:] if seasonal else np.empty(0)
    return _HoltWintersState(
        alpha=float(params["smoothing_level"]),
        beta=float(params["smoothing_trend"]),
        phi=float(params["damping_trend"]),
        gamma=float(params["smoothing_seasonal"]) if seasonal else 0.0,
        level=float(np.asarray(fit.level)[-1]),
        trend=float(np.asarray(fit.trend)[-1]),
        season=season,
        sigma=float(np.sqrt(np.mean(residuals**2))),
    )


def _smooth(state: _HoltWintersState, new_values: FloatArray) -> _HoltWintersState:
    """Run the smoothing equations over new points with the parameters held."""
    level, trend = state.level, state.trend
    season = state.season.copy()
    alpha, beta, phi, gamma = state.alpha, state.beta, state.phi, state.gamma
    for value in new_values:
        seasonal_term = float(season[0]) if season.size else 0.0
        error = float(value) - (level + phi * trend + seasonal_term)
        level, trend = level + phi * trend + alpha * error, phi * trend + alpha * beta * error
        if season.size:
            season = np.roll(season, -1)
            season[-1] = seasonal_term + gamma * error
    return replace(state, level=level, trend=trend, season=season)


def _holt_winters_forecast(state: _HoltWintersState, steps: int) -> tuple[FloatArray, FloatArray]:
    ahead = np.arange(1, steps + 1)
    # phi + phi^2 + ... + phi^h: the damped trend's contribution h steps ahead.
    damped_sum = np.cumsum(state.phi**ahead)
    point = state.level + damped_sum * state.trend
    if state.season.size:
        point = point + state.season[(ahead - 1) % state.season.size]
    # ETS(A,Ad,A): var_h = sigma^2 (1 + sum_{j<h} c_j^2), c_j = alpha (1 + beta phi_j) + gamma
    # on whole seasons, with statsmodels' beta (Hyndman's beta* = beta / alpha).
    c = state.alpha * (1.0 + state.beta * damped_sum[:-1])
    if state.season.size:
        c = c + state.gamma * ((ahead[:-1] % state.season.size) == 0)
    variance_factor = 1.0 + np.concatenate(([0.0], np.cumsum(c**2)))
    return point, state.sigma * np.sqrt(variance_factor)


class ProphetPredictor:
    """Prophet (optional extra). Prophet has no incremental update: between refits it forecasts
    from its last fit at the new times, so the newest points reach it only at the next refit."""

    name = "prophet"
    min_points = 24

    def __init__(self, confidence: float, schedule: RefitSchedule, fit_points: int) -> None:
        self._prophet_class = import_prophet()
        self._confidence = confidence
        self._fit_points = fit_points
        self._model: Any = None
        self._books = _FitBookkeeping(schedule)

    def predict(self, series: SeriesView, steps: int, now: float) -> Prediction:
        pd = importlib.import_module("pandas")  # only this optional predictor needs it
        refit = self._model is None or self._books.refit_due(series, now)
        if refit:
            keep = slice(-self._fit_points, None)
            frame = pd.DataFrame(
                {"ds": pd.to_datetime(series.times[keep], unit="s"), "y": series.values[keep]}
            )
            # A two-sided interval of width 2c - 1 has its upper edge at the one-sided c quantile.
            self._model = self._prophet_class(interval_width=2 * self._confidence - 1)
            self._model.fit(frame)
        self._books.caught_up(series, now, refit)
        ahead = series.times[-1] + series.window_s * np.arange(1, steps + 1)
        future = pd.DataFrame({"ds": pd.to_datetime(ahead, unit="s")})
        table = self._model.predict(future)
        point = table["yhat"].to_numpy(dtype=np.float64)
        upper = table["yhat_upper"].to_numpy(dtype=np.float64)
        return Prediction(point, upper, self.name, refitted=refit)


def import_prophet() -> Any:
    """The ``Prophet`` class, or ``PredictorUnavailable`` naming the extra to install."""
    try:
        return importlib.import_module("prophet").Prophet
    except ImportError:
        raise PredictorUnavailable(
            f"the prophet predictor needs the optional dependency: {PROPHET_INSTALL_HINT}"
        ) from None


class RobustPredictor:
    """What every forecast needs whatever the model (see the module docstring)."""

    def __init__(self, model: Predictor, confidence: float) -> None:
        self.model = model
        self._constant = ConstantPredictor(confidence)

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def min_points(self) -> int:
        return self.model.min_points

    def predict(self, series: SeriesView, steps: int, now: float) -> Prediction:
        finite = np.isfinite(series.values) & np.isfinite(series.times)
        values = np.maximum(series.values[finite], 0.0)
        scaled = replace(series, values=np.sqrt(values), times=series.times[finite])
        prediction, fallback = self._scaled_prediction(scaled, steps, now)
        if prediction.model != self._constant.name and not (
            np.all(np.isfinite(prediction.point)) and np.all(np.isfinite(prediction.upper))
        ):
            prediction = self._constant.predict(scaled, steps, now)
            fallback = f"{self.name} gave a non-finite forecast"
        # Back from square roots: a quantile of sqrt(y) squared is the quantile of y; a negative
        # value on the root scale means 0.
        runaway = RUNAWAY_FACTOR * float(values.max()) if values.size else 0.0
        point = np.minimum(np.square(np.maximum(prediction.point, 0.0)), runaway)
        upper = np.minimum(np.square(np.maximum(prediction.upper, 0.0)), runaway)
        return replace(prediction, point=point, upper=np.maximum(upper, point), fallback=fallback)

    def _scaled_prediction(
        self, scaled: SeriesView, steps: int, now: float
    ) -> tuple[Prediction, str | None]:
        if len(scaled) == 0:
            return self._constant.predict(scaled, steps, now), "no observations yet"
        if self.model.name == self._constant.name:
            return self.model.predict(scaled, steps, now), None
        if len(scaled) < self.model.min_points:
            reason = f"{len(scaled)} points, {self.name} needs {self.model.min_points}"
            return self._constant.predict(scaled, steps, now), reason
        if np.ptp(scaled.values) == 0.0:
            # Every estimator of a noise variance breaks on a flat series; last value is exact.
            reason = f"flat history (every point {float(scaled.values[0]) ** 2:g})"
            return self._constant.predict(scaled, steps, now), reason
        try:
            return self.model.predict(scaled, steps, now), None
        except (ValueError, ArithmeticError) as exc:
            # statsmodels raises these for data it cannot fit (e.g. a singular matrix).
            reason = f"{self.name} fit failed ({type(exc).__name__}: {exc})"
            return self._constant.predict(scaled, steps, now), reason[:200]


PredictorFactory = Callable[[float, RefitSchedule, int], Predictor]

MODELS: dict[str, PredictorFactory] = {
    "constant": lambda confidence, _schedule, _fit_points: ConstantPredictor(confidence),
    "arima": ArimaPredictor,
    "kalman": KalmanPredictor,
    "holt-winters": HoltWintersPredictor,
    "horizon-smoothing": HorizonSmoothingPredictor,
    "auto": AutoPredictor,
    "prophet": ProphetPredictor,
}


def make_predictor(
    name: str,
    confidence: float = 0.9,
    schedule: RefitSchedule | None = None,
    fit_points: int = 720,
) -> RobustPredictor:
    """A fresh predictor for one series; raises ``PredictorUnavailable`` or ``KeyError``."""
    factory = MODELS.get(name)
    if factory is None:
        raise KeyError(f"unknown predictor {name!r}; one of {', '.join(MODELS)}")
    model = factory(confidence, schedule or RefitSchedule(), fit_points)
    return RobustPredictor(model, confidence)


def ensure_available(name: str) -> None:
    """Fail at start-up, not at the first forecast, when a predictor cannot be built."""
    if name not in MODELS:
        raise KeyError(f"unknown predictor {name!r}; one of {', '.join(MODELS)}")
    if name == "prophet":
        import_prophet()
