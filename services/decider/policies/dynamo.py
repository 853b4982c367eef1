"""The ``dynamo`` policy: NVIDIA Dynamo's SLA-planner arithmetic, reproduced exactly.

Source: ``Planner._compute_replica_requirements`` and ``make_adjustments`` in
``components/planner/src/dynamo/planner/utils/planner_core.py`` of ai-dynamo/dynamo
(Apache-2.0). Our code, Dynamo's formulas; floating-point operations are kept in Dynamo's order
so that every ``ceil`` and ``round`` lands on the same integer:

- correction factors from the last observation: prefill ``p = TTFT_observed / TTFT_profiled(ISL)``;
  decode ``d = ITL_observed / ITL_profiled(concurrency, ISL + OSL/2)`` with
  ``concurrency = num_req / decode_workers * request_duration / interval``;
- prefill replicas ``ceil(num_req * ISL / interval * min(1, p) / thpt_per_gpu(ISL) / gpus)``;
- decode replicas ``ceil(num_req * OSL / interval / best_thpt_per_gpu(ITL_target / d,
  ISL + OSL/2) / gpus)``;
- both at least ``min_endpoint``; if their GPUs exceed the budget, ``scale = budget / total``,
  ``p = max(min_endpoint, round(p * scale))``, ``d = max(min_endpoint, round((budget - p *
  gpus_p) / gpus_d))`` (Python's round, half to even).

Where we add to Dynamo, the explanation says so: per-role min/max replicas (neutral at their
defaults), a guard for the cases where Dynamo's cut leaves the total above the budget (its
``min_endpoint`` floor or rounding can; ``enforce_gpu_budget=False`` keeps Dynamo's numbers),
and missing or stale metrics, which hold the last target rather than shrink (Dynamo skips the
adjustment in that case, which also holds).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from services.decider.knobs import DYNAMO, DeploymentKnobs
from services.decider.policies import contract
from services.decider.policies.contract import PlannedLoad, PolicyDecision, PolicyState
from shared.explanation import (
    Explanation,
    Held,
    HoldCause,
    RoleExplanation,
    Rule,
    RunningNow,
    Trail,
)
from shared.messages import MetricSnapshot
from shared.perf_model import IslClamp, Profile

NAME = "dynamo"


@dataclass(frozen=True)
class RoleSizing:
    """One role's need before normalisation, with every number that produced it."""

    replicas: int
    raw_replicas: float
    capacity_per_replica_tokens_per_s: float
    detail: dict[str, Any]


def observation_problem(observed: MetricSnapshot | None, knobs: DeploymentKnobs
                        ) -> HoldCause | None:
    """Why the observation cannot be trusted for a decision, or ``None`` if it can.

    The load itself always needs the request count and mean lengths; with corrections on, the
    latencies, the request duration and a decode worker count are needed too (Dynamo's
    ``Metrics.is_valid`` plus what its correction arithmetic divides by).
    """
    needed = ["num_requests", "isl_avg", "osl_avg"]
    if knobs.correction_enabled:
        needed += ["ttft_avg_s", "itl_avg_s", "request_duration_avg_s", "decode_workers"]
    cause = contract.hold_cause(observed, needed)
    if cause is None and knobs.correction_enabled and observed is not None and (
        observed.decode_workers == 0
    ):
        return HoldCause(
            Rule.HELD_MISSING_METRICS,
            "decode_workers is 0; the ITL correction needs the current decode worker count",
        )
    return cause


