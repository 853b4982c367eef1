"""Counter and histogram arithmetic of one window (pure), and the snapshot fields it yields.

A counter's increase over a window is its value at the end minus its value at the start; a
counter that went down was reset, so its whole current value is the increase (as Prometheus'
``increase()`` assumes). Averages are ``increase(_sum) / increase(_count)``, as Dynamo's planner
computes them. Nothing is invented: a series that is absent gives ``None`` with a reason
(unknown), an empty window gives ``None`` averages with ``UNDEFINED`` (0/0), and an idle window's
request count is a real 0.

Both sources use these: the Prometheus source (``promql``) computes the same values inside
Prometheus, the direct-scrape source (``exposition``) from two scrapes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Why a field is null when its window had no samples: 0/0 is undefined, not 0 and not unknown.
UNDEFINED = "no samples in window"

# The snapshot fields a window yields, by how they are computed.
COUNT_FIELDS = ("num_requests", "requests_failed")
AVERAGE_FIELDS = ("isl_avg", "osl_avg", "ttft_avg_s", "itl_avg_s", "request_duration_avg_s",
                  "queue_time_avg_s", "prefill_time_avg_s", "decode_time_avg_s")
QUANTILE_FIELDS = ("isl_p50", "isl_p90", "isl_p99", "osl_p90", "ttft_p90_s", "ttft_p99_s",
                   "itl_p90_s", "itl_p99_s", "queue_time_p90_s", "prefill_time_p90_s")
GAUGE_FIELDS = ("requests_running", "requests_waiting", "requests_before_first_token",
                "prefill_tokens_pending")


def counter_increase(previous: float, current: float) -> float:
    # A counter only goes down when its process restarted; all of its value is then new.
    return current if current < previous else current - previous


def bin_increases(readings: Sequence[float | None]) -> list[float]:
    """A counter's increase in each bin from its readings at the bins' edges (one more reading
    than bins; ``None`` where the series did not exist or had no sample). A series that
    appears after the first edge is new (Dynamo creates a label set's series with its first
    request): all of its first reading counts in the bin it appears in."""
    counts = [0.0] * max(len(readings) - 1, 0)
    last: float | None = None
    for index, reading in enumerate(readings):
        if reading is None:
            continue
        if index > 0:
            counts[index - 1] = reading if last is None else counter_increase(last, reading)
        last = reading
    return counts


def histogram_quantile(quantile: float, bucket_increase: Mapping[float, float]) -> float | None:
    """Prometheus' histogram_quantile over one window's bucket increases (linear in a bucket)."""
    edges = sorted(bucket_increase)
    if not edges or not math.isinf(edges[-1]):
        return None
    cumulative = np.array([bucket_increase[e] for e in edges], dtype=float)
    total = cumulative[-1]
    if total <= 0:
        return None
    rank = quantile * total
    index = int(np.searchsorted(cumulative, rank, side="left"))
    if index >= len(edges) - 1:
        # In the +Inf bucket: the best Prometheus can say is the highest finite edge.
        return edges[-2] if len(edges) > 1 else None
    upper = edges[index]
    lower = edges[index - 1] if index > 0 else 0.0
    below = cumulative[index - 1] if index > 0 else 0.0
    in_bucket = cumulative[index] - below
    if in_bucket <= 0:
        return upper
    return float(lower + (upper - lower) * (rank - below) / in_bucket)


@dataclass(frozen=True)
class WindowValues:
    values: dict[str, Any]
    gaps: dict[str, str]
