"""Forecaster core: per-deployment history in, LoadForecast out. No bus, no clock, no files.

The shell calls ``forecast`` from a thread pool so that one slow fit does not hold up the other
deployments; every deployment has its own lock, so calls for different deployments run side by
side while two calls for the same deployment never interleave (its history and its fitted models
change together). ``rebuilder`` replays the stream's snapshots after a restart, holding only
compact rows of numbers, never the snapshots; ``warm_start`` fills a new deployment's history
from a recorded trace; ``forget_idle`` drops the deployments that have gone quiet.
"""

from __future__ import annotations

import math
import threading
import time
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from services.forecaster import predictors
from services.forecaster.history import DeploymentHistory, SeriesName, SeriesView
from services.forecaster.settings import ForecasterSettings
from shared import traces
from shared.messages import (
    DeploymentKey,
    ForecastStep,
    LoadForecast,
    MetricSnapshot,
    ModelSelection,
    derived_id,
)

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
    # The latest window_end seen of this deployment (window time, like everything here); None
    # for one filled by ``warm_start`` and not seen yet, which is kept until it is.
    last_seen_s: float | None
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
        deployment = self._deployment(snapshot.deployment, snapshot.window_end, live=snapshot)
        with deployment.lock:
            self._record(deployment, snapshot)

    def forecast(self, snapshot: MetricSnapshot) -> LoadForecast:
        """Record the snapshot (if not yet recorded) and forecast the steps up to the horizon."""
        deployment = self._deployment(snapshot.deployment, snapshot.window_end, live=snapshot)
        windows = self.settings.horizon_steps(snapshot.window_s)
        per_step = self.settings.windows_per_step(snapshot.window_s)
        with deployment.lock:
            self._record(deployment, snapshot)
            # fit_s is a duration for the reader, measured here because only here is it known;
            # no decision depends on it.
            started = time.perf_counter()
            # A spread the collector does not report is left out, not forecast as 0.
            spreads = tuple(s for s in SPREAD_SERIES if len(deployment.history.series(s)))
            predictions = {
                series: self._predictor(deployment, series).predict(
                    deployment.history.series(series), windows, now=snapshot.window_end
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
            steps=_steps(snapshot.window_end, snapshot.window_s, predictions, windows, per_step),
            step_s=per_step * snapshot.window_s,
            selection=_selection(predictions),
            observed=snapshot,
        )

    def rebuild(self, snapshots: Iterable[MetricSnapshot]) -> int:
        """Replay snapshots (e.g. the stream's, on start) into the histories; returns how many
        were recorded. Order does not matter; duplicates and stale ones are skipped. No model is
        fitted here: that happens at the first forecast."""
        rebuild = self.rebuilder()
        for snapshot in snapshots:
            rebuild.add(snapshot)
        return rebuild.finish()

    def rebuilder(self) -> Rebuild:
        """A replay to feed snapshots one at a time (as they are read from the stream) and
        finish once; memory stays bounded by the history, whatever the number of snapshots."""
        return Rebuild(self)

    def forget_idle(self, now_s: float) -> int:
        """Forget the deployments whose latest window ended ``idle_forget_s`` or more before
        ``now_s`` (history, models, everything); returns how many. A forgotten deployment that
        comes back starts afresh."""
        if self.settings.idle_forget_s <= 0.0:
            return 0
        cutoff = now_s - self.settings.idle_forget_s
        with self._deployments_lock:
            idle = [
                key
                for key, deployment in self._deployments.items()
                if deployment.last_seen_s is not None and deployment.last_seen_s <= cutoff
            ]
            for key in idle:
                del self._deployments[key]
            return len(idle)

    def newest_seen_s(self) -> float | None:
        """The latest window_end seen of any deployment still held (None with none)."""
        with self._deployments_lock:
            seen = [d.last_seen_s for d in self._deployments.values() if d.last_seen_s is not None]
        return max(seen, default=None)

    def deployment_count(self) -> int:
        with self._deployments_lock:
            return len(self._deployments)

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
        deployment = self._deployment(key, seen_s=None)
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
        self, key: DeploymentKey, seen_s: float | None, live: MetricSnapshot | None = None
    ) -> _Deployment:
        """The deployment's state, created if new; ``seen_s`` (a window_end) marks it active
        (under the same lock as ``forget_idle``, so a deployment in use is never forgotten)."""
        with self._deployments_lock:
            deployment = self._deployments.get(key)
            if deployment is None:
                deployment = _Deployment(
                    DeploymentHistory(self.settings.history_points),
                    self._overrides.get(str(key), self.settings.predictor),
                    last_seen_s=seen_s,
                )
                if live is not None and self._warm_start_trace is not None:
                    window_s = live.window_s
                    windows = self._warm_start_windows.get(window_s)
                    if windows is None:
                        windows = trace_windows(self._warm_start_trace, window_s)
                        self._warm_start_windows[window_s] = windows
                    end_s = live.window_end - window_s
                    _fill(deployment.history, windows, end_s=end_s)
                self._deployments[key] = deployment
            elif seen_s is not None:
                last = deployment.last_seen_s
                deployment.last_seen_s = seen_s if last is None else max(last, seen_s)
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


