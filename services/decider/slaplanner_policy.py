"""The ``slaplanner`` policy: keep TTFT and ITL under target with as few GPUs as the load allows.

A pure function of the forecast, the last snapshot, the profile, the configuration and the
deployment's memory (``PolicyState.extra["slaplanner"]``); no clock (``now`` is the forecast's or
the snapshot's ``window_end``), no bus, no cluster. What it does that Dynamo's policy does not:

- **Lookahead.** A worker asked for now serves only after its startup time (configured, 180 s by
  default, then learnt from the deployment's own ScaleEvents). Each role is sized for the
  busiest forecast step up to ``now + startup + interval`` (until the next decision's workers can
  be ready), so nothing is removed that would be needed before it could be back.
- **Quantile.** The load covered is the forecast's upper quantile, rescaled from the forecaster's
  confidence to ours under a normal error (``point + (upper - point) * z_ours / z_theirs``).
- **Prefill by queueing.** The fewest engines for which the M/G/c wait stays within
  ``TTFT target - prefill time`` for ``ttft_quantile`` of requests (Erlang C with the
  Allen-Cunneen variability factor, ``services/decider/queueing.py``).
- **Decode by Little's law.** Requests in flight = rate x OSL x ITL; each engine takes as many as
  keep ITL under target on the profile's curve *and* fit the KV-cache headroom; the Poisson
  quantile of the M/G/infinity concurrency is covered.
- **Corrections that cannot explode** (``corrections.py``): prefill's factor is the engine
  slowdown that makes the queueing model reproduce the observed mean TTFT (so queueing is not
  mistaken for slow engines, and a TTFT worse than profiled *does* add engines); decode's is
  observed / profiled ITL at the observed concurrency; both clamped and averaged with weights
  equal to their request counts.
- **Stabilisation and step limits** as the HPA (``stabilise.py``), except that the window holds
  no more than the forecast's own upper quantile needs over the whole lookahead once that upper
  quantile has held for every window checked lately; **ratio bounds**; **scale to
  zero** (opt-in); **a GPU budget split** that gives the GPUs to the role whose shortfall costs
  the SLA more, by the same queueing models.
- **A fast path** between planning intervals (``fast_path``): on a growing queue, latency p99
  over target or an observed rate above what the requested replicas serve, scale up at once
  within the step limits, counting replicas already starting; never down.
- Missing or stale load metrics hold the last target; missing latencies (while requests flowed)
  let the deployment grow but not shrink. Every rule that bound a number is named.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import Any

from services.decider import corrections, policy, queueing, sizing, stabilise, startup
from services.decider.corrections import Correction
from services.decider.dynamo_policy import observation_summary
from services.decider.policy import (
    FastPathResult,
    PlannedLoad,
    PlannerKnobs,
    PolicyConfig,
    PolicyDecision,
    PolicyState,
    Reason,
)
from services.decider.sizing import PrefillSizing, size_decode, size_prefill
from shared.messages import (
    DeploymentKey,
    ForecastStep,
    LoadForecast,
    MetricSnapshot,
    ScaleEvent,
)
from shared.perf_model import Profile

NAME = "slaplanner"
MEMORY_KEY = "slaplanner"
ROLES = ("prefill", "decode")
# A latency p99 over target is acted on only with evidence that more replicas would help: for
# TTFT, a queue whose work takes more than this share of the wait budget to clear (or, without
# a queue gauge, a mean TTFT above the prefill time by that share of the budget), since a p99
# made of long prompts is not fixed by more engines; for ITL, a mean ITL above this share of
# the target.
FAST_PATH_TTFT_EVIDENCE = 0.5
FAST_PATH_ITL_EVIDENCE = 0.8
_RULES = {
    Reason.QUEUEING_MODEL: "queueing",
    Reason.ITL_CURVE: "itl_curve",
    Reason.KV_CAPACITY: "kv_capacity",
    Reason.SCALE_DOWN_STABILISED: "stabilisation",
    Reason.STEP_LIMIT_UP: "step_limit",
    Reason.STEP_LIMIT_DOWN: "step_limit",
    Reason.GPU_BUDGET_SLA_SPLIT: "budget",
    Reason.GPU_BUDGET_ENFORCED: "budget",
    Reason.RATIO_MIN: "ratio",
    Reason.RATIO_MAX: "ratio",
    Reason.FAST_PATH: "fast_path",
    Reason.CAPACITY_ON_THE_WAY: "capacity_on_the_way",
    Reason.SCALE_TO_ZERO: "scale_to_zero",
    Reason.WAKE_FROM_ZERO: "scale_to_zero",
    Reason.NO_SHRINK_MISSING_METRICS: "missing_metrics",
    Reason.MIN_REPLICAS: "min_replicas",
    Reason.MAX_REPLICAS: "max_replicas",
    Reason.SERVING_FLOOR: "min_replicas",
}


# ---------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class WindowCount:
    """What one snapshot counted: the fast path's recent load and the arrivals' burstiness."""

    window_end: float
    count: float
    window_s: float
    isl_avg: float | None
    osl_avg: float | None


@dataclass(frozen=True)
class PlannerMemory:
    """What the policy remembers of one deployment between decisions."""

    recommendations: tuple[stabilise.Recommendation, ...] = ()
    prefill_correction: Correction = field(default_factory=Correction)
    decode_correction: Correction = field(default_factory=Correction)
    startup: startup.StartupMemory = field(default_factory=startup.StartupMemory)
    last_activity_s: float | None = None  # last time a request was seen, queued or in flight
    last_waiting: float | None = None  # requests queued at the last snapshot
    last_seen_s: float | None = None
    # a queue longer than the model expects at the end of the last planning window
    backlog_at_window_end: bool = False
    # prefill-time variability measured from the last window with enough requests
    service_cv2: float | None = None
    service_cv2_detail: dict[str, Any] | None = None
    # arrival burstiness: request counts of recent short snapshots, and its smoothed measure
    arrival_counts: tuple[WindowCount, ...] = ()
    arrival_dispersion: Correction = field(default_factory=Correction)
    # The forecast's upper request counts still to be checked against the windows they cover
    # (window end, the lowest upper any forecast gave it), and when one was last exceeded.
    band_pending: tuple[tuple[float, float], ...] = ()
    band_checked: int = 0
    band_missed_at_s: float | None = None


def memory_of(state: PolicyState) -> PlannerMemory:
    memory = state.extra.get(MEMORY_KEY)
    return memory if isinstance(memory, PlannerMemory) else PlannerMemory()


def with_memory(state: PolicyState, memory: PlannerMemory) -> PolicyState:
    return replace(
        state,
        prefill_correction=memory.prefill_correction.factor,
        decode_correction=memory.decode_correction.factor,
        extra={**state.extra, MEMORY_KEY: memory},
    )


def _active(snapshot: MetricSnapshot) -> bool:
    return any(
        value is not None and value > 0
        for value in (snapshot.num_requests, snapshot.requests_waiting, snapshot.requests_running,
                      snapshot.requests_before_first_token)
    )


def _observe(memory: PlannerMemory, snapshot: MetricSnapshot | None, now_s: float) -> PlannerMemory:
    """Activity (for scale to zero) and ready counts (for startup learning) of a snapshot."""
    if snapshot is None or snapshot.stale:
        return memory
    last_activity = memory.last_activity_s
    if _active(snapshot) or last_activity is None:
        # A decider meeting a deployment counts that moment as activity: a full cooldown first.
        last_activity = now_s if last_activity is None else max(last_activity, now_s)
    return replace(
        memory,
        last_activity_s=last_activity,
        last_seen_s=now_s,
        startup=startup.on_ready(
            memory.startup, now_s, snapshot.prefill_workers, snapshot.decode_workers
        ),
    )


def observe_scale_event(event: ScaleEvent, config: PolicyConfig, state: PolicyState) -> PolicyState:
    """Learn from what the actuator did: starts to time, ready counts."""
    memory = memory_of(state)
    learnt = startup.on_scale_event(memory.startup, event)
    return with_memory(state, replace(memory, startup=learnt))


# ---------------------------------------------------------------------------------------------
# The load to plan for


@dataclass(frozen=True)
class StepLoad:
    """One forecast step at the planning quantile, as a rate."""

    index: int  # 0 = the next window
    window_end_s: float
    num_requests: float
    rate_per_s: float
    isl_tokens: float
    osl_tokens: float


def at_confidence(
    point: float, upper: float, forecast_confidence: float, confidence: float
) -> float:
    """The forecast at our confidence, from its point and its upper quantile at the forecaster's
    (a normal error: ``point + (upper - point) * z(confidence) / z(forecast_confidence)``)."""
    if not upper > point:
        return point
    z_theirs = NormalDist().inv_cdf(forecast_confidence)
    z_ours = NormalDist().inv_cdf(confidence) if confidence > 0.5 else 0.0
    return max(0.0, point + (upper - point) * z_ours / z_theirs)


def planned_steps(
    forecast: LoadForecast, knobs: PlannerKnobs, startup_s: float
) -> tuple[list[StepLoad], dict[str, Any]]:
    """The steps from the next window up to ``now + startup + one window``, at our quantile."""
    now, window = forecast.window_end, forecast.window_s
    horizon_end = now + startup_s + window
    steps: list[StepLoad] = []
    for index, step in enumerate(forecast.steps):
        if index > 0 and step.window_end > horizon_end + 1e-6:
            break
        steps.append(_step_load(index, step, window, knobs))
    reaches = forecast.steps[len(steps) - 1].window_end
    return steps, {
        "now_s": now,
        "startup_s": startup_s,
        "lookahead_until_s": horizon_end,
        "lookahead_s": horizon_end - now,
        "forecast_steps_used": len(steps),
        "forecast_reaches_s": reaches,
        "horizon_short": reaches + 1e-6 < horizon_end,
        "load_confidence": knobs.load_confidence,
        "forecast_confidence": knobs.forecast_confidence,
    }


def _step_load(index: int, step: ForecastStep, window_s: float, knobs: PlannerKnobs) -> StepLoad:
    conf, theirs = knobs.load_confidence, knobs.forecast_confidence
    requests = at_confidence(step.num_requests, step.num_requests_upper, theirs, conf)
    return StepLoad(
        index=index,
        window_end_s=step.window_end,
        num_requests=requests,
        rate_per_s=requests / window_s,
        isl_tokens=at_confidence(step.isl_avg, step.isl_avg_upper, theirs, conf),
        osl_tokens=at_confidence(step.osl_avg, step.osl_avg_upper, theirs, conf),
    )


def one_step_forecast(load: PlannedLoad, now_s: float) -> LoadForecast:
    """A forecast of one step, point = upper, for a caller that has only a ``PlannedLoad``."""
    step = ForecastStep(
        window_end=now_s + load.window_s,
        num_requests=load.num_requests,
        num_requests_upper=load.num_requests,
        isl_avg=load.isl_avg_tokens,
        isl_avg_upper=load.isl_avg_tokens,
        osl_avg=load.osl_avg_tokens,
        osl_avg_upper=load.osl_avg_tokens,
    )
    return LoadForecast(
        id="planned-load",
        deployment=DeploymentKey(namespace="unknown", name="unknown"),
        window_end=now_s,
        window_s=load.window_s,
        model="given",
        steps=[step],
    )


def _correction_knobs(knobs: PlannerKnobs) -> corrections.CorrectionKnobs:
    return corrections.CorrectionKnobs(
        half_life_s=knobs.correction_half_life_s,
        min_weight_requests=knobs.correction_min_weight_requests,
        minimum=knobs.correction_min,
        maximum=knobs.correction_max,
    )


def variability(memory: PlannerMemory, config: PolicyConfig) -> sizing.Variability:
    """Arrival and prefill-time variability: configured, else measured, else M/M/c's."""
    knobs = config.planner
    arrival = knobs.arrival_cv2
    if arrival is None:
        measured = memory.arrival_dispersion
        arrival = measured.factor if measured.updated_at_s is not None else None
    service = knobs.prefill_service_cv2
    if service is None:
        service = memory.service_cv2
    return sizing.Variability(
        arrival_cv2=sizing.DEFAULT_ARRIVAL_CV2 if arrival is None else arrival,
        service_cv2=sizing.DEFAULT_SERVICE_CV2 if service is None else service,
    )


