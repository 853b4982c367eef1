"""Correction factors that learn how far the engines are from their profile, calmly.

A factor says how much slower (above 1) or faster (below 1) the engines are than profiled. Dynamo
recomputes its factors from each window alone, so a window of two requests that happened to meet
a cold cache can swing the fleet. Here each window's observation is

1. clamped to ``[minimum, maximum]`` (no single window can claim a 50x slowdown), then
2. averaged into the factor with a weight equal to its request count, against the weight the
   factor already carries: ``f' = (W f + n x) / (W + n)``, where ``W`` is the past weight decayed
   with a half-life in seconds and never less than ``min_weight_requests``.

So a window of 2 requests moves a factor by at most ``2 / (min_weight + 2)`` of the distance to
its (clamped) observation, a busy window moves it a lot, and a factor forgets old evidence at a
known rate. This is an exponentially weighted moving average whose per-sample weight is the
sample's request count (the usual count-weighted EWMA of rate estimators).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class CorrectionKnobs:
    half_life_s: float = 120.0
    min_weight_requests: float = 50.0
    minimum: float = 0.5
    maximum: float = 3.0


@dataclass(frozen=True)
class Correction:
    """A smoothed factor, the request weight behind it and when it was last updated."""

    factor: float = 1.0
    weight_requests: float = 0.0
    updated_at_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "weight_requests": self.weight_requests,
            "updated_at_s": self.updated_at_s,
        }


def clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def updated(
    correction: Correction,
    observed_factor: float,
    requests: float,
    now_s: float,
    knobs: CorrectionKnobs,
) -> tuple[Correction, dict[str, Any]]:
    """The correction after one window's observation; and how it was computed."""
    if not (math.isfinite(observed_factor) and observed_factor > 0 and requests > 0):
        return correction, {"updated": False, "note": "no usable observation in this window"}
    clamped = clamp(observed_factor, knobs.minimum, knobs.maximum)
    elapsed = 0.0 if correction.updated_at_s is None else max(0.0, now_s - correction.updated_at_s)
    decay = 0.5 ** (elapsed / knobs.half_life_s) if knobs.half_life_s > 0 else 0.0
    past_weight = max(correction.weight_requests * decay, knobs.min_weight_requests)
    factor = (past_weight * correction.factor + requests * clamped) / (past_weight + requests)
    factor = clamp(factor, knobs.minimum, knobs.maximum)
    new = replace(
        correction, factor=factor, weight_requests=past_weight + requests, updated_at_s=now_s
    )
    return new, {
        "updated": True,
        "observed_factor": observed_factor,
        "observed_factor_clamped": clamped,
        "requests": requests,
        "past_weight_requests": past_weight,
        "window_weight": requests / (past_weight + requests),
        "previous_factor": correction.factor,
        "factor": factor,
    }
