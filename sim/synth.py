"""Synthetic request traces: Poisson arrivals whose rate follows a sine between two rates.

The rate is Dynamo's ``sin_synth`` formula (ai-dynamo/dynamo, ``benchmarks/sin_load_generator``,
Apache-2.0), which starts at the minimum::

    rate(t) = (min + max) / 2 + (max - min) / 2 * sin(2 * pi * t / period - pi / 2)

Arrivals are an exact non-homogeneous Poisson process (thinning of a homogeneous one at the
maximum rate), not a per-second approximation. Input and output lengths are fixed, lognormal
around a mean with a given coefficient of variation, or sampled (as pairs) from a real trace.
Traces are written as Mooncake JSONL (``timestamp`` in integer milliseconds), which
``shared.traces.load_trace`` and Dynamo's tools read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import orjson

from shared.traces import Trace

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Dynamo's block size for ``hash_ids`` (one id per 512-token prompt block).
HASH_BLOCK_TOKENS = 512


@dataclass(frozen=True)
class SineLoad:
    """Arrival rate between ``rate_min_per_s`` and ``rate_max_per_s`` over ``period_s``."""

    duration_s: float
    rate_min_per_s: float
    rate_max_per_s: float
    period_s: float
    isl_tokens: int
    osl_tokens: int
    isl_cv: float = 0.0  # 0: every request has exactly isl_tokens
    osl_cv: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.duration_s > 0:
            raise ValueError(f"duration must be positive, got {self.duration_s!r}")
        if not 0 <= self.rate_min_per_s <= self.rate_max_per_s:
            raise ValueError("rates must satisfy 0 <= min <= max")
        if not self.rate_max_per_s > 0:
            raise ValueError("the maximum rate must be positive")
        if not self.period_s > 0:
            raise ValueError(f"period must be positive, got {self.period_s!r}")
        if self.isl_tokens < 1 or self.osl_tokens < 1:
            raise ValueError("input and output lengths must be >= 1 token")
        if self.isl_cv < 0 or self.osl_cv < 0:
            raise ValueError("coefficients of variation must be >= 0")

    def rate_per_s(self, t_s: FloatArray) -> FloatArray:
        middle = (self.rate_min_per_s + self.rate_max_per_s) / 2.0
        half = (self.rate_max_per_s - self.rate_min_per_s) / 2.0
        return middle + half * np.sin(2.0 * np.pi * t_s / self.period_s - np.pi / 2.0)


# Dynamo's planner test scenario on the H200 profile: 12 to 36 requests/s, period 600 s, 1,800 s,
# ISL 3000 / OSL 300.
DYNAMO_SINE = SineLoad(
    duration_s=1800.0,
    rate_min_per_s=12.0,
    rate_max_per_s=36.0,
    period_s=600.0,
    isl_tokens=3000,
    osl_tokens=300,
)


def _lengths(rng: np.random.Generator, mean: int, cv: float, size: int) -> IntArray:
    if cv == 0:
        return np.full(size, mean, dtype=np.int64)
    sigma = math.sqrt(math.log1p(cv * cv))
    values = rng.lognormal(math.log(mean) - sigma * sigma / 2.0, sigma, size)
    return np.maximum(np.rint(values), 1).astype(np.int64)


def generate(load: SineLoad, lengths_from: Trace | None = None, name: str = "sine") -> Trace:
    """A trace for ``load``; with ``lengths_from``, (ISL, OSL) pairs are drawn from that trace."""
    rng = np.random.default_rng(load.seed)
    candidates = rng.poisson(load.rate_max_per_s * load.duration_s)
    times = np.sort(rng.uniform(0.0, load.duration_s, candidates))
    keep = rng.uniform(0.0, load.rate_max_per_s, candidates) < load.rate_per_s(times)
    arrival = times[keep]
    n = arrival.size
    if lengths_from is not None:
        if len(lengths_from) == 0:
            raise ValueError("the trace to sample lengths from has no requests")
        pick = rng.integers(0, len(lengths_from), n)
        isl = np.asarray(lengths_from.isl_tokens, dtype=np.int64)[pick]
        osl = np.asarray(lengths_from.osl_tokens, dtype=np.int64)[pick]
    else:
        isl = _lengths(rng, load.isl_tokens, load.isl_cv, n)
        osl = _lengths(rng, load.osl_tokens, load.osl_cv, n)
    return Trace(arrival, isl, osl, name)


def write_mooncake(trace: Trace, path: str | Path) -> int:
    """Write ``trace`` as Mooncake JSONL; returns the number of requests written.

    ``hash_ids`` gives each request its own prompt blocks (no shared prefixes), as Dynamo's
    synthesiser does when prefix caching is not modelled.
    """
    next_block = 0
    with Path(path).open("wb") as out:
        stamps = np.rint(trace.arrival_s * 1000.0).astype(np.int64).tolist()
        for stamp, isl, osl in zip(
            stamps, trace.isl_tokens.tolist(), trace.osl_tokens.tolist(), strict=True
        ):
            blocks = max(1, -(-isl // HASH_BLOCK_TOKENS))
            row = {
                "timestamp": stamp,
                "input_length": isl,
                "output_length": osl,
                "hash_ids": list(range(next_block, next_block + blocks)),
            }
            next_block += blocks
            out.write(orjson.dumps(row) + b"\n")
    return len(trace)


# ---------------------------------------------------------------------------------------------
# Shaped loads: a piecewise-linear arrival rate, with bursts inside each second's neighbourhood


@dataclass(frozen=True)
class ShapedLoad:
    """An arrival rate that is linear between knots, and how bursty arrivals are around it.

    ``dispersion`` is the per-second index of dispersion of the request counts (variance over
    mean of the counts of the seconds of one minute): 1 is a Poisson process, more is burstier.
    Each second's count is Poisson with a gamma-distributed mean (a negative binomial), whose
    variance is ``dispersion`` times its mean whatever the rate.
    """

    knots_s: tuple[float, ...]
    rates_per_s: tuple[float, ...]
    dispersion: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.knots_s) < 2 or len(self.knots_s) != len(self.rates_per_s):
            raise ValueError("a shape needs at least two knots, each with a rate")
        if self.knots_s[0] != 0.0 or any(
            b <= a for a, b in zip(self.knots_s, self.knots_s[1:], strict=False)
        ):
            raise ValueError("knots start at 0 s and increase")
        if any(not (r >= 0 and math.isfinite(r)) for r in self.rates_per_s):
            raise ValueError("rates must be finite and >= 0")
        if not max(self.rates_per_s) > 0:
            raise ValueError("the highest rate must be positive")
        if not (self.dispersion >= 1.0 and math.isfinite(self.dispersion)):
            raise ValueError(f"dispersion must be >= 1, got {self.dispersion!r}")

    @property
    def duration_s(self) -> float:
        return self.knots_s[-1]

    def rate_per_s(self, t_s: FloatArray) -> FloatArray:
        return np.interp(t_s, self.knots_s, self.rates_per_s)


# A working day, as fractions of its peak by hour of the day: a night trough at 15 %, a morning
# ramp, a plateau from mid-morning with a dip at lunch, and the day's peak in the evening.
DAY_SHAPE: tuple[tuple[float, float], ...] = (
    (0.0, 0.32), (2.0, 0.18), (4.0, 0.15), (5.5, 0.15), (7.0, 0.30), (9.0, 0.75),
    (10.0, 0.82), (12.0, 0.82), (12.5, 0.62), (13.5, 0.62), (14.5, 0.82), (17.0, 0.82),
    (18.5, 0.95), (19.5, 1.0), (21.0, 1.0), (22.5, 0.62), (24.0, 0.32),
)


def day_load(peak_rate_per_s: float, dispersion: float = 1.0, seed: int = 0) -> ShapedLoad:
    """24 hours of ``DAY_SHAPE`` at ``peak_rate_per_s``."""
    return ShapedLoad(
        tuple(hour * 3600.0 for hour, _ in DAY_SHAPE),
        tuple(share * peak_rate_per_s for _, share in DAY_SHAPE),
        dispersion,
        seed,
    )


def flash_crowd_load(
    base_rate_per_s: float,
    factor: float = 3.0,
    before_s: float = 900.0,
    rise_s: float = 60.0,
    hold_s: float = 1200.0,
    after_s: float = 900.0,
    dispersion: float = 1.0,
    seed: int = 0,
) -> ShapedLoad:
    """A steady load that rises ``factor`` times within ``rise_s``, holds, and falls back as
    fast."""
    t1 = before_s
    t2 = t1 + rise_s
    t3 = t2 + hold_s
    t4 = t3 + rise_s
    peak = base_rate_per_s * factor
    return ShapedLoad(
        (0.0, t1, t2, t3, t4, t4 + after_s),
        (base_rate_per_s, base_rate_per_s, peak, peak, base_rate_per_s, base_rate_per_s),
        dispersion,
        seed,
    )


def ramp_load(
    base_rate_per_s: float,
    factor: float = 4.0,
    ramp_s: float = 7200.0,
    before_s: float = 600.0,
    after_s: float = 600.0,
    dispersion: float = 1.0,
    seed: int = 0,
) -> ShapedLoad:
    """A steady load that rises linearly ``factor`` times over ``ramp_s``, then stays there."""
    top = base_rate_per_s * factor
    return ShapedLoad(
        (0.0, before_s, before_s + ramp_s, before_s + ramp_s + after_s),
        (base_rate_per_s, base_rate_per_s, top, top),
        dispersion,
        seed,
    )


def per_second_dispersion(*arrivals_s: FloatArray) -> float:
    """The index of dispersion of per-second request counts inside each minute, pooled over the
    minutes with requests of every timeline given (the sum of the minutes' variances over the
    sum of their means), so that the load's drift from minute to minute is not counted as
    burstiness."""
    variance = mean = 0.0
    for arrival in arrivals_s:
        if arrival.size == 0:
            continue
        whole = np.floor(arrival)
        seconds = (whole - whole.min()).astype(np.int64)
        counts = np.bincount(seconds)
        minutes = -(-counts.size // 60)
        counts = np.pad(counts, (0, minutes * 60 - counts.size)).reshape(minutes, 60)
        means = counts.mean(axis=1)
        busy = means > 0
        variance += float(counts.var(axis=1)[busy].sum())
        mean += float(means[busy].sum())
    if mean == 0:
        raise ValueError("no requests to measure")
    return variance / mean


def generate_shaped(
    load: ShapedLoad, lengths_from: Sequence[Trace], name: str = "shaped"
) -> Trace:
    """A trace for ``load``, its (ISL, OSL) pairs drawn from the requests of ``lengths_from``
    (all of them pooled)."""
    if not lengths_from or sum(len(t) for t in lengths_from) == 0:
        raise ValueError("give at least one trace with requests to draw lengths from")
    rng = np.random.default_rng(load.seed)
    seconds = np.arange(math.ceil(load.duration_s), dtype=np.float64)
    mean = load.rate_per_s(seconds + 0.5) * np.minimum(1.0, load.duration_s - seconds)
    if load.dispersion > 1.0:
        # Gamma mixing: variance = mean + mean^2 / shape = dispersion * mean.
        shape = np.maximum(mean, 1e-12) / (load.dispersion - 1.0)
        mean = rng.gamma(shape, 1.0 / shape) * mean
    counts = rng.poisson(mean)
    arrival = np.repeat(seconds, counts) + rng.uniform(0.0, 1.0, int(counts.sum()))
    # Whole milliseconds, as the trace file keeps them, so that a trace written by
    # ``slaplanner trace synth`` and read back is this one exactly.
    arrival = np.sort(np.rint(arrival[arrival < load.duration_s] * 1000.0) / 1000.0)
    isl = np.concatenate([np.asarray(t.isl_tokens, dtype=np.int64) for t in lengths_from])
    osl = np.concatenate([np.asarray(t.osl_tokens, dtype=np.int64) for t in lengths_from])
    pick = rng.integers(0, isl.size, arrival.size)
    return Trace(arrival, isl[pick], osl[pick], name)


# The shaped scenarios of the planning benchmark (``slaplanner trace synth --shape NAME`` writes
# the same traces): request lengths drawn from both bundled traces, bursts as dispersed as theirs.
SHAPES = ("day", "flash-crowd", "ramp")
DEFAULT_RATES = {"day": 32.0, "flash-crowd": 10.0, "ramp": 8.0}  # peak, base, base (requests/s)


def bundled_traces() -> list[Trace]:
    from shared import traces

    return [traces.load_trace(traces.bundled_trace_path(name))
            for name in ("azure_llm_2023_code.csv", "mooncake_conversation.jsonl")]


def shaped(shape: str, rate_per_s: float | None = None, dispersion: float | None = None,
           seed: int = 0) -> ShapedLoad:
    """The load of a named shape; ``dispersion`` defaults to the bundled traces' own."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    rate = DEFAULT_RATES[shape] if rate_per_s is None else rate_per_s
    if dispersion is None:
        dispersion = per_second_dispersion(*(t.arrival_s for t in bundled_traces()))
    if shape == "day":
        return day_load(rate, dispersion, seed)
    if shape == "flash-crowd":
        return flash_crowd_load(rate, dispersion=dispersion, seed=seed)
    return ramp_load(rate, dispersion=dispersion, seed=seed)


def shaped_trace(shape: str, rate_per_s: float | None = None, seed: int = 0) -> Trace:
    """A benchmark scenario's trace: ``shaped`` load, lengths from both bundled traces."""
    return generate_shaped(shaped(shape, rate_per_s, seed=seed), bundled_traces(), name=shape)
