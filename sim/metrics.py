"""What a run is scored on: SLA attainment, latency percentiles, GPU-hours, and the lower bound.

The lower bound is the fewest GPUs that each interval's true load needs with instant startup:
prefill engines = ceil(the interval's total prefill time / interval), the prefill time of each
request being the profiled one at its (clipped) input length times the engines' real speed
(``perf_skew``); decode engines = ceil(the interval's decoded tokens / interval / the most tokens
per second per engine that keep the ITL target at the interval's mean context), from the same
profile grid the decider reads, again at the engines' real speed. An interval with requests needs
at least one engine of each role; an idle one needs none. No queueing headroom, no startup delay:
no policy can do better on average, so GPU-hours / lower bound measures the price of uncertainty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.perf_model import Profile
from sim.cluster import ServiceTimes, SimResult, clip_to_context

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class IntervalNeeds:
    """Engines each interval of a trace needs (index k covers ``[k * interval, (k + 1) * ...)``)."""

    interval_s: float
    prefill: IntArray
    decode: IntArray
    decode_meets_itl: npt.NDArray[np.bool_]  # False where no profiled point keeps the target

    def gpu_hours(self, prefill_engine_gpus: int = 1, decode_engine_gpus: int = 1) -> float:
        gpus = self.prefill * prefill_engine_gpus + self.decode * decode_engine_gpus
        return float(gpus.sum()) * self.interval_s / 3600.0

    def peak(self) -> tuple[int, int]:
        if self.prefill.size == 0:
            return 1, 1
        return max(1, int(self.prefill.max())), max(1, int(self.decode.max()))

    def start_counts(self, startup_delay_s: float) -> tuple[int, int]:
        """What an oracle would have running at time 0: the most that the intervals before a
        first new worker could be ready need (at least one of each)."""
        first = max(1, math.ceil(startup_delay_s / self.interval_s) + 1)
        prefill = self.prefill[:first]
        decode = self.decode[:first]
        return (
            max(1, int(prefill.max()) if prefill.size else 1),
            max(1, int(decode.max()) if decode.size else 1),
        )


def interval_needs(
    arrival_s: FloatArray,
    isl_tokens: IntArray,
    osl_tokens: IntArray,
    profile: Profile,
    interval_s: float,
    itl_target_s: float,
    perf_skew: float = 1.0,
    max_context_tokens: int | None = None,
    intervals: int | None = None,
    decode_engine_gpus: int = 1,
) -> IntervalNeeds:
    """The lower bound's engines per interval for a trace (clipped to the context limit)."""
    limit = max_context_tokens or profile.max_context_tokens
    if limit is None:
        raise ValueError("the profile gives no max_context_tokens; pass max_context_tokens")
    isl, osl, _ = clip_to_context(
        np.asarray(isl_tokens, dtype=np.int64),
        np.maximum(np.asarray(osl_tokens, dtype=np.int64), 1),
        int(limit),
    )
    index = np.floor_divide(arrival_s, interval_s).astype(np.int64)
    count = int(index.max()) + 1 if index.size else 0
    if intervals is not None:
        count = max(count, intervals)
    times = ServiceTimes(profile)
    prefill_s = times.prefill_s(isl.astype(np.float64)) * perf_skew
    busy = np.bincount(index, weights=prefill_s, minlength=count)
    requests = np.bincount(index, minlength=count)
    tokens = np.bincount(index, weights=(osl - 1).astype(np.float64), minlength=count)
    context = np.bincount(index, weights=isl + osl / 2.0, minlength=count)
    prefill = np.ceil(busy / interval_s - 1e-9).astype(np.int64)
    decode = np.zeros(count, dtype=np.int64)
    meets = np.ones(count, dtype=bool)
    for k in np.flatnonzero(requests).tolist():
        mean_context = float(context[k] / requests[k])
        point = profile.decode.best_thpt_per_gpu(itl_target_s / perf_skew, mean_context)
        meets[k] = bool(point.meets_itl_target)
        # On engines perf_skew times slower, every token takes perf_skew times longer.
        per_engine = point.thpt_tokens_per_s_per_gpu * decode_engine_gpus / perf_skew
        decode[k] = math.ceil(tokens[k] / interval_s / per_engine - 1e-9) if per_engine > 0 else 1
    active = requests > 0
    prefill = np.where(active, np.maximum(prefill, 1), 0)
    decode = np.where(active, np.maximum(decode, 1), 0)
    return IntervalNeeds(float(interval_s), prefill, decode, meets)


def _percentiles(values: FloatArray, prefix: str) -> dict[str, float | None]:
    finite = values[np.isfinite(values)]
    out: dict[str, float | None] = {}
    for q in (50, 90, 99):
        out[f"{prefix}_p{q}_s"] = float(np.percentile(finite, q)) if finite.size else None
    return out


def attainment(
    result: SimResult, ttft_target_s: float, itl_target_s: float
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Per request: TTFT met, ITL met. A request never served meets neither; a one-token output
    has no inter-token gap and meets the ITL target once it finished."""
    ttft = result.ttft_s
    ttft_ok = np.isfinite(ttft) & (ttft <= ttft_target_s)
    itl = result.itl_s
    single = result.osl_tokens <= 1
    itl_ok = np.where(single, result.finished, np.isfinite(itl) & (itl <= itl_target_s))
    return ttft_ok, itl_ok


def summary(
    result: SimResult,
    ttft_target_s: float,
    itl_target_s: float,
    lower_bound_gpu_hours: float,
) -> dict[str, Any]:
    """The run's scores (the keys of ``slaplanner simulate --json``)."""
    n = int(result.arrival_s.size)
    ttft_ok, itl_ok = attainment(result, ttft_target_s, itl_target_s)
    both = ttft_ok & itl_ok
    gpu_hours = result.gpu_seconds() / 3600.0
    return {
        "requests": n,
        "finished_requests": int(result.finished.sum()),
        "clipped_requests": int(result.clipped.sum()),
        "sla_attainment": float(both.mean()) if n else None,
        "ttft_attainment": float(ttft_ok.mean()) if n else None,
        "itl_attainment": float(itl_ok.mean()) if n else None,
        **_percentiles(result.ttft_s, "ttft"),
        **_percentiles(result.itl_s, "itl"),
        "gpu_hours": gpu_hours,
        "lower_bound_gpu_hours": lower_bound_gpu_hours,
        "gpu_hours_over_lower_bound": gpu_hours / lower_bound_gpu_hours
        if lower_bound_gpu_hours > 0
        else None,
    }
