"""The explanation a replica target carries: which rule set each count, and every number behind it.

A policy builds an ``Explanation``; it travels on the bus as the JSON object of
``ReplicaTarget.explanation`` (``to_dict``), whose keys have held since the first schema version
(``prefill_bound_by``, ``hold_reason``, ``prefill.steps``, ...); fields are added, never renamed.
Every reader (the actuator's Events, the decider's log line and gauges, the dry run, the
simulator's records) goes through ``Explanation.from_dict`` and the helpers below rather than
parsing the JSON by hand, so that one definition says what the keys mean.

Three things are defined once here: the ``Trail`` of named normalisation steps of one role (the
rule that bound a count is the last step that changed it, else the sizing rule), the
``HoldCause`` of a decision that keeps the counts, and ``RunningNow``, the counts a decision starts
from (the last target, else the workers the cluster reported).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from shared.roles import ROLE_NAMES as ROLES


class Rule(StrEnum):
    """Why a replica count has the value it has (the last rule that set it)."""

    PROFILE_CAPACITY = "profile_capacity"  # demand / profiled capacity per replica, rounded up
    WITHIN_BOUNDS = "within_bounds"  # a step looked and changed nothing
    MIN_ENDPOINT = "min_endpoint"
    MIN_REPLICAS = "min_replicas"
    MAX_REPLICAS = "max_replicas"
    GPU_BUDGET = "gpu_budget"  # Dynamo's proportional cut
    GPU_BUDGET_ENFORCED = "gpu_budget_enforced"  # our guard where Dynamo's cut overshoots
    HELD_NO_OBSERVATION = "held_no_observation"
    HELD_STALE_METRICS = "held_stale_metrics"
    HELD_MISSING_METRICS = "held_missing_metrics"
    HELD_NO_CAPACITY = "held_no_capacity"
    # the slaplanner policy's rules
    QUEUEING_MODEL = "queueing_model"  # prefill: fewest engines keeping TTFT under target (M/G/c)
    ITL_CURVE = "itl_curve"  # decode: Little's law at the busiest point meeting the ITL target
    KV_CAPACITY = "kv_capacity"  # decode: Little's law at the KV-cache headroom
    SERVING_FLOOR = "serving_floor"  # a role that serves traffic keeps at least one replica
    SCALE_TO_ZERO = "scale_to_zero"  # idle for the cooldown: both roles to 0
    WAKE_FROM_ZERO = "wake_from_zero"  # a request seen at zero: back to the minimum at once
    FAST_PATH = "fast_path"  # scaled up between planning intervals on observed queue/latency
    CAPACITY_ON_THE_WAY = "capacity_on_the_way"  # replicas already starting cover the need
    NO_SHRINK_MISSING_METRICS = "no_shrink_missing_metrics"  # may grow, not shrink, this window
    SCALE_DOWN_STABILISED = "scale_down_stabilised"  # highest recommendation in the window
    STEP_LIMIT_UP = "step_limit_up"
    STEP_LIMIT_DOWN = "step_limit_down"
    RATIO_MIN = "prefill_decode_ratio_min"
    RATIO_MAX = "prefill_decode_ratio_max"
    GPU_BUDGET_SLA_SPLIT = "gpu_budget_sla_split"  # budget binds: split for the fewest violations


HOLD_RULES = frozenset(
    {Rule.HELD_NO_OBSERVATION, Rule.HELD_STALE_METRICS, Rule.HELD_MISSING_METRICS,
     Rule.HELD_NO_CAPACITY}
)
SIZING_RULES = frozenset(
    {Rule.PROFILE_CAPACITY, Rule.QUEUEING_MODEL, Rule.ITL_CURVE, Rule.KV_CAPACITY}
)

# The families of rules an explanation lists under ``rules`` when one of them changed a count.
RULE_FAMILIES = {
    Rule.QUEUEING_MODEL: "queueing",
    Rule.ITL_CURVE: "itl_curve",
    Rule.KV_CAPACITY: "kv_capacity",
    Rule.SCALE_DOWN_STABILISED: "stabilisation",
    Rule.STEP_LIMIT_UP: "step_limit",
    Rule.STEP_LIMIT_DOWN: "step_limit",
    Rule.GPU_BUDGET_SLA_SPLIT: "budget",
    Rule.GPU_BUDGET_ENFORCED: "budget",
    Rule.RATIO_MIN: "ratio",
    Rule.RATIO_MAX: "ratio",
    Rule.FAST_PATH: "fast_path",
    Rule.CAPACITY_ON_THE_WAY: "capacity_on_the_way",
    Rule.SCALE_TO_ZERO: "scale_to_zero",
    Rule.WAKE_FROM_ZERO: "scale_to_zero",
    Rule.NO_SHRINK_MISSING_METRICS: "missing_metrics",
    Rule.MIN_REPLICAS: "min_replicas",
    Rule.MAX_REPLICAS: "max_replicas",
    Rule.SERVING_FLOOR: "min_replicas",
}

# What each rule means, in the words of an Event or a log line.
RULE_TEXT = {
    Rule.PROFILE_CAPACITY: "profiled throughput (Dynamo's arithmetic)",
    Rule.WITHIN_BOUNDS: "within bounds",
    Rule.MIN_ENDPOINT: "min_endpoint",
    Rule.MIN_REPLICAS: "the role's minimum replicas",
    Rule.MAX_REPLICAS: "the role's maximum replicas",
    Rule.GPU_BUDGET: "Dynamo's proportional GPU budget cut",
    Rule.GPU_BUDGET_ENFORCED: "the GPU budget",
    Rule.HELD_NO_OBSERVATION: "held: no observation",
    Rule.HELD_STALE_METRICS: "held: stale metrics",
    Rule.HELD_MISSING_METRICS: "held: metrics missing",
    Rule.HELD_NO_CAPACITY: "held: the profile gives no capacity here",
    Rule.QUEUEING_MODEL: "queueing model",
    Rule.ITL_CURVE: "ITL curve",
    Rule.KV_CAPACITY: "KV-cache capacity",
    Rule.SERVING_FLOOR: "one replica while serving",
    Rule.SCALE_TO_ZERO: "idle: scale to zero",
    Rule.WAKE_FROM_ZERO: "a request at zero: wake up",
    Rule.FAST_PATH: "fast path",
    Rule.CAPACITY_ON_THE_WAY: "replicas already starting",
    Rule.NO_SHRINK_MISSING_METRICS: "no shrink while latencies are missing",
    Rule.SCALE_DOWN_STABILISED: "scale-down stabilisation window",
    Rule.STEP_LIMIT_UP: "step limit up",
    Rule.STEP_LIMIT_DOWN: "step limit down",
    Rule.RATIO_MIN: "minimum prefill:decode ratio",
    Rule.RATIO_MAX: "maximum prefill:decode ratio",
    Rule.GPU_BUDGET_SLA_SPLIT: "GPU budget (split for the most requests within target)",
}


def rule_text(rule: str, rules: tuple[str, ...] = ()) -> str:
    """A rule in words; a sizing rule says at which load it sized (``rules`` of the decision)."""
    try:
        known = Rule(rule)
    except ValueError:
        return rule
    text = RULE_TEXT[known]
    if known in SIZING_RULES and known is not Rule.PROFILE_CAPACITY:
        if "quantile" in rules:
            text += " at forecast upper quantile"
        if "lookahead" in rules:
            text += " over the startup lookahead"
    return text


# ---------------------------------------------------------------------------------------------
# The parts


@dataclass(frozen=True)
class TrailStep:
    step: str
    replicas: int
    rule: str

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "replicas": self.replicas, "reason": self.rule}


@dataclass
class Trail:
    """The normalisation steps of one role, in order; the first is the sizing rule."""

    steps: list[TrailStep] = field(default_factory=list)

    def add(self, name: str, replicas: int, rule: str) -> int:
        self.steps.append(TrailStep(name, replicas, str(rule)))
        return replicas

    @property
    def last(self) -> int:
        return self.steps[-1].replicas

    def bound_by(self) -> str:
        """The last step that changed the count, else the first (the sizing rule)."""
        if not self.steps:
            return ""
        last = self.steps[0].rule
        previous = self.steps[0].replicas
        for step in self.steps[1:]:
            if step.replicas != previous:
                last = step.rule
            previous = step.replicas
        return last

    def families(self) -> set[str]:
        """``RULE_FAMILIES`` of the steps that set a count (the first always does)."""
        names = set()
        previous: int | None = None
        for step in self.steps:
            changed = previous is None or step.replicas != previous
            family = RULE_FAMILIES.get(Rule(step.rule)) if step.rule in _RULE_VALUES else None
            if changed and family is not None:
                names.add(family)
            previous = step.replicas
        return names

    def replicas_after(self, name: str) -> int | None:
        """The count after the first step called ``name``."""
        return next((s.replicas for s in self.steps if s.step == name), None)

    def as_list(self) -> list[dict[str, Any]]:
        return [step.as_dict() for step in self.steps]

    @classmethod
    def from_list(cls, raw: Any) -> Trail:
        steps = []
        for item in raw if isinstance(raw, list) else []:
            if isinstance(item, Mapping) and isinstance(item.get("replicas"), int):
                steps.append(TrailStep(str(item.get("step", "")), int(item["replicas"]),
                                       str(item.get("reason", ""))))
        return cls(steps)


_RULE_VALUES = frozenset(r.value for r in Rule)


@dataclass(frozen=True)
class HoldCause:
    """Why the observation cannot be used for a decision: the counts are held."""

    rule: Rule
    detail: str


@dataclass(frozen=True)
class RunningNow:
    """What a decision starts from: the last target, else the worker counts the cluster reported."""

    prefill: int
    decode: int
    source: str  # "last target" or "observed workers"

    @property
    def counts(self) -> tuple[int, int]:
        return self.prefill, self.decode

    def as_dict(self) -> dict[str, Any]:
        return {"prefill": self.prefill, "decode": self.decode, "source": self.source}


@dataclass(frozen=True)
class RoleExplanation:
    """One role's part: the count, the steps that led to it and the sizing numbers."""

    replicas: int
    bound_by: str
    trail: Trail | None = None  # None: the counts were held, nothing was sized
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def need(self) -> int | None:
        """What the sizing rule asked for, before any bound."""
        return self.trail.steps[0].replicas if self.trail and self.trail.steps else None


