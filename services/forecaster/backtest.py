"""The ``auto`` predictor's candidate models and the rolling-origin backtest that picks one.

Pure numpy/scipy/statsmodels: no clock, no I/O. Everything works on the square root of a series
(``RobustPredictor`` hands it over so) and is vectorised over forecast origins: a fitted
candidate computes, from its parameters alone, the forecast it makes from every origin of a
window of points. One call thus gives a candidate's backtest, the errors its upper quantile is
calibrated on, and the forecast from the latest point. Parameters are estimated only at a
selection, which the predictor runs on the refit schedule; between selections the winner is
run again over the latest points with its parameters held (filters, no optimisation).

Candidates, simplest first (a tie goes to the simpler):

- ``constant``: next = last;
- ``smoothing``: simple exponential smoothing with its constant tuned for the horizon (the
  ``horizon-smoothing`` predictor's model);
- ``arima(p,d,q)`` on a small grid of orders, estimated by Hannan-Rissanen regressions
  (statsmodels), which take a millisecond where a likelihood fit takes a second;
- ``damped-trend``: Holt's smoothing with a damped trend, for ramps such as the daily rise of
  traffic;
- ``seasonal``: when the history shows a period (periodogram peak confirmed by the
  autocorrelation), the seasonal profile of a classical decomposition (statsmodels'
  ``seasonal_decompose``) plus smoothing of the seasonally adjusted series; its forecast is the
  level plus the profile at the future phases ("forecasting with decomposition", Hyndman &
  Athanasopoulos, Forecasting: Principles and Practice, 3rd ed., section 3.7 / 5.7).

The choice: each candidate is fitted on the points before the backtest window and forecasts from
every origin in it; the smallest mean absolute error in the series' own unit (the square undone),
averaged over the steps up to the horizon, wins (rolling-origin evaluation, Tashman,
International Journal of Forecasting 16(4), 2000). The winner is then fitted again on the whole
window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view
from scipy.signal import detrend, lfilter, lfiltic, periodogram
from statsmodels.tsa.arima.estimators.hannan_rissanen import hannan_rissanen
from statsmodels.tsa.seasonal import seasonal_decompose
from statsmodels.tsa.stattools import acf

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Errors needed at the farthest step whose spread is measured; a shorter history measures fewer
# steps ahead and holds the farthest spread beyond.
MIN_ERRORS = 8
# Smoothing constants tried, from heavy smoothing to the last value.
ALPHAS: FloatArray = np.linspace(0.05, 1.0, 20)
# The damped trend's grid: smoothing constants, trend smoothing as a share of the level's
# (Hyndman's beta*), and damping (Gardner & McKenzie's phi; 0.98 is nearly Holt's linear trend).
TREND_ALPHAS: FloatArray = np.linspace(0.05, 1.0, 10)
TREND_BETAS = (0.05, 0.2)
TREND_PHIS = (0.9, 0.98)
# ARIMA orders tried: stationary AR/ARMA around a mean, and the differenced models that track a
# wandering level (the grid the ``arima`` predictor searches by AIC).
ARIMA_ORDERS: tuple[tuple[int, int, int], ...] = ((1, 0, 0), (2, 0, 0), (1, 0, 1), (0, 1, 1),
                                                  (1, 1, 1))
# Standard errors by which a challenger must beat smoothing in the backtest to replace it (a
# one-sided 5 % test).
CHALLENGE_Z = 1.645
# Points an ARIMA candidate needs to be estimated at all.
ARIMA_MIN_POINTS = 20
# The shortest season, in points: 2 is a load that alternates from one window to the next.
MIN_PERIOD_POINTS = 2
# Autocorrelation at the period (adjusted for the lag) a season needs to become a candidate.
# The backtest, not this threshold, decides whether it forecasts better.
MIN_SEASON_CORRELATION = 0.3
# Periodogram peaks whose period is checked against the autocorrelation.
PERIOD_GUESSES = 3
# Calendar seasons, seconds: a period found within 2 % of one is taken to be it exactly, since a
# season of a few cycles is found only to within a point or two, and a point off a day shifts
# the phase by a point every day.
CALENDAR_PERIODS_S = (3600.0, 86_400.0, 7 * 86_400.0)
CALENDAR_TOLERANCE = 0.02
# Missing windows (as a share of the points, at least one) beyond which the phase of a season
# can no longer be trusted.
MAX_GAP_SHARE = 0.02


def smoothed_levels(values: FloatArray, alpha: float) -> FloatArray:
    """level_t = alpha value_t + (1 - alpha) level_(t-1), starting at the first value."""
    levels: FloatArray = lfilter(
        [alpha], [1.0, alpha - 1.0], values, zi=[(1.0 - alpha) * values[0]]
    )[0]
    return levels


def conformal_quantiles(errors: FloatArray, confidence: float) -> FloatArray:
    """The split-conformal quantile of each column of ``errors`` (n rows): its
    ceil((n + 1) confidence)-th smallest (the largest if that is beyond n), so that a new error
    exchangeable with these stays under it with probability at least ``confidence`` (Lei et al.,
    "Distribution-free predictive inference for regression", JASA 113, 2018). The plain sample
    quantile covers less than ``confidence`` on the few dozen errors a young history has."""
    rows = errors.shape[0]
    rank = min(rows, math.ceil((rows + 1) * confidence))
    quantiles: FloatArray = np.partition(errors, rank - 1, axis=0)[rank - 1]
    return quantiles


def tune_alpha(values: FloatArray, steps: int) -> float:
    """The smoothing constant with the smallest in-sample squared error ``steps`` ahead (fewer
    when the history is short): "direct multi-step estimation" (Chevillon, Journal of Economic
    Surveys 21(4), 2007), since a constant tuned one step ahead smooths too much on bursty
    traffic to be any better than the last value several minutes ahead."""
    tuning_steps = max(1, min(steps, values.size - MIN_ERRORS))
    if values.size <= tuning_steps:
        return 1.0
    levels = np.stack([smoothed_levels(values, alpha) for alpha in ALPHAS])
    errors = values[None, tuning_steps:] - levels[:, :-tuning_steps]
    return float(ALPHAS[int(np.argmin(np.mean(errors**2, axis=1)))])


class Fitted(Protocol):
    """A candidate with its parameters estimated."""

    @property
    def label(self) -> str: ...

    @property
    def period_points(self) -> int: ...

    @property
    def parameters(self) -> int:
        """Values estimated from the series (for the correction of in-sample errors)."""
        ...

    def forecasts(
        self, values: FloatArray, times: FloatArray, origins: IntArray, steps: int
    ) -> FloatArray:
        """Row i: the forecasts 1..steps ahead made from ``origins[i]`` with the points up to
        and including it, the parameters held."""
        ...


@dataclass(frozen=True)
class Constant:
    label: ClassVar[str] = "constant"
    period_points: ClassVar[int] = 0
    parameters: ClassVar[int] = 0

    def forecasts(
        self, values: FloatArray, times: FloatArray, origins: IntArray, steps: int
    ) -> FloatArray:
        return np.repeat(values[origins][:, None], steps, axis=1)


@dataclass(frozen=True)
class Smoothing:
    alpha: float
    label: ClassVar[str] = "smoothing"
    period_points: ClassVar[int] = 0
    parameters: ClassVar[int] = 1

    def forecasts(
        self, values: FloatArray, times: FloatArray, origins: IntArray, steps: int
    ) -> FloatArray:
        levels = smoothed_levels(values, self.alpha)
        return np.repeat(levels[origins][:, None], steps, axis=1)


@dataclass(frozen=True)
class DampedTrend:
    """Holt's linear smoothing with a damped trend, ETS(A,Ad,N) (Gardner & McKenzie, Management
    Science 31(10), 1985): a ramp, such as the daily rise of traffic, is followed instead of
    lagged. The level and trend of every point are two linear filters of the series (the
    error-correction equations as transfer functions), started from a flat past at the first
    value."""

    alpha: float
    beta: float  # trend smoothing as a share of alpha (Hyndman's beta*)
    phi: float
    label: ClassVar[str] = "damped-trend"
    period_points: ClassVar[int] = 0
    parameters: ClassVar[int] = 3

    def states(self, values: FloatArray) -> tuple[FloatArray, FloatArray]:
        """(level, trend) after each point."""
        # x_t = D x_(t-1) + g y_t with D = F - g w', F = [[1, phi], [0, phi]], g = [a, a b],
        # w = [1, phi]: level and trend over det(I - D/z).
        gain = self.alpha * self.beta
        d11, d12 = 1.0 - self.alpha, self.phi * (1.0 - self.alpha)
        d21, d22 = -gain, self.phi * (1.0 - gain)
        denominator = [1.0, -(d11 + d22), d11 * d22 - d12 * d21]
        to_level = [self.alpha, d12 * gain - d22 * self.alpha]
        to_trend = [gain, d21 * self.alpha - d11 * gain]
        first = float(values[0])
        level = lfilter(to_level, denominator, values,
                        zi=lfiltic(to_level, denominator, [first, first], [first, first]))[0]
        trend = lfilter(to_trend, denominator, values,
                        zi=lfiltic(to_trend, denominator, [0.0, 0.0], [first, first]))[0]
        return level, trend

    def forecasts(
        self, values: FloatArray, times: FloatArray, origins: IntArray, steps: int
    ) -> FloatArray:
        level, trend = self.states(values)
        # phi + phi^2 + ... + phi^h: the damped trend's sum h steps ahead
        damped = np.cumsum(self.phi ** np.arange(1, steps + 1))
        forecast: FloatArray = level[origins][:, None] + trend[origins][:, None] * damped[None, :]
        return forecast


@dataclass(frozen=True)
class Seasonal:
    """Smoothing of the seasonally adjusted series plus a seasonal profile held by phase. The
    phase comes from the window's end time, not its position, so a missing window does not
    shift the season."""

    alpha: float
    profile: FloatArray  # one value per phase
    window_s: float
    label: ClassVar[str] = "seasonal"

    @property
    def period_points(self) -> int:
        return int(self.profile.size)

    @property
    def parameters(self) -> int:
        return self.period_points + 1

    def forecasts(
        self, values: FloatArray, times: FloatArray, origins: IntArray, steps: int
    ) -> FloatArray:
        phase = phases(times, self.window_s, self.period_points)
        levels = smoothed_levels(values - self.profile[phase], self.alpha)
        ahead = (phase[origins][:, None] + np.arange(1, steps + 1)[None, :]) % self.period_points
        forecast: FloatArray = levels[origins][:, None] + self.profile[ahead]
        return forecast


@dataclass(frozen=True)
class Arima:
    """ARIMA(p, d, q) with d of 0 (around ``mean``) or 1 (no drift)."""

    order: tuple[int, int, int]
    mean: float
    ar: FloatArray = field(repr=False)
    ma: FloatArray = field(repr=False)
    period_points: ClassVar[int] = 0

    @property
    def label(self) -> str:
        p, d, q = self.order
        return f"arima({p},{d},{q})"

    @property
    def parameters(self) -> int:
        return self.ar.size + self.ma.size + (0 if self.order[1] else 1)

    def forecasts(
        self, values: FloatArray, times: FloatArray, origins: IntArray, steps: int
    ) -> FloatArray:
        differenced = self.order[1] == 1
        # z_t: the series around its mean, or its change since the previous point (0 at first).
        z = np.diff(values, prepend=values[0]) if differenced else values - self.mean
        innovations = lfilter(np.r_[1.0, -self.ar], np.r_[1.0, self.ma], z)
        lags = max(self.ar.size, self.ma.size, 1)
        z_padded = np.r_[np.zeros(lags), z]
        innovations_padded = np.r_[np.zeros(lags), innovations]
        at = origins + lags  # where each origin's point sits in the padded arrays
        recent = [z_padded[at - k] for k in range(self.ar.size)]  # newest first
        ahead = np.empty((origins.size, steps))
        for h in range(1, steps + 1):
            step = np.zeros(origins.size)
            for phi, past in zip(self.ar, recent, strict=True):
                step += phi * past
            # Innovations after the origin are unknown (0); those up to it are known.
            for j in range(h, self.ma.size + 1):
                step += self.ma[j - 1] * innovations_padded[at + h - j]
            ahead[:, h - 1] = step
            if recent:
                recent = [step, *recent[:-1]]
        if differenced:
            level: FloatArray = values[origins][:, None] + np.cumsum(ahead, axis=1)
            return level
        return ahead + self.mean


def phases(times: FloatArray, window_s: float, period_points: int) -> IntArray:
    """Each point's phase in a season of ``period_points`` windows, from its end time."""
    phase: IntArray = np.rint(times / window_s).astype(np.int64) % period_points
    return phase