def update_correction_factors(
    observed: MetricSnapshot, profile: Profile, knobs: DeploymentKnobs, state: PolicyState
) -> tuple[PolicyState, dict[str, Any]]:
    """Dynamo's correction factors from a usable observation; the explanation of each."""
    if not knobs.correction_enabled:
        return state, {
            "enabled": False,
            "updated": False,
            "prefill_factor": state.prefill_correction,
            "decode_factor": state.decode_correction,
        }
    # observation_problem has checked that these are present.
    assert observed.isl_avg is not None and observed.osl_avg is not None
    assert observed.ttft_avg_s is not None and observed.itl_avg_s is not None
    assert observed.num_requests is not None and observed.request_duration_avg_s is not None
    assert observed.decode_workers

    notes: list[str] = []
    prefill_expected = profile.prefill.estimate(observed.isl_avg)
    prefill_factor = state.prefill_correction
    if prefill_expected.ttft_s > 0:
        prefill_factor = observed.ttft_avg_s / prefill_expected.ttft_s
    else:
        notes.append("profiled TTFT is not positive here; prefill factor kept")

    concurrency = (
        observed.num_requests
        / observed.decode_workers
        * observed.request_duration_avg_s
        / observed.window_s
    )
    context = observed.isl_avg + observed.osl_avg / 2
    decode_expected = profile.decode.at(concurrency, context)
    decode_factor = state.decode_correction
    if decode_expected.itl_s > 0:
        decode_factor = observed.itl_avg_s / decode_expected.itl_s
    else:
        notes.append("profiled ITL is not positive here; decode factor kept")

    new_state = replace(state, prefill_correction=prefill_factor, decode_correction=decode_factor)
    return new_state, {
        "enabled": True,
        "updated": True,
        "notes": notes,
        "prefill_factor": prefill_factor,
        "decode_factor": decode_factor,
        "prefill": {
            "observed_ttft_s": observed.ttft_avg_s,
            "profiled": prefill_expected.as_dict(),
        },
        "decode": {
            "observed_itl_s": observed.itl_avg_s,
            "concurrency_per_engine": concurrency,
            "kv_usage_fraction": profile.decode.kv_usage(concurrency, context),
            "profiled": decode_expected.as_dict(),
        },
    }


def size_prefill(
    load: PlannedLoad, profile: Profile, knobs: DeploymentKnobs, correction: float
) -> RoleSizing:
    estimate = profile.prefill.estimate(load.isl_avg_tokens)
    applied = min(1, correction)  # Dynamo: a TTFT worse than profiled never adds replicas
    # prefill_headroom (ours, an operator's tuning) multiplies the demand; at its default of 1
    # the product is the very same float, so Dynamo's numbers hold exactly.
    demand = load.num_requests * load.isl_avg_tokens / load.window_s * applied
    demand *= knobs.prefill_headroom
    return _sized(demand, estimate.thpt_tokens_per_s_per_gpu, knobs.prefill_engine_num_gpu, {
        "correction_factor": correction,
        "correction_applied": applied,
        "prefill_headroom": knobs.prefill_headroom,
        "profile": estimate.as_dict(),
        "isl_clamped": estimate.clamp is not IslClamp.WITHIN_RANGE,
    })


def _sized(demand: float, thpt: float, gpus: int, detail: dict[str, Any]) -> RoleSizing:
    """Dynamo's ``ceil(demand / throughput per GPU / GPUs per engine)``, explained."""
    raw = demand / thpt / gpus if thpt != 0 else float("inf")
    return RoleSizing(
        replicas=contract.ceil_replicas(raw),
        raw_replicas=raw,
        capacity_per_replica_tokens_per_s=thpt * gpus,
        detail={"demand_tokens_per_s": demand, **detail},
    )


def size_decode(
    load: PlannedLoad, profile: Profile, knobs: DeploymentKnobs, correction: float
) -> RoleSizing:
    # Dynamo guards a zero factor (no metrics yet) by using the target as it is.
    itl_target = knobs.itl_target_s / correction if correction > 0 else knobs.itl_target_s
    context = load.isl_avg_tokens + load.osl_avg_tokens / 2
    point = profile.decode.best_thpt_per_gpu(itl_target, context)
    demand = load.num_requests * load.osl_avg_tokens / load.window_s
    return _sized(demand, point.thpt_tokens_per_s_per_gpu, knobs.decode_engine_num_gpu, {
        "correction_factor": correction,
        "itl_target_s": knobs.itl_target_s,
        "corrected_itl_target_s": itl_target,
        "operating_point": point.as_dict(),
    })


