"""Request traces: loading, speeding up, slicing, and bucketing by interval.

A trace is three aligned arrays: arrival time (seconds from the trace start), input tokens (ISL)
and output tokens (OSL) per request. Two formats are read (see ``shared/traces/README.md``):

- Mooncake JSONL: ``timestamp`` in milliseconds from the trace start, ``input_length``,
  ``output_length`` (Dynamo's planner dry run reads this format);
- Azure LLM inference CSV: ``TIMESTAMP`` wall clock with seven fractional digits,
  ``ContextTokens``, ``GeneratedTokens``; an arrival time is the seconds since the first row.

The dry run, the simulator and the forecaster share these loaders. This module reads files and
computes; it does no other I/O.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import orjson

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

BUNDLED_TRACES = Path(__file__).resolve().parent / "traces"
_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


class TraceError(ValueError):
    """A trace that cannot be read; the message names the file and the line."""


def bundled_trace_path(file_name: str) -> Path:
    """A trace shipped with the project, e.g. ``bundled_trace_path("azure_llm_2023_code.csv")``."""
    return BUNDLED_TRACES / file_name


@dataclass(frozen=True, eq=False)
class Trace:
    """Requests in arrival order."""

    arrival_s: FloatArray
    isl_tokens: IntArray
    osl_tokens: IntArray
    name: str = "trace"

    def __post_init__(self) -> None:
        n = self.arrival_s.size
        if self.isl_tokens.size != n or self.osl_tokens.size != n:
            raise ValueError("arrival_s, isl_tokens and osl_tokens must have the same length")

    def __len__(self) -> int:
        return int(self.arrival_s.size)

    @property
    def span_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0

    def sped_up(self, factor: float) -> Trace:
        """Every arrival time divided by ``factor`` (a 10x faster replay of the same requests)."""
        if not factor > 0:
            raise ValueError(f"speed-up must be positive, got {factor!r}")
        return Trace(self.arrival_s / factor, self.isl_tokens, self.osl_tokens, self.name)

    def between(self, start_s: float, end_s: float, rebase: bool = False) -> Trace:
        """The requests arriving in ``[start_s, end_s)``; ``rebase`` shifts them to start at 0."""
        keep = (self.arrival_s >= start_s) & (self.arrival_s < end_s)
        arrival = self.arrival_s[keep] - (start_s if rebase else 0.0)
        return Trace(arrival, self.isl_tokens[keep], self.osl_tokens[keep], self.name)

    def head(self, count: int) -> Trace:
        """The first ``count`` requests."""
        return Trace(
            self.arrival_s[:count], self.isl_tokens[:count], self.osl_tokens[:count], self.name
        )


def _non_negative_int(value: object, path: Path, line: int, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TraceError(f"{path}:{line}: field '{field}': expected a count, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise TraceError(f"{path}:{line}: field '{field}': not a number: {value!r}") from None
    if not number >= 0 or number != int(number):
        raise TraceError(f"{path}:{line}: field '{field}': expected a count >= 0, got {value!r}")
    return int(number)


def load_mooncake_jsonl(path: str | Path) -> Trace:
    """Mooncake JSONL; arrival seconds = ``timestamp`` (milliseconds) / 1000."""
    path = Path(path)
    timestamps_ms: list[float] = []
    isl: list[int] = []
    osl: list[int] = []
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise TraceError(f"{path}:{number}: invalid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise TraceError(f"{path}:{number}: expected a JSON object")
            for key in ("timestamp", "input_length", "output_length"):
                if key not in row:
                    raise TraceError(f"{path}:{number}: field '{key}' is missing")
            stamp = row["timestamp"]
            if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or stamp < 0:
                raise TraceError(f"{path}:{number}: field 'timestamp': expected ms >= 0")
            timestamps_ms.append(float(stamp))
            isl.append(_non_negative_int(row["input_length"], path, number, "input_length"))
            osl.append(_non_negative_int(row["output_length"], path, number, "output_length"))
    return _sorted_trace(np.asarray(timestamps_ms) / 1000.0, isl, osl, path.name)


def load_azure_csv(path: str | Path) -> Trace:
    """Azure LLM inference CSV; arrival seconds since the first row, at 100 ns resolution."""
    path = Path(path)
    stamps: list[str] = []
    isl: list[int] = []
    osl: list[int] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != _AZURE_COLUMNS:
            raise TraceError(f"{path}:1: expected the header {','.join(_AZURE_COLUMNS)}")
        for number, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 3:
                raise TraceError(f"{path}:{number}: expected 3 columns, got {len(row)}")
            stamps.append(row[0].strip().replace(" ", "T"))
            isl.append(_non_negative_int(row[1].strip(), path, number, "ContextTokens"))
            osl.append(_non_negative_int(row[2].strip(), path, number, "GeneratedTokens"))
    if not stamps:
        return _sorted_trace(np.zeros(0), isl, osl, path.name)
    try:
        # datetime64[ns] keeps all seven fractional digits (Python's datetime stops at six).
        wall = np.array(stamps, dtype="datetime64[ns]")
    except ValueError as exc:
        raise TraceError(f"{path}: field 'TIMESTAMP': unreadable time ({exc})") from None
    elapsed_ns = (wall - wall[0]).astype(np.int64)
    return _sorted_trace(elapsed_ns / 1e9, isl, osl, path.name)


def _sorted_trace(arrival_s: FloatArray, isl: list[int], osl: list[int], name: str) -> Trace:
    order = np.argsort(arrival_s, kind="stable")  # already sorted in both public traces
    return Trace(
        np.asarray(arrival_s, dtype=np.float64)[order],
        np.asarray(isl, dtype=np.int64)[order],
        np.asarray(osl, dtype=np.int64)[order],
        name,
    )


def load_trace(path: str | Path) -> Trace:
    """A Mooncake ``.jsonl`` or an Azure ``.csv`` trace, by file suffix."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return load_mooncake_jsonl(path)
    if suffix == ".csv":
        return load_azure_csv(path)
    raise TraceError(f"{path}: unknown trace format (expected .jsonl Mooncake or .csv Azure)")


