"""Scale-down stabilisation and step limits, after the Kubernetes HPA's behaviour.

The HPA (``pkg/controller/podautoscaler/horizontal.go``, ``stabilizeRecommendationWithBehaviors``
and ``convertDesiredReplicasWithBehaviorRate``; documented under "Configurable scaling behavior"
in the Kubernetes HPA docs) keeps the recommendations of the last ``stabilizationWindowSeconds``
(300 s by default for scale-down) and scales down only to the *highest* of them, so a brief dip
does not remove capacity that a rebound needs back; it scales up at once. Each move is then
limited by policies such as "at most 4 pods or 100 %, whichever is more". Our steps do the same
with ``now`` passed in (no clock) and return ``(replicas, reason)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from shared.explanation import Rule


@dataclass(frozen=True)
class Recommendation:
    """What one decision wanted for both roles at one moment (before stabilisation)."""

    at_s: float
    prefill: int
    decode: int


def record(
    window: Sequence[Recommendation], now_s: float, prefill: int, decode: int, window_s: float
) -> tuple[Recommendation, ...]:
    """The window with this recommendation added and those older than ``window_s`` dropped.

    A recommendation dated in the future of ``now_s`` (a message from a clock ahead of this
    one) is dropped too, so that one bad timestamp cannot pin the deployment up for ever.
    """
    kept = tuple(r for r in window if now_s - window_s <= r.at_s <= now_s)
    return (*kept, Recommendation(now_s, prefill, decode))


def window_max(window: Sequence[Recommendation], role: str) -> int | None:
    """The highest recommendation of a role in the window, ``None`` if it is empty."""
    values = [r.prefill if role == "prefill" else r.decode for r in window]
    return max(values) if values else None


def scale_down_stabilised(
    desired: int, current: int | None, highest_in_window: int | None
) -> tuple[int, Rule]:
    """Up at once; down only to the highest recommendation of the window (never above current).

    This is the HPA's rule with no scale-up window: ``desired`` if it is above ``current``,
    otherwise ``min(current, max(window))``.
    """
    if current is None or desired >= current or highest_in_window is None:
        return desired, Rule.WITHIN_BOUNDS
    stabilised = min(current, max(desired, highest_in_window))
    if stabilised > desired:
        return stabilised, Rule.SCALE_DOWN_STABILISED
    return desired, Rule.WITHIN_BOUNDS


def step_limited(
    desired: int,
    current: int | None,
    up_replicas: int,
    up_percent: float,
    down_replicas: int,
    down_percent: float,
) -> tuple[int, Rule]:
    """At most ``max(up_replicas, up_percent of current)`` more replicas in one step, and at most
    ``max(down_replicas, down_percent of current)`` fewer (the HPA takes the most permissive of
    its policies by default, ``selectPolicy: Max``)."""
    if current is None:
        return desired, Rule.WITHIN_BOUNDS
    if desired > current:
        most = current + max(up_replicas, math.ceil(current * up_percent / 100.0))
        if desired > most:
            return most, Rule.STEP_LIMIT_UP
    elif desired < current:
        least = current - max(down_replicas, math.floor(current * down_percent / 100.0))
        if desired < least:
            return least, Rule.STEP_LIMIT_DOWN
    return desired, Rule.WITHIN_BOUNDS


def release_at(
    window: Sequence[Recommendation], role: str, desired: int, window_s: float
) -> float | None:
    """When the window stops holding ``role`` above ``desired``: the last recommendation above
    it leaves the window then (``None``: nothing holds it)."""
    above = [r.at_s for r in window if (r.prefill if role == "prefill" else r.decode) > desired]
    return max(above) + window_s if above else None
