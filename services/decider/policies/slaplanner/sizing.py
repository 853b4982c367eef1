"""Sizing arithmetic of the ``slaplanner`` policy on a profile: how many engines a load needs,
and what an observed window says about the engines' speed. Pure functions of numbers, a profile
and the knobs; the queueing formulas and their sources are in ``queueing.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special

from services.decider.knobs import DeploymentKnobs
from services.decider.policies import contract
from services.decider.policies.slaplanner import attainment, queueing
from shared.explanation import Rule
from shared.messages import MAX_REPLICAS, MetricSnapshot
from shared.perf_model import DecodeModel, IslClamp, Profile

# A wait budget below this share of the prefill time is treated as this share: the TTFT target
# is then out of reach at this ISL whatever the engine count, and we size for a short queue.
MIN_WAIT_SHARE = 0.1
# Above this utilisation a window's mean TTFT is dominated by its backlog, which says nothing
# about the engines' speed: the prefill correction skips such windows.
SATURATED = 0.95
# Variability when none is configured or measured: Poisson arrivals, exponential service (M/M/c).
DEFAULT_ARRIVAL_CV2 = 1.0
DEFAULT_SERVICE_CV2 = 1.0
# The most variable prefill times a window's ISL p90 may imply (a lognormal's cv^2).
MAX_SERVICE_CV2 = 4.0
# Fewest requests in a window for its ISL p90 to say something about the spread.
MIN_REQUESTS_FOR_SPREAD = 20
# Fewest short windows (fast-path snapshots) to measure how bursty arrivals are.
MIN_COUNTS_FOR_DISPERSION = 8


# ---------------------------------------------------------------------------------------------
# Sizing


@dataclass(frozen=True)
class Variability:
    """What spreads prefill work: the arrivals' burstiness (inter-arrival ``cv^2``), the prompt
    mix (measured ISL quantiles), and the prefill-time ``cv^2`` to assume while the mix is
    unknown."""

    arrival_cv2: float = DEFAULT_ARRIVAL_CV2
    service_cv2: float = DEFAULT_SERVICE_CV2
    mix: attainment.PromptMix | None = None

    @property
    def factor(self) -> float:
        return queueing.allen_cunneen_factor(self.arrival_cv2, self.service_cv2)


def ttft_miss_budget(knobs: DeploymentKnobs) -> float:
    """Share of requests the prefill sizing may let miss TTFT: its part of the goal's misses."""
    return (1.0 - knobs.attainment_goal) * knobs.ttft_miss_share


def itl_miss_budget(knobs: DeploymentKnobs) -> float:
    return (1.0 - knobs.attainment_goal) * (1.0 - knobs.ttft_miss_share)


@dataclass(frozen=True)
class PrefillSizing:
    replicas: int
    offered_load: float  # engines busy on average (erlangs)
    service_s: float  # mean engine-seconds per request, corrected
    prefill_s: float  # prefill latency of the mean prompt, corrected
    wait_budget_s: float  # the wait the mean prompt may have
    variability: float  # Allen-Cunneen factor
    reachable: bool
    detail: dict[str, Any]
    queue: attainment.PrefillQueue | None = None
    ttft_target_s: float = 0.0

    def hurt(self, up_to: int) -> list[float]:
        """Predicted share of requests missing TTFT with 0 .. ``up_to`` engines (above 1: the
        queue grows, by how much the engines fall short)."""
        if self.queue is None:
            return [0.0] * (up_to + 1)
        return attainment.prefill_miss_shares(self.queue, self.ttft_target_s, up_to)


