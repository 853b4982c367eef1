"""The bounds of a ``slaplanner`` decision: floors, the prefill:decode ratio, the role maxima and
the GPU budget, split for the most requests within both targets when it binds."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from services.decider.knobs import DeploymentKnobs
from services.decider.policies import contract
from shared.explanation import Rule, Trail


@dataclass(frozen=True)
class Floors:
    """The fewest replicas of each role: configured floors, and one while serving."""

    prefill: int
    decode: int
    serving_prefill: int
    serving_decode: int


def floors(knobs: DeploymentKnobs) -> Floors:
    serving_p = min(max(1, knobs.prefill_floor), knobs.max_prefill_replicas)
    serving_d = min(max(1, knobs.decode_floor), knobs.max_decode_replicas)
    gpus = serving_p * knobs.prefill_engine_num_gpu + serving_d * knobs.decode_engine_num_gpu
    if gpus > knobs.max_total_gpus:  # a budget too small to serve: the configured floors
        serving_p, serving_d = knobs.prefill_floor, knobs.decode_floor
    return Floors(knobs.prefill_floor, knobs.decode_floor, serving_p, serving_d)


def ratio_bounds(
    prefill: int, decode: int, knobs: DeploymentKnobs
) -> tuple[int, int, Rule, Rule]:
    """Raise the role that is short of the prefill:decode ratio bounds (never lower one)."""
    p_reason = d_reason = Rule.WITHIN_BOUNDS
    low, high = knobs.min_prefill_decode_ratio, knobs.max_prefill_decode_ratio
    if low is not None and decode > 0 and prefill < low * decode - 1e-9:
        raised = min(math.ceil(low * decode - 1e-9), knobs.max_prefill_replicas)
        if raised > prefill:
            prefill, p_reason = raised, Rule.RATIO_MIN
    if high is not None and high > 0 and prefill > high * decode + 1e-9:
        raised = min(math.ceil(prefill / high - 1e-9), knobs.max_decode_replicas)
        if raised > decode:
            decode, d_reason = raised, Rule.RATIO_MAX
    return prefill, decode, p_reason, d_reason


@dataclass(frozen=True)
class BudgetSplit:
    prefill: int
    decode: int
    detail: dict[str, Any]


@dataclass(frozen=True)
class Need:
    """What each role's sizing rule asked for, and the words for what held it to the count
    that reaches the budget (``None``: nothing did)."""

    prefill: int
    decode: int
    prefill_held_by: str | None = None
    decode_held_by: str | None = None

    def text(self, prefill: int, decode: int) -> str:
        parts = []
        for role, need, got, by in (("prefill", self.prefill, prefill, self.prefill_held_by),
                                    ("decode", self.decode, decode, self.decode_held_by)):
            if need != got:
                parts.append(f"{role} needs {need}" + (f", held to {got} by {by}" if by else ""))
        return "; ".join(parts)


def split_gpu_budget(
    prefill: int,
    decode: int,
    lowest: tuple[int, int],
    knobs: DeploymentKnobs,
    prefill_hurt: Callable[[int], list[float]] | None,
    decode_hurt: Callable[[Sequence[int]], list[float]] | None,
    need: Need | None = None,
) -> BudgetSplit:
    """Within the budget, the split (of at most the wanted counts) predicted to keep the most
    requests within both targets.

    A request meets the SLA if it meets TTFT and ITL: the predicted attainment of a split is
    ``(1 - TTFT misses) x (1 - ITL misses)``, each from the role's queueing model. When no
    split can keep up with both roles' throughput (every request would miss), the split that
    serves the largest share of the load wins: the one whose more overloaded role is least
    overloaded (a P/D pipeline runs at the pace of its bottleneck). Ties go to the split using
    more of the budget, then more prefill."""
    gp, gd, budget = knobs.prefill_engine_num_gpu, knobs.decode_engine_num_gpu, knobs.max_total_gpus
    required = prefill * gp + decode * gd
    detail: dict[str, Any] = {"max_gpus": budget, "required_gpus": required, "binds": False}
    if required <= budget:
        detail["final_gpus"] = required
        return BudgetSplit(prefill, decode, detail)
    if need is not None:
        detail["need"] = {"prefill": need.prefill, "decode": need.decode}
    held = need.text(prefill, decode) if need is not None else ""
    asked = f"{prefill} prefill + {decode} decode ({required} GPUs" + (
        f"; {held})" if held else ")"
    )
    low_p, low_d = min(lowest[0], prefill), min(lowest[1], decode)
    candidates: list[tuple[int, int]] = []
    for p in range(prefill, low_p - 1, -1):
        left = budget - p * gp
        if left >= low_d * gd:
            candidates.append((p, min(decode, left // gd)))
    if prefill_hurt is None or decode_hurt is None or not candidates:
        p, d, _, _ = contract.enforce_gpu_budget(prefill, decode, knobs)
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
        why=f"{budget} GPUs cannot hold {asked}; {why}",
        final_gpus=p * gp + d * gd,
    )
    return BudgetSplit(p, d, detail)


def max_bounds(
    p_trail: Trail, d_trail: Trail, prefill: int, decode: int, knobs: DeploymentKnobs
) -> tuple[int, int]:
    if prefill > knobs.max_prefill_replicas:
        prefill = p_trail.add("role_bounds_after_ratio", knobs.max_prefill_replicas,
                              Rule.MAX_REPLICAS)
    if decode > knobs.max_decode_replicas:
        decode = d_trail.add("role_bounds_after_ratio", knobs.max_decode_replicas,
                             Rule.MAX_REPLICAS)
    return prefill, decode


def budget_rule(after: int, before: int) -> Rule:
    return Rule.GPU_BUDGET_SLA_SPLIT if after != before else Rule.WITHIN_BOUNDS


