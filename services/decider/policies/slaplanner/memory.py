"""What the ``slaplanner`` policy remembers of a deployment, and what it learns from each input.

The memory lives in ``PolicyState.extra["slaplanner"]``: the stabilisation window, the
correction factors, startup learning, the last activity (scale to zero), the arrivals' and
prefill times' variability, and the forecast's band (its upper counts checked against the windows
they covered). Every update here is a pure function of the memory and one message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import Any

from services.decider.knobs import DeploymentKnobs
from services.decider.policies.contract import PolicyState
from services.decider.policies.slaplanner import (
    attainment,
    corrections,
    sizing,
    stabilise,
    startup,
)
from services.decider.policies.slaplanner.corrections import Correction
from shared.messages import LoadForecast, MetricSnapshot, ScaleEvent
from shared.perf_model import Profile

MEMORY_KEY = "slaplanner"
# How long short snapshots' request counts are kept to measure burstiness, and how many.
ARRIVAL_COUNTS_KEPT_S = 600.0
ARRIVAL_COUNTS_KEPT = 240
DISPERSION_KNOBS = corrections.CorrectionKnobs(
    half_life_s=300.0, min_weight_requests=200.0, minimum=0.25, maximum=1000.0
)
LOG_DISPERSION_KNOBS = corrections.CorrectionKnobs(
    half_life_s=DISPERSION_KNOBS.half_life_s,
    min_weight_requests=DISPERSION_KNOBS.min_weight_requests,
    minimum=math.log(DISPERSION_KNOBS.minimum),
    maximum=math.log(DISPERSION_KNOBS.maximum),
)
# The prompt mix's lognormal spread (sigma), smoothed over windows as the dispersion is.
MIX_KNOBS = corrections.CorrectionKnobs(
    half_life_s=600.0, min_weight_requests=200.0, minimum=0.0, maximum=attainment.MAX_SIGMA
)


@dataclass(frozen=True)
class SlaSample:
    """One window's observed misses of each target, for the SLA feedback."""

    window_end: float
    requests: float
    ttft_misses: float
    itl_misses: float


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
    # the prompt mix's spread, measured from the windows' ISL quantiles
    prompt_sigma: Correction | None = None
    # when each role last gained ready workers (warm-up windows do not correct the profile)
    ready_rose_at_s: tuple[float | None, float | None] = (None, None)
    # SLA feedback: recent windows' misses, each role's planned load quantile (None: the
    # knob's), and when each last moved up
    sla_samples: tuple[SlaSample, ...] = ()
    confidences: tuple[float | None, float | None] = (None, None)
    raised_at_s: tuple[float | None, float | None] = (None, None)
    feedback_at_s: float | None = None


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
    before = memory.startup.ready
    seen = (snapshot.prefill_workers, snapshot.decode_workers)
    rose = tuple(
        now_s if count is not None and last is not None and count > last else at
        for count, last, at in zip(seen, before, memory.ready_rose_at_s, strict=True)
    )
    return replace(
        memory,
        last_activity_s=last_activity,
        last_seen_s=now_s,
        ready_rose_at_s=(rose[0], rose[1]),
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
    mix = None
    if memory.prompt_sigma is not None and knobs.prefill_service_cv2 is None:
        mix = attainment.lognormal_mix(memory.prompt_sigma.factor)
    return sizing.Variability(
        arrival_cv2=sizing.DEFAULT_ARRIVAL_CV2 if arrival is None else arrival,
        service_cv2=sizing.DEFAULT_SERVICE_CV2 if service is None else service,
        mix=mix,
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
        "prompt_mix_sigma": None if memory.prompt_sigma is None else memory.prompt_sigma.factor,
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
    """Measure the prompt mix, the arrivals' burstiness, the prefill-time variability and
    whether a backlog ends the window."""
    requests = observed.num_requests or 0.0
    now = observed.window_end
    if requests >= sizing.MIN_REQUESTS_FOR_SPREAD and observed.isl_p50:
        sigma = attainment.lognormal_sigma(observed.isl_p50, observed.isl_p90, observed.isl_p99)
        if sigma is not None:
            smoothed, _ = corrections.updated(
                memory.prompt_sigma or corrections.Correction(factor=sigma), max(sigma, 1e-6),
                requests, now, MIX_KNOBS,
            )
            memory = replace(memory, prompt_sigma=smoothed)
    if observed.arrival_dispersion is not None and requests >= sizing.MIN_REQUESTS_FOR_SPREAD:
        # averaged in log space (a geometric mean): one window holding a rare burst of hundreds
        # of requests in a second multiplies the dispersion for that window alone
        previous = memory.arrival_dispersion
        logged, _ = corrections.updated(
            replace(previous, factor=math.log(max(previous.factor, DISPERSION_KNOBS.minimum))),
            math.log(min(max(observed.arrival_dispersion, DISPERSION_KNOBS.minimum),
                         DISPERSION_KNOBS.maximum)),
            requests, now, LOG_DISPERSION_KNOBS,
        )
        memory = replace(memory, arrival_dispersion=replace(logged,
                                                            factor=math.exp(logged.factor)))
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


def warming_up(memory: PlannerMemory, role_index: int, now_s: float, window_s: float,
               knobs: DeploymentKnobs) -> bool:
    """Whether the role gained ready workers within the window or the warm-up before it."""
    rose = memory.ready_rose_at_s[role_index]
    return rose is not None and now_s - rose < window_s + knobs.worker_warmup_s


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
    spread = variability(memory, knobs)
    observations: list[tuple[float | None, dict[str, Any]]] = []
    for index in range(2):
        if warming_up(memory, index, now_s, observed.window_s, knobs):
            observations.append((None, {
                "note": f"workers joined within {knobs.worker_warmup_s:.0f} s of this window: "
                "a warm-up pass is not a slow engine",
            }))
        elif index == 0 and observed.prefill_time_avg_s is not None:
            observations.append(sizing.prefill_factor_from_compute_time(
                observed, profile, spread.mix
            ))
        elif index == 0:
            observations.append(sizing.observed_prefill_factor(
                observed, profile, knobs, spread, memory.backlog_at_window_end
            ))
        else:
            observations.append(sizing.observed_decode_factor(observed, profile))
    (p_obs, p_detail), (d_obs, d_detail) = observations
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


def planning_confidences(memory: PlannerMemory, knobs: DeploymentKnobs) -> tuple[float, float]:
    """Each role's planned load quantile: the SLA feedback's, else the knob's."""
    if not knobs.sla_feedback:
        return knobs.load_confidence, knobs.load_confidence
    p, d = memory.confidences
    return (
        knobs.load_confidence if p is None else p,
        knobs.load_confidence if d is None else d,
    )


def observe_sla(
    memory: PlannerMemory,
    observed: MetricSnapshot,
    knobs: DeploymentKnobs,
    startup_s: float,
) -> tuple[PlannerMemory, dict[str, Any]]:
    """The SLA feedback: each role's planned load quantile moves with the misses observed.

    The misses are judged over the sliding window, from a startup delay after the role's last
    raise on (capacity asked for needs that long to show; misses from before it say nothing of
    the quantile planned now). Up by ``sla_feedback_step`` (in normal units) when those windows
    miss more than the role's share of the goal and the newest does too; down by
    ``sla_feedback_relax_per_hour`` while they miss less than half its share and span at least
    half the sliding window (a quantile that just stopped the misses is not lowered at once).
    Bounded by ``load_confidence_min`` and ``load_confidence_max``."""
    detail: dict[str, Any] = {"enabled": knobs.sla_feedback}
    if not knobs.sla_feedback:
        return memory, detail
    now = observed.window_end
    sample = _sla_sample(observed, knobs)
    samples = tuple(
        x for x in memory.sla_samples if now - knobs.sla_feedback_window_s < x.window_end < now
    )
    if sample is not None:
        samples = (*samples, sample)
    memory = replace(memory, sla_samples=samples)
    detail["window_s"] = knobs.sla_feedback_window_s
    if sample is None:
        detail["note"] = "no observed share under the targets in this window"
        return memory, detail
    elapsed_h = 0.0 if memory.feedback_at_s is None else max(now - memory.feedback_at_s, 0.0) / 3600
    budgets = (sizing.ttft_miss_budget(knobs), sizing.itl_miss_budget(knobs))
    low, high = NormalDist().inv_cdf(knobs.load_confidence_min), NormalDist().inv_cdf(
        knobs.load_confidence_max
    )
    confidences = list(planning_confidences(memory, knobs))
    raised = list(memory.raised_at_s)
    first_start = samples[0].window_end - observed.window_s
    half_window = knobs.sla_feedback_window_s / 2
    for index, role in enumerate(("prefill", "decode")):
        # judged on the windows since the last raise could show (a startup delay after it):
        # misses from before it say nothing of the quantile planned now
        last_raise = raised[index]
        since = -math.inf if last_raise is None else last_raise + startup_s
        judged = [x for x in samples if x.window_end > since]
        requests = sum(x.requests for x in judged)
        misses = sum(x.ttft_misses if index == 0 else x.itl_misses for x in judged)
        share = misses / requests if requests else 0.0
        newest = (sample.ttft_misses if index == 0 else sample.itl_misses) / sample.requests
        z = NormalDist().inv_cdf(confidences[index])
        if requests < knobs.sla_feedback_min_requests:
            move = f"held: {requests:.0f} requests judged, fewer than " \
                f"{knobs.sla_feedback_min_requests:.0f}"
        elif share > budgets[index] and newest > budgets[index]:
            z, move = z + knobs.sla_feedback_step, "raised"
            raised[index] = now
        elif share < budgets[index] / 2 and now - max(since, first_start) >= half_window:
            z, move = z - knobs.sla_feedback_relax_per_hour * elapsed_h, "relaxed"
        elif share < budgets[index] / 2:
            move = "held: within the budget for less than half the window"
        else:
            move = "held: within the budget"
        confidences[index] = NormalDist().cdf(min(max(z, low), high))
        detail[role] = {
            "judged_since_s": None if last_raise is None else since,
            "judged_requests": requests,
            "window_miss_share": share,
            "newest_miss_share": newest,
            "miss_budget": budgets[index],
            "move": move,
            "load_confidence": confidences[index],
        }
    memory = replace(
        memory,
        confidences=(confidences[0], confidences[1]),
        raised_at_s=(raised[0], raised[1]),
        feedback_at_s=now,
    )
    return memory, detail


def _sla_sample(observed: MetricSnapshot, knobs: DeploymentKnobs) -> SlaSample | None:
    """The window's misses of each target, when it measured them against ours."""
    n = observed.num_requests
    ttft, itl = observed.ttft_under_target_share, observed.itl_under_target_share
    if not n or ttft is None or itl is None:
        return None
    for measured_against, ours in (
        (observed.ttft_target_s, knobs.ttft_target_s),
        (observed.itl_target_s, knobs.itl_target_s),
    ):
        if measured_against is not None and abs(measured_against - ours) > 1e-9 * ours:
            return None
    return SlaSample(observed.window_end, n, n * (1.0 - ttft), n * (1.0 - itl))


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

