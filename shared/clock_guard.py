"""The clock guard: a window that ends in the future was not observed, whatever its body says.

A window ends before its snapshot is published, so every honest body carries a ``window_end`` at
or before the clock of the service that reads it, give or take the skew between two machines'
clocks. One far ahead (a collector whose clock stepped forward, or a forged body) would freeze
whatever keeps "the newest window seen": a forecaster's history, the actuator's "last applied".
Pure: the caller passes its clock's reading.
"""

from __future__ import annotations


def window_ahead(window_end: float, now: float, tolerance_s: float) -> str | None:
    """Why a window ending at ``window_end`` is refused at ``now``, or None if it is not."""
    ahead = window_end - now
    if ahead <= tolerance_s:
        return None
    return (f"window_end {window_end:.3f} is {ahead:.0f} s ahead of this service's clock "
            f"(at most {tolerance_s:g} s allowed, SLAPLANNER_MAX_WINDOW_AHEAD_S): a clock "
            "stepped forward, or a forged body; refused, not stored as history")
