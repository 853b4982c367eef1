"""Forecaster core: per-deployment history in, LoadForecast out. No bus, no clock, no files.

The shell calls ``forecast`` from a thread pool so that one slow fit does not hold up the other
deployments; every deployment has its own lock, so calls for different deployments run side by
side while two calls for the same deployment never interleave (its history and its fitted models
change together). ``rebuild`` replays the stream's snapshots after a restart, and ``warm_start``
fills a new deployment's history from a recorded trace.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from services.forecaster import predictors
from services.forecaster.history import DeploymentHistory, SeriesName, SeriesView
from services.forecaster.settings import ForecasterSettings
from shared import traces
from shared.messages import DeploymentKey, ForecastStep, LoadForecast, MetricSnapshot, derived_id

# Series every ForecastStep carries.
STEP_SERIES = (SeriesName.NUM_REQUESTS, SeriesName.ISL_AVG, SeriesName.OSL_AVG)
# The spread series are tracked in the history, and forecast only once the contract has a place
# for them: optional ForecastStep fields named like the series, each with an ``_upper`` twin.
SPREAD_SERIES = tuple(
    series
    for series in (SeriesName.ISL_P90, SeriesName.OSL_P90)
    if series.value in ForecastStep.model_fields
)


@dataclass
class _Deployment:
    history: DeploymentHistory
    predictor_name: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    predictors: dict[SeriesName, predictors.RobustPredictor] = field(default_factory=dict)
    refits: int = 0


@dataclass(frozen=True)
class TraceWindows:
    """A recorded trace cut into windows, ready to be recorded into a history."""

    window_s: float
    window_end_s: npt.NDArray[np.float64]
    values: tuple[Mapping[SeriesName, float | None], ...]


class Forecaster:
    def __init__(self, settings: ForecasterSettings) -> None:
        self.settings = settings
        self._overrides = settings.overrides()
        for name in {settings.predictor, *self._overrides.values()}:
            predictors.ensure_available(name)  # a missing optional extra fails at start-up
        self._schedule = predictors.RefitSchedule(settings.refit_interval_s)
        self._deployments: dict[DeploymentKey, _Deployment] = {}
        self._deployments_lock = threading.Lock()
        self._warm_start_trace: traces.Trace | None = None
        self._warm_start_windows: dict[float, TraceWindows] = {}

    def observe(self, snapshot: MetricSnapshot) -> None:
        """Record a snapshot without forecasting (a duplicate or a stale one records nothing)."""
        deployment = self._deployment(snapshot.deployment, first_seen_live=snapshot)
        with deployment.lock:
            self._record(deployment, snapshot)

    def forecast(self, snapshot: MetricSnapshot) -> LoadForecast:
        """Record the snapshot (if not yet recorded) and forecast the steps up to the horizon."""
        deployment = self._deployment(snapshot.deployment, first_seen_live=snapshot)
        steps = self.settings.horizon_steps(snapshot.window_s)
        with deployment.lock:
            self._record(deployment, snapshot)
            # fit_s is a duration for the reader, measured here because only here is it known;
            # no decision depends on it.
            started = time.perf_counter()
            # A spread the collector does not report is left out, not forecast as 0.
            spreads = tuple(s for s in SPREAD_SERIES if len(deployment.history.series(s)))
            predictions = {
                series: self._predictor(deployment, series).predict(
                    deployment.history.series(series), steps, now=snapshot.window_end
                )
                for series in STEP_SERIES + spreads
            }
            fit_s = time.perf_counter() - started
            deployment.refits += sum(prediction.refitted for prediction in predictions.values())
        primary = predictions[SeriesName.NUM_REQUESTS]
        fallbacks = [
            f"{series}: {prediction.fallback}"
            for series, prediction in predictions.items()
            if prediction.fallback is not None
        ]
        return LoadForecast(
            id=derived_id("forecast", snapshot.id),
            deployment=snapshot.deployment,
            window_end=snapshot.window_end,
            window_s=snapshot.window_s,
            model=primary.model,
            fallback=_truncate("; ".join(fallbacks), 512) if fallbacks else None,
            fit_s=fit_s,
            steps=[
                _step(snapshot.window_end + (k + 1) * snapshot.window_s, predictions, k)
                for k in range(steps)
            ],
            observed=snapshot,
        )

    def rebuild(self, snapshots: Iterable[MetricSnapshot]) -> int:
        """Replay snapshots (e.g. the stream's, on start) into the histories; returns how many
        were recorded. Order does not matter; duplicates and stale ones are skipped. No model is
        fitted here: that happens at the first forecast."""
        recorded = 0
        for snapshot in sorted(snapshots, key=lambda s: s.window_end):
            # Deployments with a real past need no warm start.
            deployment = self._deployment(snapshot.deployment)
            with deployment.lock:
                recorded += bool(self._record(deployment, snapshot))
        return recorded

    def warm_start(
        self,
        key: DeploymentKey,
        arrival_s: npt.ArrayLike,
        isl: npt.ArrayLike,
        osl: npt.ArrayLike,
    ) -> int:
        """Fill the history of a deployment that has none from a recorded trace (arrival times in
        seconds from its start, input and output tokens per request), cut into
        ``warm_start_window_s`` windows. Returns the windows recorded; 0 if it had a history."""
        windows = trace_windows(_trace(arrival_s, isl, osl), self.settings.warm_start_window_s)
        deployment = self._deployment(key)
        with deployment.lock:
            return _fill(deployment.history, windows, end_s=None)

    def warm_start_new_deployments(
        self, arrival_s: npt.ArrayLike, isl: npt.ArrayLike, osl: npt.ArrayLike
    ) -> None:
        """From now on, fill the history of every deployment first seen live (not those that
        ``rebuild`` brings back) from this trace, e.g. the one ``warm_start_trace`` names, cut
        into that deployment's window and ending just before its first snapshot."""
        with self._deployments_lock:
            self._warm_start_trace = _trace(arrival_s, isl, osl)
            self._warm_start_windows.clear()

    def series(self, key: DeploymentKey, name: SeriesName) -> SeriesView:
        """A copy of one recorded series of a deployment (empty if unknown)."""
        with self._deployments_lock:
            deployment = self._deployments.get(key)
        if deployment is None:
            return DeploymentHistory(capacity_points=1).series(name)
        with deployment.lock:
            return deployment.history.series(name)

    def refits_total(self) -> int:
        """Model refits (parameters re-estimated) so far, all deployments and series."""
        with self._deployments_lock:
            return sum(deployment.refits for deployment in self._deployments.values())

    def _deployment(
        self, key: DeploymentKey, first_seen_live: MetricSnapshot | None = None
    ) -> _Deployment:
        with self._deployments_lock:
            deployment = self._deployments.get(key)
            if deployment is None:
                deployment = _Deployment(
                    DeploymentHistory(self.settings.history_points),
                    self._overrides.get(str(key), self.settings.predictor),
                )
                if first_seen_live is not None and self._warm_start_trace is not None:
                    window_s = first_seen_live.window_s
                    windows = self._warm_start_windows.get(window_s)
                    if windows is None:
                        windows = trace_windows(self._warm_start_trace, window_s)
                        self._warm_start_windows[window_s] = windows
                    end_s = first_seen_live.window_end - window_s
                    _fill(deployment.history, windows, end_s=end_s)
                self._deployments[key] = deployment
        return deployment

    def _record(self, deployment: _Deployment, snapshot: MetricSnapshot) -> int:
        result = deployment.history.record(snapshot.window_end, snapshot)
        if result.reset_reason is not None:
            deployment.predictors.clear()  # fitted to a series that no longer exists
        return len(result.recorded)

    def _predictor(self, deployment: _Deployment, series: SeriesName) -> predictors.RobustPredictor:
        predictor = deployment.predictors.get(series)
        if predictor is None:
            predictor = deployment.predictors[series] = predictors.make_predictor(
                deployment.predictor_name,
                self.settings.confidence,
                self._schedule,
                self.settings.fit_points,
            )
        return predictor


def trace_windows(trace: traces.Trace, window_s: float) -> TraceWindows:
    """Cut a trace into consecutive windows from its first to its last complete one. A window
    without requests is a 0 count with undefined ISL/OSL, as the collector would report it."""
    windows = traces.window_loads(trace, window_s)
    # The last window is cut short by the end of the recording; its count would read as a drop.
    kept = windows[: max(1, len(windows) - 1)]
    idle: Mapping[SeriesName, float | None] = {SeriesName.NUM_REQUESTS: 0.0}
    values = tuple(
        {
            SeriesName.NUM_REQUESTS: float(w.num_requests),
            SeriesName.ISL_AVG: w.isl_avg,
            SeriesName.OSL_AVG: w.osl_avg,
            SeriesName.ISL_P90: w.isl_p90,
            SeriesName.OSL_P90: w.osl_p90,
        }
        if w.num_requests else idle
        for w in kept
    )
    ends = np.array([w.end_s(window_s) for w in kept], dtype=np.float64)
    return TraceWindows(window_s, ends, values)


def _trace(arrival_s: npt.ArrayLike, isl: npt.ArrayLike, osl: npt.ArrayLike) -> traces.Trace:
    return traces.Trace(
        np.asarray(arrival_s, dtype=np.float64),
        np.asarray(isl, dtype=np.int64),
        np.asarray(osl, dtype=np.int64),
    )


def _fill(history: DeploymentHistory, windows: TraceWindows, end_s: float | None) -> int:
    """Record trace windows into an empty history, shifted to end at ``end_s`` if given."""
    if len(history) or not windows.values:
        return 0
    shift = 0.0 if end_s is None else end_s - float(windows.window_end_s[-1])
    recorded = 0
    for window_end_s, values in zip(windows.window_end_s, windows.values, strict=True):
        result = history.record_values(float(window_end_s) + shift, windows.window_s, values)
        recorded += bool(result.recorded)
    return recorded


def _step(
    window_end: float, predictions: Mapping[SeriesName, predictors.Prediction], k: int
) -> ForecastStep:
    """Step k (0-based): every series' point as ``<series>`` and quantile as ``<series>_upper``."""
    values: dict[str, float] = {"window_end": window_end}
    for series, prediction in predictions.items():
        values[series.value] = float(prediction.point[k])
        values[f"{series.value}_upper"] = float(prediction.upper[k])
    return ForecastStep.model_validate(values)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
