"""What every sizing policy takes and returns, and the steps they share.

A policy is a pure function: planned load, the last observation, the profile, the deployment's
knobs and the policy's own state in; replica counts, new state and an explanation out. It reads
no clock, no bus and no cluster. Each normalisation step returns ``(replicas, rule)`` so that the
rule that bound a count goes straight into the explanation (``shared/explanation.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.decider.knobs import DeploymentKnobs
from shared.explanation import Explanation, HoldCause, Rule, RunningNow
from shared.messages import MAX_REPLICAS, LoadForecast, MetricSnapshot, ScaleEvent
from shared.perf_model import Profile


@dataclass(frozen=True)
class PlannedLoad:
    """The load to size for: requests expected in one window and their mean lengths."""

    num_requests: float
    isl_avg_tokens: float
    osl_avg_tokens: float
    window_s: float  # the window ``num_requests`` counts over (Dynamo: its adjustment interval)
    # The forecast this load is the first step of, for policies that look further ahead and use
    # its upper quantiles; ``dynamo`` ignores it.
    forecast: LoadForecast | None = None


@dataclass(frozen=True)
class PolicyState:
    """What a policy remembers about one deployment between decisions."""

    prefill_correction: float = 1.0
    decode_correction: float = 1.0
    last_prefill_replicas: int | None = None
    last_decode_replicas: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # policy-specific memory


@dataclass(frozen=True)
class PolicyDecision:
    prefill_replicas: int
    decode_replicas: int
    state: PolicyState
    explained: Explanation

    @property
    def held(self) -> bool:
        return self.explained.held is not None

    @property
    def explanation(self) -> dict[str, Any]:
        """The explanation as it goes on the bus."""
        return self.explained.to_dict()


class Policy(Protocol):
    def __call__(
        self,
        load: PlannedLoad,
        observed: MetricSnapshot | None,
        profile: Profile,
        knobs: DeploymentKnobs,
        state: PolicyState,
    ) -> PolicyDecision: ...


@dataclass(frozen=True)
class FastPathResult:
    """What a snapshot between planning intervals did: new memory, and a decision if the
    policy scales now (``None``: nothing to publish)."""

    state: PolicyState
    decision: PolicyDecision | None


class FastPath(Protocol):
    """A policy's reaction to a snapshot between planning intervals (scales up only)."""

    def __call__(
        self,
        snapshot: MetricSnapshot,
        profile: Profile,
        knobs: DeploymentKnobs,
        state: PolicyState,
    ) -> FastPathResult: ...


class ScaleEventHook(Protocol):
    """A policy learning from what the actuator did (e.g. how long workers take to start)."""

    def __call__(
        self, event: ScaleEvent, knobs: DeploymentKnobs, state: PolicyState
    ) -> PolicyState: ...


# ---------------------------------------------------------------------------------------------
# What every policy reads the same way


def running_now(state: PolicyState, observed: MetricSnapshot | None) -> RunningNow | None:
    """The last target, else the worker counts the cluster reported; ``None`` if neither."""
    if state.last_prefill_replicas is not None and state.last_decode_replicas is not None:
        return RunningNow(state.last_prefill_replicas, state.last_decode_replicas, "last target")
    if (
        observed is not None
        and observed.prefill_workers is not None
        and observed.decode_workers is not None
    ):
        return RunningNow(observed.prefill_workers, observed.decode_workers, "observed workers")
    return None


def hold_cause(observed: MetricSnapshot | None, needed: Sequence[str]) -> HoldCause | None:
    """Why the observation cannot be used, or ``None``: no snapshot, a stale one, or one without
    the fields ``needed`` (each named with the collector's reason for its gap)."""
    if observed is None:
        return HoldCause(Rule.HELD_NO_OBSERVATION, "the forecast carries no observed snapshot")
    if observed.stale:
        gaps = "; ".join(f"{k}: {v}" for k, v in sorted(observed.gaps.items()))
        return HoldCause(
            Rule.HELD_STALE_METRICS,
            "the observed snapshot is marked stale" + (f" ({gaps})" if gaps else ""),
        )
    missing = [name for name in needed if getattr(observed, name) is None]
    if missing:
        why = [f"{n} ({observed.gaps[n]})" if n in observed.gaps else n for n in missing]
        return HoldCause(Rule.HELD_MISSING_METRICS, "not observed: " + ", ".join(why))
    return None