# A rebuild row: window_end, window_s, then each series (NaN where the snapshot had none).
_ROW_SERIES = tuple(SeriesName)
_ROW_WIDTH = 2 + len(_ROW_SERIES)


class Rebuild:
    """A replay of snapshots into the histories, fed one snapshot at a time.

    Each snapshot is cut at once to a row of numbers (window_end, window_s and the series, 8
    floats) in a per-deployment buffer, and the snapshot itself is let go: a day of a hundred
    deployments at 60 s (190k snapshots) holds about 12 MB of rows, not gigabytes of models. A
    buffer that grows past twice the history is cut back to its latest ``history_points``
    windows (older ones would fall out of the history anyway), so memory is bounded per
    deployment whatever the number of snapshots. ``finish`` sorts each buffer by window_end
    (order in the stream does not matter) and records it.
    """

    def __init__(self, forecaster: Forecaster) -> None:
        self._forecaster = forecaster
        self._keep = forecaster.settings.history_points
        self._rows: dict[DeploymentKey, array[float]] = {}

    def add(self, snapshot: MetricSnapshot) -> None:
        if snapshot.stale:
            return  # its values are not measurements (the history would skip them too)
        rows = self._rows.get(snapshot.deployment)
        if rows is None:
            rows = self._rows[snapshot.deployment] = array("d")
        rows.append(snapshot.window_end)
        rows.append(snapshot.window_s)
        for series in _ROW_SERIES:
            value = getattr(snapshot, series.value)
            rows.append(math.nan if value is None else value)
        if len(rows) > 2 * self._keep * _ROW_WIDTH:
            self._rows[snapshot.deployment] = array("d", _latest(rows, self._keep).ravel())

    def finish(self) -> int:
        """Record every buffered row into its deployment's history; returns how many windows
        were recorded (duplicates and windows not after the last recorded one are skipped)."""
        recorded = 0
        while self._rows:
            key, rows = self._rows.popitem()
            table = _latest(rows, self._keep)
            if table.size == 0:
                continue
            # Deployments with a real past need no warm start.
            deployment = self._forecaster._deployment(key, seen_s=float(table[-1, 0]))
            with deployment.lock:
                for row in table:
                    values = {
                        series: None if math.isnan(value) else float(value)
                        for series, value in zip(_ROW_SERIES, row[2:], strict=True)
                    }
                    result = deployment.history.record_values(float(row[0]), float(row[1]), values)
                    if result.reset_reason is not None:
                        deployment.predictors.clear()
                    recorded += bool(result.recorded)
        return recorded


def _latest(rows: array[float], keep: int) -> npt.NDArray[np.float64]:
    """The rows as a table sorted by window_end (stable: the first of equals stays first), cut to
    the latest ``keep``."""
    table = np.frombuffer(rows, dtype=np.float64).reshape(-1, _ROW_WIDTH)
    order = np.argsort(table[:, 0], kind="stable")
    latest: npt.NDArray[np.float64] = table[order[-keep:]]
    return latest


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


def _steps(
    now_s: float,
    window_s: float,
    predictions: Mapping[SeriesName, predictors.Prediction],
    windows: int,
    per_step: int,
) -> list[ForecastStep]:
    """One step per ``per_step`` windows up to the horizon, each series as ``<series>`` and its
    quantile as ``<series>_upper``. A step of several windows carries their largest point and
    largest quantile: a fleet sized for the step is then sized for its busiest window."""
    starts = np.arange(0, windows, per_step)
    ends = np.minimum(starts + per_step, windows)
    columns: dict[str, list[float]] = {"window_end": list(now_s + ends * window_s)}
    for series, prediction in predictions.items():
        columns[series.value] = np.maximum.reduceat(prediction.point[:windows], starts).tolist()
        columns[f"{series.value}_upper"] = np.maximum.reduceat(
            prediction.upper[:windows], starts
        ).tolist()
    return [
        ForecastStep.model_validate({name: float(column[k]) for name, column in columns.items()})
        for k in range(starts.size)
    ]


def _selection(
    predictions: Mapping[SeriesName, predictors.Prediction],
) -> dict[str, ModelSelection] | None:
    """What a selecting predictor chose for each series (None when no series selected)."""
    chosen = {
        series.value: ModelSelection(
            model=selection.model,
            period_s=selection.period_s,
            backtest_mae=selection.backtest_mae,
            backtest_mae_constant=(
                selection.constant_mae if math.isfinite(selection.constant_mae) else None
            ),
            backtest_origins=selection.origins,
        )
        for series, prediction in predictions.items()
        if (selection := prediction.selection) is not None
    }
    return chosen or None


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
