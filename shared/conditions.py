"""A deployment's autoscaling conditions, as ``kubectl describe hpa`` shows an HPA's.

Pure: from the last ReplicaTarget, the last ScaleEvent and the last MetricSnapshot of one
deployment, and the time to judge them at, the four conditions an operator asks about first:

- ``AbleToScale``: can the actuator change the workload (it applied or found it at target), or not
  (dry run, refused, failed, no event)? As in the HPA, a scale-down held by the stabilisation
  window shows here as ``ScaleDownStabilized``.
- ``ScalingActive``: is the decider planning from fresh inputs, or holding the last counts?
- ``ScalingLimited``: did a bound, a step limit or the GPU budget cut what the policy wanted? The
  binding rule comes from the target's ``prefill_bound_by``/``decode_bound_by`` explanation keys.
- ``MetricsStale``: is the collector's latest snapshot stale, incomplete or too old?

``slaplanner status`` prints them; the actuator can write the same list to Kubernetes
(``Condition.as_kubernetes`` has the ``metav1.Condition`` shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from shared.explanation import Explanation
from shared.messages import MetricSnapshot, Outcome, ReplicaTarget, ScaleEvent, ShareMethod
from shared.roles import ROLE_NAMES as ROLES

# A snapshot older than this many of its windows is stale: the collector skipped two intervals.
STALE_AFTER_WINDOWS = 3.0
# The planning inputs a snapshot must carry for the decider to size from it.
PLANNING_FIELDS = ("num_requests", "isl_avg", "osl_avg")


class ConditionType(StrEnum):
    ABLE_TO_SCALE = "AbleToScale"
    SCALING_ACTIVE = "ScalingActive"
    SCALING_LIMITED = "ScalingLimited"
    METRICS_STALE = "MetricsStale"


class Status(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


# The decider's binding rules (``shared.explanation.Rule`` values) that are limits, and
# the HPA-style reason each one is reported under. Every other rule (a sizing model, a hold, the
# fast path) is the policy deciding, not a limit.
LIMIT_REASONS: dict[str, str] = {
    "min_endpoint": "TooFewReplicas",
    "min_replicas": "TooFewReplicas",
    "max_replicas": "TooManyReplicas",
    "gpu_budget": "GpuBudget",
    "gpu_budget_enforced": "GpuBudget",
    "gpu_budget_sla_split": "GpuBudget",
    "step_limit_up": "ScaleUpLimit",
    "step_limit_down": "ScaleDownLimit",
    "prefill_decode_ratio_min": "RatioLimit",
    "prefill_decode_ratio_max": "RatioLimit",
    "no_shrink_missing_metrics": "NoScaleDownWithoutMetrics",
}
STABILISED = "scale_down_stabilised"


@dataclass(frozen=True)
class Condition:
    type: ConditionType
    status: Status
    reason: str  # CamelCase, as Kubernetes wants condition reasons
    message: str

    def as_kubernetes(self, last_transition: datetime,
                      observed_generation: int | None = None) -> dict[str, Any]:
        """The ``metav1.Condition`` body (the caller keeps ``lastTransitionTime`` when the
        status did not change)."""
        body: dict[str, Any] = {
            "type": str(self.type),
            "status": str(self.status),
            "reason": self.reason,
            "message": self.message[:32768],
            "lastTransitionTime": last_transition.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if observed_generation is not None:
            body["observedGeneration"] = observed_generation
        return body


def bound_by(target: ReplicaTarget) -> dict[str, str | None]:
    """The rule that set each role's count (``None`` where the explanation does not say)."""
    why = Explanation.from_dict(target.explanation)
    return {role: _text(why.role(role).bound_by) for role in ROLES}


def predicted_attainment(target: ReplicaTarget) -> float | None:
    """The share of requests the policy predicts within both targets, where it says."""
    value = Explanation.from_dict(target.explanation).predicted_attainment
    budget = target.explanation.get("gpu_budget")
    if value is None and isinstance(budget, dict):
        value = budget.get("predicted_attainment")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


# The latencies the SLA judges, as the snapshot's fields are prefixed.
LATENCIES = ("ttft", "itl")