def variability_detail(memory: PlannerMemory, config: PolicyConfig) -> dict[str, Any]:
    knobs = config.planner
    spread = variability(memory, config)

    def source(configured: float | None, measured: bool) -> str:
        return "configured" if configured is not None else ("measured" if measured else "default")

    return {
        "arrival_cv2": spread.arrival_cv2,
        "arrival_source": source(
            knobs.arrival_cv2, memory.arrival_dispersion.updated_at_s is not None
        ),
        "arrival_measure": memory.arrival_dispersion.as_dict(),
        "service_cv2": spread.service_cv2,
        "service_source": source(knobs.prefill_service_cv2, memory.service_cv2 is not None),
        "service_measure": memory.service_cv2_detail,
        "allen_cunneen_factor": spread.factor,
    }


# How long short snapshots' request counts are kept to measure burstiness, and how many.
ARRIVAL_COUNTS_KEPT_S = 600.0
ARRIVAL_COUNTS_KEPT = 240
DISPERSION_KNOBS = corrections.CorrectionKnobs(
    half_life_s=300.0, min_weight_requests=200.0, minimum=0.25, maximum=25.0
)


@dataclass(frozen=True)
class RecentLoad:
    requests: float
    span_s: float
    isl_avg: float | None  # means weighted by each window's requests
    osl_avg: float | None


def recent_load(memory: PlannerMemory, snapshot: MetricSnapshot, lookback_s: float) -> RecentLoad:
    """The load of the snapshots of the last ``lookback_s`` (at least this snapshot's window):
    the fast path acts on a load that lasts, not on a burst of requests (or of long prompts)
    that is over before any new worker could start."""
    now, window = snapshot.window_end, snapshot.window_s
    recent = [
        c for c in memory.arrival_counts
        if c.window_s == window and now - max(lookback_s, window) < c.window_end <= now
    ]
    if not recent:
        return RecentLoad(snapshot.num_requests or 0.0, window, snapshot.isl_avg,
                          snapshot.osl_avg)

    def mean(values: list[tuple[float, float | None]]) -> float | None:
        known = [(n, v) for n, v in values if v is not None and n > 0]
        total = sum(n for n, _ in known)
        return sum(n * v for n, v in known) / total if total > 0 else None

    return RecentLoad(
        requests=sum(c.count for c in recent),
        span_s=len(recent) * window,
        isl_avg=mean([(c.count, c.isl_avg) for c in recent]),
        osl_avg=mean([(c.count, c.osl_avg) for c in recent]),
    )