@dataclass(frozen=True)
class Held:
    cause: HoldCause
    held_from: str
    counts: tuple[int, int]  # what was held, before the bounds and budget


@dataclass(frozen=True)
class Explanation:
    """A policy's decision, explained. ``sections`` holds the policy's own sections by their bus
    key (``load``, ``observed``, ``config``, ``correction``, ``gpu_budget``, ...)."""

    policy: str
    prefill: RoleExplanation
    decode: RoleExplanation
    held: Held | None = None
    rules: tuple[str, ...] | None = None  # the families of rules that bound a number
    current: RunningNow | None = None
    predicted_attainment: float | None = None  # share of requests predicted within both targets
    sections: dict[str, Any] = field(default_factory=dict)

    def role(self, name: str) -> RoleExplanation:
        return self.prefill if name == "prefill" else self.decode

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``ReplicaTarget.explanation``."""
        out: dict[str, Any] = {"policy": self.policy, **self.sections,
                               "held": self.held is not None}
        if self.held is not None:
            out.update(
                hold_reason=str(self.held.cause.rule),
                hold_detail=self.held.cause.detail,
                held_from=self.held.held_from,
                held_counts={"prefill": self.held.counts[0], "decode": self.held.counts[1]},
            )
        for name in ROLES:
            part = self.role(name)
            if part.trail is not None:
                out[name] = {**part.detail, "steps": part.trail.as_list(),
                             "replicas": part.replicas}
        out["prefill_bound_by"] = self.prefill.bound_by
        out["decode_bound_by"] = self.decode.bound_by
        if self.rules is not None:
            out["rules"] = list(self.rules)
        if self.current is not None:
            out["current"] = self.current.as_dict()
        if self.predicted_attainment is not None:
            out["predicted_attainment"] = self.predicted_attainment
        out["summary"] = self.summary()
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], prefill_replicas: int = 0,
                  decode_replicas: int = 0) -> Explanation:
        """Read an explanation off the bus; what it lacks stays unknown (a hand-typed target
        may carry anything, or nothing)."""
        known = {"policy", "held", "hold_reason", "hold_detail", "held_from", "held_counts",
                 "prefill", "decode", "prefill_bound_by", "decode_bound_by", "rules", "current",
                 "predicted_attainment", "summary"}
        held = None
        if raw.get("held") and isinstance(raw.get("hold_reason"), str):
            held_counts = raw.get("held_counts")
            counts: Mapping[str, Any] = held_counts if isinstance(held_counts, Mapping) else {}
            try:
                rule = Rule(raw["hold_reason"])
            except ValueError:
                rule = Rule.HELD_NO_OBSERVATION
            held = Held(
                HoldCause(rule, str(raw.get("hold_detail", ""))),
                str(raw.get("held_from", "")),
                (_int(counts.get("prefill"), prefill_replicas),
                 _int(counts.get("decode"), decode_replicas)),
            )
        roles = {}
        for name, replicas in (("prefill", prefill_replicas), ("decode", decode_replicas)):
            part = raw.get(name)
            bound = raw.get(f"{name}_bound_by")
            if isinstance(part, Mapping):
                detail = {k: v for k, v in part.items() if k not in ("steps", "replicas")}
                roles[name] = RoleExplanation(
                    _int(part.get("replicas"), replicas), str(bound or ""),
                    Trail.from_list(part.get("steps")), detail,
                )
            else:
                roles[name] = RoleExplanation(replicas, str(bound or ""))
        current_raw = raw.get("current")
        current = None
        if isinstance(current_raw, Mapping) and {"prefill", "decode"} <= set(current_raw):
            current = RunningNow(_int(current_raw["prefill"], 0), _int(current_raw["decode"], 0),
                                 str(current_raw.get("source", "")))
        rules = raw.get("rules")
        attainment = raw.get("predicted_attainment")
        return cls(
            policy=str(raw.get("policy", "")),
            prefill=roles["prefill"],
            decode=roles["decode"],
            held=held,
            rules=tuple(str(r) for r in rules) if isinstance(rules, list) else None,
            current=current,
            predicted_attainment=float(attainment)
            if isinstance(attainment, int | float) and not isinstance(attainment, bool) else None,
            sections={k: v for k, v in raw.items() if k not in known},
        )

    # --- words ---------------------------------------------------------------------------------
    def bound_text(self, role: str) -> str:
        """The rule that set one role's count, in words (empty if the explanation has none)."""
        bound = self.role(role).bound_by
        if not bound:
            return ""
        text = rule_text(bound, self.rules or ())
        if self.held is not None and bound in _RULE_VALUES and Rule(bound) in HOLD_RULES:
            text += f" ({self.held.cause.detail})"
        return text

    def role_line(self, role: str) -> str:
        """``prefill 3 -> 5: queueing model at forecast upper quantile`` (the need too, when a
        bound set a count other than the sizing rule's)."""
        part = self.role(role)
        before = None if self.current is None else getattr(self.current, role)
        moved = f"{role} {part.replicas}" if before is None else (
            f"{role} {before} -> {part.replicas}"
        )
        line = f"{moved}: {self.bound_text(role) or 'no rule given'}"
        need = part.need
        if need is not None and need != part.replicas:
            line += f" (needed {need})"
        return line

    def summary(self) -> str:
        """One sentence whose numbers are the decision's: each role from -> to, the rule that
        set it and the need where a bound changed it, the predicted attainment if known."""
        if self.held is not None:
            head = (f"held {self.held.held_from} {self.held.counts[0]} + "
                    f"{self.held.counts[1]}: {self.held.cause.detail}")
            moved = [
                self.role_line(r) for r in ROLES
                if self.role(r).replicas != self.held.counts[ROLES.index(r)]
            ]
            return "; ".join([head, *moved])
        text = "; ".join(self.role_line(r) for r in ROLES)
        if self.predicted_attainment is not None:
            text += f"; predicted attainment {self.predicted_attainment:.2%}"
        return text


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def reason_text(explanation: Mapping[str, Any], role: str | None = None) -> str | None:
    """The rule that set a target's count of ``role`` (or of both roles), in words, for Events
    and logs; ``None`` when the explanation names none (a hand-typed target)."""
    why = Explanation.from_dict(explanation)
    roles = ROLES if role is None else (role,)
    parts = [(r, why.bound_text(r)) for r in roles]
    parts = [(r, text) for r, text in parts if text]
    if not parts:
        return None
    if role is not None:
        return parts[0][1]
    return "; ".join(f"{r}: {text}" for r, text in parts)