@dataclass(frozen=True)
class ObservedShare:
    """The share of a window's requests within a latency target, as the collector measured it
    (``ttft_under_target_share``, ``itl_under_target_share``), and how."""

    share: float
    method: ShareMethod | None
    target_s: float | None  # the target it was measured against

    @property
    def lower_bound(self) -> bool:
        """The target lies beyond the histogram's last finite bucket: at least this share."""
        return self.method is ShareMethod.BEYOND_BUCKETS


def observed_share(snapshot: MetricSnapshot | None, latency: str,
                   target_s: float | None) -> ObservedShare | None:
    """The snapshot's share within the ``latency`` (``ttft``, ``itl``) target, if it measured
    one against ``target_s`` (any target when ``target_s`` is not known); ``None`` for a
    version 1 body, a window without samples or a collector set to another target."""
    if snapshot is None:
        return None
    share = getattr(snapshot, f"{latency}_under_target_share")
    measured_at = getattr(snapshot, f"{latency}_target_s")
    if share is None:
        return None
    if target_s is not None and measured_at is not None \
            and not math.isclose(measured_at, target_s, rel_tol=1e-9):
        return None
    return ObservedShare(float(share), getattr(snapshot, f"{latency}_share_method"),
                         measured_at if measured_at is not None else target_s)


def conditions(
    target: ReplicaTarget | None,
    event: ScaleEvent | None,
    snapshot: MetricSnapshot | None,
    now: float,
) -> list[Condition]:
    """The four conditions of one deployment at ``now`` (epoch seconds)."""
    return [
        able_to_scale(target, event, now),
        scaling_active(target),
        scaling_limited(target),
        metrics_stale(snapshot, now),
    ]


def able_to_scale(target: ReplicaTarget | None, event: ScaleEvent | None,
                  now: float) -> Condition:
    kind = ConditionType.ABLE_TO_SCALE
    if target is not None and (event is None or event.target_id != target.id):
        waited = now - target.window_end
        if waited > target.window_s:
            return Condition(kind, Status.UNKNOWN, "AwaitingActuator",
                             f"no ScaleEvent for the target of {_clock(target.window_end)} after "
                             f"{_duration(waited)}: is the actuator running?")
    if event is None:
        return Condition(kind, Status.UNKNOWN, "NoScaleEvent",
                         "no ScaleEvent on the bus yet: is the actuator running?")
    change = (f"prefill {_change(event.prefill.from_, event.prefill.to)}, "
              f"decode {_change(event.decode.from_, event.decode.to)}")
    if event.outcome is Outcome.DRY_RUN:
        return Condition(kind, Status.FALSE, "DryRun",
                         f"the {event.backend} backend only reports ({change}); nothing is "
                         "scaled: map the deployment to a backend in the actuator's config file")
    if event.outcome is Outcome.REFUSED:
        return Condition(kind, Status.FALSE, "ScaleRefused",
                         f"the actuator refused {change}: {event.reason or 'no reason given'}")
    if event.outcome is Outcome.FAILED:
        return Condition(kind, Status.FALSE, "FailedUpdateScale",
                         f"the actuator could not apply {change}: "
                         f"{event.reason or 'no reason given'}")
    if target is not None and event.target_id == target.id \
            and STABILISED in bound_by(target).values():
        return Condition(kind, Status.TRUE, "ScaleDownStabilized",
                         "recent recommendations were higher than the current one; the highest "
                         "within the scale-down window is applied")
    if event.outcome is Outcome.APPLIED:
        return Condition(kind, Status.TRUE, "SucceededRescale",
                         f"the {event.backend} backend applied {change}")
    return Condition(kind, Status.TRUE, "ReadyForNewScale",
                     f"the workload is at the target ({change})")


def scaling_active(target: ReplicaTarget | None) -> Condition:
    kind = ConditionType.SCALING_ACTIVE
    if target is None:
        return Condition(kind, Status.UNKNOWN, "NoTarget",
                         "no ReplicaTarget on the bus yet: are the forecaster and the decider "
                         "running, and has a snapshot arrived?")
    why = target.explanation
    if why.get("held"):
        hold = _text(why.get("hold_reason")) or "held"
        detail = _text(why.get("hold_detail"))
        return Condition(kind, Status.FALSE, _camel(hold),
                         f"the decider holds prefill {target.prefill_replicas} and decode "
                         f"{target.decode_replicas}" + (f": {detail}" if detail else ""))
    source = "the forecast" if target.forecast_id is not None else "the fast path's snapshot"
    return Condition(kind, Status.TRUE, "ValidMetricFound",
                     f"policy {target.policy} sizes from {source} of {_clock(target.window_end)}")