def prefill_queue(
    rate_per_s: float,
    isl_tokens: float,
    profile: Profile,
    knobs: DeploymentKnobs,
    factor: float,
    variability: Variability,
) -> attainment.PrefillQueue:
    """The load as a queue on the profile: per prompt of the mix, the engine-seconds it takes
    (ISL over the engine's throughput, Dynamo's capacity arithmetic) and its prefill time."""
    mix = (
        attainment.scaled_mix(variability.mix, isl_tokens)
        if variability.mix is not None
        else attainment.point_mix(isl_tokens)
    )
    points = np.asarray(mix.isl_tokens, dtype=np.float64)
    used = np.clip(points, profile.prefill.min_isl_tokens, profile.prefill.max_isl_tokens)
    latency = profile.prefill.ttft_s_many(points)
    thpt = profile.prefill.thpt_per_gpu_many(points) * knobs.prefill_engine_num_gpu
    service = np.where(thpt > 0, used / np.maximum(thpt, 1e-12), np.maximum(latency, 1e-6))
    return attainment.PrefillQueue(
        rate_per_s=max(rate_per_s, 0.0),
        service_s=np.maximum(service, 1e-9) * factor,
        latency_s=np.maximum(latency, 0.0) * factor,
        weights=np.asarray(mix.weights, dtype=np.float64),
        arrival_cv2=variability.arrival_cv2,
        service_cv2_default=variability.service_cv2,
    )


def size_prefill(
    rate_per_s: float,
    isl_tokens: float,
    profile: Profile,
    knobs: DeploymentKnobs,
    factor: float,
    variability: Variability | None = None,
    budget: float | None = None,
) -> PrefillSizing:
    """The fewest engines whose predicted share of TTFTs over target stays within the budget
    (the goal's share for TTFT unless ``budget`` is given): a GI/G/c queue with the arrivals'
    burstiness and the prompt mix's spread (``attainment.py``)."""
    spread = variability or Variability()
    queue = prefill_queue(rate_per_s, isl_tokens, profile, knobs, factor, spread)
    estimate = profile.prefill.estimate(isl_tokens)
    prefill_s = max(estimate.ttft_s, 0.0) * factor
    target = knobs.ttft_target_s
    reachable = prefill_s < target
    wait_budget = max(target - prefill_s, MIN_WAIT_SHARE * prefill_s)
    miss_budget = ttft_miss_budget(knobs) if budget is None else budget
    found = attainment.fewest_prefill(queue, target, miss_budget, MAX_REPLICAS)
    return PrefillSizing(
        replicas=found.engines,
        offered_load=queue.offered_load,
        service_s=queue.mean_service_s,
        prefill_s=prefill_s,
        wait_budget_s=wait_budget,
        variability=queue.variability,
        reachable=reachable,
        queue=queue,
        ttft_target_s=target,
        detail={
            "model": "GI/G/c (Allen-Cunneen): TTFT misses averaged over the prompt mix",
            "rate_per_s": rate_per_s,
            "isl_tokens": isl_tokens,
            "profile": estimate.as_dict(),
            "isl_clamped": estimate.clamp is not IslClamp.WITHIN_RANGE,
            "correction_factor": factor,
            "service_s": queue.mean_service_s,
            "prefill_s": prefill_s,
            "ttft_target_s": target,
            "ttft_reachable": reachable,
            "prompt_mix": "measured" if spread.mix is not None and spread.mix.measured
            else "mean only",
            "arrival_cv2": queue.arrival_cv2,
            "service_cv2": queue.service_cv2,
            "variability_factor": queue.variability,
            "offered_load_erlangs": queue.offered_load,
            "ttft_miss_budget": miss_budget,
            "predicted_ttft_miss_share": min(found.share, 1.0),
            "budget_reached": found.reached,
            "replicas": found.engines,
        },
    )


@dataclass(frozen=True)
class OperatingPoint:
    """Where one decode engine is run: its concurrency, ITL there, and what bound it."""

    kv_column: int
    kv_usage_fraction: float
    concurrency: float  # requests in flight per engine
    itl_s: float  # profiled ITL there (uncorrected)
    reason: Rule  # ITL_CURVE or KV_CAPACITY
    reachable: bool  # False: even one request misses the ITL target


