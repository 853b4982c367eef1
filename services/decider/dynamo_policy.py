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

from services.decider import policy
from services.decider.policy import PlannedLoad, PolicyConfig, PolicyDecision, PolicyState, Reason
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


@dataclass(frozen=True)
class HoldCause:
    reason: Reason
    detail: str


def observation_problem(observed: MetricSnapshot | None, config: PolicyConfig) -> HoldCause | None:
    """Why the observation cannot be trusted for a decision, or ``None`` if it can.

    The load itself always needs the request count and mean lengths; with corrections on, the
    latencies, the request duration and a decode worker count are needed too (Dynamo's
    ``Metrics.is_valid`` plus what its correction arithmetic divides by).
    """
    if observed is None:
        return HoldCause(Reason.HELD_NO_OBSERVATION, "the forecast carries no observed snapshot")
    if observed.stale:
        gaps = "; ".join(f"{k}: {v}" for k, v in sorted(observed.gaps.items()))
        return HoldCause(
            Reason.HELD_STALE_METRICS,
            "the observed snapshot is marked stale" + (f" ({gaps})" if gaps else ""),
        )
    needed = ["num_requests", "isl_avg", "osl_avg"]
    if config.correction_enabled:
        needed += ["ttft_avg_s", "itl_avg_s", "request_duration_avg_s", "decode_workers"]
    missing = [name for name in needed if getattr(observed, name) is None]
    if missing:
        why = [
            f"{name} ({observed.gaps[name]})" if name in observed.gaps else name for name in missing
        ]
        return HoldCause(Reason.HELD_MISSING_METRICS, "not observed: " + ", ".join(why))
    if config.correction_enabled and observed.decode_workers == 0:
        return HoldCause(
            Reason.HELD_MISSING_METRICS,
            "decode_workers is 0; the ITL correction needs the current decode worker count",
        )
    return None


def update_correction_factors(
    observed: MetricSnapshot, profile: Profile, config: PolicyConfig, state: PolicyState
) -> tuple[PolicyState, dict[str, Any]]:
    """Dynamo's correction factors from a usable observation; the explanation of each."""
    if not config.correction_enabled:
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
    load: PlannedLoad, profile: Profile, config: PolicyConfig, correction: float
) -> RoleSizing:
    estimate = profile.prefill.estimate(load.isl_avg_tokens)
    applied = min(1, correction)  # Dynamo: a TTFT worse than profiled never adds replicas
    demand = load.num_requests * load.isl_avg_tokens / load.window_s * applied
    if config.prefill_headroom != 1.0:  # an operator's knob; at 1 the arithmetic is Dynamo's
        demand *= config.prefill_headroom
    thpt = estimate.thpt_tokens_per_s_per_gpu
    raw = demand / thpt / config.prefill_engine_gpus if thpt != 0 else float("inf")
    return RoleSizing(
        replicas=policy.ceil_replicas(raw),
        raw_replicas=raw,
        capacity_per_replica_tokens_per_s=thpt * config.prefill_engine_gpus,
        detail={
            "demand_tokens_per_s": demand,
            "correction_factor": correction,
            "correction_applied": applied,
            "headroom": config.prefill_headroom,
            "profile": estimate.as_dict(),
            "isl_clamped": estimate.clamp is not IslClamp.WITHIN_RANGE,
        },
    )


def size_decode(
    load: PlannedLoad, profile: Profile, config: PolicyConfig, correction: float
) -> RoleSizing:
    # Dynamo guards a zero factor (no metrics yet) by using the target as it is.
    itl_target = config.itl_target_s / correction if correction > 0 else config.itl_target_s
    context = load.isl_avg_tokens + load.osl_avg_tokens / 2
    point = profile.decode.best_thpt_per_gpu(itl_target, context)
    demand = load.num_requests * load.osl_avg_tokens / load.window_s
    thpt = point.thpt_tokens_per_s_per_gpu
    raw = demand / thpt / config.decode_engine_gpus if thpt != 0 else float("inf")
    return RoleSizing(
        replicas=policy.ceil_replicas(raw),
        raw_replicas=raw,
        capacity_per_replica_tokens_per_s=thpt * config.decode_engine_gpus,
        detail={
            "demand_tokens_per_s": demand,
            "correction_factor": correction,
            "itl_target_s": config.itl_target_s,
            "corrected_itl_target_s": itl_target,
            "operating_point": point.as_dict(),
        },
    )


def cut_to_gpu_budget(
    prefill: int, decode: int, config: PolicyConfig
) -> tuple[int, int, dict[str, Any]]:
    """Dynamo's proportional cut when both roles together need more GPUs than the budget."""
    gp, gd, budget = config.prefill_engine_gpus, config.decode_engine_gpus, config.max_gpu_budget
    required = prefill * gp + decode * gd
    if required <= budget:
        return prefill, decode, {"max_gpus": budget, "required_gpus": required, "cut": False}
    scale = budget / required
    cut_prefill = max(config.prefill_floor, round(prefill * scale))
    cut_decode = max(config.decode_floor, round((budget - cut_prefill * gp) / gd))
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


