"""Queueing arithmetic for sizing: prefill as an M/G/c queue, decode as an M/G/infinity system.

Pure functions of numbers; nothing here knows a profile, a message or a clock.

Prefill. A prefill engine takes one request at a time (in the bundled profile, throughput x TTFT
equals the ISL at every point: the engine is busy for the whole TTFT of a request), requests wait
for a free engine, and TTFT = wait + prefill time. That is a multi-server queue. With Poisson
arrivals and exponential service (M/M/c), Erlang's C formula gives the probability of waiting,
and the wait beyond zero is exponential with rate ``c mu - lambda``:

    P(W > t) = C(c, a) * exp(-(c - a) * t / S),        a = lambda * S (offered load, erlangs)

(A. K. Erlang, 1917; e.g. L. Kleinrock, *Queueing Systems* vol. 1, 1975, section 3.5, or
Gross, Shortle, Thompson and Harris, *Fundamentals of Queueing Theory*, 4th ed., section 2.3).
Real prefill times are not exponential and real arrivals are not Poisson; the Allen-Cunneen
approximation for GI/G/c scales the M/M/c waiting time by ``(ca^2 + cs^2) / 2``, the mean of the
squared coefficients of variation of inter-arrival and service times (A. O. Allen, *Probability,
Statistics and Queueing Theory*, 2nd ed., 1990; W. Whitt, "Approximations for the GI/G/m queue",
Production and Operations Management 2(2), 1993). We keep the M/M/c probability of waiting and
stretch the exponential tail by the same factor, which gives the Allen-Cunneen mean exactly. Why
this and not M/D/c: prompt lengths vary widely (the Mooncake trace's p90 is several times its
median), so prefill time is far from deterministic, and arrivals come in bursts; one variability
factor covers both, has a closed form, and reduces to M/M/c (factor 1) and to the usual M/D/c
approximation (factor 1/2) at its ends.

Decode. With continuous batching every request in flight holds a decode slot from its first
token to its last, and nobody waits for a slot as long as KV capacity lasts: an infinite-server
system. By Little's law the mean number in flight is ``L = lambda * W`` (J. D. C. Little, "A proof
for the queuing formula L = lambda W", Operations Research 9(3), 1961), with ``W = OSL * ITL``;
for M/G/infinity the number in flight is exactly Poisson with that mean, whatever the
distribution of the holding time (C. Palm, "Intensitatsschwankungen im Fernsprechverkehr",
Ericsson Technics 44, 1943; L. Takacs, *Introduction to the Theory of Queues*, 1962), so a
quantile of the concurrency is a Poisson quantile.
"""

from __future__ import annotations

import math

from scipy import special, stats


def allen_cunneen_factor(arrival_cv2: float, service_cv2: float) -> float:
    """``(ca^2 + cs^2) / 2``: 1 for M/M/c, 1/2 for M/D/c, more for bursty arrivals."""
    return (arrival_cv2 + service_cv2) / 2.0


def erlang_b(servers: int, offered_load: float) -> float:
    """Erlang's loss formula by its stable recursion ``B(k) = a B(k-1) / (k + a B(k-1))``."""
    blocking = 1.0
    for k in range(1, servers + 1):
        blocking = offered_load * blocking / (k + offered_load * blocking)
    return blocking


def erlang_c_from_b(servers: int, offered_load: float, blocking: float) -> float:
    """Probability of waiting in M/M/c, from Erlang B: ``C = B / (1 - rho (1 - B))``."""
    if offered_load <= 0.0:
        return 0.0
    if servers <= offered_load:
        return 1.0
    rho = offered_load / servers
    return blocking / (1.0 - rho * (1.0 - blocking))


def erlang_c(servers: int, offered_load: float) -> float:
    """Probability that an arrival waits in M/M/c with ``offered_load`` erlangs (1 if unstable)."""
    if offered_load <= 0.0:
        return 0.0
    if servers <= offered_load:
        return 1.0
    return erlang_c_from_b(servers, offered_load, erlang_b(servers, offered_load))


def mean_wait_s(servers: int, offered_load: float, service_s: float, variability: float) -> float:
    """Mean wait (Allen-Cunneen): ``C(c, a) * S / (c - a) * (ca^2 + cs^2) / 2``; inf if unstable."""
    if offered_load <= 0.0:
        return 0.0
    if servers <= offered_load:
        return math.inf
    return erlang_c(servers, offered_load) * service_s / (servers - offered_load) * variability


def poisson_quantile(mean: float, quantile: float) -> float:
    """The ``quantile`` of a Poisson count with this mean (M/G/infinity occupancy)."""
    if not mean > 0.0:
        return 0.0
    if not 0.0 < quantile < 1.0:
        return float(stats.poisson.ppf(quantile, mean))
    # scipy's own poisson._ppf, without stats.poisson.ppf's generic argument handling, which
    # costs ten times the arithmetic and is called for every lookahead step of every forecast.
    inverse = float(special.pdtrik(quantile, mean))
    if not math.isfinite(inverse):
        # A mean beyond the inversion's range (~1e300, or infinite, from a runaway forecast):
        # its spread, sqrt(mean), is nothing beside it.
        return mean
    count = math.ceil(inverse)
    below = max(count - 1, 0)
    return float(below if special.pdtr(below, mean) >= quantile else count)


def poisson_rate_lower(count: float, window_s: float, confidence: float) -> float:
    """A lower confidence bound of a Poisson rate seen as ``count`` events in ``window_s``
    (the exact Garwood bound, ``chi2.ppf(1 - confidence, 2n) / 2``), per second."""
    if not count > 0.0 or not window_s > 0.0:
        return 0.0
    return float(stats.chi2.ppf(1.0 - confidence, 2.0 * count)) / 2.0 / window_s