@dataclass(frozen=True, eq=False)
class IntervalLoad:
    """Requests grouped by interval; only intervals with at least one request are present."""

    interval_s: float
    index: IntArray  # floor(arrival / interval) of each present interval
    num_requests: IntArray
    isl_avg_tokens: FloatArray
    osl_avg_tokens: FloatArray

    def __len__(self) -> int:
        return int(self.index.size)

    @property
    def start_s(self) -> FloatArray:
        return self.index.astype(np.float64) * self.interval_s


def bucket_by_interval(trace: Trace, interval_s: float) -> IntervalLoad:
    """Group requests as Dynamo's dry-run extractor does: by ``arrival // interval``, empty
    intervals skipped, mean ISL and OSL per interval.

    ``//`` (``np.floor_divide``) is floor(arrival / interval) computed the way Python's float
    ``//`` computes it, which is what Dynamo's extractor uses; a plain ``floor(a / b)`` can land
    one interval later for an arrival a hair below a boundary.
    """
    if not interval_s > 0:
        raise ValueError(f"interval must be positive, got {interval_s!r}")
    buckets = np.floor_divide(trace.arrival_s, interval_s).astype(np.int64)
    index, position, counts = np.unique(buckets, return_inverse=True, return_counts=True)
    # Sums of integer token counts are exact in float64 (far below 2**53), so each mean is the
    # same double as Dynamo's sum(...) / count.
    isl_sum = np.bincount(position, weights=trace.isl_tokens.astype(np.float64))
    osl_sum = np.bincount(position, weights=trace.osl_tokens.astype(np.float64))
    return IntervalLoad(
        interval_s=float(interval_s),
        index=index.astype(np.int64),
        num_requests=counts.astype(np.int64),
        isl_avg_tokens=isl_sum / counts,
        osl_avg_tokens=osl_sum / counts,
    )


@dataclass(frozen=True)
class WindowLoad:
    """One window of a trace as a collector counts it: the requests that arrived in it, their
    mean lengths (the same doubles as ``bucket_by_interval``'s) and p90 lengths; the averages
    are ``None`` for an idle window (a real 0 requests)."""

    index: int  # floor(arrival / window)
    num_requests: int
    isl_avg: float | None
    osl_avg: float | None
    isl_p90: float | None
    osl_p90: float | None

    def end_s(self, window_s: float) -> float:
        return (self.index + 1) * window_s


def window_loads(trace: Trace, window_s: float, percentiles: bool = True) -> list[WindowLoad]:
    """Every window from the first request's to the last's, idle ones included: the one way a
    trace becomes per-window loads (the collector's trace source, the forecaster's warm start,
    the dry run)."""
    if len(trace) == 0:
        return []
    load = bucket_by_interval(trace, window_s)
    p90: dict[int, tuple[float, float]] = {}
    if percentiles:
        window_of_request = np.floor_divide(trace.arrival_s, window_s).astype(np.int64)
        order = np.argsort(window_of_request, kind="stable")
        starts = np.searchsorted(window_of_request[order], load.index)
        isl, osl = trace.isl_tokens[order], trace.osl_tokens[order]
        for start, index, count in zip(starts, load.index, load.num_requests, strict=True):
            group = slice(int(start), int(start + count))
            p90[int(index)] = (float(np.percentile(isl[group], 90)),
                               float(np.percentile(osl[group], 90)))
    present = {int(index): row for row, index in enumerate(load.index)}
    windows = []
    for index in range(int(load.index[0]), int(load.index[-1]) + 1):
        row = present.get(index)
        if row is None:
            windows.append(WindowLoad(index, 0, None, None, None, None))
            continue
        isl_p90, osl_p90 = p90.get(index, (None, None))
        windows.append(WindowLoad(
            index, int(load.num_requests[row]), float(load.isl_avg_tokens[row]),
            float(load.osl_avg_tokens[row]), isl_p90, osl_p90,
        ))
    return windows