def _step(steps: list[dict[str, Any]], name: str, replicas: int, reason: Reason) -> None:
    steps.append({"step": name, "replicas": replicas, "reason": str(reason)})


def _bound_by(steps: list[dict[str, Any]]) -> str:
    changed = [s["reason"] for s in steps if s["reason"] != Reason.WITHIN_BOUNDS]
    return changed[-1] if changed else str(Reason.PROFILE_CAPACITY)


def normalise(prefill: int, decode: int, config: PolicyConfig) -> tuple[int, int, dict[str, Any]]:
    """min_endpoint, per-role bounds, Dynamo's budget cut, bounds again, the budget guard."""
    p_steps: list[dict[str, Any]] = []
    d_steps: list[dict[str, Any]] = []
    _step(p_steps, "profile_capacity", prefill, Reason.PROFILE_CAPACITY)
    _step(d_steps, "profile_capacity", decode, Reason.PROFILE_CAPACITY)

    prefill, reason = policy.at_least_min_endpoint(prefill, config.min_endpoint)
    _step(p_steps, "min_endpoint", prefill, reason)
    decode, reason = policy.at_least_min_endpoint(decode, config.min_endpoint)
    _step(d_steps, "min_endpoint", decode, reason)

    prefill, reason = policy.within_role_bounds(
        prefill, config.min_prefill_replicas, config.max_prefill_replicas
    )
    _step(p_steps, "role_bounds", prefill, reason)
    decode, reason = policy.within_role_bounds(
        decode, config.min_decode_replicas, config.max_decode_replicas
    )
    _step(d_steps, "role_bounds", decode, reason)

    before = (prefill, decode)
    prefill, decode, budget = cut_to_gpu_budget(prefill, decode, config)
    _step(
        p_steps,
        "gpu_budget",
        prefill,
        Reason.GPU_BUDGET if prefill != before[0] else Reason.WITHIN_BOUNDS,
    )
    _step(
        d_steps,
        "gpu_budget",
        decode,
        Reason.GPU_BUDGET if decode != before[1] else Reason.WITHIN_BOUNDS,
    )

    # Dynamo's cut gives decode whatever budget prefill leaves, which may pass its maximum.
    prefill, reason = policy.within_role_bounds(
        prefill, config.prefill_floor, config.max_prefill_replicas
    )
    _step(p_steps, "role_bounds_after_budget", prefill, reason)
    decode, reason = policy.within_role_bounds(
        decode, config.decode_floor, config.max_decode_replicas
    )
    _step(d_steps, "role_bounds_after_budget", decode, reason)

    gpus = prefill * config.prefill_engine_gpus + decode * config.decode_engine_gpus
    budget["gpus_after_dynamo_cut"] = gpus
    budget["dynamo_cut_exceeds_budget"] = gpus > config.max_gpu_budget
    if config.enforce_gpu_budget:
        prefill, decode, p_reason, d_reason = policy.enforce_gpu_budget(prefill, decode, config)
        _step(p_steps, "gpu_budget_guard", prefill, p_reason)
        _step(d_steps, "gpu_budget_guard", decode, d_reason)
    budget["final_gpus"] = prefill * config.prefill_engine_gpus + decode * config.decode_engine_gpus
    return (
        prefill,
        decode,
        {
            "prefill_steps": p_steps,
            "decode_steps": d_steps,
            "prefill_bound_by": _bound_by(p_steps),
            "decode_bound_by": _bound_by(d_steps),
            "gpu_budget": budget,
        },
    )


def _held_counts(
    state: PolicyState, observed: MetricSnapshot | None
) -> tuple[tuple[int, int], str] | None:
    """The last target, else the worker counts the cluster reported; ``None`` if neither."""
    if state.last_prefill_replicas is not None and state.last_decode_replicas is not None:
        return (state.last_prefill_replicas, state.last_decode_replicas), "last target"
    if (
        observed is not None
        and observed.prefill_workers is not None
        and observed.decode_workers is not None
    ):
        return (observed.prefill_workers, observed.decode_workers), "observed workers"
    return None


