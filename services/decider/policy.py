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

from shared.messages import MAX_REPLICAS, LoadForecast, MetricSnapshot, ScaleEvent
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
    # The forecast this load is the first step of, for policies that look further ahead and use
    # its upper quantiles; ``dynamo`` ignores it.
    forecast: LoadForecast | None = None


@dataclass(frozen=True)
class PlannerKnobs:
    """Knobs of the ``slaplanner`` policy (``dynamo`` ignores them); SI units, in the names.

    Each field is documented where operators set it, in ``services/decider/settings.py``.
    """

    worker_startup_s: float = 180.0
    learn_startup: bool = True
    load_confidence: float = 0.75
    forecast_confidence: float = 0.9
    ttft_quantile: float = 0.99
    decode_concurrency_quantile: float = 0.9
    arrival_cv2: float | None = None  # None: measured from short snapshots' counts
    prefill_service_cv2: float | None = None  # None: measured from the ISL spread
    kv_usage_max: float = 0.9
    scale_down_window_s: float = 300.0
    scale_up_step_replicas: int = 4
    scale_up_step_percent: float = 100.0
    scale_down_step_replicas: int = 1
    scale_down_step_percent: float = 50.0
    min_prefill_decode_ratio: float | None = None
    max_prefill_decode_ratio: float | None = None
    scale_to_zero: bool = False
    scale_to_zero_idle_s: float = 600.0
    correction_half_life_s: float = 120.0
    correction_min_weight_requests: float = 50.0
    correction_min: float = 0.5
    correction_max: float = 3.0
    fast_path: bool = True
    fast_path_confidence: float = 0.9
    fast_path_window_s: float = 30.0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


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
    prefill_headroom: float = 1.0  # dynamo: multiplies the prefill demand before the ceil
    planner: PlannerKnobs = field(default_factory=PlannerKnobs)

    @property
    def prefill_floor(self) -> int:
        """The fewest prefill replicas any step may leave."""
        return max(self.min_endpoint, self.min_prefill_replicas)

    @property
    def decode_floor(self) -> int:
        return max(self.min_endpoint, self.min_decode_replicas)

    def as_dict(self) -> dict[str, Any]:
        """The shared knobs (``planner.as_dict()`` gives the slaplanner policy's own)."""
        fields = self.__dataclass_fields__
        return {name: getattr(self, name) for name in fields if name != "planner"}


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
        config: PolicyConfig,
        state: PolicyState,
    ) -> FastPathResult: ...


class ScaleEventHook(Protocol):
    """A policy learning from what the actuator did (e.g. how long workers take to start)."""

    def __call__(
        self, event: ScaleEvent, config: PolicyConfig, state: PolicyState
    ) -> PolicyState: ...


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