def cut_to_gpu_budget(
    prefill: int, decode: int, knobs: DeploymentKnobs
) -> tuple[int, int, dict[str, Any]]:
    """Dynamo's proportional cut when both roles together need more GPUs than the budget."""
    gp, gd, budget = knobs.prefill_engine_num_gpu, knobs.decode_engine_num_gpu, knobs.max_total_gpus
    required = prefill * gp + decode * gd
    if required <= budget:
        return prefill, decode, {"max_gpus": budget, "required_gpus": required, "cut": False}
    scale = budget / required
    cut_prefill = max(knobs.prefill_floor, round(prefill * scale))
    cut_decode = max(knobs.decode_floor, round((budget - cut_prefill * gp) / gd))
    return (
        cut_prefill,
        cut_decode,
        {
            "max_gpus": budget,
            "required_gpus": required,
            "cut": True,
            "scale": scale,
            "after_cut": {"prefill": cut_prefill, "decode": cut_decode},
        },
    )


def normalise(
    prefill: int, decode: int, knobs: DeploymentKnobs
) -> tuple[Trail, Trail, dict[str, Any]]:
    """min_endpoint, per-role bounds, Dynamo's budget cut, bounds again, the budget guard."""
    p_trail, d_trail = Trail(), Trail()
    p_trail.add("profile_capacity", prefill, Rule.PROFILE_CAPACITY)
    d_trail.add("profile_capacity", decode, Rule.PROFILE_CAPACITY)

    for trail, floor in ((p_trail, knobs.min_endpoint), (d_trail, knobs.min_endpoint)):
        trail.add("min_endpoint", *contract.at_least_min_endpoint(trail.last, floor))
    p_trail.add("role_bounds", *contract.within_role_bounds(
        p_trail.last, knobs.min_prefill_replicas, knobs.max_prefill_replicas))
    d_trail.add("role_bounds", *contract.within_role_bounds(
        d_trail.last, knobs.min_decode_replicas, knobs.max_decode_replicas))

    before = (p_trail.last, d_trail.last)
    prefill, decode, budget = cut_to_gpu_budget(before[0], before[1], knobs)
    p_trail.add("gpu_budget", prefill,
                Rule.GPU_BUDGET if prefill != before[0] else Rule.WITHIN_BOUNDS)
    d_trail.add("gpu_budget", decode,
                Rule.GPU_BUDGET if decode != before[1] else Rule.WITHIN_BOUNDS)

    # Dynamo's cut gives decode whatever budget prefill leaves, which may pass its maximum.
    p_trail.add("role_bounds_after_budget", *contract.within_role_bounds(
        prefill, knobs.prefill_floor, knobs.max_prefill_replicas))
    d_trail.add("role_bounds_after_budget", *contract.within_role_bounds(
        decode, knobs.decode_floor, knobs.max_decode_replicas))

    gpus = knobs.gpus(p_trail.last, d_trail.last)
    budget["gpus_after_dynamo_cut"] = gpus
    budget["dynamo_cut_exceeds_budget"] = gpus > knobs.max_total_gpus
    if knobs.enforce_gpu_budget:
        prefill, decode, p_rule, d_rule = contract.enforce_gpu_budget(
            p_trail.last, d_trail.last, knobs
        )
        p_trail.add("gpu_budget_guard", prefill, p_rule)
        d_trail.add("gpu_budget_guard", decode, d_rule)
    budget["final_gpus"] = knobs.gpus(p_trail.last, d_trail.last)
    return p_trail, d_trail, budget


def _hold(
    cause: HoldCause,
    kept: RunningNow,
    running: RunningNow | None,
    state: PolicyState,
    knobs: DeploymentKnobs,
    sections: dict[str, Any],
) -> PolicyDecision:
    """Keep ``kept``, within the configured bounds and budget."""
    prefill, decode, p_bound, d_bound = contract.hold_within_bounds(
        kept.counts, knobs, cause, knobs.enforce_gpu_budget
    )
    explained = Explanation(
        policy=NAME,
        prefill=RoleExplanation(prefill, p_bound),
        decode=RoleExplanation(decode, d_bound),
        held=Held(cause, kept.source, kept.counts),
        current=running,
        sections=sections,
    )
    held_state = replace(state, last_prefill_replicas=prefill, last_decode_replicas=decode)
    return PolicyDecision(prefill, decode, held_state, explained)