def record_count(memory: PlannerMemory, snapshot: MetricSnapshot) -> PlannerMemory:
    """Keep a short snapshot's request count, to measure how bursty arrivals are."""
    if snapshot.num_requests is None or snapshot.stale:
        return memory
    now = snapshot.window_end
    kept = tuple(
        c for c in memory.arrival_counts if now - ARRIVAL_COUNTS_KEPT_S < c.window_end < now
    )
    entry = WindowCount(now, snapshot.num_requests, snapshot.window_s, snapshot.isl_avg,
                        snapshot.osl_avg)
    return replace(memory, arrival_counts=(*kept, entry)[-ARRIVAL_COUNTS_KEPT:])


def measure_dispersion(
    memory: PlannerMemory, now_s: float, window_s: float
) -> tuple[PlannerMemory, dict[str, Any]]:
    """Update the arrival burstiness from the short snapshots of the last two planning windows."""
    if not memory.arrival_counts:
        return memory, {"note": "no short snapshots (the fast path sees none)"}
    short_s = memory.arrival_counts[-1].window_s
    if short_s >= window_s:
        return memory, {"note": "snapshots are not shorter than the planning window"}
    counts = [
        c.count for c in memory.arrival_counts
        if c.window_s == short_s and now_s - 2 * window_s < c.window_end <= now_s
    ]
    dispersion, detail = sizing.arrival_cv2_from_counts(counts)
    if dispersion is None:
        return memory, detail
    smoothed, update = corrections.updated(
        memory.arrival_dispersion, max(dispersion, DISPERSION_KNOBS.minimum), sum(counts), now_s,
        DISPERSION_KNOBS,
    )
    return replace(memory, arrival_dispersion=smoothed), {**detail, **update}


def observe_spread(
    memory: PlannerMemory, observed: MetricSnapshot, profile: Profile, config: PolicyConfig
) -> PlannerMemory:
    """Measure the prefill-time variability and whether a backlog ends the window."""
    if (
        observed.num_requests is not None
        and observed.num_requests >= sizing.MIN_REQUESTS_FOR_SPREAD
        and observed.isl_avg
        and observed.isl_p90 is not None
    ):
        cv2, detail = sizing.service_cv2_from_spread(profile, observed.isl_avg, observed.isl_p90)
        memory = replace(memory, service_cv2=cv2, service_cv2_detail=detail)
    backlog = False
    if observed.requests_waiting and observed.prefill_workers is not None and observed.isl_avg:
        prefill = size_prefill(
            0.0, observed.isl_avg, profile, config, memory.prefill_correction.factor,
            variability(memory, config),
        )
        clearing = sizing.backlog_wait_s(
            observed.requests_waiting, observed.prefill_workers, prefill
        )
        backlog = clearing > prefill.wait_budget_s
    return replace(memory, backlog_at_window_end=backlog)


def update_corrections(
    memory: PlannerMemory,
    observed: MetricSnapshot,
    profile: Profile,
    config: PolicyConfig,
    now_s: float,
) -> tuple[PlannerMemory, dict[str, Any]]:
    if not config.correction_enabled:
        return memory, {
            "enabled": False,
            "prefill_factor": memory.prefill_correction.factor,
            "decode_factor": memory.decode_correction.factor,
        }
    knobs = _correction_knobs(config.planner)
    requests = observed.num_requests or 0.0
    p_obs, p_detail = sizing.observed_prefill_factor(
        observed, profile, config, variability(memory, config), memory.backlog_at_window_end
    )
    d_obs, d_detail = sizing.observed_decode_factor(observed, profile)
    prefill, p_update = (
        corrections.updated(memory.prefill_correction, p_obs, requests, now_s, knobs)
        if p_obs is not None
        else (memory.prefill_correction, {"updated": False})
    )
    decode, d_update = (
        corrections.updated(memory.decode_correction, d_obs, requests, now_s, knobs)
        if d_obs is not None
        else (memory.decode_correction, {"updated": False})
    )
    memory = replace(memory, prefill_correction=prefill, decode_correction=decode)
    return memory, {
        "enabled": True,
        "prefill_factor": prefill.factor,
        "decode_factor": decode.factor,
        "prefill": {**p_detail, **p_update},
        "decode": {**d_detail, **d_update},
        "clamp": [knobs.minimum, knobs.maximum],
        "half_life_s": knobs.half_life_s,
        "min_weight_requests": knobs.min_weight_requests,
    }


def check_band(memory: PlannerMemory, observed: MetricSnapshot) -> PlannerMemory:
    """Compare the window just observed with the upper request counts forecast for it."""
    if observed.num_requests is None:
        return memory
    end = observed.window_end
    due = [upper for at, upper in memory.band_pending if abs(at - end) < 1e-6]
    left = tuple((at, upper) for at, upper in memory.band_pending if at > end + 1e-6)
    missed = memory.band_missed_at_s
    if due and observed.num_requests > min(due):
        missed = end
    return replace(memory, band_pending=left, band_checked=memory.band_checked + len(due),
                   band_missed_at_s=missed)


def remember_band(memory: PlannerMemory, forecast: LoadForecast, steps: int) -> PlannerMemory:
    """Keep the lookahead's upper request counts, to check them when their windows are seen."""
    pending = dict(memory.band_pending)
    for step in forecast.steps[:steps]:
        at = step.window_end
        pending[at] = min(pending.get(at, math.inf), step.num_requests_upper)
    return replace(memory, band_pending=tuple(sorted(pending.items())))


def band_trusted(memory: PlannerMemory, now_s: float, steps: int, window_s: float) -> bool:
    """The forecast's upper counts have held for every window checked within ``window_s``, and
    at least a lookahead's worth of them have been checked."""
    recent_miss = memory.band_missed_at_s is not None and now_s - memory.band_missed_at_s <= (
        window_s
    )
    return memory.band_checked >= steps and not recent_miss


# ---------------------------------------------------------------------------------------------
# Normalisation: named steps, each with its reason


@dataclass
class Trail:
    """The normalisation steps of one role, in order."""

    steps: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, replicas: int, reason: Reason) -> int:
        self.steps.append({"step": name, "replicas": replicas, "reason": str(reason)})
        return replicas

    def bound_by(self) -> str:
        """The last step that changed the count, else the first (the sizing rule)."""
        last = self.steps[0]["reason"]
        previous = self.steps[0]["replicas"]
        for step in self.steps[1:]:
            if step["replicas"] != previous:
                last = step["reason"]
            previous = step["replicas"]
        return str(last)

    def rules(self) -> set[str]:
        names = set()
        previous = None
        for step in self.steps:
            reason = Reason(step["reason"])
            changed = previous is None or step["replicas"] != previous
            if changed and reason in _RULES:
                names.add(_RULES[reason])
            previous = step["replicas"]
        return names


@dataclass(frozen=True)
class Floors:
    """The fewest replicas of each role: configured floors, and one while serving."""

    prefill: int
    decode: int
    serving_prefill: int
    serving_decode: int


