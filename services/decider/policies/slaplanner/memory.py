"""What the ``slaplanner`` policy remembers of a deployment, and what it learns from each input.

The memory lives in ``PolicyState.extra["slaplanner"]``: the stabilisation window, the
correction factors, startup learning, the last activity (scale to zero), the arrivals' and
prefill times' variability, and the forecast's band (its upper counts checked against the windows
they covered). Every update here is a pure function of the memory and one message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from services.decider.knobs import DeploymentKnobs
from services.decider.policies.contract import PolicyState
from services.decider.policies.slaplanner import corrections, sizing, stabilise, startup
from services.decider.policies.slaplanner.corrections import Correction
from shared.messages import LoadForecast, MetricSnapshot, ScaleEvent
from shared.perf_model import Profile

MEMORY_KEY = "slaplanner"
# How long short snapshots' request counts are kept to measure burstiness, and how many.
ARRIVAL_COUNTS_KEPT_S = 600.0
ARRIVAL_COUNTS_KEPT = 240
DISPERSION_KNOBS = corrections.CorrectionKnobs(
    half_life_s=300.0, min_weight_requests=200.0, minimum=0.25, maximum=25.0
)


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


def active(snapshot: MetricSnapshot) -> bool:
    return any(
        value is not None and value > 0
        for value in (snapshot.num_requests, snapshot.requests_waiting, snapshot.requests_running,
                      snapshot.requests_before_first_token)
    )


def observe(memory: PlannerMemory, snapshot: MetricSnapshot | None, now_s: float) -> PlannerMemory:
    """Activity (for scale to zero) and ready counts (for startup learning) of a snapshot."""
    if snapshot is None or snapshot.stale:
        return memory
    last_activity = memory.last_activity_s
    if active(snapshot) or last_activity is None:
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


def observe_scale_event(
    event: ScaleEvent, knobs: DeploymentKnobs, state: PolicyState
) -> PolicyState:
    """Learn from what the actuator did: starts to time, ready counts."""
    memory = memory_of(state)
    learnt = startup.on_scale_event(memory.startup, event)
    return with_memory(state, replace(memory, startup=learnt))


def _correction_knobs(knobs: DeploymentKnobs) -> corrections.CorrectionKnobs:
    return corrections.CorrectionKnobs(
        half_life_s=knobs.correction_half_life_s,
        min_weight_requests=knobs.correction_min_weight_requests,
        minimum=knobs.correction_min,
        maximum=knobs.correction_max,
    )


def variability(memory: PlannerMemory, knobs: DeploymentKnobs) -> sizing.Variability:
    """Arrival and prefill-time variability: configured, else measured, else M/M/c's."""
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


def variability_detail(memory: PlannerMemory, knobs: DeploymentKnobs) -> dict[str, Any]:
    spread = variability(memory, knobs)

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
    memory: PlannerMemory, observed: MetricSnapshot, profile: Profile, knobs: DeploymentKnobs
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
        prefill = sizing.size_prefill(
            0.0, observed.isl_avg, profile, knobs, memory.prefill_correction.factor,
            variability(memory, knobs),
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
    knobs: DeploymentKnobs,
    now_s: float,
) -> tuple[PlannerMemory, dict[str, Any]]:
    if not knobs.correction_enabled:
        return memory, {
            "enabled": False,
            "prefill_factor": memory.prefill_correction.factor,
            "decode_factor": memory.decode_correction.factor,
        }
    smoothing = _correction_knobs(knobs)
    requests = observed.num_requests or 0.0
    p_obs, p_detail = sizing.observed_prefill_factor(
        observed, profile, knobs, variability(memory, knobs), memory.backlog_at_window_end
    )
    d_obs, d_detail = sizing.observed_decode_factor(observed, profile)
    prefill, p_update = (
        corrections.updated(memory.prefill_correction, p_obs, requests, now_s, smoothing)
        if p_obs is not None
        else (memory.prefill_correction, {"updated": False})
    )
    decode, d_update = (
        corrections.updated(memory.decode_correction, d_obs, requests, now_s, smoothing)
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
        "clamp": [smoothing.minimum, smoothing.maximum],
        "half_life_s": smoothing.half_life_s,
        "min_weight_requests": smoothing.min_weight_requests,
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

