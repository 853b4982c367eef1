"""The load the ``slaplanner`` policy plans for: the forecast's steps over the startup lookahead at
our quantile, the recent load the fast path reads, and each role's need over the lookahead."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from services.decider.knobs import DeploymentKnobs
from services.decider.policies.contract import PlannedLoad
from services.decider.policies.slaplanner import sizing
from services.decider.policies.slaplanner.memory import (
    PlannerMemory,
    band_trusted,
    planning_confidences,
    variability,
)
from services.decider.policies.slaplanner.sizing import PrefillSizing, size_decode, size_prefill
from shared.messages import DeploymentKey, ForecastStep, LoadForecast, MetricSnapshot
from shared.perf_model import Profile


@dataclass(frozen=True)
class StepLoad:
    """One forecast step at the planning quantile, as a rate."""

    index: int  # 0 = the next window
    window_end_s: float
    num_requests: float
    rate_per_s: float
    isl_tokens: float
    osl_tokens: float


# What each role's work grows with: prefill with the requests and their prompts, decode also
# with their outputs (how long each holds its slot and KV cache).
PREFILL_LOAD = ("requests", "isl")
DECODE_LOAD = ("requests", "isl", "osl")


def design_point(
    points: dict[str, float], uppers: dict[str, float], forecast_confidence: float,
    confidence: float,
) -> dict[str, float]:
    """The quantities at which their product (a role's work) reaches our quantile, each at its
    most likely value there: with independent relative errors ``s_k`` (from the forecaster's
    upper quantile), the product's is ``s = sqrt(sum s_k^2)``, and the point of the boundary
    nearest the forecast moves each by ``z * s_k^2 / s`` (the design point of first-order
    reliability). Taking every quantity at the quantile itself would plan a product far above
    it: requests and mean prompt both at their 0.75 quantile are about the 0.83 quantile of the
    prefill work.

    Written as each quantity's band rescaled to our quantile, ``point + (upper - point) *
    z(ours) / z(theirs)``, times its share ``s_k / s`` of the product's error: one quantity
    alone takes its whole band. A point of 0 under a band has an unbounded relative error, so
    (in the limit) such quantities share the whole product's error and the others stay at
    their points: a forecast of no requests with room for some plans for some."""
    z_theirs = NormalDist().inv_cdf(forecast_confidence)
    z_ours = NormalDist().inv_cdf(min(max(confidence, 1e-6), 1 - 1e-6))
    banded = {k for k, v in points.items() if uppers[k] > v}
    unbounded = {k for k in banded if points[k] <= 0.0}
    if unbounded:
        shares = {k: 1.0 / math.sqrt(len(unbounded)) if k in unbounded else 0.0 for k in points}
    else:
        spreads = {k: (uppers[k] / v - 1.0) if k in banded else 0.0 for k, v in points.items()}
        total = math.hypot(*spreads.values())  # no overflow, even for a point near zero
        shares = {k: spread / total if total > 0.0 else 0.0 for k, spread in spreads.items()}
    return {k: max(0.0, v + (uppers[k] - v) * z_ours / z_theirs * shares[k])
            for k, v in points.items()}


def planned_steps(
    forecast: LoadForecast, knobs: DeploymentKnobs, startup_s: float,
    confidence: float | None = None, joint: tuple[str, ...] = PREFILL_LOAD,
) -> tuple[list[StepLoad], dict[str, Any]]:
    """The steps from the next window up to ``now + startup + one window``, with the role's
    work (the product of the ``joint`` quantities) at our quantile (``load_confidence``, unless
    ``confidence`` is given); a quantity not in ``joint`` stays at the forecast's point."""
    ours = knobs.load_confidence if confidence is None else confidence
    now, window = forecast.window_end, forecast.window_s
    horizon_end = now + startup_s + window
    steps: list[StepLoad] = []
    for index, step in enumerate(forecast.steps):
        if index > 0 and step.window_end > horizon_end + 1e-6:
            break
        steps.append(_step_load(index, step, window, ours, knobs.forecast_confidence, joint))
    reaches = forecast.steps[len(steps) - 1].window_end
    return steps, {
        "now_s": now,
        "startup_s": startup_s,
        "lookahead_until_s": horizon_end,
        "lookahead_s": horizon_end - now,
        "forecast_steps_used": len(steps),
        "forecast_reaches_s": reaches,
        "horizon_short": reaches + 1e-6 < horizon_end,
        "load_confidence": ours,
        "forecast_confidence": knobs.forecast_confidence,
    }


def _step_load(
    index: int, step: ForecastStep, window_s: float, conf: float, theirs: float,
    joint: tuple[str, ...],
) -> StepLoad:
    points = {"requests": step.num_requests, "isl": step.isl_avg, "osl": step.osl_avg}
    uppers = {"requests": step.num_requests_upper, "isl": step.isl_avg_upper,
              "osl": step.osl_avg_upper}
    planned = {**points, **design_point({k: points[k] for k in joint},
                                        {k: uppers[k] for k in joint}, theirs, conf)}
    return StepLoad(
        index=index,
        window_end_s=step.window_end,
        num_requests=planned["requests"],
        rate_per_s=planned["requests"] / window_s,
        isl_tokens=planned["isl"],
        osl_tokens=planned["osl"],
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
    # the need itself: the binding step's count, or what runs now when a step before new
    # replicas could be ready binds (adding for it would come too late)
    prefill_need: int = 0
    decode_need: int = 0


def binding_step(
    needs: list[int], late: list[int], current: int | None
) -> tuple[int, int]:
    """The step that binds a role and its need: the most any step after new replicas could be
    ready needs; a step before that may only keep what runs (what it needs beyond, new replicas
    would bring too late; what runs it needs must not be released)."""
    late_at = max(late, key=lambda i: (needs[i], -i))
    early = [i for i in range(len(needs)) if i not in late]
    if current is None or not early:
        return late_at, needs[late_at]
    early_at = max(early, key=lambda i: (needs[i], -i))
    kept = min(current, needs[early_at])
    if kept > needs[late_at]:
        return early_at, kept
    return late_at, needs[late_at]


def size_lookahead(
    forecast: LoadForecast,
    profile: Profile,
    knobs: DeploymentKnobs,
    memory: PlannerMemory,
    startup_s: float,
    current: tuple[int, int] | None = None,
) -> Sized:
    """Size both roles for every forecast step of the lookahead, each role at its planned load
    quantile (the SLA feedback's); the busiest step binds (see ``binding_step``)."""
    p_factor, d_factor = memory.prefill_correction.factor, memory.decode_correction.factor
    spread = variability(memory, knobs)
    p_conf, d_conf = planning_confidences(memory, knobs)
    p_steps, lookahead = planned_steps(forecast, knobs, startup_s, p_conf, PREFILL_LOAD)
    d_steps, _ = planned_steps(forecast, knobs, startup_s, d_conf, DECODE_LOAD)
    prefills = [
        size_prefill(s.rate_per_s, s.isl_tokens, profile, knobs, p_factor, spread)
        for s in p_steps
    ]
    decodes = [
        size_decode(s.rate_per_s, s.isl_tokens, s.osl_tokens, profile, knobs, d_factor)
        for s in d_steps
    ]
    ready_at = forecast.window_end + startup_s
    late = [i for i, s in enumerate(p_steps) if s.window_end_s > ready_at + 1e-6]
    late = late or [len(p_steps) - 1]
    p_at, p_need = binding_step([x.replicas for x in prefills], late,
                                None if current is None else current[0])
    d_at, d_need = binding_step([x.replicas for x in decodes], late,
                                None if current is None else current[1])
    first = p_steps[0]
    load = {
        "num_requests": first.num_requests,
        "isl_avg_tokens": first.isl_tokens,
        "osl_avg_tokens": d_steps[0].osl_tokens,
        "window_s": forecast.window_s,
        "request_rate_per_s": first.rate_per_s,
        "point_num_requests": forecast.steps[0].num_requests,
        "steps": [
            {
                "index": s.index,
                "window_end_s": s.window_end_s,
                "num_requests": s.num_requests,
                "decode_num_requests": ds_.num_requests,
                "isl_tokens": s.isl_tokens,
                "decode_isl_tokens": ds_.isl_tokens,
                "osl_tokens": ds_.osl_tokens,
                "prefill_replicas": ps.replicas,
                "decode_replicas": ds.replicas,
                "after_new_replicas_ready": i in late,
            }
            for i, (s, ds_, ps, ds) in enumerate(zip(p_steps, d_steps, prefills, decodes,
                                                     strict=True))
        ],
        **lookahead,
        "load_confidence": {"prefill": p_conf, "decode": d_conf},
        "new_replicas_ready_at_s": ready_at,
        "prefill_step": p_at,
        "decode_step": d_at,
    }
    quantile_used = max(p_conf, d_conf) > 0.5 and any(
        st.num_requests_upper > st.num_requests
        or st.isl_avg_upper > st.isl_avg
        or st.osl_avg_upper > st.osl_avg
        for st in forecast.steps[: len(p_steps)]
    )
    covered = None
    trusted = band_trusted(memory, forecast.window_end, len(p_steps),
                           hold_window_s(knobs, startup_s, forecast.window_s))
    load["forecast_band_trusted"] = trusted
    if not lookahead["horizon_short"] and trusted:
        sure_p, sure_d = (max(c, knobs.forecast_confidence) for c in (p_conf, d_conf))
        sure_p_steps, _ = planned_steps(forecast, knobs, startup_s, sure_p, PREFILL_LOAD)
        sure_d_steps, _ = planned_steps(forecast, knobs, startup_s, sure_d, DECODE_LOAD)
        covered = (
            max(size_prefill(s.rate_per_s, s.isl_tokens, profile, knobs, p_factor,
                             spread).replicas for s in sure_p_steps),
            max(size_decode(s.rate_per_s, s.isl_tokens, s.osl_tokens, profile, knobs,
                            d_factor).replicas for s in sure_d_steps),
        )
        load["covered_over_lookahead"] = {"prefill": covered[0], "decode": covered[1]}
    return Sized(prefills[p_at], decodes[d_at], p_at, d_at, load, quantile_used, covered,
                 p_need, d_need)


def hold_window_s(knobs: DeploymentKnobs, startup_s: float, interval_s: float) -> float:
    """The scale-down stabilisation window: the knob's, else one startup delay plus one
    interval (released capacity is back no sooner than a startup delay later)."""
    if knobs.scale_down_window_s is not None:
        return knobs.scale_down_window_s
    return startup_s + interval_s
