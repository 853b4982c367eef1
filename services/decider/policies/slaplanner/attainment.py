"""Predicted attainment: the share of requests a fleet keeps under each target, for a load.

Pure functions of numbers; the profile lookups happen in ``sizing.py``.

Prefill is a multi-server queue (``queueing.py``): a request's TTFT is its wait for a free engine
plus its own prefill time, so a request of prefill time ``s`` misses the target ``T`` when its
wait exceeds ``T - s``. With the Allen-Cunneen approximation for GI/G/c the wait is zero with
probability ``1 - C(c, a)`` and otherwise exponential with mean ``S F / (c - a)``, where
``S`` is the mean service time, ``a = lambda S`` the offered load in erlangs and
``F = (ca^2 + cs^2) / 2`` the variability factor (A. O. Allen, *Probability, Statistics and
Queueing Theory*, 2nd ed., 1990; W. Whitt, "Approximations for the GI/G/m queue", 1993). The
share of requests missing TTFT is that tail averaged over the prompt mix:

    miss(c) = sum_i w_i P(W > T - s_i)

``ca^2`` is the index of dispersion of per-second arrival counts (the renewal limit of a count
process's dispersion, Cox and Lewis 1966): what makes bunched arrivals queue, which a mean rate
hides. ``cs^2`` comes from the prompt mix itself. Fed each 15 s interval's own rate, prompt mix
and dispersion (30 to 180 there), it asks on the Azure code trace at x10 for 4.0 engines on
average where an exact FCFS replay of each interval needs 3.4 (0 to +2 per interval), while a
fluid view of each second's burst asks for 7.2.

Decode holds every request in flight in a continuous batch; with the number in flight Poisson
(M/G/infinity, Palm 1943) of mean ``L`` and ``c`` engines of ``k`` requests each at the ITL target,
a request sees a batch over capacity when the others in flight fill it: the size-biased count is
``1 + Poisson(L)``, so the share of requests decoded in an over-full batch is ``P(N >= c k)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from services.decider.policies.slaplanner import queueing

# Strata of the prompt mix: equal-probability slices of a lognormal fitted to the ISL quantiles,
# each at its middle quantile; the top slices are split finer, where TTFT misses come from.
_STRATA = np.concatenate([
    (np.arange(16) + 0.5) / 16.0 * 0.9,  # 0 .. 0.9 in 16 slices
    0.9 + (np.arange(8) + 0.5) / 8.0 * 0.09,  # 0.9 .. 0.99 in 8
    0.99 + (np.arange(4) + 0.5) / 4.0 * 0.01,  # 0.99 .. 1 in 4
])
_WEIGHTS = np.concatenate([np.full(16, 0.9 / 16), np.full(8, 0.09 / 8), np.full(4, 0.01 / 4)])
_Z = stats.norm.ppf(_STRATA)
# The widest lognormal a window's ISL quantiles may imply (sigma; p90/p50 = e^(1.28 sigma) ~ 13).
MAX_SIGMA = 2.0
Z90, Z99 = float(stats.norm.ppf(0.9)), float(stats.norm.ppf(0.99))
# A prompt whose prefill alone misses the target is sized for a wait of this share of it.
MIN_WAIT_SHARE = 0.1


@dataclass(frozen=True)
class PromptMix:
    """Prompt lengths as weighted points (tokens); one point when the spread is unknown."""

    isl_tokens: tuple[float, ...]
    weights: tuple[float, ...]
    measured: bool

    @property
    def mean(self) -> float:
        return float(np.dot(self.isl_tokens, self.weights))


def point_mix(isl_avg: float) -> PromptMix:
    return PromptMix((max(isl_avg, 0.0),), (1.0,), measured=False)


def lognormal_sigma(p50: float, p90: float | None, p99: float | None) -> float | None:
    """The spread of a lognormal through the median and the upper quantiles (least squares in
    log space over those known); ``None`` when none is known or they are inconsistent."""
    if not p50 > 0:
        return None
    pairs = [(z, math.log(q / p50)) for z, q in ((Z90, p90), (Z99, p99)) if q and q >= p50]
    if not pairs:
        return None
    sigma = sum(z * d for z, d in pairs) / sum(z * z for z, _ in pairs)
    return min(max(sigma, 0.0), MAX_SIGMA)


def measured_mix(
    isl_avg: float, p50: float | None, p90: float | None, p99: float | None
) -> PromptMix:
    """The prompt mix of a window: a lognormal through its ISL quantiles, rescaled so that its
    mean is the window's mean (the throughput arithmetic stays the mean's)."""
    sigma = lognormal_sigma(p50 or 0.0, p90, p99)
    if sigma is None or not isl_avg > 0 or p50 is None:
        return point_mix(isl_avg)
    points = p50 * np.exp(sigma * _Z)
    points *= isl_avg / float(np.dot(points, _WEIGHTS))
    return PromptMix(tuple(points.tolist()), tuple(_WEIGHTS.tolist()), measured=True)


def lognormal_mix(sigma: float, isl_avg: float = 1.0) -> PromptMix:
    """A lognormal mix of spread ``sigma`` and mean ``isl_avg``."""
    points = np.exp(min(max(sigma, 0.0), MAX_SIGMA) * _Z)
    points *= isl_avg / float(np.dot(points, _WEIGHTS))
    return PromptMix(tuple(points.tolist()), tuple(_WEIGHTS.tolist()), measured=True)


def scaled_mix(mix: PromptMix, isl_avg: float) -> PromptMix:
    """The same spread around another mean (a forecast step's)."""
    mean = mix.mean
    if not mean > 0 or len(mix.isl_tokens) == 1:
        return point_mix(isl_avg)
    ratio = max(isl_avg, 0.0) / mean
    return PromptMix(tuple(x * ratio for x in mix.isl_tokens), mix.weights, mix.measured)


@dataclass(frozen=True)
class PrefillQueue:
    """A prefill load on a profile: service and latency per mix point, engine-seconds each."""

    rate_per_s: float
    service_s: np.ndarray  # engine-seconds per request, per mix point
    latency_s: np.ndarray  # prefill time of a request, per mix point
    weights: np.ndarray
    arrival_cv2: float
    service_cv2_default: float  # used when the mix is one point (spread unknown)

    @property
    def mean_service_s(self) -> float:
        return float(np.dot(self.service_s, self.weights))

    @property
    def offered_load(self) -> float:
        return self.rate_per_s * self.mean_service_s

    @property
    def service_cv2(self) -> float:
        if self.service_s.size == 1:
            return self.service_cv2_default
        mean = self.mean_service_s
        if not mean > 0:
            return 0.0
        second = float(np.dot(self.service_s**2, self.weights))
        return max(second / mean**2 - 1.0, 0.0)

    @property
    def variability(self) -> float:
        return queueing.allen_cunneen_factor(self.arrival_cv2, self.service_cv2)

    def slack_s(self, target_s: float) -> np.ndarray:
        """The wait each prompt may have within the target; a prompt whose prefill alone misses
        it misses whatever the engine count, so it is sized for a short wait (a tenth of its
        prefill time) rather than for none, which no count could give."""
        return np.maximum(target_s - self.latency_s, MIN_WAIT_SHARE * self.latency_s)

    def unreachable_share(self, target_s: float) -> float:
        """Share of requests whose prefill time alone exceeds the target."""
        return float(np.dot(self.weights, self.latency_s >= target_s))


def _queue_share(queue: PrefillQueue, slack: np.ndarray, c: int, blocking: float) -> float:
    """The GI/G/c wait tail averaged over the prompt mix, with ``c`` engines (``c > a``)."""
    a = queue.offered_load
    waiting = queueing.erlang_c_from_b(c, a, blocking)
    decay = (c - a) / (queue.mean_service_s * max(queue.variability, 1e-9))
    return waiting * float(np.dot(queue.weights, np.exp(-decay * slack)))


def prefill_miss_shares(queue: PrefillQueue, target_s: float, up_to: int) -> list[float]:
    """Predicted share of requests missing TTFT with 0 .. ``up_to`` engines; where the engines
    cannot keep up (``c <= a``) the share is above 1, by how far they fall short, so that the
    shares still order the counts."""
    a = queue.offered_load
    if not a > 0:
        return [0.0] * (up_to + 1)
    slack = queue.slack_s(target_s)
    shares = [2.0]
    blocking = 1.0
    for c in range(1, up_to + 1):
        blocking = a * blocking / (c + a * blocking)
        if c <= a:
            shares.append(1.0 + (a - c) / a)
            continue
        shares.append(min(_queue_share(queue, slack, c, blocking), 1.0))
    return shares


@dataclass(frozen=True)
class Found:
    engines: int
    share: float  # predicted miss share with that many
    reached: bool  # False: no count up to the most reaches the budget


def fewest_prefill(queue: PrefillQueue, target_s: float, budget: float, most: int) -> Found:
    """The fewest engines (at most ``most``) whose predicted TTFT miss share (as
    ``prefill_miss_shares``) is within ``budget``: one walk up, carrying Erlang B."""
    a = queue.offered_load
    if not a > 0:
        return Found(0, 0.0, True)
    slack = queue.slack_s(target_s)
    blocking = 1.0
    share = 2.0
    for c in range(1, most + 1):
        blocking = a * blocking / (c + a * blocking)
        if c <= a:
            continue
        share = _queue_share(queue, slack, c, blocking)
        if share <= budget:
            return Found(c, share, True)
    return Found(most, share, False)


def decode_miss_shares(mean_in_flight: float, per_engine: float, up_to: int) -> list[float]:
    """Predicted share of requests decoded in a batch beyond what ``c`` engines hold at the ITL
    target, for 0 .. ``up_to`` engines (above 1 where the mean alone exceeds capacity)."""
    if not mean_in_flight > 0:
        return [0.0] * (up_to + 1)
    shares: list[float] = []
    for c in range(up_to + 1):
        capacity = c * per_engine
        if capacity <= mean_in_flight:
            shares.append(1.0 + (mean_in_flight - capacity) / mean_in_flight)
        else:
            shares.append(float(stats.poisson.sf(math.ceil(capacity) - 1, mean_in_flight)))
    return shares


def fewest_reaching(shares: list[float], budget: float) -> tuple[int, bool]:
    """The fewest engines whose predicted miss share is within ``budget``, and whether any is
    (if none, the most engines considered)."""
    for count, share in enumerate(shares):
        if share <= budget:
            return count, True
    return len(shares) - 1, False
