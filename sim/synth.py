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
