"""The ``slaplanner`` planning decision: the need over the lookahead, normalised one named step at a
time (scale to zero, stabilisation, step limits, no shrink on missing latencies, ratio bounds,
maxima, the GPU budget), each step with its rule."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from services.decider.knobs import SLAPLANNER, DeploymentKnobs
from services.decider.policies import contract
from services.decider.policies.contract import PlannedLoad, PolicyDecision, PolicyState
from services.decider.policies.slaplanner import stabilise, startup
from services.decider.policies.slaplanner.bounds import (
    Need,
    budget_rule,
    floors,
    max_bounds,
    ratio_bounds,
    split_gpu_budget,
)
from services.decider.policies.slaplanner.load import (
    Sized,
    hold_window_s,
    one_step_forecast,
    size_lookahead,
)
from services.decider.policies.slaplanner.memory import (
    PlannerMemory,
    active,
    check_band,
    measure_dispersion,
    memory_of,
    observe,
    observe_sla,
    observe_spread,
    remember_band,
    update_corrections,
    variability_detail,
    with_memory,
)
from shared.explanation import (
    ROLES,
    Explanation,
    Held,
    HoldCause,
    RoleExplanation,
    Rule,
    RunningNow,
    Trail,
    rule_text,
)
from shared.messages import MetricSnapshot
from shared.perf_model import Profile

NAME = "slaplanner"


def needed_metrics(observed: MetricSnapshot | None) -> list[str]:
    """What the load itself needs: a request count, and the mean lengths if requests flowed."""
    if observed is None or observed.num_requests is None:
        return ["num_requests"]
    return ["isl_avg", "osl_avg"] if observed.num_requests else []


def _missing_latencies(observed: MetricSnapshot, knobs: DeploymentKnobs) -> list[str]:
    """Metrics the corrections need, missing although requests flowed."""
    if not knobs.correction_enabled or not observed.num_requests:
        return []
    needed = ("ttft_avg_s", "itl_avg_s")
    return [name for name in needed if getattr(observed, name) is None]


def base_sections(
    load: dict[str, Any], observed: MetricSnapshot | None, knobs: DeploymentKnobs
) -> dict[str, Any]:
    summary = contract.observation_summary(observed)
    if summary is not None and observed is not None:
        summary.update(
            ttft_p99_s=observed.ttft_p99_s,
            itl_p99_s=observed.itl_p99_s,
            requests_waiting=observed.requests_waiting,
            requests_running=observed.requests_running,
            kv_cache_usage=observed.kv_cache_usage,
            isl_p90=observed.isl_p90,
        )
    return {"load": load, "observed": summary, "config": knobs.explained(SLAPLANNER)}


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
    knobs: DeploymentKnobs,
    memory: PlannerMemory,
    hold_s: float,
) -> Normalised:
    """The planning pipeline, one named step at a time, each with its rule: the need; scale to
    zero (or the floors, waking from zero); the stabilisation window; the step limits; no shrink
    on missing latencies; the ratio bounds; the maxima; the GPU budget."""
    bounds = floors(knobs)
    p_trail, d_trail = Trail(), Trail()
    prefill = p_trail.add("queueing_model", sized.prefill_need, Rule.QUEUEING_MODEL)
    decode = d_trail.add("little_law", sized.decode_need, sized.decode.reason)
    detail: dict[str, Any] = {}

    idle_s = None if memory.last_activity_s is None else now - memory.last_activity_s
    zero = bool(
        knobs.scale_to_zero
        and idle_s is not None
        and idle_s >= knobs.scale_to_zero_idle_s
        and (observed is None or not active(observed))
    )
    at_zero = current == (0, 0)
    detail["scale_to_zero"] = {
        "enabled": knobs.scale_to_zero,
        "idle_s": idle_s,
        "idle_cooldown_s": knobs.scale_to_zero_idle_s,
        "to_zero": zero,
        "waking": at_zero and not zero,
    }
    floor_rule = Rule.WAKE_FROM_ZERO if at_zero and not zero else Rule.SERVING_FLOOR
    prefill = _bounded(p_trail, prefill, bounds.serving_prefill, knobs.max_prefill_replicas,
                       bounds.prefill, floor_rule)
    decode = _bounded(d_trail, decode, bounds.serving_decode, knobs.max_decode_replicas,
                      bounds.decode, floor_rule)
    if zero:  # idle for the cooldown: below the serving floor, to nothing
        prefill = p_trail.add("scale_to_zero", 0, Rule.SCALE_TO_ZERO)
        decode = d_trail.add("scale_to_zero", 0, Rule.SCALE_TO_ZERO)

    window = memory.recommendations
    seeded = not window and current is not None
    if seeded and current is not None:
        # A decider meeting a deployment (or restarted) takes what runs as a recommendation of
        # now: it scales down no sooner than one window later, as if it had been there.
        window = (stabilise.Recommendation(now, current[0], current[1]),)
    memory = replace(
        memory,
        recommendations=stabilise.record(window, now, prefill, decode, hold_s),
    )
    stabilisation: dict[str, Any] = {
        "window_s": hold_s,
        "window_from": "scale_down_window_s" if knobs.scale_down_window_s is not None
        else "startup delay + interval",
        "current": list(current) if current is not None else None,
        "seeded_with_current": seeded,
    }
    detail["stabilisation"] = stabilisation
    if not zero:
        for index, (role, trail) in enumerate(zip(ROLES, (p_trail, d_trail), strict=True)):
            now_at = current[index] if current is not None else None
            highest = stabilise.window_max(memory.recommendations, role)
            stabilisation[f"{role}_highest_in_window"] = highest
            if sized.covered is not None and highest is not None:
                # hold no more than the forecast's upper quantile needs over the lookahead
                highest = min(highest, sized.covered[index])
                stabilisation[f"{role}_held_at_most"] = highest
            wanted = trail.last
            held = trail.add("scale_down_stabilisation",
                             *stabilise.scale_down_stabilised(wanted, now_at, highest))
            if held > wanted:
                stabilisation[f"{role}_release_at_s"] = stabilise.release_at(
                    memory.recommendations, role, wanted, hold_s
                )
            value = trail.add("step_limit", *stabilise.step_limited(
                trail.last, now_at, knobs.scale_up_step_replicas, knobs.scale_up_step_percent,
                knobs.scale_down_step_replicas, knobs.scale_down_step_percent,
            ))
            floor = (bounds.serving_prefill, bounds.serving_decode)[index]
            if at_zero and value < floor:  # waking: straight to the floor, whatever the limit
                trail.add("wake_from_zero", floor, Rule.WAKE_FROM_ZERO)
        prefill, decode = p_trail.last, d_trail.last
        missing = _missing_latencies(observed, knobs) if observed is not None else []
        if missing and current is not None:
            detail["no_shrink"] = (
                "not observed although requests flowed: " + ", ".join(missing)
                + "; the deployment may grow but not shrink this window"
            )
            if prefill < current[0]:
                prefill = p_trail.add("no_shrink", current[0], Rule.NO_SHRINK_MISSING_METRICS)
            if decode < current[1]:
                decode = d_trail.add("no_shrink", current[1], Rule.NO_SHRINK_MISSING_METRICS)
        prefill, decode, p_rule, d_rule = ratio_bounds(prefill, decode, knobs)
        prefill = p_trail.add("ratio_bounds", prefill, p_rule)
        decode = d_trail.add("ratio_bounds", decode, d_rule)
        prefill, decode = max_bounds(p_trail, d_trail, prefill, decode, knobs)

    lowest = (bounds.prefill, bounds.decode) if zero else (
        bounds.serving_prefill, bounds.serving_decode
    )
    need = Need(
        sized.prefill_need, sized.decode_need,
        _held_by(p_trail), _held_by(d_trail),
    )
    split = split_gpu_budget(
        prefill, decode, lowest, knobs, sized.prefill.hurt, sized.decode.hurt, need
    )
    prefill = p_trail.add("gpu_budget", split.prefill, budget_rule(split.prefill, prefill))
    decode = d_trail.add("gpu_budget", split.decode, budget_rule(split.decode, decode))
    detail["gpu_budget"] = split.detail
    return Normalised(prefill, decode, p_trail, d_trail, memory, detail)


def _held_by(trail: Trail) -> str | None:
    """The rule that moved a role away from its need, in words (``None``: none did)."""
    bound = trail.bound_by()
    return None if bound == trail.steps[0].rule else rule_text(bound)


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


def predicted_attainment(sized: Sized, prefill: int, decode: int) -> float:
    """Share of requests the queueing models predict within both targets at these counts, for
    the binding forecast step: ``(1 - TTFT misses) x (1 - ITL misses)``, as the budget split
    scores a split."""
    p_miss = sized.prefill.hurt(prefill)[prefill]
    d_miss = sized.decode.hurt([decode])[0]
    return (1.0 - min(p_miss, 1.0)) * (1.0 - min(d_miss, 1.0))


def decide(
    load: PlannedLoad,
    observed: MetricSnapshot | None,
    profile: Profile,
    knobs: DeploymentKnobs,
    state: PolicyState,
) -> PolicyDecision:
    """Replica counts for the forecast in ``load.forecast`` (or ``load`` alone), explained."""
    now = (
        load.forecast.window_end
        if load.forecast is not None
        else (observed.window_end if observed is not None else 0.0)
    )
    forecast = load.forecast or one_step_forecast(load, now)
    memory = observe(memory_of(state), observed, now)
    running = contract.running_now(state, observed)

    start = startup.estimate(memory.startup, knobs.worker_startup_s, now, knobs.learn_startup)
    hold_s = hold_window_s(knobs, start.startup_s, forecast.window_s)
    cause = contract.hold_cause(observed, needed_metrics(observed))
    if cause is not None and running is not None:
        return _held(cause, running, now, knobs, state, memory, observed, hold_s)
    correction: dict[str, Any]
    feedback: dict[str, Any] = {"enabled": knobs.sla_feedback, "note": "no observation"}
    if observed is not None and cause is None:
        memory, correction = update_corrections(memory, observed, profile, knobs, now)
        memory = observe_spread(memory, observed, profile, knobs)
        memory = check_band(memory, observed)
        memory, feedback = observe_sla(memory, observed, knobs, start.startup_s)
    else:
        correction = {
            "enabled": knobs.correction_enabled,
            "updated": False,
            "prefill_factor": memory.prefill_correction.factor,
            "decode_factor": memory.decode_correction.factor,
        }
    if observed is None or observed.arrival_dispersion is None:
        memory, dispersion = measure_dispersion(memory, now, forecast.window_s)
    else:
        dispersion = {"note": "measured by the collector: the snapshot's arrival_dispersion"}
    current = None if running is None else running.counts
    sized = size_lookahead(forecast, profile, knobs, memory, start.startup_s, current)
    memory = remember_band(memory, forecast, sized.load["forecast_steps_used"])
    result = normalise(sized, current, now, observed, knobs, memory, hold_s)
    prefill, decode, memory = result.prefill, result.decode, result.memory

    rules = result.prefill_trail.families() | result.decode_trail.families()
    if sized.prefill_step > 0 or sized.decode_step > 0:
        rules.add("lookahead")
    if sized.quantile_used:
        rules.add("quantile")
    sections = {
        **base_sections(sized.load, observed, knobs),
        "correction": correction,
        "startup": {"startup_s": start.startup_s, "source": start.source, **start.detail},
        "sla_feedback": feedback,
        "capacity_on_the_way": _on_the_way(current, memory, now),
        "variability": {**variability_detail(memory, knobs),
                        "arrival_measure_update": dispersion},
        **result.detail,
    }
    if cause is not None:
        sections["note"] = f"{cause.detail}; nothing to hold (no earlier target, no worker counts)"
    explained = Explanation(
        policy=NAME,
        prefill=RoleExplanation(
            prefill, result.prefill_trail.bound_by(), result.prefill_trail,
            {**sized.prefill.detail, "forecast_step": sized.prefill_step},
        ),
        decode=RoleExplanation(
            decode, result.decode_trail.bound_by(), result.decode_trail,
            {**sized.decode.detail, "forecast_step": sized.decode_step},
        ),
        rules=tuple(sorted(rules)),
        current=running,
        predicted_attainment=predicted_attainment(sized, prefill, decode),
        sections=sections,
    )
    new_state = replace(
        with_memory(state, memory), last_prefill_replicas=prefill, last_decode_replicas=decode
    )
    return PolicyDecision(prefill, decode, new_state, explained)


def _bounded(
    trail: Trail, replicas: int, serving_floor: int, highest: int, floor: int,
    floor_rule: Rule,
) -> int:
    value, rule = contract.within_role_bounds(replicas, serving_floor, highest)
    if rule is Rule.MIN_REPLICAS and serving_floor > floor:
        rule = floor_rule
    return trail.add("role_bounds", value, rule)


def _held(
    cause: HoldCause,
    running: RunningNow,
    now: float,
    knobs: DeploymentKnobs,
    state: PolicyState,
    memory: PlannerMemory,
    observed: MetricSnapshot | None,
    hold_s: float,
) -> PolicyDecision:
    """Keep what runs now (within bounds and budget, which may have changed)."""
    prefill, decode, p_bound, d_bound = contract.hold_within_bounds(
        running.counts, knobs, cause, enforce_budget=True
    )
    memory = replace(
        memory,
        recommendations=stabilise.record(
            memory.recommendations, now, prefill, decode, hold_s
        ),
    )
    sections = {
        **base_sections({"window_s": None}, observed, knobs),
        "correction": {
            "updated": False,
            "note": f"correction factors not updated: {cause.detail}",
            "prefill_factor": memory.prefill_correction.factor,
            "decode_factor": memory.decode_correction.factor,
        },
    }
    explained = Explanation(
        policy=NAME,
        prefill=RoleExplanation(prefill, p_bound),
        decode=RoleExplanation(decode, d_bound),
        held=Held(cause, running.source, running.counts),
        rules=("held",),
        current=running,
        sections=sections,
    )
    new_state = replace(
        with_memory(state, memory), last_prefill_replicas=prefill, last_decode_replicas=decode
    )
    return PolicyDecision(prefill, decode, new_state, explained)
