"""The ``slaplanner`` fast path: snapshots between planning intervals.

On a growing queue, a latency p99 over target or an observed rate above what the requested
replicas serve, scale up at once within the step limits, counting replicas already starting as
capacity on the way; never down, and never into GPUs the budget does not leave free.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from services.decider.knobs import DeploymentKnobs
from services.decider.policies import contract
from services.decider.policies.contract import FastPathResult, PolicyDecision, PolicyState
from services.decider.policies.slaplanner import queueing, sizing, stabilise, startup
from services.decider.policies.slaplanner.bounds import floors, max_bounds, ratio_bounds
from services.decider.policies.slaplanner.load import hold_window_s, recent_load
from services.decider.policies.slaplanner.memory import (
    active,
    memory_of,
    observe,
    record_count,
    variability,
    with_memory,
)
from services.decider.policies.slaplanner.plan import NAME, base_sections
from services.decider.policies.slaplanner.sizing import PrefillSizing, size_decode, size_prefill
from shared.explanation import ROLES, Explanation, RoleExplanation, Rule, Trail
from shared.messages import MetricSnapshot
from shared.perf_model import Profile

# A latency p99 over target is acted on only with evidence that more replicas would help: for
# TTFT, a queue whose work takes more than this share of the wait budget to clear (or, without
# a queue gauge, a mean TTFT above the prefill time by that share of the budget), since a p99
# made of long prompts is not fixed by more engines; for ITL, a mean ITL above this share of
# the target.
FAST_PATH_TTFT_EVIDENCE = 0.5
FAST_PATH_ITL_EVIDENCE = 0.8


def fast_path(
    snapshot: MetricSnapshot, profile: Profile, knobs: DeploymentKnobs, state: PolicyState
) -> FastPathResult:
    """Scale up at once, within the step limits, when the snapshot shows the deployment falling
    behind; never down. Replicas requested and not yet ready count as capacity on the way."""
    now = snapshot.window_end
    previous = memory_of(state)
    memory = replace(
        record_count(observe(previous, snapshot, now), snapshot),
        last_waiting=snapshot.requests_waiting,
    )
    state = with_memory(state, memory)
    running = contract.running_now(state, snapshot)
    if snapshot.stale or running is None:
        return FastPathResult(state, None)
    current = running.counts
    bounds = floors(knobs)
    at_zero = current == (0, 0)
    if at_zero:
        if not (knobs.scale_to_zero and active(snapshot)):
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
    cv2 = variability(memory, knobs)
    # A queue is news only if the work in it takes longer than the wait budget to clear at the
    # engines that serve now, and it is longer than at the last snapshot.
    if snapshot.isl_avg is not None:
        probe = size_prefill(0.0, snapshot.isl_avg, profile, knobs, p_factor, cv2)
        clearing = sizing.backlog_wait_s(waiting, ready[0], probe)
        budget_s = probe.wait_budget_s
    else:  # no request finished in the window: only an empty fleet makes a queue news
        clearing = math.inf if waiting > 0 and ready[0] == 0 else 0.0
        budget_s = knobs.ttft_target_s
    growing = clearing > budget_s and waiting > (previous.last_waiting or 0.0)
    recent = recent_load(memory, snapshot, knobs.fast_path_window_s)
    count, span_s = recent.requests, recent.span_s
    rate_low = queueing.poisson_rate_lower(count, span_s, knobs.fast_path_confidence)
    drain = waiting / max(start.startup_s, snapshot.window_s) if growing else 0.0
    d_factor = memory.decode_correction.factor
    isl, osl = recent.isl_avg, recent.osl_avg
    p_size = (
        size_prefill(rate_low + drain, isl, profile, knobs, p_factor, cv2)
        if isl is not None
        else None
    )
    d_size = (
        size_decode(rate_low, isl, osl, profile, knobs, d_factor)
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
        snapshot, knobs, clearing > FAST_PATH_TTFT_EVIDENCE * budget_s, growing, p_size
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

    sections = base_sections(
        {
            "num_requests": count,
            "window_s": span_s,
            "request_rate_per_s": count / span_s,
            "request_rate_lower_per_s": rate_low,
            "isl_avg_tokens": isl,
            "osl_avg_tokens": osl,
        },
        snapshot,
        knobs,
    )
    on_the_way_only = tuple(
        bool(probes[role]) and on_the_way[i] > 0 and wants[i] == current[i]
        for i, role in enumerate(ROLES)
    )
    prefill, decode, trails, budget = normalise_fast(
        (wants[0], wants[1]), current, at_zero, on_the_way_only, knobs
    )
    if (prefill, decode) == current or prefill < current[0] or decode < current[1]:
        return FastPathResult(state, None)
    memory = replace(
        memory,
        recommendations=stabilise.record(
            memory.recommendations, now, prefill, decode,
            hold_window_s(knobs, start.startup_s, knobs.adjustment_interval_s),
        ),
    )
    sections.update(
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
        gpu_budget=budget,
    )
    explained = Explanation(
        policy=NAME,
        prefill=RoleExplanation(prefill, trails[0].bound_by(), trails[0]),
        decode=RoleExplanation(decode, trails[1].bound_by(), trails[1]),
        rules=tuple(sorted(trails[0].families() | trails[1].families())),
        current=running,
        sections=sections,
    )
    new_state = replace(
        with_memory(state, memory), last_prefill_replicas=prefill, last_decode_replicas=decode
    )
    return FastPathResult(new_state, PolicyDecision(prefill, decode, new_state, explained))


def normalise_fast(
    wants: tuple[int, int],
    current: tuple[int, int],
    at_zero: bool,
    on_the_way_only: tuple[bool, ...],
    knobs: DeploymentKnobs,
) -> tuple[int, int, tuple[Trail, Trail], dict[str, Any]]:
    """The fast path's pipeline: never below the current counts; the step limits (not when
    waking from zero); the maxima; the ratio bounds; the GPUs the budget leaves free."""
    trails = (Trail(), Trail())
    result = list(current)
    for index, role in enumerate(ROLES):
        trail, want = trails[index], wants[index]
        if at_zero:
            reason = Rule.WAKE_FROM_ZERO
        elif want > current[index]:
            reason = Rule.FAST_PATH
        elif on_the_way_only[index]:
            reason = Rule.CAPACITY_ON_THE_WAY
        else:
            reason = Rule.WITHIN_BOUNDS
        value = trail.add("fast_path", max(want, current[index]), reason)
        if not at_zero:
            value, step_reason = stabilise.step_limited(
                value, current[index], knobs.scale_up_step_replicas, knobs.scale_up_step_percent,
                knobs.scale_down_step_replicas, knobs.scale_down_step_percent,
            )
            value = trail.add("step_limit", value, step_reason)
        floor = knobs.prefill_floor if role == "prefill" else knobs.decode_floor
        if value < floor:  # a deployment found below its minimum is brought up to it
            value = trail.add("role_bounds", floor, Rule.MIN_REPLICAS)
        highest = knobs.max_prefill_replicas if role == "prefill" else knobs.max_decode_replicas
        if value > highest:
            value = trail.add("role_bounds", max(highest, current[index]), Rule.MAX_REPLICAS)
        result[index] = value
    prefill, decode, p_reason, d_reason = ratio_bounds(result[0], result[1], knobs)
    prefill = trails[0].add("ratio_bounds", prefill, p_reason)
    decode = trails[1].add("ratio_bounds", decode, d_reason)
    prefill, decode = max_bounds(trails[0], trails[1], prefill, decode, knobs)
    before = (prefill, decode)
    prefill, decode, budget = _within_free_budget(prefill, decode, current, knobs)
    trails[0].add("gpu_budget", prefill, Rule.GPU_BUDGET_ENFORCED if prefill != before[0]
                  else Rule.WITHIN_BOUNDS)
    trails[1].add("gpu_budget", decode, Rule.GPU_BUDGET_ENFORCED if decode != before[1]
                  else Rule.WITHIN_BOUNDS)
    return prefill, decode, trails, budget


def _latency_probes(
    snapshot: MetricSnapshot,
    knobs: DeploymentKnobs,
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
    if ttft99 is not None and ttft99 > knobs.ttft_target_s and queueing_seen and not growing:
        probes["prefill"].append(
            f"TTFT p99 {ttft99:.3g} s over the {knobs.ttft_target_s:.3g} s target, requests "
            "queueing"
        )
    itl99, itl = snapshot.itl_p99_s, snapshot.itl_avg_s
    if (
        itl99 is not None
        and itl99 > knobs.itl_target_s
        and itl is not None
        and itl > FAST_PATH_ITL_EVIDENCE * knobs.itl_target_s
    ):
        probes["decode"].append(
            f"ITL p99 {itl99:.3g} s over the {knobs.itl_target_s:.3g} s target (mean {itl:.3g} s)"
        )
    kv = snapshot.kv_cache_usage
    if kv is not None and kv >= knobs.kv_usage_max:
        probes["decode"].append(
            f"KV cache {kv:.0%} used (headroom ends at {knobs.kv_usage_max:.0%})"
        )
    return probes


def _within_free_budget(
    prefill: int, decode: int, current: tuple[int, int], knobs: DeploymentKnobs
) -> tuple[int, int, dict[str, Any]]:
    """The fast path never takes GPUs from the other role: it grows into the free budget only
    (the planning decision re-splits a binding budget)."""
    gp, gd, budget = knobs.prefill_engine_num_gpu, knobs.decode_engine_num_gpu, knobs.max_total_gpus
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