def scaling_limited(target: ReplicaTarget | None) -> Condition:
    kind = ConditionType.SCALING_LIMITED
    if target is None:
        return Condition(kind, Status.UNKNOWN, "NoTarget", "no ReplicaTarget on the bus yet")
    rules = bound_by(target)
    limited = [(role, rule) for role, rule in rules.items()
               if rule is not None and rule in LIMIT_REASONS]
    if not limited:
        return Condition(kind, Status.FALSE, "DesiredWithinRange",
                         "the desired counts are within the bounds, the step limits and the GPU "
                         "budget")
    reason = LIMIT_REASONS[limited[0][1]]
    parts = [f"{role} {replicas_of(target, role)} bound by {rule}" for role, rule in limited]
    budget = target.explanation.get("gpu_budget")
    if reason == "GpuBudget" and isinstance(budget, dict):
        parts.append(_budget_text(budget))
    return Condition(kind, Status.TRUE, reason, "; ".join(parts))


def metrics_stale(snapshot: MetricSnapshot | None, now: float) -> Condition:
    kind = ConditionType.METRICS_STALE
    if snapshot is None:
        return Condition(kind, Status.TRUE, "NoSnapshot",
                         "no MetricSnapshot on the bus: is the collector running?")
    gaps = "; ".join(f"{k}: {v}" for k, v in sorted(snapshot.gaps.items()))
    if snapshot.stale:
        return Condition(kind, Status.TRUE, "SourceUnreadable",
                         f"the collector could not read its source for the window ending "
                         f"{_clock(snapshot.window_end)}" + (f" ({gaps})" if gaps else ""))
    age = now - snapshot.window_end
    if age > STALE_AFTER_WINDOWS * snapshot.window_s:
        return Condition(kind, Status.TRUE, "NoRecentSnapshot",
                         f"the last snapshot ended {_duration(age)} ago, more than "
                         f"{STALE_AFTER_WINDOWS:g} windows of {_duration(snapshot.window_s)}")
    missing = [name for name in PLANNING_FIELDS if getattr(snapshot, name) is None]
    if missing:
        return Condition(kind, Status.TRUE, "MissingMetrics",
                         f"the snapshot of {_clock(snapshot.window_end)} lacks "
                         f"{', '.join(missing)}" + (f" ({gaps})" if gaps else ""))
    return Condition(kind, Status.FALSE, "FreshMetrics",
                     f"the snapshot of {_clock(snapshot.window_end)} has every planning input")


def _budget_text(budget: dict[str, Any]) -> str:
    text = f"GPU budget {budget.get('max_gpus')}"
    wanted, chosen = budget.get("wanted"), budget.get("chosen")
    if isinstance(wanted, dict) and isinstance(chosen, dict):
        text += (f": wanted prefill {wanted.get('prefill')} + decode {wanted.get('decode')}, "
                 f"got {chosen.get('prefill')} + {chosen.get('decode')}")
    elif budget.get("required_gpus") is not None:
        text += f", {budget.get('required_gpus')} GPUs wanted"
    attainment = budget.get("predicted_attainment")
    if isinstance(attainment, (int, float)) and not isinstance(attainment, bool):
        text += f"; predicted attainment {percent(float(attainment))}"
    return text


def percent(share: float) -> str:
    """A share as the project prints attainment everywhere: ``97.61 %``."""
    return f"{100.0 * share:.2f} %"


def replicas_of(target: ReplicaTarget, role: str) -> int:
    return target.prefill_replicas if role == "prefill" else target.decode_replicas


def _change(before: int | None, after: int) -> str:
    return f"{'?' if before is None else before}->{after}"


def _camel(rule: str) -> str:
    return "".join(part.capitalize() for part in rule.split("_") if part)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _clock(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.0f} days"