def decide(
    load: PlannedLoad,
    observed: MetricSnapshot | None,
    profile: Profile,
    knobs: DeploymentKnobs,
    state: PolicyState,
) -> PolicyDecision:
    """Dynamo's replica counts for the planned load, with the explanation of every number."""
    sections: dict[str, Any] = {
        "load": {
            "num_requests": load.num_requests,
            "isl_avg_tokens": load.isl_avg_tokens,
            "osl_avg_tokens": load.osl_avg_tokens,
            "window_s": load.window_s,
            "request_rate_per_s": load.num_requests / load.window_s,
        },
        "observed": contract.observation_summary(observed),
        "config": knobs.explained(DYNAMO),
    }
    running = contract.running_now(state, observed)
    cause = observation_problem(observed, knobs)
    if cause is None:
        assert observed is not None
        state, correction = update_correction_factors(observed, profile, knobs, state)
        unheld_note = None
    else:
        if running is not None:
            return _hold(cause, running, running, state, knobs,
                         {**sections, "correction": _kept(state, cause)})
        correction = _kept(state, cause)
        unheld_note = (
            f"{cause.detail}; nothing to hold (no earlier target, no observed worker counts), "
            "so sized from the forecast"
        )

    prefill = size_prefill(load, profile, knobs, state.prefill_correction)
    decode = size_decode(load, profile, knobs, state.decode_correction)
    # Dynamo divides by the interpolated throughput: zero raises there (no adjustment, so the
    # replicas hold); a negative value (a cubic overshoot near zero load) gives a need <= 0,
    # hence min_endpoint, which we keep for exactness and flag below.
    if (
        prefill.capacity_per_replica_tokens_per_s == 0
        or decode.capacity_per_replica_tokens_per_s == 0
    ):
        no_capacity = HoldCause(
            Rule.HELD_NO_CAPACITY, "the profile gives zero throughput at this load"
        )
        floors = RunningNow(
            knobs.prefill_floor, knobs.decode_floor, "the floors (nothing earlier to hold)"
        )
        return _hold(no_capacity, running or floors, running, state, knobs,
                     {**sections, "correction": correction})

    p_trail, d_trail, budget = normalise(prefill.replicas, decode.replicas, knobs)
    sections = {**sections, "correction": correction, "gpu_budget": budget}
    if unheld_note is not None:
        sections["note"] = unheld_note
    warnings = [
        f"the interpolated {role} throughput is negative here (a cubic overshoot of the profile);"
        " Dynamo's arithmetic then sizes at the floor"
        for role, sizing in (("prefill", prefill), ("decode", decode))
        if sizing.capacity_per_replica_tokens_per_s < 0
    ]
    if warnings:
        sections["profile_warnings"] = warnings
    explained = Explanation(
        policy=NAME,
        prefill=RoleExplanation(p_trail.last, p_trail.bound_by(), p_trail, _detail(prefill)),
        decode=RoleExplanation(d_trail.last, d_trail.bound_by(), d_trail, _detail(decode)),
        current=running,
        sections=sections,
    )
    new_state = replace(
        state, last_prefill_replicas=p_trail.last, last_decode_replicas=d_trail.last
    )
    return PolicyDecision(p_trail.last, d_trail.last, new_state, explained)


def _detail(sizing: RoleSizing) -> dict[str, Any]:
    return {
        **sizing.detail,
        "capacity_per_replica_tokens_per_s": sizing.capacity_per_replica_tokens_per_s,
        "raw_replicas": sizing.raw_replicas,
        "needed_replicas": sizing.replicas,
    }


def _kept(state: PolicyState, cause: HoldCause) -> dict[str, Any]:
    return {
        "updated": False,
        "note": f"correction factors not updated: {cause.detail}",
        "prefill_factor": state.prefill_correction,
        "decode_factor": state.decode_correction,
    }