def operating_point(
    decode: DecodeModel, context_tokens: float, itl_target_s: float, kv_usage_max: float
) -> OperatingPoint:
    """The busiest point of the context's grid row before the ITL first misses its target,
    within the KV headroom. Scanning from the low end (not Dynamo's top-down scan) never picks
    a point beyond a region that misses the target, where the profile is noisy."""
    context = max(context_tokens, 1.0)
    row = decode.itl_grid_s[decode.context_row(context)]
    meets = row <= itl_target_s
    misses = np.flatnonzero(~meets[1:])
    itl_column = int(misses[0]) if misses.size else decode.resolution - 1  # last column that meets
    within_kv = np.flatnonzero(decode.kv_axis <= kv_usage_max + 1e-12)
    kv_column = max(int(within_kv[-1]) if within_kv.size else 1, 1)
    reachable = bool(meets[1])
    if not reachable:
        column, reason = 1, Rule.ITL_CURVE
    elif kv_column < itl_column:
        column, reason = kv_column, Rule.KV_CAPACITY
    else:
        column, reason = max(itl_column, 1), Rule.ITL_CURVE
    usage = float(decode.kv_axis[column])
    return OperatingPoint(
        kv_column=column,
        kv_usage_fraction=usage,
        concurrency=usage * decode.max_kv_tokens / context,
        itl_s=float(row[column]),
        reason=reason,
        reachable=reachable,
    )


@dataclass(frozen=True)
class DecodeSizing:
    replicas: int
    mean_concurrency: float  # requests in flight with every engine at the ITL target
    per_engine: float
    reason: Rule
    detail: dict[str, Any]

    def hurt(self, replicas: Sequence[int]) -> list[float]:
        """Predicted share of requests decoded in a batch beyond what ``replicas`` engines hold
        at the ITL target (above 1: short on average, by how much)."""
        if not self.mean_concurrency > 0:
            return [0.0 for _ in replicas]
        shares = attainment.decode_miss_shares(self.mean_concurrency, self.per_engine,
                                               max(replicas, default=0))
        return [shares[r] for r in replicas]


def size_decode(
    rate_per_s: float,
    isl_tokens: float,
    osl_tokens: float,
    profile: Profile,
    knobs: DeploymentKnobs,
    factor: float,
    budget: float | None = None,
) -> DecodeSizing:
    """The fewest engines whose predicted share of requests decoded in an over-full batch stays
    within the budget (the goal's share for ITL unless ``budget`` is given): requests in flight
    by Little's law at the ITL target (rate x OSL x ITL), Poisson (M/G/infinity), each engine at
    the busiest point that meets the ITL target and the KV headroom.

    The in-flight count is taken at the target's ITL, not at the faster ITL of a batch with
    room (the least fixed point of ``N = rate x OSL x ITL(N / c)``): sized on that fixed point,
    the planning lost its margin against a rising load the forecast lags, and the SLA feedback,
    which acts only after misses, let ITL miss through every morning ramp of the day scenario
    (98.8 % against 99.5 % on the benchmark)."""
    context = isl_tokens + osl_tokens / 2.0
    target = knobs.itl_target_s / factor if factor > 0 else knobs.itl_target_s
    point = operating_point(profile.decode, context, target, knobs.kv_usage_max)
    itl = point.itl_s * factor
    hold_s = max(osl_tokens, 0.0) * itl
    mean = max(rate_per_s, 0.0) * hold_s
    miss_budget = itl_miss_budget(knobs) if budget is None else budget
    # a request is over capacity when the others in flight fill the batch: P(N >= c k) <= budget
    needed = queueing.poisson_quantile(mean, 1.0 - miss_budget) + 1.0 if mean > 0 else 0.0
    raw = needed / point.concurrency if point.concurrency > 0 else math.inf
    replicas = min(contract.ceil_replicas(raw), MAX_REPLICAS) if mean > 0 else 0
    share = attainment.decode_miss_shares(mean, point.concurrency, replicas)[replicas]
    return DecodeSizing(
        replicas=replicas,
        mean_concurrency=mean,
        per_engine=point.concurrency,
        reason=point.reason,
        detail={
            "model": "Little's law (in flight = rate x OSL x ITL), Poisson (M/G/infinity): "
            "share of requests in an over-full batch",
            "rate_per_s": rate_per_s,
            "isl_tokens": isl_tokens,
            "osl_tokens": osl_tokens,
            "context_tokens": context,
            "correction_factor": factor,
            "itl_target_s": knobs.itl_target_s,
            "corrected_itl_target_s": target,
            "itl_reachable": point.reachable,
            "operating_point": {
                "kv_usage_fraction": point.kv_usage_fraction,
                "kv_usage_max": knobs.kv_usage_max,
                "concurrency_per_engine": point.concurrency,
                "profiled_itl_s": point.itl_s,
                "corrected_itl_s": itl,
                "bound_by": str(point.reason),
            },
            "request_decode_s": hold_s,
            "mean_in_flight": mean,
            "itl_miss_budget": miss_budget,
            "in_flight_covered": needed,
            "predicted_itl_miss_share": min(share, 1.0),
            "raw_replicas": raw,
            "replicas": replicas,
        },
    )


