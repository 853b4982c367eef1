"""Bounded per-deployment history of the series the forecaster predicts.

Pure: no clock, no I/O. Time is an argument: ``record(now, snapshot)`` files the snapshot's values
under ``now`` (the core passes the snapshot's ``window_end``; a warm start passes the end of each
trace bucket), like Knative's ``Record(now, value)``.

What is kept out, and why:

- a stale snapshot (the collector could not read its source): its values are not measurements;
- a snapshot no later than the last one recorded: a duplicate or a late redelivery, which would
  put the series out of order;
- a null or non-finite value: a gap is skipped, never filled with an invented 0;
- ISL/OSL (and their spread) of a window with 0 requests: undefined, while the 0 request count is a
  real observation and is recorded.

Each series is a ring of (time, value) pairs that grows up to ``capacity_points`` and no further,
so memory per deployment is bounded whatever the traffic, and small while the history is short.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from shared.messages import MetricSnapshot

FloatArray = npt.NDArray[np.float64]


class SeriesName(StrEnum):
    """A forecast series; the value is the MetricSnapshot field it comes from."""

    NUM_REQUESTS = "num_requests"
    ISL_AVG = "isl_avg"
    OSL_AVG = "osl_avg"
    # The spread: a burst of long prompts breaks TTFT while the mean looks calm.
    ISL_P90 = "isl_p90"
    OSL_P90 = "osl_p90"


# Per-request statistics: undefined in a window without requests.
PER_REQUEST_SERIES = frozenset(
    {SeriesName.ISL_AVG, SeriesName.OSL_AVG, SeriesName.ISL_P90, SeriesName.OSL_P90}
)


class SkipReason(StrEnum):
    STALE = "snapshot marked stale"
    NOT_AFTER_LAST = "window_end not after the last recorded one (duplicate or late)"
    MISSING = "null in the snapshot"
    NOT_FINITE = "not a finite number"
    NEGATIVE = "negative"
    NO_REQUESTS = "undefined in a window with 0 requests"


@dataclass(frozen=True)
class SeriesView:
    """A chronological copy of one series, what a predictor reads.

    ``total_recorded`` counts every point ever recorded into the series (including those the ring
    has since dropped), so a stateful predictor can tell how many points are new since it last
    looked: ``total_recorded - seen``.
    """

    values: FloatArray
    times: FloatArray
    total_recorded: int
    window_s: float

    def __len__(self) -> int:
        return int(self.values.size)


@dataclass(frozen=True)
class RecordResult:
    recorded: tuple[SeriesName, ...]
    skipped: Mapping[SeriesName, SkipReason]
    # Set when the history was emptied first, e.g. because the window length changed.
    reset_reason: str | None = None


class _Ring:
    """Ring of (time, value) pairs in two arrays that grow, doubling, up to ``capacity``: a
    deployment seen once holds a few hundred bytes per series, not a day's worth."""

    INITIAL_POINTS = 32

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        allocated = min(capacity, self.INITIAL_POINTS)
        self._times = np.empty(allocated, dtype=np.float64)
        self._values = np.empty(allocated, dtype=np.float64)
        self._next = 0
        self._size = 0
        self.total_recorded = 0

    def append(self, time: float, value: float) -> None:
        if self._size == self._times.size < self.capacity:
            # Not wrapped yet (that happens only at full capacity): the points are in order.
            allocated = min(self.capacity, 2 * self._times.size)
            self._times = np.concatenate([self._times, np.empty(allocated - self._size)])
            self._values = np.concatenate([self._values, np.empty(allocated - self._size)])
            self._next = self._size
        self._times[self._next] = time
        self._values[self._next] = value
        self._next = (self._next + 1) % self._times.size
        self._size = min(self._size + 1, self._times.size)
        self.total_recorded += 1

    def __len__(self) -> int:
        return self._size

    def clear(self) -> None:
        # total_recorded keeps counting, so a predictor sees every point after a clear as new.
        self._next = 0
        self._size = 0

    def chronological(self) -> tuple[FloatArray, FloatArray]:
        if self._size < self._times.size:
            return self._times[: self._size].copy(), self._values[: self._size].copy()
        order = np.r_[self._next : self._times.size, 0 : self._next]
        return self._times[order], self._values[order]


@dataclass
class DeploymentHistory:
    """All series of one deployment, each bounded to ``capacity_points`` points."""

    capacity_points: int
    window_s: float | None = None
    last_recorded_s: float | None = None
    _rings: dict[SeriesName, _Ring] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.capacity_points < 1:
            raise ValueError(f"capacity_points must be at least 1, got {self.capacity_points}")

    def record(self, now: float, snapshot: MetricSnapshot) -> RecordResult:
        """File the snapshot's values under ``now``; say what was kept out and why."""
        if snapshot.stale:
            return RecordResult((), dict.fromkeys(SeriesName, SkipReason.STALE))
        values = {series: getattr(snapshot, series.value) for series in SeriesName}
        return self.record_values(now, snapshot.window_s, values)

    def record_values(
        self, now: float, window_s: float, values: Mapping[SeriesName, float | None]
    ) -> RecordResult:
        """Record one window's values (absent keys count as missing)."""
        if self.last_recorded_s is not None and now <= self.last_recorded_s:
            return RecordResult((), dict.fromkeys(SeriesName, SkipReason.NOT_AFTER_LAST))
        reset_reason = None
        if self.window_s is not None and window_s != self.window_s:
            # Counts per window of another length are not the same series; start afresh rather
            # than mix them (the next forecasts fall back until the history refills).
            reset_reason = f"window_s changed from {self.window_s:g} to {window_s:g}"
            self.clear()

        no_requests = values.get(SeriesName.NUM_REQUESTS) == 0.0
        recorded: list[SeriesName] = []
        skipped: dict[SeriesName, SkipReason] = {}
        for series in SeriesName:
            value = values.get(series)
            if value is None:
                skipped[series] = SkipReason.MISSING
            elif (reason := _unusable(value)) is not None:
                skipped[series] = reason
            elif no_requests and series in PER_REQUEST_SERIES:
                skipped[series] = SkipReason.NO_REQUESTS
            else:
                self._ring(series).append(now, float(value))
                recorded.append(series)
        if recorded:
            self.window_s = window_s
            self.last_recorded_s = now
        return RecordResult(tuple(recorded), skipped, reset_reason)

    def series(self, name: SeriesName) -> SeriesView:
        ring = self._rings.get(name)
        if ring is None:
            empty = np.empty(0, dtype=np.float64)
            return SeriesView(empty, empty.copy(), 0, self.window_s or 0.0)
        times, values = ring.chronological()
        return SeriesView(values, times, ring.total_recorded, self.window_s or 0.0)

    def __len__(self) -> int:
        """Points of the longest series."""
        return max((len(ring) for ring in self._rings.values()), default=0)

    def clear(self) -> None:
        for ring in self._rings.values():
            ring.clear()
        self.window_s = None
        self.last_recorded_s = None

    def _ring(self, name: SeriesName) -> _Ring:
        ring = self._rings.get(name)
        if ring is None:
            ring = self._rings[name] = _Ring(self.capacity_points)
        return ring


def _unusable(value: float) -> SkipReason | None:
    """Why a value cannot be recorded, or None when it can."""
    if not math.isfinite(value):
        return SkipReason.NOT_FINITE
    if value < 0.0:
        return SkipReason.NEGATIVE
    return None
