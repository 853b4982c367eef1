"""Statistics of one window that the collector and the simulator compute the same way (pure).

Arrivals: from the arrival counts per bin of the window (the collector reads them from counter
samples, the simulator counts its requests), the index of dispersion and the peak 1 s and 10 s
counts. Share under a target: from the increases of a histogram's buckets in the window, exact
where the target is a bucket bound and interpolated inside a bucket otherwise, as Prometheus'
``histogram_quantile`` interpolates; or exactly, when every request's latency is known.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from shared.messages import ArrivalSignal, ShareMethod

# Why a field is null when its window had no samples: 0/0 is undefined, not 0 and not unknown.
NO_SAMPLES = "no samples in window"
_SPANS_S = {"arrivals_peak_1s": 1.0, "arrivals_peak_10s": 10.0}


@dataclass(frozen=True)
class ArrivalStats:
    bin_s: float
    dispersion: float | None
    peak_1s: float | None
    peak_10s: float | None
    peaks_exact: bool | None
    gaps: dict[str, str] = field(default_factory=dict)
    signal: ArrivalSignal = ArrivalSignal.REQUEST_START

    def fields(self) -> dict[str, float | bool | str | None]:
        return {"arrival_bin_s": self.bin_s, "arrival_dispersion": self.dispersion,
                "arrivals_peak_1s": self.peak_1s, "arrivals_peak_10s": self.peak_10s,
                "arrival_peaks_exact": self.peaks_exact, "arrival_signal": self.signal}


def _peak(counts: np.ndarray, bin_s: float, span_s: float) -> tuple[float | None, bool, str]:
    """Most arrivals in ``span_s`` consecutive seconds, in steps of one bin; whether exact."""
    if counts.size * bin_s < span_s - 1e-9:
        return None, True, f"window shorter than {span_s:g} s"
    bins = span_s / bin_s
    whole = round(bins)
    if abs(bins - whole) < 1e-9 and whole >= 1:
        sums = np.convolve(counts, np.ones(whole), mode="valid")
        return float(sums.max()), True, ""
    if bins < 1:
        # a bin longer than the span: the busiest bin's count scaled to the span bounds the
        # span's peak from below (the arrivals may all have come in one span of it)
        return float(counts.max()) * bins, False, ""
    sums = np.convolve(counts, np.ones(math.floor(bins)), mode="valid")
    return float(sums.max()), False, ""  # the most in a span a little shorter: a lower bound


def arrival_stats(counts: Sequence[float] | np.ndarray, bin_s: float,
                  signal: ArrivalSignal = ArrivalSignal.REQUEST_START) -> ArrivalStats:
    """Dispersion and peaks of a window's arrival counts per bin of ``bin_s`` seconds, counted
    by a counter that moves at ``signal``."""
    values = np.asarray(counts, dtype=np.float64)
    gaps: dict[str, str] = {}
    dispersion: float | None = None
    if values.size < 2:
        gaps["arrival_dispersion"] = "the window holds fewer than two bins"
    elif values.mean() <= 0:
        gaps["arrival_dispersion"] = "no arrivals in window"
    else:
        dispersion = float(values.var() / values.mean())
    peaks: dict[str, float | None] = {}
    exact = True
    for name, span in _SPANS_S.items():
        peak, peak_exact, reason = (None, True, "no bins") if values.size == 0 else _peak(
            values, bin_s, span)
        peaks[name] = peak
        exact = exact and peak_exact
        if peak is None:
            gaps[name] = reason
    defined = any(p is not None for p in peaks.values())
    return ArrivalStats(bin_s, dispersion, peaks["arrivals_peak_1s"],
                        peaks["arrivals_peak_10s"], exact if defined else None, gaps, signal)


def arrival_bin(window_s: float, finest_s: float, samples: int) -> float | None:
    """The bin to count a window's arrivals in: the smallest whole multiple of ``finest_s``
    that divides the window into no more bins than the counter has samples in it (``samples``;
    a bin without a sample of its own would count nothing and pass its arrivals to the next),
    or None when no multiple of ``finest_s`` divides the window."""
    most = math.floor(window_s / finest_s + 1e-9)
    for multiple in range(1, most + 1):
        bin_s = finest_s * multiple
        bins = window_s / bin_s
        if abs(bins - round(bins)) > 1e-6:
            continue
        if round(bins) <= samples:
            return bin_s
    return None


def counts_per_bin(arrivals_s: np.ndarray, start_s: float, end_s: float,
                   bin_s: float = 1.0) -> np.ndarray:
    """Arrivals in each bin ``[start + k * bin, start + (k + 1) * bin)`` of the window."""
    bins = max(1, round((end_s - start_s) / bin_s))
    edges = start_s + bin_s * np.arange(bins + 1)
    edges[-1] = end_s
    counts, _ = np.histogram(arrivals_s, bins=edges)
    # np.histogram closes the last bin on the right; the window does not
    at_end = int(np.count_nonzero(arrivals_s == end_s))
    counts[-1] -= at_end
    return counts.astype(np.float64)


@dataclass(frozen=True)
class ShareUnderTarget:
    share: float | None
    bucket_s: float | None  # the bucket bound that stood for the target
    method: ShareMethod | None
    reason: str = ""  # why the share is null


def share_from_buckets(bucket_increase: Mapping[float, float], target: float
                       ) -> ShareUnderTarget:
    """Share of a window's observations at or below ``target`` from cumulative bucket increases
    (``le`` bound -> observations at or below it, ``+Inf`` included)."""
    edges = sorted(bucket_increase)
    if not edges or not math.isinf(edges[-1]):
        return ShareUnderTarget(None, None, None, "the histogram has no +Inf bucket")
    cumulative = [max(bucket_increase[e], 0.0) for e in edges]
    total = cumulative[-1]
    if total <= 0:
        return ShareUnderTarget(None, None, None, NO_SAMPLES)
    lower, below = 0.0, 0.0
    for edge, count in zip(edges, cumulative, strict=True):
        if math.isclose(edge, target, rel_tol=1e-9, abs_tol=1e-12):
            return ShareUnderTarget(min(count / total, 1.0), edge, ShareMethod.BUCKET_EDGE)
        if edge > target:
            if math.isinf(edge):
                finite = edges[-2] if len(edges) > 1 else None
                return ShareUnderTarget(below / total, finite, ShareMethod.BEYOND_BUCKETS)
            inside = below + (count - below) * (target - lower) / (edge - lower)
            return ShareUnderTarget(min(inside / total, 1.0), edge, ShareMethod.INTERPOLATED)
        lower, below = edge, count
    raise AssertionError("the +Inf bucket is above every target")


def share_per_request(latencies_s: np.ndarray, target: float) -> ShareUnderTarget:
    """Share of the requests whose latency is at or below ``target``, every one of them known."""
    values = latencies_s[np.isfinite(latencies_s)]
    if values.size == 0:
        return ShareUnderTarget(None, None, None, NO_SAMPLES)
    return ShareUnderTarget(float(np.count_nonzero(values <= target) / values.size), None,
                            ShareMethod.PER_REQUEST)