# ---------------------------------------------------------------------------------------------
# Corrections from an observation


def _prefill_model_ttft(
    factor: float, servers: int, rate: float, base_service: float, base_prefill: float,
    variability: float,
) -> float:
    service = base_service * factor
    return base_prefill * factor + queueing.mean_wait_s(servers, rate * service, service,
                                                         variability)


def observed_prefill_factor(
    observed: MetricSnapshot,
    profile: Profile,
    knobs: DeploymentKnobs,
    variability: Variability | None = None,
    backlog_before: bool = False,
) -> tuple[float | None, dict[str, Any]]:
    """The engine slowdown that makes the queueing model give the observed mean TTFT at the
    observed rate, ISL and engines; ``None`` (with the reason) when the window cannot say."""
    n, ttft, isl, engines = (
        observed.num_requests, observed.ttft_avg_s, observed.isl_avg, observed.prefill_workers,
    )
    if not n or ttft is None or isl is None:
        return None, {"note": "no requests, TTFT or ISL in the window"}
    if not engines:
        return None, {"note": "prefill_workers not observed; cannot separate queueing"}
    if backlog_before:
        return None, {
            "note": "a long queue at the window's start: its TTFT measures that backlog"
        }
    probe = size_prefill(0.0, isl, profile, knobs, 1.0, variability)
    rate = n / observed.window_s
    utilisation = rate * probe.service_s / engines
    detail: dict[str, Any] = {
        "observed_ttft_s": ttft,
        "profiled_prefill_s": probe.prefill_s,
        "engines": engines,
        "rate_per_s": rate,
        "utilisation_at_profile": utilisation,
    }
    if utilisation >= SATURATED:
        detail["note"] = (
            "engines saturated in this window: its TTFT measures the backlog, not the engines"
        )
        return None, detail
    clearing = backlog_wait_s(observed.requests_waiting or 0.0, engines, probe)
    if clearing > probe.wait_budget_s:
        detail["note"] = (
            f"{observed.requests_waiting:.0f} requests waiting at the window's end take "
            f"{clearing:.3g} s to clear, more than the {probe.wait_budget_s:.3g} s wait budget: "
            "its TTFT measures a backlog, not the engines"
        )
        return None, detail
    low, high = knobs.correction_min, knobs.correction_max
    saturation = engines / (rate * probe.service_s) if rate > 0 else math.inf
    high = min(high, saturation * (1 - 1e-9))

    def model(factor: float) -> float:
        return _prefill_model_ttft(
            factor, engines, rate, probe.service_s, probe.prefill_s, probe.variability
        )

    if model(low) >= ttft:
        factor = low
    elif model(high) <= ttft:
        detail["note"] = (
            f"no engine slowdown up to {high:.3g}x explains a mean TTFT of {ttft:.3g} s at this "
            "load: a backlog, not slow engines"
        )
        return None, detail
    else:
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if model(middle) < ttft else (low, middle)
        factor = (low + high) / 2
    detail["model_ttft_s"] = model(factor)
    if rate * probe.service_s * factor / engines >= SATURATED:
        detail["note"] = (
            "only a saturated engine explains this TTFT: a backlog from an earlier window, "
            "not slow engines"
        )
        return None, detail
    cap = _slowdown_cap(observed, profile)
    if cap is not None:
        detail["slowdown_cap"] = cap
        if factor > cap:
            detail["capped_from"] = factor
            factor = max(cap, knobs.correction_min)
    return factor, detail