# --- fitting ------------------------------------------------------------------------------------

Fit = Callable[[FloatArray, FloatArray], Fitted | None]


def fit_constant(values: FloatArray, times: FloatArray) -> Fitted:
    return Constant()


def smoothing_fit(steps: int) -> Fit:
    def fit(values: FloatArray, times: FloatArray) -> Fitted:
        return Smoothing(tune_alpha(values, steps))

    return fit


def arima_fit(order: tuple[int, int, int]) -> Fit:
    p, d, q = order

    def fit(values: FloatArray, times: FloatArray) -> Fitted | None:
        if values.size < ARIMA_MIN_POINTS:
            return None
        series = np.diff(values) if d else values
        mean = 0.0 if d else float(np.mean(series))
        if np.ptp(series) == 0.0:
            return None
        try:
            # Without the bias-correcting third step: it costs two thirds of the time and, on
            # a series near white noise, lands on cancelling roots that the check below drops.
            params, _ = hannan_rissanen(
                series - mean, ar_order=p, ma_order=q, demean=False, unbiased=False
            )
        except (ValueError, ArithmeticError, np.linalg.LinAlgError):
            return None
        ar = np.asarray(params.ar_params, dtype=np.float64)
        ma = np.asarray(params.ma_params, dtype=np.float64)
        if not (np.all(np.isfinite(ar)) and np.all(np.isfinite(ma))):
            return None
        # A root within 1.01 of the unit circle sits on the stationarity or invertibility
        # boundary, where forecasts oscillate or explode (as the ``arima`` predictor rejects).
        for polynomial in (params.ar_poly, params.ma_poly):
            roots = polynomial.roots()
            if roots.size and np.any(np.abs(roots) < 1.01):
                return None
        return Arima(order, mean, ar, ma)

    return fit