def _hold(
    cause: HoldCause,
    counts: tuple[int, int],
    held_from: str,
    state: PolicyState,
    config: PolicyConfig,
    base: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> PolicyDecision:
    """Keep the counts, within the configured bounds and budget (which may have changed, and
    which reported worker counts need not respect)."""
    held_prefill, held_decode = counts
    prefill, p_reason = policy.within_role_bounds(
        held_prefill, config.prefill_floor, config.max_prefill_replicas
    )
    decode, d_reason = policy.within_role_bounds(
        held_decode, config.decode_floor, config.max_decode_replicas
    )
    if config.enforce_gpu_budget:
        prefill, decode, p_budget, d_budget = policy.enforce_gpu_budget(prefill, decode, config)
        p_reason = p_budget if p_budget is not Reason.WITHIN_BOUNDS else p_reason
        d_reason = d_budget if d_budget is not Reason.WITHIN_BOUNDS else d_reason
    explanation = {
        **base,
        "held": True,
        "hold_reason": str(cause.reason),
        "hold_detail": cause.detail,
        "held_from": held_from,
        "held_counts": {"prefill": held_prefill, "decode": held_decode},
        "prefill_bound_by": str(cause.reason if p_reason is Reason.WITHIN_BOUNDS else p_reason),
        "decode_bound_by": str(cause.reason if d_reason is Reason.WITHIN_BOUNDS else d_reason),
        **(extra or {}),
    }
    held_state = replace(state, last_prefill_replicas=prefill, last_decode_replicas=decode)
    return PolicyDecision(prefill, decode, held_state, explanation)


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


def decide(
    load: PlannedLoad,
    observed: MetricSnapshot | None,
    profile: Profile,
    config: PolicyConfig,
    state: PolicyState,
) -> PolicyDecision:
    """Dynamo's replica counts for the planned load, with the explanation of every number."""
    base: dict[str, Any] = {
        "policy": NAME,
        "load": {
            "num_requests": load.num_requests,
            "isl_avg_tokens": load.isl_avg_tokens,
            "osl_avg_tokens": load.osl_avg_tokens,
            "window_s": load.window_s,
            "request_rate_per_s": load.num_requests / load.window_s,
        },
        "observed": observation_summary(observed),
        "config": config.as_dict(),
    }
    cause = observation_problem(observed, config)
    if cause is None:
        assert observed is not None
        state, correction = update_correction_factors(observed, profile, config, state)
        unheld_note = None
    else:
        held = _held_counts(state, observed)
        if held is not None:
            counts, held_from = held
            return _hold(
                cause, counts, held_from, state, config, base, {"correction": _kept(state, cause)}
            )
        correction = _kept(state, cause)
        unheld_note = (
            f"{cause.detail}; nothing to hold (no earlier target, no observed worker counts), "
            "so sized from the forecast"
        )

    prefill = size_prefill(load, profile, config, state.prefill_correction)
    decode = size_decode(load, profile, config, state.decode_correction)
    # Dynamo divides by the interpolated throughput: zero raises there (no adjustment, so the
    # replicas hold); a negative value (a cubic overshoot near zero load) gives a need <= 0,
    # hence min_endpoint, which we keep for exactness and flag below.
    if (
        prefill.capacity_per_replica_tokens_per_s == 0
        or decode.capacity_per_replica_tokens_per_s == 0
    ):
        no_capacity = HoldCause(
            Reason.HELD_NO_CAPACITY, "the profile gives zero throughput at this load"
        )
        counts, held_from = _held_counts(state, observed) or (
            (config.prefill_floor, config.decode_floor),
            "the floors (nothing earlier to hold)",
        )
        return _hold(
            no_capacity, counts, held_from, state, config, base, {"correction": correction}
        )

    prefill_replicas, decode_replicas, normalised = normalise(
        prefill.replicas, decode.replicas, config
    )
    explanation = {
        **base,
        "held": False,
        "correction": correction,
        "prefill": {
            **prefill.detail,
            "capacity_per_replica_tokens_per_s": prefill.capacity_per_replica_tokens_per_s,
            "raw_replicas": prefill.raw_replicas,
            "needed_replicas": prefill.replicas,
            "steps": normalised["prefill_steps"],
            "replicas": prefill_replicas,
        },
        "decode": {
            **decode.detail,
            "capacity_per_replica_tokens_per_s": decode.capacity_per_replica_tokens_per_s,
            "raw_replicas": decode.raw_replicas,
            "needed_replicas": decode.replicas,
            "steps": normalised["decode_steps"],
            "replicas": decode_replicas,
        },
        "prefill_bound_by": normalised["prefill_bound_by"],
        "decode_bound_by": normalised["decode_bound_by"],
        "gpu_budget": normalised["gpu_budget"],
    }
    if unheld_note is not None:
        explanation["note"] = unheld_note
    warnings = [
        f"the interpolated {role} throughput is negative here (a cubic overshoot of the profile);"
        " Dynamo's arithmetic then sizes at the floor"
        for role, sizing in (("prefill", prefill), ("decode", decode))
        if sizing.capacity_per_replica_tokens_per_s < 0
    ]
    if warnings:
        explanation["profile_warnings"] = warnings
    new_state = replace(
        state, last_prefill_replicas=prefill_replicas, last_decode_replicas=decode_replicas
    )
    return PolicyDecision(prefill_replicas, decode_replicas, new_state, explanation)


def _kept(state: PolicyState, cause: HoldCause) -> dict[str, Any]:
    return {
        "updated": False,
        "note": f"correction factors not updated: {cause.detail}",
        "prefill_factor": state.prefill_correction,
        "decode_factor": state.decode_correction,
    }
