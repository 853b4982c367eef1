"""Window values from two scrapes of cumulative counters and histograms (pure).

A scrape is flattened into ``Sample``s; the window between two scrapes is the increase of each
counter (a counter that went down was reset, so its whole current value is the increase, as
Prometheus' ``increase()`` assumes) and averages are ``increase(_sum) / increase(_count)``, as
Dynamo's planner computes them. Nothing is invented: a series that is absent gives ``None`` with a
reason (unknown), an empty window gives ``None`` averages with ``UNDEFINED`` (0/0), and an idle
window's request count is a real 0.

The Prometheus source (``promql``) computes the same window values inside Prometheus and reports
them with the same field names and the same reasons; the names and reasons live here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

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

# Dynamo frontend metric names (NVIDIA Dynamo, docs "Dynamo Metrics", Apache-2.0).
DYNAMO_FRONTEND = {
    "requests": "dynamo_frontend_requests_total",
    "isl": "dynamo_frontend_input_sequence_tokens",
    "osl": "dynamo_frontend_output_sequence_tokens",
    "ttft": "dynamo_frontend_time_to_first_token_seconds",
    "itl": "dynamo_frontend_inter_token_latency_seconds",
    "duration": "dynamo_frontend_request_duration_seconds",
    "inflight": "dynamo_frontend_inflight_requests",
    "queued": "dynamo_frontend_queued_requests",
}


# The key of a counter's samples labelled status="error" in a Scrape.
FAILED = '{status="error"}'


@dataclass(frozen=True)
class Scrape:
    """Sums of each sample name over the label sets that matched, plus histogram buckets."""

    values: Mapping[str, float]
    buckets: Mapping[str, Mapping[float, float]] = field(default_factory=dict)


def parse_exposition(text: str, labels: Mapping[str, str] | None = None) -> Scrape:
    """Flatten a text exposition, keeping only samples whose labels include ``labels``."""
    wanted = dict(labels or {})
    values: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if any(sample.labels.get(k) != v for k, v in wanted.items()):
                continue
            if sample.labels.get("status") == "error":  # Dynamo's failed requests, apart
                values[sample.name + FAILED] = values.get(sample.name + FAILED, 0.0) \
                    + sample.value
                continue
            if sample.name.endswith("_bucket") and "le" in sample.labels:
                base = sample.name[: -len("_bucket")]
                edge = float(sample.labels["le"])
                per_edge = buckets.setdefault(base, {})
                per_edge[edge] = per_edge.get(edge, 0.0) + sample.value
            else:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return Scrape(values=values, buckets=buckets)


def counter_increase(previous: float, current: float) -> float:
    # A counter only goes down when its process restarted; all of its value is then new.
    return current if current < previous else current - previous


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


def _increase(name: str, before: Scrape, after: Scrape) -> float | None:
    # A labelled series appears with its first event; absent from a scrape that succeeded, it
    # was zero then. Absent now, it is unknown.
    if name not in after.values:
        return None
    return counter_increase(before.values.get(name, 0.0), after.values[name])


def window_values(
    before: Scrape, after: Scrape, names: Mapping[str, str] = DYNAMO_FRONTEND
) -> WindowValues:
    """The snapshot fields for the window between two scrapes."""
    values: dict[str, float | None] = {}
    gaps: dict[str, str] = {}
    requests = _increase(names["requests"], before, after)
    values["num_requests"] = requests
    if requests is None:
        gaps["num_requests"] = f"series {names['requests']} absent"
        gaps["requests_failed"] = f"series {names['requests']} absent"
        values["requests_failed"] = None
    else:  # the error series appears with the first failure: none yet is a real 0
        failed = names["requests"] + FAILED
        values["requests_failed"] = counter_increase(before.values.get(failed, 0.0),
                                                     after.values.get(failed, 0.0))

    averages = {
        "isl_avg": names["isl"],
        "osl_avg": names["osl"],
        "ttft_avg_s": names["ttft"],
        "itl_avg_s": names["itl"],
        "request_duration_avg_s": names["duration"],
    }
    for field_name, metric in averages.items():
        total = _increase(f"{metric}_sum", before, after)
        count = _increase(f"{metric}_count", before, after)
        if total is None or count is None:
            values[field_name] = None
            gaps[field_name] = f"series {metric}_sum/_count absent"
        elif count <= 0:
            values[field_name] = None
            gaps[field_name] = UNDEFINED
        else:
            values[field_name] = max(total / count, 0.0)

    quantiles = {
        "ttft_p90_s": (names["ttft"], 0.9),
        "ttft_p99_s": (names["ttft"], 0.99),
        "itl_p90_s": (names["itl"], 0.9),
        "itl_p99_s": (names["itl"], 0.99),
        "isl_p90": (names["isl"], 0.9),
        "osl_p90": (names["osl"], 0.9),
    }
    for field_name, (metric, q) in quantiles.items():
        now_b, then_b = after.buckets.get(metric), before.buckets.get(metric, {})
        if not now_b:
            values[field_name] = None
            gaps[field_name] = f"histogram {metric}_bucket absent"
            continue
        delta = {e: counter_increase(then_b.get(e, 0.0), c) for e, c in now_b.items()}
        estimate = histogram_quantile(q, delta)
        values[field_name] = estimate
        if estimate is None:
            gaps[field_name] = UNDEFINED

    for field_name, metric in (("requests_running", names["inflight"]),
                               ("requests_before_first_token", names["queued"])):
        values[field_name] = after.values.get(metric)
        if values[field_name] is None:
            gaps[field_name] = f"gauge {metric} absent"
    return WindowValues(values=values, gaps=gaps)


def missing_series(scrape: Scrape, names: Iterable[str] = DYNAMO_FRONTEND.values()) -> list[str]:
    """Metric names a scrape lacks entirely, to tell the operator what to check."""
    present = set(scrape.values) | set(scrape.buckets)
    missing = []
    for name in names:
        if not any(p == name or p.startswith(name + "_") for p in present):
            missing.append(name)
    return missing