def observation_summary(observed: MetricSnapshot | None) -> dict[str, Any] | None:
    if observed is None:
        return None
    return {
        "id": observed.id,
        "window_end": observed.window_end,
        "window_s": observed.window_s,
        "stale": observed.stale,
        "num_requests": observed.num_requests,
        "isl_avg": observed.isl_avg,
        "osl_avg": observed.osl_avg,
        "ttft_avg_s": observed.ttft_avg_s,
        "itl_avg_s": observed.itl_avg_s,
        "request_duration_avg_s": observed.request_duration_avg_s,
        "prefill_workers": observed.prefill_workers,
        "decode_workers": observed.decode_workers,
        "gaps": dict(observed.gaps),
    }


# ---------------------------------------------------------------------------------------------
# Normalisation steps shared by policies


def ceil_replicas(raw: float) -> int:
    """``ceil`` of a replica need, kept within what a message may carry (an absurd forecast must
    not overflow an int or become a fleet). NaN only arises as an infinite demand times a zero
    correction, which is no demand."""
    if math.isnan(raw) or raw <= 0:
        return 0
    if raw >= MAX_REPLICAS:
        return MAX_REPLICAS
    return math.ceil(raw)


def at_least_min_endpoint(replicas: int, min_endpoint: int) -> tuple[int, Rule]:
    if replicas < min_endpoint:
        return min_endpoint, Rule.MIN_ENDPOINT
    return replicas, Rule.WITHIN_BOUNDS


def within_role_bounds(replicas: int, lowest: int, highest: int) -> tuple[int, Rule]:
    if replicas < lowest:
        return lowest, Rule.MIN_REPLICAS
    if replicas > highest:
        return highest, Rule.MAX_REPLICAS
    return replicas, Rule.WITHIN_BOUNDS


def enforce_gpu_budget(
    prefill: int, decode: int, knobs: DeploymentKnobs
) -> tuple[int, int, Rule, Rule]:
    """Remove replicas, one at a time from the role holding more GPUs, until the budget holds.

    The knobs guarantee that both floors fit the budget, so this always ends within it.
    """
    prefill_rule = decode_rule = Rule.WITHIN_BOUNDS
    while knobs.gpus(prefill, decode) > knobs.max_total_gpus:
        can_cut_prefill = prefill > knobs.prefill_floor
        can_cut_decode = decode > knobs.decode_floor
        if not (can_cut_prefill or can_cut_decode):
            break
        prefill_gpus = prefill * knobs.prefill_engine_num_gpu
        decode_gpus = decode * knobs.decode_engine_num_gpu
        if can_cut_prefill and (prefill_gpus >= decode_gpus or not can_cut_decode):
            prefill -= 1
            prefill_rule = Rule.GPU_BUDGET_ENFORCED
        else:
            decode -= 1
            decode_rule = Rule.GPU_BUDGET_ENFORCED
    return prefill, decode, prefill_rule, decode_rule


def hold_within_bounds(
    counts: tuple[int, int], knobs: DeploymentKnobs, cause: HoldCause, enforce_budget: bool
) -> tuple[int, int, str, str]:
    """Held counts kept within the role bounds and (if ``enforce_budget``) the GPU budget, which
    may have changed since, and which reported worker counts need not respect; each role's
    rule is the bound that moved it, else the hold's cause."""
    prefill, p_rule = within_role_bounds(counts[0], knobs.prefill_floor, knobs.max_prefill_replicas)
    decode, d_rule = within_role_bounds(counts[1], knobs.decode_floor, knobs.max_decode_replicas)
    if enforce_budget:
        prefill, decode, p_budget, d_budget = enforce_gpu_budget(prefill, decode, knobs)
        p_rule = p_budget if p_budget is not Rule.WITHIN_BOUNDS else p_rule
        d_rule = d_budget if d_budget is not Rule.WITHIN_BOUNDS else d_rule
    return (
        prefill,
        decode,
        str(cause.rule if p_rule is Rule.WITHIN_BOUNDS else p_rule),
        str(cause.rule if d_rule is Rule.WITHIN_BOUNDS else d_rule),
    )
