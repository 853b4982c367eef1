"""Prometheus gauges of the decider, one series per deployment (labels ``namespace`` and
``deployment``), and per role where a number is one role's (label ``role``).

The names are documented in ``docs/metrics.md``. Values come from the target
(``services.decider.core.gauge_values``, ``shared.conditions``) and from the snapshot it was
decided on; a value that was not observed is exported as NaN, never as 0 and never as the stale
value of an earlier window.

``slaplanner_decider_desired_replicas{role}`` is the decision itself, in the form KEDA's
Prometheus scaler and an HPA's external metric read (``deploy/examples/keda``).
"""

from __future__ import annotations

import contextlib
import math

from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from services.decider.core import gauge_values
from shared import conditions
from shared.messages import DeploymentKey, MetricSnapshot, ReplicaTarget

PREFIX = "slaplanner_decider_"
LABELS = ["namespace", "deployment"]
ROLES = ("prefill", "decode")

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
    "target_held": "1 when the target holds the last one because metrics were missing or stale",
}
# From the snapshot the target was decided on: the tail the SLA is judged by. A p99 above its
# target means fewer than 99 % of the window's requests were within it.
SNAPSHOT_GAUGES: dict[str, str] = {
    "observed_ttft_p99_seconds": "Observed 99th percentile time to first token in the last "
    "window, seconds",
    "observed_itl_p99_seconds": "Observed 99th percentile inter-token latency in the last "
    "window, seconds",
    "observed_ttft_attainment_ratio": "Share of the last window's first tokens within the TTFT "
    "target, as the collector measured it (a lower bound where the target lies beyond the "
    "histogram's buckets); NaN where the snapshot has none for this target",
    "observed_itl_attainment_ratio": "Share of the requests finished in the last window whose "
    "mean inter-token latency was within the ITL target, as the collector measured it; NaN "
    "where the snapshot has none for this target",
}
# From the target as a whole.
TARGET_GAUGES: dict[str, str] = {
    "predicted_attainment_ratio": "Share of requests the decider predicts within both targets "
    "where it predicts one (the GPU budget binds); NaN otherwise",
    "last_decision_timestamp_seconds": "End of the window the last target was decided for, "
    "seconds since the epoch",
}
# Per role (label role): gauge name -> (gauge_values key with {role}, help text).
ROLE_GAUGES: dict[str, tuple[str, str]] = {
    "desired_replicas": ("{role}_target_replicas", "Replicas the decider asked for"),
    "observed_workers": ("observed_{role}_workers", "Workers the cluster reported"),
}
BINDING_RULE = "binding_rule"
BINDING_RULE_HELP = ("1 for the rule that set the role's count in the last target (label rule: "
                     "a sizing model, a bound, the GPU budget, a hold, ...)")


def snapshot_values(
    snapshot: MetricSnapshot | None, ttft_target_s: float | None = None,
    itl_target_s: float | None = None,
) -> dict[str, float | None]:
    """The tail and the shares within the targets, from the snapshot the target was decided
    on (a share measured against another target than the decider's is not its attainment)."""
    values: dict[str, float | None] = {
        "observed_ttft_p99_seconds": None if snapshot is None else snapshot.ttft_p99_s,
        "observed_itl_p99_seconds": None if snapshot is None else snapshot.itl_p99_s,
    }
    for latency, target_s in (("ttft", ttft_target_s), ("itl", itl_target_s)):
        share = conditions.observed_share(snapshot, latency, target_s)
        values[f"observed_{latency}_attainment_ratio"] = None if share is None else share.share
    return values


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


class DeciderGauges:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        target_registry = REGISTRY if registry is None else registry

        def gauge(key: str, help_text: str, labels: list[str]) -> Gauge:
            return Gauge(PREFIX + key, help_text, labels, registry=target_registry)

        self._gauges = {key: gauge(key, text, LABELS)
                        for key, text in {**GAUGES, **SNAPSHOT_GAUGES, **TARGET_GAUGES}.items()}
        self._role_gauges = {key: gauge(key, text, [*LABELS, "role"])
                             for key, (_, text) in ROLE_GAUGES.items()}
        self._rules = gauge(BINDING_RULE, BINDING_RULE_HELP, [*LABELS, "role", "rule"])
        self._rule_of: dict[tuple[str, str, str], str] = {}

    def record(self, target: ReplicaTarget, observed: MetricSnapshot | None = None) -> None:
        """Record a target and the snapshot it was decided on (``None``: not known)."""
        key = target.deployment
        labels = {"namespace": key.namespace, "deployment": key.name}
        values = gauge_values(target)
        values.update(snapshot_values(observed, values.get("ttft_target_seconds"),
                                      values.get("itl_target_seconds")))
        values["predicted_attainment_ratio"] = conditions.predicted_attainment(target)
        values["last_decision_timestamp_seconds"] = target.window_end
        for name, gauge in self._gauges.items():
            gauge.labels(**labels).set(_nan(values.get(name)))
        for role in ROLES:
            for name, (source, _) in ROLE_GAUGES.items():
                self._role_gauges[name].labels(**labels, role=role).set(
                    _nan(values.get(source.format(role=role))))
        for role, rule in conditions.bound_by(target).items():
            self._set_rule((key.namespace, key.name, role), rule or "unknown")

    def forget(self, deployment: DeploymentKey) -> None:
        """Remove every series of a deployment (one the decider forgot: idle too long)."""
        labels = (deployment.namespace, deployment.name)
        for gauge in self._gauges.values():
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        for role in ROLES:
            for gauge in self._role_gauges.values():
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels, role)
            rule = self._rule_of.pop((*labels, role), None)
            if rule is not None:
                self._rules.remove(*labels, role, rule)

    def _set_rule(self, series: tuple[str, str, str], rule: str) -> None:
        # One series per role: the old rule's goes when the rule changes.
        previous = self._rule_of.get(series)
        if previous is not None and previous != rule:
            self._rules.remove(*series, previous)
        self._rule_of[series] = rule
        self._rules.labels(*series, rule).set(1.0)


_default: DeciderGauges | None = None


def record(target: ReplicaTarget, observed: MetricSnapshot | None = None) -> None:
    """Record a target on the process-wide registry (what ``/metrics`` serves)."""
    global _default
    if _default is None:
        _default = DeciderGauges()
    _default.record(target, observed)


def forget(deployment: DeploymentKey) -> None:
    """Remove a deployment's series from the process-wide registry."""
    if _default is not None:
        _default.forget(deployment)