def damped_trend_fit(steps: int) -> Fit:
    """The damped trend with the smallest in-sample squared error ``steps`` ahead on a small
    grid (direct multi-step estimation, as ``tune_alpha``)."""

    def fit(values: FloatArray, times: FloatArray) -> Fitted | None:
        ahead = max(1, min(steps, values.size - MIN_ERRORS))
        if values.size <= ahead + MIN_ERRORS:
            return None
        best: tuple[float, DampedTrend] | None = None
        for alpha in TREND_ALPHAS:
            for beta in TREND_BETAS:
                for phi in TREND_PHIS:
                    model = DampedTrend(float(alpha), beta, phi)
                    level, trend = model.states(values)
                    damped = float(np.sum(phi ** np.arange(1, ahead + 1)))
                    errors = values[ahead:] - (level[:-ahead] + damped * trend[:-ahead])
                    score = float(errors @ errors)
                    if best is None or score < best[0]:
                        best = (score, model)
        return None if best is None else best[1]

    return fit


def seasonal_fit(period_points: int, window_s: float, steps: int) -> Fit:
    def fit(values: FloatArray, times: FloatArray) -> Fitted | None:
        if values.size < 2 * period_points:
            return None  # a classical decomposition needs two whole seasons
        # The trend is extrapolated at both ends from a season of points, so every point has a
        # detrended value and every phase is averaged over the same number of seasons.
        decomposition = seasonal_decompose(
            values, period=period_points, extrapolate_trend=period_points
        )
        seasonal = np.asarray(decomposition.seasonal, dtype=np.float64)
        phase = phases(times, window_s, period_points)
        counts = np.bincount(phase, minlength=period_points)
        profile = np.bincount(phase, seasonal, minlength=period_points) / np.maximum(counts, 1)
        alpha = tune_alpha(values - profile[phase], steps)
        return Seasonal(alpha, profile, window_s)

    return fit


