"""The load the ``slaplanner`` policy plans for: the forecast's steps over the startup lookahead at
our quantile, the recent load the fast path reads, and each role's need over the lookahead."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from services.decider.knobs import DeploymentKnobs
from services.decider.policies.contract import PlannedLoad
from services.decider.policies.slaplanner import sizing
from services.decider.policies.slaplanner.memory import PlannerMemory, band_trusted, variability
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
    forecast: LoadForecast, knobs: DeploymentKnobs, startup_s: float,
    confidence: float | None = None,
) -> tuple[list[StepLoad], dict[str, Any]]:
    """The steps from the next window up to ``now + startup + one window``, at our quantile
    (``load_confidence``, unless ``confidence`` is given)."""
    ours = knobs.load_confidence if confidence is None else confidence
    now, window = forecast.window_end, forecast.window_s
    horizon_end = now + startup_s + window
    steps: list[StepLoad] = []
    for index, step in enumerate(forecast.steps):
        if index > 0 and step.window_end > horizon_end + 1e-6:
            break
        steps.append(_step_load(index, step, window, ours, knobs.forecast_confidence))
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
    index: int, step: ForecastStep, window_s: float, conf: float, theirs: float
) -> StepLoad:
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


def size_lookahead(
    forecast: LoadForecast,
    profile: Profile,
    knobs: DeploymentKnobs,
    memory: PlannerMemory,
    startup_s: float,
) -> Sized:
    """Size both roles for every forecast step of the lookahead; the busiest step binds."""
    p_factor, d_factor = memory.prefill_correction.factor, memory.decode_correction.factor
    spread = variability(memory, knobs)
    steps, lookahead = planned_steps(forecast, knobs, startup_s)
    prefills = [
        size_prefill(s.rate_per_s, s.isl_tokens, profile, knobs, p_factor, spread) for s in steps
    ]
    decodes = [
        size_decode(s.rate_per_s, s.isl_tokens, s.osl_tokens, profile, knobs, d_factor)
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
        sure = max(knobs.load_confidence, knobs.forecast_confidence)
        sure_steps, _ = planned_steps(forecast, knobs, startup_s, sure)
        covered = (
            max(size_prefill(s.rate_per_s, s.isl_tokens, profile, knobs, p_factor,
                             spread).replicas for s in sure_steps),
            max(size_decode(s.rate_per_s, s.isl_tokens, s.osl_tokens, profile, knobs,
                            d_factor).replicas for s in sure_steps),
        )
        load["covered_over_lookahead"] = {"prefill": covered[0], "decode": covered[1]}
    return Sized(prefills[p_at], decodes[d_at], p_at, d_at, load, quantile_used, covered)