def floors(config: PolicyConfig) -> Floors:
    serving_p = min(max(1, config.prefill_floor), config.max_prefill_replicas)
    serving_d = min(max(1, config.decode_floor), config.max_decode_replicas)
    gpus = serving_p * config.prefill_engine_gpus + serving_d * config.decode_engine_gpus
    if gpus > config.max_gpu_budget:  # a budget too small to serve: the configured floors
        serving_p, serving_d = config.prefill_floor, config.decode_floor
    return Floors(config.prefill_floor, config.decode_floor, serving_p, serving_d)


def ratio_bounds(
    prefill: int, decode: int, config: PolicyConfig
) -> tuple[int, int, Reason, Reason]:
    """Raise the role that is short of the prefill:decode ratio bounds (never lower one)."""
    knobs = config.planner
    p_reason = d_reason = Reason.WITHIN_BOUNDS
    low, high = knobs.min_prefill_decode_ratio, knobs.max_prefill_decode_ratio
    if low is not None and decode > 0 and prefill < low * decode - 1e-9:
        raised = min(math.ceil(low * decode - 1e-9), config.max_prefill_replicas)
        if raised > prefill:
            prefill, p_reason = raised, Reason.RATIO_MIN
    if high is not None and high > 0 and prefill > high * decode + 1e-9:
        raised = min(math.ceil(prefill / high - 1e-9), config.max_decode_replicas)
        if raised > decode:
            decode, d_reason = raised, Reason.RATIO_MAX
    return prefill, decode, p_reason, d_reason


@dataclass(frozen=True)
class BudgetSplit:
    prefill: int
    decode: int
    detail: dict[str, Any]