def detect_period(values: FloatArray, times: FloatArray, window_s: float) -> int:
    """The season of the series in points, or 0.

    The strongest periodogram peaks give rough periods; near each, the period is the one whose
    phases explain the series best (the least variance within phases per degree of freedom:
    phase dispersion minimisation, Stellingwerf, Astrophysical Journal 224, 1978), since a
    smooth season's autocorrelation is too flat at its peak to tell 59 from 60 points, and one
    point off shifts the phase by a point every season. It is kept if the autocorrelation at
    that lag is at least ``MIN_SEASON_CORRELATION``. The history must cover two seasons,
    without missing windows that would shift the phase."""
    n = values.size
    longest = n // 2
    if longest < MIN_PERIOD_POINTS or window_s <= 0.0:
        return 0
    missing = (float(times[-1] - times[0]) / window_s + 1.0) - n
    if missing > max(1.0, MAX_GAP_SHARE * n) + 1e-6:
        return 0
    level_free = detrend(values)
    if np.ptp(level_free) == 0.0:
        return 0
    frequencies, power = periodogram(level_free)
    usable = np.flatnonzero(frequencies >= 1.0 / longest)
    if usable.size == 0:
        return 0
    guesses = usable[np.argsort(power[usable])[::-1][:PERIOD_GUESSES]]
    # adjusted: divided by n - lag, so that a long season is not penalised for its fewer pairs
    correlation = acf(level_free, nlags=longest, adjusted=True, fft=True)
    best, best_correlation = 0, MIN_SEASON_CORRELATION
    for index in guesses:
        guess = 1.0 / frequencies[index]
        low = max(MIN_PERIOD_POINTS, math.floor(0.8 * guess))
        high = min(longest, math.ceil(1.2 * guess))
        if low > high:
            continue
        # The autocorrelation's peak is right within a few per cent; the dispersion settles it.
        peak = low + int(np.argmax(correlation[low : high + 1]))
        spread = max(2, math.ceil(0.03 * peak))
        nearby = range(max(low, peak - spread), min(high, peak + spread) + 1)
        lag = min(nearby, key=lambda period: _dispersion(level_free, period))
        if correlation[lag] >= best_correlation:
            best, best_correlation = lag, float(correlation[lag])
    return _calendar(_fundamental(best, correlation), window_s) if best else 0