def prefill_factor_from_compute_time(
    observed: MetricSnapshot, profile: Profile, mix: attainment.PromptMix | None
) -> tuple[float | None, dict[str, Any]]:
    """Observed prefill compute time over the profile's at the window's prompt mix: engine
    speed alone, whatever the queueing (which TTFT mixes in)."""
    n, compute, isl = observed.num_requests, observed.prefill_time_avg_s, observed.isl_avg
    if not n or compute is None or not isl:
        return None, {"note": "no requests, prefill time or ISL in the window"}
    prompts = (
        attainment.measured_mix(isl, observed.isl_p50, observed.isl_p90, observed.isl_p99)
        if observed.isl_p50 is not None
        else (attainment.scaled_mix(mix, isl) if mix is not None else attainment.point_mix(isl))
    )
    profiled = float(np.dot(
        profile.prefill.ttft_s_many(np.asarray(prompts.isl_tokens)), prompts.weights
    ))
    detail = {
        "observed_prefill_time_s": compute,
        "profiled_prefill_time_s": profiled,
        "from": "prefill compute time at the window's prompt mix",
    }
    if not profiled > 0:
        return None, {**detail, "note": "profiled prefill time is not positive"}
    return compute / profiled, detail


def _slowdown_cap(observed: MetricSnapshot, profile: Profile) -> float | None:
    """The most the engines can be slowed down given the window's TTFT p90, whatever the queueing.

    A request's TTFT is never shorter than its prefill time, and prefill time grows with the
    prompt, so the window's TTFT p90 is at least ``k x`` the profiled prefill time at its ISL p90.
    The mean-TTFT model cannot tell arrivals bunched within the window (which it does not see)
    from slow engines; this bound holds either way.
    """
    ttft_p90, isl_p90 = observed.ttft_p90_s, observed.isl_p90
    if (
        ttft_p90 is None
        or isl_p90 is None
        or not observed.num_requests
        or observed.num_requests < MIN_REQUESTS_FOR_SPREAD
    ):
        return None
    prefill_p90 = profile.prefill.ttft_s(isl_p90)
    return ttft_p90 / prefill_p90 if prefill_p90 > 0 else None


def observed_decode_factor(
    observed: MetricSnapshot, profile: Profile
) -> tuple[float | None, dict[str, Any]]:
    """Observed ITL / profiled ITL at the observed concurrency per engine (Little's law)."""
    n, itl, isl, osl, engines = (
        observed.num_requests, observed.itl_avg_s, observed.isl_avg, observed.osl_avg,
        observed.decode_workers,
    )
    if not n or itl is None or isl is None or osl is None:
        return None, {"note": "no requests, ITL, ISL or OSL in the window"}
    context = isl + osl / 2
    if engines:
        concurrency = n / observed.window_s * osl * itl / engines
        source = "little_law"
    elif observed.kv_cache_usage is not None:
        concurrency = observed.kv_cache_usage * profile.decode.max_kv_tokens / max(context, 1.0)
        source = "kv_cache_usage"
    else:
        return None, {"note": "decode_workers and kv_cache_usage not observed"}
    if concurrency * max(context, 1.0) > profile.decode.max_kv_tokens:
        return None, {
            "concurrency_per_engine": concurrency,
            "note": "more in flight than the KV cache holds: the ITL measures preemption and "
            "queueing, not the engines",
        }
    point = profile.decode.at(concurrency, context)
    detail = {
        "observed_itl_s": itl,
        "concurrency_per_engine": concurrency,
        "concurrency_from": source,
        "profiled": point.as_dict(),
    }
    if point.itl_s <= 0:
        return None, {**detail, "note": "profiled ITL is not positive here"}
    return itl / point.itl_s, detail