def split_gpu_budget(
    prefill: int,
    decode: int,
    lowest: tuple[int, int],
    config: PolicyConfig,
    prefill_hurt: Callable[[int], list[float]] | None,
    decode_hurt: Callable[[Sequence[int]], list[float]] | None,
) -> BudgetSplit:
    """Within the budget, the split (of at most the wanted counts) predicted to keep the most
    requests within both targets.

    A request meets the SLA if it meets TTFT and ITL: the predicted attainment of a split is
    ``(1 - TTFT misses) x (1 - ITL misses)``, each from the role's queueing model. When no
    split can keep up with both roles' throughput (every request would miss), the split that
    serves the largest share of the load wins: the one whose more overloaded role is least
    overloaded (a P/D pipeline runs at the pace of its bottleneck). Ties go to the split using
    more of the budget, then more prefill."""
    gp, gd, budget = config.prefill_engine_gpus, config.decode_engine_gpus, config.max_gpu_budget
    required = prefill * gp + decode * gd
    detail: dict[str, Any] = {"max_gpus": budget, "required_gpus": required, "binds": False}
    if required <= budget:
        detail["final_gpus"] = required
        return BudgetSplit(prefill, decode, detail)
    low_p, low_d = min(lowest[0], prefill), min(lowest[1], decode)
    candidates: list[tuple[int, int]] = []
    for p in range(prefill, low_p - 1, -1):
        left = budget - p * gp
        if left >= low_d * gd:
            candidates.append((p, min(decode, left // gd)))
    if prefill_hurt is None or decode_hurt is None or not candidates:
        p, d, _, _ = policy.enforce_gpu_budget(prefill, decode, config)
        if candidates and (p < low_p or d < low_d):
            # The plain cut would break a role's floor while a split within the budget keeps
            # both: take the one using the most GPUs (then more decode, whose floor bound).
            p, d = max(candidates, key=lambda c: (c[0] * gp + c[1] * gd, c[1]))
        detail.update(
            binds=True,
            rule="removed from the role holding more GPUs"
            + ("" if candidates else " (the floors alone exceed the budget)"),
            final_gpus=p * gp + d * gd,
        )
        return BudgetSplit(p, d, detail)
    p_hurts = prefill_hurt(prefill)
    d_hurts = decode_hurt([d for _, d in candidates])
    scored = []
    for (p, d), d_hurt in zip(candidates, d_hurts, strict=True):
        p_hurt = p_hurts[p]
        attainment = (1.0 - min(p_hurt, 1.0)) * (1.0 - min(d_hurt, 1.0))
        overload = max(p_hurt - 1.0, d_hurt - 1.0, 0.0)
        scored.append((-attainment, overload, -(p * gp + d * gd), -p, p, d, p_hurt, d_hurt))
    best = min(scored)
    attainment, overload, p, d, p_hurt, d_hurt = -best[0], best[1], *best[4:]
    short = [role for role, (want, got) in
             (("prefill", (prefill, p)), ("decode", (decode, d))) if got < want]
    if attainment > 0:
        why = (
            f"{p} prefill + {d} decode is predicted to keep {attainment:.2%} of requests within "
            f"both targets (TTFT misses {p_hurt:.2%}, ITL misses {d_hurt:.2%}), the most of any "
            "split"
        )
    else:
        why = (
            f"no split keeps up with both roles' throughput; {p} prefill + {d} decode leaves "
            f"the bottleneck least overloaded ({overload:.0%} short)"
        )
    detail.update(
        binds=True,
        rule="split for the most requests within both targets",
        wanted={"prefill": prefill, "decode": decode},
        chosen={"prefill": p, "decode": d},
        short_of_wanted=short,
        predicted_attainment=attainment,
        predicted_ttft_miss_share=min(p_hurt, 1.0),
        predicted_itl_miss_share=min(d_hurt, 1.0),
        why=f"{budget} GPUs cannot hold {prefill} prefill + {decode} decode ({required} GPUs); "
        + why,
        final_gpus=p * gp + d * gd,
    )
    return BudgetSplit(p, d, detail)


# ---------------------------------------------------------------------------------------------
# The planning decision


def _current(state: PolicyState, observed: MetricSnapshot | None) -> tuple[int, int] | None:
    if state.last_prefill_replicas is not None and state.last_decode_replicas is not None:
        return state.last_prefill_replicas, state.last_decode_replicas
    if observed is not None and observed.prefill_workers is not None and (
        observed.decode_workers is not None
    ):
        return observed.prefill_workers, observed.decode_workers
    return None


def _hold_cause(observed: MetricSnapshot | None) -> tuple[Reason, str] | None:
    """Why the observation cannot be trusted at all (the load itself is missing or stale)."""
    if observed is None:
        return Reason.HELD_NO_OBSERVATION, "the forecast carries no observed snapshot"
    if observed.stale:
        gaps = "; ".join(f"{k}: {v}" for k, v in sorted(observed.gaps.items()))
        return Reason.HELD_STALE_METRICS, "the observed snapshot is marked stale" + (
            f" ({gaps})" if gaps else ""
        )
    missing = ["num_requests"] if observed.num_requests is None else []
    if observed.num_requests:
        missing += [name for name in ("isl_avg", "osl_avg") if getattr(observed, name) is None]
    if missing:
        why = [f"{n} ({observed.gaps[n]})" if n in observed.gaps else n for n in missing]
        return Reason.HELD_MISSING_METRICS, "not observed: " + ", ".join(why)
    return None


def _missing_latencies(observed: MetricSnapshot, config: PolicyConfig) -> list[str]:
    """Metrics the corrections need, missing although requests flowed."""
    if not config.correction_enabled or not observed.num_requests:
        return []
    needed = ("ttft_avg_s", "itl_avg_s")
    return [name for name in needed if getattr(observed, name) is None]


def _base(
    load: dict[str, Any], observed: MetricSnapshot | None, config: PolicyConfig
) -> dict[str, Any]:
    summary = observation_summary(observed)
    if summary is not None and observed is not None:
        summary.update(
            ttft_p99_s=observed.ttft_p99_s,
            itl_p99_s=observed.itl_p99_s,
            requests_waiting=observed.requests_waiting,
            requests_running=observed.requests_running,
            kv_cache_usage=observed.kv_cache_usage,
            isl_p90=observed.isl_p90,
        )
    return {
        "policy": NAME,
        "load": load,
        "observed": summary,
        "config": {**config.as_dict(), **config.planner.as_dict()},
    }


@dataclass(frozen=True)
class Sized:
    """Each role's need over the lookahead, and the sizing (at its binding step) behind it."""

    prefill: PrefillSizing
    decode: sizing.DecodeSizing
    prefill_step: int
    decode_step: int
    load: dict[str, Any]
    quantile_used: bool
    # The most each role needs over the whole lookahead at the forecaster's own upper quantile
    # (None: the forecast does not reach the end of the lookahead): a scale-down to at least
    # this needs no stabilisation, the lookahead already covers the rebound it guards against.
    covered: tuple[int, int] | None = None


def size_lookahead(
    forecast: LoadForecast,
    profile: Profile,
    config: PolicyConfig,
    memory: PlannerMemory,
    startup_s: float,
) -> Sized:
    """Size both roles for every forecast step of the lookahead; the busiest step binds."""
    knobs = config.planner
    p_factor, d_factor = memory.prefill_correction.factor, memory.decode_correction.factor
    spread = variability(memory, config)
    steps, lookahead = planned_steps(forecast, knobs, startup_s)
    prefills = [
        size_prefill(s.rate_per_s, s.isl_tokens, profile, config, p_factor, spread) for s in steps
    ]
    decodes = [
        size_decode(s.rate_per_s, s.isl_tokens, s.osl_tokens, profile, config, d_factor)
        for s in steps
    ]
    p_at = max(range(len(steps)), key=lambda i: (prefills[i].replicas, -i))
    d_at = max(range(len(steps)), key=lambda i: (decodes[i].replicas, -i))
    first = steps[0]
    load = {
        "num_requests": first.num_requests,
        "isl_avg_tokens": first.isl_tokens,
        "osl_avg_tokens": first.osl_tokens,
        "window_s": forecast.window_s,
        "request_rate_per_s": first.rate_per_s,
        "point_num_requests": forecast.steps[0].num_requests,
        "steps": [
            {
                "index": s.index,
                "window_end_s": s.window_end_s,
                "num_requests": s.num_requests,
                "isl_tokens": s.isl_tokens,
                "osl_tokens": s.osl_tokens,
                "prefill_replicas": ps.replicas,
                "decode_replicas": ds.replicas,
            }
            for s, ps, ds in zip(steps, prefills, decodes, strict=True)
        ],
        **lookahead,
        "prefill_step": p_at,
        "decode_step": d_at,
    }
    quantile_used = knobs.load_confidence > 0.5 and any(
        st.num_requests_upper > st.num_requests
        or st.isl_avg_upper > st.isl_avg
        or st.osl_avg_upper > st.osl_avg
        for st in forecast.steps[: len(steps)]
    )
    covered = None
    trusted = band_trusted(memory, forecast.window_end, len(steps), knobs.scale_down_window_s)
    load["forecast_band_trusted"] = trusted
    if not lookahead["horizon_short"] and trusted:
        sure = replace(knobs, load_confidence=max(knobs.load_confidence,
                                                  knobs.forecast_confidence))
        sure_steps, _ = planned_steps(forecast, sure, startup_s)
        covered = (
            max(size_prefill(s.rate_per_s, s.isl_tokens, profile, config, p_factor,
                             spread).replicas for s in sure_steps),
            max(size_decode(s.rate_per_s, s.isl_tokens, s.osl_tokens, profile, config,
                            d_factor).replicas for s in sure_steps),
        )
        load["covered_over_lookahead"] = {"prefill": covered[0], "decode": covered[1]}
    return Sized(prefills[p_at], decodes[d_at], p_at, d_at, load, quantile_used, covered)


@dataclass
class Normalised:
    prefill: int
    decode: int
    prefill_trail: Trail
    decode_trail: Trail
    memory: PlannerMemory
    detail: dict[str, Any]


def normalise(
    sized: Sized,
    current: tuple[int, int] | None,
    now: float,
    observed: MetricSnapshot | None,
    config: PolicyConfig,
    memory: PlannerMemory,
) -> Normalised:
    """The planning pipeline, one named step at a time, each with its reason: the need; scale to
    zero (or the floors, waking from zero); the stabilisation window; the step limits; no shrink
    on missing latencies; the ratio bounds; the maxima; the GPU budget."""
    knobs = config.planner
    bounds = floors(config)
    p_trail, d_trail = Trail(), Trail()
    prefill = p_trail.add("queueing_model", sized.prefill.replicas, Reason.QUEUEING_MODEL)
    decode = d_trail.add("little_law", sized.decode.replicas, sized.decode.reason)
    detail: dict[str, Any] = {}

    idle_s = None if memory.last_activity_s is None else now - memory.last_activity_s
    zero = bool(
        knobs.scale_to_zero
        and idle_s is not None
        and idle_s >= knobs.scale_to_zero_idle_s
        and (observed is None or not _active(observed))
    )
    at_zero = current == (0, 0)
    detail["scale_to_zero"] = {
        "enabled": knobs.scale_to_zero,
        "idle_s": idle_s,
        "idle_cooldown_s": knobs.scale_to_zero_idle_s,
        "to_zero": zero,
        "waking": at_zero and not zero,
    }
    floor_reason = Reason.WAKE_FROM_ZERO if at_zero and not zero else Reason.SERVING_FLOOR
    prefill = _bounded(p_trail, prefill, bounds.serving_prefill, config.max_prefill_replicas,
                       bounds.prefill, floor_reason)
    decode = _bounded(d_trail, decode, bounds.serving_decode, config.max_decode_replicas,
                      bounds.decode, floor_reason)
    if zero:  # idle for the cooldown: below the serving floor, to nothing
        prefill = p_trail.add("scale_to_zero", 0, Reason.SCALE_TO_ZERO)
        decode = d_trail.add("scale_to_zero", 0, Reason.SCALE_TO_ZERO)

    window = memory.recommendations
    seeded = not window and current is not None
    if seeded and current is not None:
        # A decider meeting a deployment (or restarted) takes what runs as a recommendation of
        # now: it scales down no sooner than one window later, as if it had been there.
        window = (stabilise.Recommendation(now, current[0], current[1]),)
    memory = replace(
        memory,
        recommendations=stabilise.record(window, now, prefill, decode, knobs.scale_down_window_s),
    )
    stabilisation: dict[str, Any] = {
        "window_s": knobs.scale_down_window_s,
        "current": list(current) if current is not None else None,
        "seeded_with_current": seeded,
    }
    detail["stabilisation"] = stabilisation
    if not zero:
        for index, (role, trail) in enumerate((("prefill", p_trail), ("decode", d_trail))):
            now_at = current[index] if current is not None else None
            highest = stabilise.window_max(memory.recommendations, role)
            stabilisation[f"{role}_highest_in_window"] = highest
            if sized.covered is not None and highest is not None:
                # hold no more than the forecast's upper quantile needs over the lookahead
                highest = min(highest, sized.covered[index])
                stabilisation[f"{role}_held_at_most"] = highest
            value, reason = stabilise.scale_down_stabilised(
                trail.steps[-1]["replicas"], now_at, highest
            )
            value = trail.add("scale_down_stabilisation", value, reason)
            value, reason = stabilise.step_limited(
                value, now_at, knobs.scale_up_step_replicas, knobs.scale_up_step_percent,
                knobs.scale_down_step_replicas, knobs.scale_down_step_percent,
            )
            value = trail.add("step_limit", value, reason)
            floor = (bounds.serving_prefill, bounds.serving_decode)[index]
            if at_zero and value < floor:  # waking: straight to the floor, whatever the limit
                trail.add("wake_from_zero", floor, Reason.WAKE_FROM_ZERO)
        prefill, decode = p_trail.steps[-1]["replicas"], d_trail.steps[-1]["replicas"]
        missing = _missing_latencies(observed, config) if observed is not None else []
        if missing and current is not None:
            detail["no_shrink"] = (
                "not observed although requests flowed: " + ", ".join(missing)
                + "; the deployment may grow but not shrink this window"
            )
            if prefill < current[0]:
                prefill = p_trail.add("no_shrink", current[0], Reason.NO_SHRINK_MISSING_METRICS)
            if decode < current[1]:
                decode = d_trail.add("no_shrink", current[1], Reason.NO_SHRINK_MISSING_METRICS)
        prefill, decode, p_reason, d_reason = ratio_bounds(prefill, decode, config)
        prefill = p_trail.add("ratio_bounds", prefill, p_reason)
        decode = d_trail.add("ratio_bounds", decode, d_reason)
        prefill, decode = _max_bounds(p_trail, d_trail, prefill, decode, config)

    lowest = (bounds.prefill, bounds.decode) if zero else (
        bounds.serving_prefill, bounds.serving_decode
    )
    split = split_gpu_budget(
        prefill, decode, lowest, config, sized.prefill.hurt, sized.decode.hurt
    )
    prefill = p_trail.add("gpu_budget", split.prefill, _budget_reason(split.prefill, prefill))
    decode = d_trail.add("gpu_budget", split.decode, _budget_reason(split.decode, decode))
    detail["gpu_budget"] = split.detail
    return Normalised(prefill, decode, p_trail, d_trail, memory, detail)


def _on_the_way(
    current: tuple[int, int] | None, memory: PlannerMemory, now: float
) -> dict[str, Any]:
    """Replicas asked for and not yet seen ready: capacity on the way, not to be asked twice."""
    ready = memory.startup.ready
    return {
        role: None
        if current is None or ready[index] is None
        else max(0, current[index] - (ready[index] or 0))
        for index, role in enumerate(ROLES)
    } | {
        "ready_seen_at_s": memory.startup.ready_at_s,
        "pending_starts": [
            {"role": p.role, "replicas": p.replicas, "waiting_s": now - p.requested_at_s}
            for p in memory.startup.pending
        ],
    }


def decide(
    load: PlannedLoad,
    observed: MetricSnapshot | None,
    profile: Profile,
    config: PolicyConfig,
    state: PolicyState,
) -> PolicyDecision:
    """Replica counts for the forecast in ``load.forecast`` (or ``load`` alone), explained."""
    knobs = config.planner
    now = (
        load.forecast.window_end
        if load.forecast is not None
        else (observed.window_end if observed is not None else 0.0)
    )
    forecast = load.forecast or one_step_forecast(load, now)
    memory = _observe(memory_of(state), observed, now)
    current = _current(state, observed)

    cause = _hold_cause(observed)
    if cause is not None and current is not None:
        return _held(cause, current, now, config, state, memory, observed)
    correction: dict[str, Any]
    if observed is not None and cause is None:
        memory, correction = update_corrections(memory, observed, profile, config, now)
        memory = observe_spread(memory, observed, profile, config)
        memory = check_band(memory, observed)
    else:
        correction = {
            "enabled": config.correction_enabled,
            "updated": False,
            "prefill_factor": memory.prefill_correction.factor,
            "decode_factor": memory.decode_correction.factor,
        }
    memory, dispersion = measure_dispersion(memory, now, forecast.window_s)
    start = startup.estimate(memory.startup, knobs.worker_startup_s, now, knobs.learn_startup)
    sized = size_lookahead(forecast, profile, config, memory, start.startup_s)
    memory = remember_band(memory, forecast, sized.load["forecast_steps_used"])
    result = normalise(sized, current, now, observed, config, memory)
    prefill, decode, memory = result.prefill, result.decode, result.memory

    rules = result.prefill_trail.rules() | result.decode_trail.rules()
    if sized.prefill_step > 0 or sized.decode_step > 0:
        rules.add("lookahead")
    if sized.quantile_used:
        rules.add("quantile")
    explanation = _base(sized.load, observed, config)
    explanation.update(
        held=False,
        correction=correction,
        startup={"startup_s": start.startup_s, "source": start.source, **start.detail},
        capacity_on_the_way=_on_the_way(current, memory, now),
        variability={**variability_detail(memory, config), "arrival_measure_update": dispersion},
        prefill={**sized.prefill.detail, "forecast_step": sized.prefill_step,
                 "steps": result.prefill_trail.steps, "replicas": prefill},
        decode={**sized.decode.detail, "forecast_step": sized.decode_step,
                "steps": result.decode_trail.steps, "replicas": decode},
        **result.detail,
        prefill_bound_by=result.prefill_trail.bound_by(),
        decode_bound_by=result.decode_trail.bound_by(),
        rules=sorted(rules),
    )
    if cause is not None:
        explanation["note"] = f"{cause[1]}; nothing to hold (no earlier target, no worker counts)"
    new_state = replace(
        with_memory(state, memory), last_prefill_replicas=prefill, last_decode_replicas=decode
    )
    return PolicyDecision(prefill, decode, new_state, explanation)


def _bounded(
    trail: Trail, replicas: int, serving_floor: int, highest: int, floor: int,
    floor_reason: Reason,
) -> int:
    value, reason = policy.within_role_bounds(replicas, serving_floor, highest)
    if reason is Reason.MIN_REPLICAS and serving_floor > floor:
        reason = floor_reason
    return trail.add("role_bounds", value, reason)


def _max_bounds(
    p_trail: Trail, d_trail: Trail, prefill: int, decode: int, config: PolicyConfig
) -> tuple[int, int]:
    if prefill > config.max_prefill_replicas:
        prefill = p_trail.add("role_bounds_after_ratio", config.max_prefill_replicas,
                              Reason.MAX_REPLICAS)
    if decode > config.max_decode_replicas:
        decode = d_trail.add("role_bounds_after_ratio", config.max_decode_replicas,
                             Reason.MAX_REPLICAS)
    return prefill, decode


def _budget_reason(after: int, before: int) -> Reason:
    return Reason.GPU_BUDGET_SLA_SPLIT if after != before else Reason.WITHIN_BOUNDS


def _held(
    cause: tuple[Reason, str],
    current: tuple[int, int],
    now: float,
    config: PolicyConfig,
    state: PolicyState,
    memory: PlannerMemory,
    observed: MetricSnapshot | None,
) -> PolicyDecision:
    """Keep the current counts (within bounds and budget, which may have changed)."""
    reason, detail = cause
    bounds = floors(config)
    held_from = "last target" if state.last_prefill_replicas is not None else "observed workers"
    prefill, p_reason = policy.within_role_bounds(
        current[0], bounds.prefill, config.max_prefill_replicas
    )
    decode, d_reason = policy.within_role_bounds(
        current[1], bounds.decode, config.max_decode_replicas
    )
    prefill, decode, p_budget, d_budget = policy.enforce_gpu_budget(prefill, decode, config)
    p_reason = p_budget if p_budget is not Reason.WITHIN_BOUNDS else p_reason
    d_reason = d_budget if d_budget is not Reason.WITHIN_BOUNDS else d_reason
    memory = replace(
        memory,
        recommendations=stabilise.record(
            memory.recommendations, now, prefill, decode, config.planner.scale_down_window_s
        ),
    )
    explanation = {
        **_base({"window_s": None}, observed, config),
        "held": True,
        "hold_reason": str(reason),
        "hold_detail": detail,
        "held_from": held_from,
        "held_counts": {"prefill": current[0], "decode": current[1]},
        "correction": {
            "updated": False,
            "note": f"correction factors not updated: {detail}",
            "prefill_factor": memory.prefill_correction.factor,
            "decode_factor": memory.decode_correction.factor,
        },
        "prefill_bound_by": str(reason if p_reason is Reason.WITHIN_BOUNDS else p_reason),
        "decode_bound_by": str(reason if d_reason is Reason.WITHIN_BOUNDS else d_reason),
        "rules": ["held"],
    }
    new_state = replace(
        with_memory(state, memory), last_prefill_replicas=prefill, last_decode_replicas=decode
    )
    return PolicyDecision(prefill, decode, new_state, explanation)


# ---------------------------------------------------------------------------------------------
# The fast path: snapshots between planning intervals


def fast_path(
    snapshot: MetricSnapshot, profile: Profile, config: PolicyConfig, state: PolicyState
) -> FastPathResult:
    """Scale up at once, within the step limits, when the snapshot shows the deployment falling
    behind; never down. Replicas requested and not yet ready count as capacity on the way."""
    knobs = config.planner
    now = snapshot.window_end
    previous = memory_of(state)
    memory = replace(
        record_count(_observe(previous, snapshot, now), snapshot),
        last_waiting=snapshot.requests_waiting,
    )
    state = with_memory(state, memory)
    current = _current(state, snapshot)
    if snapshot.stale or current is None:
        return FastPathResult(state, None)
    bounds = floors(config)
    at_zero = current == (0, 0)
    if at_zero:
        if not (knobs.scale_to_zero and _active(snapshot)):
            return FastPathResult(state, None)
    elif not knobs.fast_path:
        return FastPathResult(state, None)

    start = startup.estimate(memory.startup, knobs.worker_startup_s, now, knobs.learn_startup)
    ready = (
        snapshot.prefill_workers if snapshot.prefill_workers is not None else current[0],
        snapshot.decode_workers if snapshot.decode_workers is not None else current[1],
    )
    on_the_way = (max(0, current[0] - ready[0]), max(0, current[1] - ready[1]))
    waiting = snapshot.requests_waiting or 0.0
    p_factor = memory.prefill_correction.factor
    cv2 = variability(memory, config)
    # A queue is news only if the work in it takes longer than the wait budget to clear at the
    # engines that serve now, and it is longer than at the last snapshot.
    if snapshot.isl_avg is not None:
        probe = size_prefill(0.0, snapshot.isl_avg, profile, config, p_factor, cv2)
        clearing = sizing.backlog_wait_s(waiting, ready[0], probe)
        budget_s = probe.wait_budget_s
    else:  # no request finished in the window: only an empty fleet makes a queue news
        clearing = math.inf if waiting > 0 and ready[0] == 0 else 0.0
        budget_s = config.ttft_target_s
    growing = clearing > budget_s and waiting > (previous.last_waiting or 0.0)
    recent = recent_load(memory, snapshot, knobs.fast_path_window_s)
    count, span_s = recent.requests, recent.span_s
    rate_low = queueing.poisson_rate_lower(count, span_s, knobs.fast_path_confidence)
    drain = waiting / max(start.startup_s, snapshot.window_s) if growing else 0.0
    d_factor = memory.decode_correction.factor
    isl, osl = recent.isl_avg, recent.osl_avg
    p_size = (
        size_prefill(rate_low + drain, isl, profile, config, p_factor, cv2)
        if isl is not None
        else None
    )
    d_size = (
        size_decode(rate_low, isl, osl, profile, config, d_factor)
        if isl is not None and osl is not None
        else None
    )
    triggers: dict[str, list[str]] = {"prefill": [], "decode": []}
    wants = list(current)
    p_need = p_size.replicas if p_size is not None else 0
    d_need = d_size.replicas if d_size is not None else 0
    rate_text = (
        f"the rate over {span_s:.0f} s (its lower {knobs.fast_path_confidence:.0%} bound "
        f"{rate_low:.3g}/s"
    )
    if p_need > current[0]:
        triggers["prefill"].append(
            rate_text
            + (f", plus draining {waiting:.0f} queued" if drain else "")
            + f") needs {p_need} prefill replicas, {current[0]} requested"
        )
        wants[0] = p_need
    if d_need > current[1]:
        triggers["decode"].append(
            f"{rate_text}) needs {d_need} decode replicas, {current[1]} requested"
        )
        wants[1] = d_need
    probes = _latency_probes(
        snapshot, config, clearing > FAST_PATH_TTFT_EVIDENCE * budget_s, growing, p_size
    )
    for index, role in enumerate(ROLES):
        if probes[role] and wants[index] == current[index]:
            if on_the_way[index] > 0:
                triggers[role].append(
                    f"{'; '.join(probes[role])}, but {on_the_way[index]} {role} replicas are "
                    "already starting"
                )
            else:
                triggers[role].append("; ".join(probes[role]) + ": one more replica")
                wants[index] = current[index] + 1
    if at_zero:
        wants = [max(wants[0], bounds.serving_prefill), max(wants[1], bounds.serving_decode)]
    if wants[0] <= current[0] and wants[1] <= current[1]:
        return FastPathResult(state, None)  # nothing needed, or all of it already on the way

    explanation = _base(
        {
            "num_requests": count,
            "window_s": span_s,
            "request_rate_per_s": count / span_s,
            "request_rate_lower_per_s": rate_low,
            "isl_avg_tokens": isl,
            "osl_avg_tokens": osl,
        },
        snapshot,
        config,
    )
    on_the_way_only = tuple(
        bool(probes[role]) and on_the_way[i] > 0 and wants[i] == current[i]
        for i, role in enumerate(ROLES)
    )
    prefill, decode, trails, budget = normalise_fast(
        (wants[0], wants[1]), current, at_zero, on_the_way_only, config
    )
    if (prefill, decode) == current or prefill < current[0] or decode < current[1]:
        return FastPathResult(state, None)
    memory = replace(
        memory,
        recommendations=stabilise.record(
            memory.recommendations, now, prefill, decode, knobs.scale_down_window_s
        ),
    )
    explanation.update(
        held=False,
        trigger="wake_from_zero" if at_zero else "fast_path",
        fast_path={
            "prefill": {"triggers": triggers["prefill"], "on_the_way": on_the_way[0],
                        "sizing": p_size.detail if p_size is not None else None},
            "decode": {"triggers": triggers["decode"], "on_the_way": on_the_way[1],
                       "sizing": d_size.detail if d_size is not None else None},
            "requests_waiting": waiting,
            "queue_growing": growing,
            "startup_s": start.startup_s,
        },
        correction={
            "updated": False,
            "prefill_factor": p_factor,
            "decode_factor": d_factor,
        },
        prefill={"steps": trails[0].steps, "replicas": prefill},
        decode={"steps": trails[1].steps, "replicas": decode},
        gpu_budget=budget,
        prefill_bound_by=trails[0].bound_by(),
        decode_bound_by=trails[1].bound_by(),
        rules=sorted(trails[0].rules() | trails[1].rules()),
    )
    new_state = replace(
        with_memory(state, memory), last_prefill_replicas=prefill, last_decode_replicas=decode
    )
    return FastPathResult(new_state, PolicyDecision(prefill, decode, new_state, explanation))


def normalise_fast(
    wants: tuple[int, int],
    current: tuple[int, int],
    at_zero: bool,
    on_the_way_only: tuple[bool, ...],
    config: PolicyConfig,
) -> tuple[int, int, tuple[Trail, Trail], dict[str, Any]]:
    """The fast path's pipeline: never below the current counts; the step limits (not when
    waking from zero); the maxima; the ratio bounds; the GPUs the budget leaves free."""
    knobs = config.planner
    trails = (Trail(), Trail())
    result = list(current)
    for index, role in enumerate(ROLES):
        trail, want = trails[index], wants[index]
        if at_zero:
            reason = Reason.WAKE_FROM_ZERO
        elif want > current[index]:
            reason = Reason.FAST_PATH
        elif on_the_way_only[index]:
            reason = Reason.CAPACITY_ON_THE_WAY
        else:
            reason = Reason.WITHIN_BOUNDS
        value = trail.add("fast_path", max(want, current[index]), reason)
        if not at_zero:
            value, step_reason = stabilise.step_limited(
                value, current[index], knobs.scale_up_step_replicas, knobs.scale_up_step_percent,
                knobs.scale_down_step_replicas, knobs.scale_down_step_percent,
            )
            value = trail.add("step_limit", value, step_reason)
        floor = config.prefill_floor if role == "prefill" else config.decode_floor
        if value < floor:  # a deployment found below its minimum is brought up to it
            value = trail.add("role_bounds", floor, Reason.MIN_REPLICAS)
        highest = config.max_prefill_replicas if role == "prefill" else config.max_decode_replicas
        if value > highest:
            value = trail.add("role_bounds", max(highest, current[index]), Reason.MAX_REPLICAS)
        result[index] = value
    prefill, decode, p_reason, d_reason = ratio_bounds(result[0], result[1], config)
    prefill = trails[0].add("ratio_bounds", prefill, p_reason)
    decode = trails[1].add("ratio_bounds", decode, d_reason)
    prefill, decode = _max_bounds(trails[0], trails[1], prefill, decode, config)
    before = (prefill, decode)
    prefill, decode, budget = _within_free_budget(prefill, decode, current, config)
    trails[0].add("gpu_budget", prefill, Reason.GPU_BUDGET_ENFORCED if prefill != before[0]
                  else Reason.WITHIN_BOUNDS)
    trails[1].add("gpu_budget", decode, Reason.GPU_BUDGET_ENFORCED if decode != before[1]
                  else Reason.WITHIN_BOUNDS)
    return prefill, decode, trails, budget


def _latency_probes(
    snapshot: MetricSnapshot,
    config: PolicyConfig,
    queueing_now: bool,
    growing: bool,
    prefill: PrefillSizing | None,
) -> dict[str, list[str]]:
    """Latency and queue signals that more replicas of a role would help."""
    probes: dict[str, list[str]] = {"prefill": [], "decode": []}
    waiting = snapshot.requests_waiting or 0.0
    if growing:
        probes["prefill"].append(
            f"queue growing ({waiting:.0f} waiting, longer than the wait budget to clear)"
        )
    ttft99, ttft = snapshot.ttft_p99_s, snapshot.ttft_avg_s
    if snapshot.requests_waiting is not None:
        queueing_seen = queueing_now
    else:
        queueing_seen = (
            prefill is not None
            and ttft is not None
            and ttft > prefill.prefill_s + FAST_PATH_TTFT_EVIDENCE * prefill.wait_budget_s
        )
    if ttft99 is not None and ttft99 > config.ttft_target_s and queueing_seen and not growing:
        probes["prefill"].append(
            f"TTFT p99 {ttft99:.3g} s over the {config.ttft_target_s:.3g} s target, requests "
            "queueing"
        )
    itl99, itl = snapshot.itl_p99_s, snapshot.itl_avg_s
    if (
        itl99 is not None
        and itl99 > config.itl_target_s
        and itl is not None
        and itl > FAST_PATH_ITL_EVIDENCE * config.itl_target_s
    ):
        probes["decode"].append(
            f"ITL p99 {itl99:.3g} s over the {config.itl_target_s:.3g} s target (mean {itl:.3g} s)"
        )
    kv = snapshot.kv_cache_usage
    if kv is not None and kv >= config.planner.kv_usage_max:
        probes["decode"].append(
            f"KV cache {kv:.0%} used (headroom ends at {config.planner.kv_usage_max:.0%})"
        )
    return probes


def _within_free_budget(
    prefill: int, decode: int, current: tuple[int, int], config: PolicyConfig
) -> tuple[int, int, dict[str, Any]]:
    """The fast path never takes GPUs from the other role: it grows into the free budget only
    (the planning decision re-splits a binding budget)."""
    gp, gd, budget = config.prefill_engine_gpus, config.decode_engine_gpus, config.max_gpu_budget
    required = prefill * gp + decode * gd
    detail: dict[str, Any] = {"max_gpus": budget, "required_gpus": required, "binds": False}
    if required <= budget:
        detail["final_gpus"] = required
        return prefill, decode, detail
    free = budget - current[0] * gp - current[1] * gd
    if free <= 0:  # nothing free (or the budget was lowered below the current counts)
        detail.update(binds=True, rule="no free GPUs for the fast path", free_gpus=max(free, 0),
                      final_gpus=current[0] * gp + current[1] * gd)
        return current[0], current[1], detail
    add_p, add_d = prefill - current[0], decode - current[1]
    # share the free GPUs in proportion to what each role wanted to add
    wanted = add_p * gp + add_d * gd
    take_p = min(add_p, int(free * (add_p * gp / wanted) // gp)) if wanted else 0
    take_d = min(add_d, (free - take_p * gp) // gd)
    take_p = min(add_p, take_p + (free - take_p * gp - take_d * gd) // gp)
    prefill, decode = current[0] + take_p, current[1] + take_d
    detail.update(
        binds=True,
        rule="the fast path only grows into GPUs the budget leaves free",
        free_gpus=free,
        final_gpus=prefill * gp + decode * gd,
    )
    return prefill, decode, detail