def _fundamental(period_points: int, correlation: FloatArray) -> int:
    """The shortest whole fraction of the period that is a season of its own: the
    autocorrelation there about as high (within 0.1), and well above its value half a season
    earlier (a season's peak, not the slow decay of a smooth series). Every multiple of a
    season correlates as well as the season itself."""
    threshold = max(MIN_SEASON_CORRELATION, float(correlation[period_points]) - 0.1)
    for parts in range(period_points // MIN_PERIOD_POINTS, 1, -1):
        shorter = round(period_points / parts)
        if abs(shorter * parts - period_points) > 1:
            continue
        trough = float(correlation[max(1, round(shorter / 2))])
        peak = float(correlation[shorter])
        if peak >= threshold and peak - trough >= MIN_SEASON_CORRELATION:
            return shorter
    return period_points


def _calendar(period_points: int, window_s: float) -> int:
    """The calendar season a period is within ``CALENDAR_TOLERANCE`` of, in points, if any."""
    for season_s in CALENDAR_PERIODS_S:
        points = round(season_s / window_s)
        exact = math.isclose(points * window_s, season_s, rel_tol=1e-9)
        if exact and abs(period_points - points) <= CALENDAR_TOLERANCE * points:
            return points
    return period_points


def _dispersion(values: FloatArray, period: int) -> float:
    """Variance of the values around their phase means, per degree of freedom."""
    phase = np.arange(values.size) % period
    counts = np.bincount(phase, minlength=period)
    means = np.bincount(phase, values, minlength=period) / np.maximum(counts, 1)
    residual = values - means[phase]
    return float(residual @ residual) / max(1, values.size - period)


# --- selection ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """The winner of a selection, what it scored, and the window it runs over."""

    model: Fitted
    backtest_mae: float  # in the series' own unit (the square undone), mean over the steps
    constant_mae: float
    origins: int
    window_points: int  # the latest points each forecast runs over (all, while fewer)

    @property
    def period_points(self) -> int:
        return self.model.period_points


def candidates(period_points: int, window_s: float, steps: int) -> list[Fit]:
    """The candidates that may displace smoothing, simplest first."""
    fits: list[Fit] = [
        fit_constant, *(arima_fit(order) for order in ARIMA_ORDERS), damped_trend_fit(steps)
    ]
    if period_points:
        fits.append(seasonal_fit(period_points, window_s, steps))
    return fits


def window_points(fit_points: int, period_points: int) -> int:
    """The latest points a selection and each forecast run over: ``fit_points``, or three seasons
    if more (all the points, while there are fewer)."""
    return max(fit_points, 3 * period_points)


def backtest_points(window: int, period_points: int) -> int:
    """Points at the end of the window that the backtest forecasts (the rest fits): a quarter,
    at least ``MIN_ERRORS``, stretched to a whole season and shrunk to leave two seasons to fit
    a seasonal candidate on, where the window allows."""
    test = max(MIN_ERRORS, window // 4)
    room = window - 2 * period_points
    if period_points and room >= MIN_ERRORS:
        test = min(max(test, period_points), room)
    return min(test, window - 1)


@dataclass(frozen=True)
class Backtest:
    """A candidate's absolute errors, in the series' unit, from every backtest origin."""

    errors: FloatArray  # origins x steps, NaN where the target lies beyond the window
    reach: int  # steps scored

    @property
    def mae(self) -> float:
        """Mean absolute error per step, averaged over the steps (each step weighs the same
        although fewer origins reach the far ones)."""
        return float(np.mean(np.nanmean(self.errors, axis=0)))

    def per_origin(self) -> FloatArray:
        per_origin: FloatArray = np.nanmean(self.errors, axis=1)
        return per_origin


def backtest(
    model: Fitted, values: FloatArray, times: FloatArray, train: int, steps: int
) -> Backtest:
    """The forecasts 1..steps ahead from every origin after ``train`` points, scored."""
    reach = max(1, min(steps, values.size - train))
    origins = np.arange(train - 1, values.size - 1)
    forecast = model.forecasts(values, times, origins, reach)
    target = origins[:, None] + np.arange(1, reach + 1)[None, :]
    actual = values[np.minimum(target, values.size - 1)]
    errors = np.abs(np.square(np.maximum(forecast, 0.0)) - np.square(actual))
    return Backtest(np.where(target < values.size, errors, np.nan), reach)


def better_beyond_noise(challenger: Backtest, incumbent: Backtest) -> bool:
    """Whether the challenger's errors are smaller than the incumbent's by more than
    ``CHALLENGE_Z`` standard errors of the mean difference (a one-sided Diebold-Mariano
    comparison, Journal of Business & Economic Statistics 13(3), 1995). Forecasts from
    neighbouring origins share their targets, so the origins count as origins / steps
    independent ones. On a few dozen points, chance alone would otherwise crown a model."""
    difference = incumbent.per_origin() - challenger.per_origin()
    mean = float(np.mean(difference))
    if mean <= 0.0:
        return False
    independent = max(1.0, difference.size / challenger.reach)
    standard_error = float(np.std(difference, ddof=1)) / math.sqrt(independent)
    return mean > CHALLENGE_Z * standard_error


def select(
    values: FloatArray, times: FloatArray, window_s: float, steps: int, fit_points: int,
    challengers: bool = True,
) -> Choice:
    """Backtest every candidate on the latest points, keep smoothing unless another is better
    beyond noise (the best such one), and fit the winner on all the points. Without
    ``challengers``, smoothing alone is fitted and scored (a millisecond)."""
    period = detect_period(values, times, window_s) if challengers else 0
    longest = window_points(fit_points, period)
    window = min(values.size, longest)
    x, t = values[-window:], times[-window:]
    test = backtest_points(window, period)
    train = window - test
    incumbent_fit = smoothing_fit(steps)
    incumbent = backtest(Smoothing(tune_alpha(x[:train], steps)), x, t, train, steps)
    constant = backtest(Constant(), x, t, train, steps)
    best_fit, best = incumbent_fit, incumbent
    for fit in candidates(period, window_s, steps) if challengers else ():
        model = fit(x[:train], t[:train])
        if model is None:
            continue
        scored = constant if isinstance(model, Constant) else backtest(model, x, t, train, steps)
        if scored.mae < best.mae and better_beyond_noise(scored, incumbent):
            best_fit, best = fit, scored
    winner = best_fit(x, t)
    if winner is None:  # the whole window cannot refit what its head could; keep the head's
        winner = best_fit(x[:train], t[:train])
        assert winner is not None
    return Choice(winner, best.mae, constant.mae, test, longest)


def upper_offsets(
    model: Fitted, values: FloatArray, times: FloatArray, steps: int, confidence: float
) -> FloatArray:
    """The conformal ``confidence`` quantile of the model's errors 1..steps ahead from every
    origin of the window, parameters held (beyond what the window can show with
    ``MIN_ERRORS`` errors, the farthest measured spread is held).

    The parameters were estimated on these same points, so the errors are smaller than those
    of a forecast; they are scaled by sqrt(n / (n - k)) for k parameters on n points, the
    degrees-of-freedom correction of a residual variance. It matters for a seasonal profile
    of a day of minutes learnt from two or three days (1.2), hardly for smoothing (1.001)."""
    measured = max(1, min(steps, values.size - MIN_ERRORS))
    origins = np.arange(values.size - measured)
    forecast = model.forecasts(values, times, origins, measured)
    actual = sliding_window_view(values[1:], measured)[: origins.size]
    offsets = conformal_quantiles(actual - forecast, confidence)
    free = max(values.size - model.parameters, values.size / 4)
    offsets = offsets * math.sqrt(values.size / free)
    return np.concatenate([offsets, np.full(steps - measured, offsets[-1])])