def backlog_wait_s(waiting: float, engines: int, prefill: PrefillSizing) -> float:
    """How long the queued requests take to clear at the engines that serve: the queued work
    (requests x engine-seconds each) over the engines. A queue is harmless while this stays
    within the wait budget, however many requests it holds (bunched arrivals make long but
    quick queues)."""
    if waiting <= 0:
        return 0.0
    if engines <= 0:
        return math.inf
    return waiting * prefill.service_s / engines


def service_cv2_from_spread(
    profile: Profile, isl_avg: float, isl_p90: float
) -> tuple[float, dict[str, Any]]:
    """Squared coefficient of variation of prefill times, from a window's ISL mean and p90.

    The prefill time of the p90 prompt over that of the mean prompt is matched to a gamma
    distribution (shape ``k``: ``p90 / mean = gamma.ppf(0.9, k) / k``, ``cv^2 = 1 / k``): prompts of
    one length give 0, a spread as wide as an exponential's gives 1, capped at
    ``MAX_SERVICE_CV2``. A gamma, not a lognormal: prompt lengths are bounded by the context, and
    on both bundled traces the lognormal fit overstated the measured cv^2 three- to four-fold
    while the gamma fit stays within about 1.6x, on the safe side.
    """
    mean_s = profile.prefill.ttft_s(isl_avg)
    p90_s = profile.prefill.ttft_s(max(isl_p90, isl_avg))
    ratio = p90_s / mean_s if mean_s > 0 else 1.0
    cv2 = _gamma_cv2_from_p90_ratio(ratio)
    return cv2, {
        "isl_avg": isl_avg,
        "isl_p90": isl_p90,
        "prefill_s_at_mean": mean_s,
        "prefill_s_at_p90": p90_s,
        "fit": "gamma",
        "service_cv2": cv2,
    }


# p90 / mean of a gamma distribution against its shape k (cv^2 = 1 / k), tabulated once: the
# ratio falls from about 3.3 (k = 1/4) to 1 (k large). Shapes between the table's points are
# interpolated on a log scale.
_GAMMA_SHAPES = np.logspace(math.log10(1.0 / MAX_SERVICE_CV2), 6.0, 600)
_GAMMA_P90_RATIOS = special.gammaincinv(_GAMMA_SHAPES, 0.9) / _GAMMA_SHAPES


def _gamma_cv2_from_p90_ratio(ratio: float) -> float:
    """``1 / k`` for the gamma shape ``k`` whose p90 is ``ratio`` times its mean."""
    if not ratio > 1.0 + 1e-9:
        return 0.0
    if ratio >= _GAMMA_P90_RATIOS[0]:
        return MAX_SERVICE_CV2
    # ratios fall as shapes grow: interpolate on the reversed (increasing) table
    log_shape = float(np.interp(ratio, _GAMMA_P90_RATIOS[::-1], np.log(_GAMMA_SHAPES[::-1])))
    return 1.0 / math.exp(log_shape)


def arrival_cv2_from_counts(counts: Sequence[float]) -> tuple[float | None, dict[str, Any]]:
    """Burstiness of arrivals from request counts in consecutive equal short windows.

    The index of dispersion of counts, ``Var(N) / E(N)``, is 1 for Poisson arrivals and tends to
    the inter-arrival ``cv^2`` of a renewal process (D. R. Cox and P. A. W. Lewis, *The Statistical
    Analysis of Series of Events*, 1966; W. Whitt's QNA uses it to carry arrival variability into
    GI/G/m approximations). Half the mean squared difference of consecutive counts estimates the
    variance without the slow trend of a changing rate.
    """
    values = np.asarray(counts, dtype=np.float64)
    if values.size < MIN_COUNTS_FOR_DISPERSION or values.sum() < MIN_REQUESTS_FOR_SPREAD:
        return None, {"note": f"{values.size} short windows, too few to measure burstiness"}
    mean = float(values.mean())
    variance = float(np.mean(np.diff(values) ** 2) / 2.0)
    dispersion = variance / mean if mean > 0 else 1.0
    return dispersion, {
        "windows": int(values.size),
        "mean_count": mean,
        "detrended_variance": variance,
        "index_of_dispersion": dispersion,
    }
