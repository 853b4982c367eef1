"""What every sizing policy takes and returns, and the normalisation steps they share.

A policy is a pure function: planned load, the last observation, the profile, the deployment's
configuration and the policy's own state in; replica counts, new state and an explanation out.
It reads no clock, no bus and no cluster. Each normalisation step returns ``(replicas, reason)``
so that the reason that bound a count goes straight into the explanation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from shared.messages import MAX_REPLICAS, MetricSnapshot
from shared.perf_model import Profile


class Reason(StrEnum):
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


HOLD_REASONS = frozenset(
    {
        Reason.HELD_NO_OBSERVATION,
        Reason.HELD_STALE_METRICS,
        Reason.HELD_MISSING_METRICS,
        Reason.HELD_NO_CAPACITY,
    }
)


@dataclass(frozen=True)
class PlannedLoad:
    """The load to size for: requests expected in one window and their mean lengths."""

    num_requests: float
    isl_avg_tokens: float
    osl_avg_tokens: float
    window_s: float  # the window ``num_requests`` counts over (Dynamo: its adjustment interval)


@dataclass(frozen=True)
class PolicyConfig:
    """A deployment's sizing configuration, in SI units."""

    ttft_target_s: float = 0.5
    itl_target_s: float = 0.05
    min_endpoint: int = 1
    max_gpu_budget: int = 8
    prefill_engine_gpus: int = 1
    decode_engine_gpus: int = 1
    min_prefill_replicas: int = 0
    max_prefill_replicas: int = MAX_REPLICAS
    min_decode_replicas: int = 0
    max_decode_replicas: int = MAX_REPLICAS
    correction_enabled: bool = True
    enforce_gpu_budget: bool = True

    @property
    def prefill_floor(self) -> int:
        """The fewest prefill replicas any step may leave."""
        return max(self.min_endpoint, self.min_prefill_replicas)

    @property
    def decode_floor(self) -> int:
        return max(self.min_endpoint, self.min_decode_replicas)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


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
    explanation: dict[str, Any]

    @property
    def held(self) -> bool:
        return bool(self.explanation.get("held", False))


class Policy(Protocol):
    def __call__(
        self,
        load: PlannedLoad,
        observed: MetricSnapshot | None,
        profile: Profile,
        config: PolicyConfig,
        state: PolicyState,
    ) -> PolicyDecision: ...


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


def at_least_min_endpoint(replicas: int, min_endpoint: int) -> tuple[int, Reason]:
    if replicas < min_endpoint:
        return min_endpoint, Reason.MIN_ENDPOINT
    return replicas, Reason.WITHIN_BOUNDS


def within_role_bounds(replicas: int, lowest: int, highest: int) -> tuple[int, Reason]:
    if replicas < lowest:
        return lowest, Reason.MIN_REPLICAS
    if replicas > highest:
        return highest, Reason.MAX_REPLICAS
    return replicas, Reason.WITHIN_BOUNDS


def enforce_gpu_budget(
    prefill: int, decode: int, config: PolicyConfig
) -> tuple[int, int, Reason, Reason]:
    """Remove replicas, one at a time from the role holding more GPUs, until the budget holds.

    Settings guarantee that both floors fit the budget, so this always ends within it.
    """
    prefill_reason = decode_reason = Reason.WITHIN_BOUNDS

    def gpus() -> int:
        return prefill * config.prefill_engine_gpus + decode * config.decode_engine_gpus

    while gpus() > config.max_gpu_budget:
        can_cut_prefill = prefill > config.prefill_floor
        can_cut_decode = decode > config.decode_floor
        if not (can_cut_prefill or can_cut_decode):
            break
        prefill_gpus = prefill * config.prefill_engine_gpus
        decode_gpus = decode * config.decode_engine_gpus
        if can_cut_prefill and (prefill_gpus >= decode_gpus or not can_cut_decode):
            prefill -= 1
            prefill_reason = Reason.GPU_BUDGET_ENFORCED
        else:
            decode -= 1
            decode_reason = Reason.GPU_BUDGET_ENFORCED
    return prefill, decode, prefill_reason, decode_reason
