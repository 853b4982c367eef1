"""Prometheus gauges of the decider, one series per deployment (label ``deployment``).

The names are documented in ``docs/metrics.md``. Values come from
``services.decider.core.gauge_values``; a value that was not observed is exported as NaN, never
as 0 and never as the stale value of an earlier window.
"""

from __future__ import annotations

import math

from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from services.decider.core import gauge_values
from shared.messages import ReplicaTarget

PREFIX = "slaplanner_decider_"

# gauge_values key -> help text (with the unit)
GAUGES: dict[str, str] = {
    "observed_ttft_seconds": "Observed mean time to first token in the last window, seconds",
    "observed_itl_seconds": "Observed mean inter-token latency in the last window, seconds",
    "ttft_target_seconds": "Time-to-first-token target, seconds",
    "itl_target_seconds": "Inter-token latency target, seconds",
    "observed_request_rate_per_second": "Observed requests per second in the last window",
    "forecast_request_rate_per_second": "Forecast requests per second sized for",
    "forecast_isl_tokens": "Forecast mean input tokens per request sized for",
    "forecast_osl_tokens": "Forecast mean output tokens per request sized for",
    "prefill_correction_factor": "How much slower than profiled prefill is (dynamo: observed / "
    "profiled TTFT; slaplanner: the smoothed engine slowdown behind the observed TTFT)",
    "decode_correction_factor": "Observed ITL / profiled ITL at the observed concurrency "
    "(slaplanner: smoothed, weighted by requests)",
    "observed_prefill_workers": "Prefill workers the cluster reported",
    "observed_decode_workers": "Decode workers the cluster reported",
    "prefill_target_replicas": "Prefill replicas the decider asked for",
    "decode_target_replicas": "Decode replicas the decider asked for",
    "target_held": "1 when the target holds the last one because metrics were missing or stale",
}


class DeciderGauges:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        target_registry = REGISTRY if registry is None else registry
        self._gauges = {
            key: Gauge(PREFIX + key, help_text, ["deployment"], registry=target_registry)
            for key, help_text in GAUGES.items()
        }

    def record(self, target: ReplicaTarget) -> None:
        deployment = str(target.deployment)
        for key, value in gauge_values(target).items():
            gauge = self._gauges.get(key)
            if gauge is not None:
                gauge.labels(deployment=deployment).set(math.nan if value is None else value)


_default: DeciderGauges | None = None


def record(target: ReplicaTarget) -> None:
    """Record a target on the process-wide registry (what ``/metrics`` serves)."""
    global _default
    if _default is None:
        _default = DeciderGauges()
    _default.record(target)
