"""Window schedule (pure): aligned window ends, evaluated once each, in order, never drifting.

Window ``k`` ends at ``k * interval_s`` (seconds since the epoch). Its values are read after
``delay_s`` (so that the last scrape before the end has been ingested) but always *at* its end, so
a late wake-up or a slow query changes when a window is read, never which window it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def next_boundary(now: float, interval_s: float) -> float:
    """The first multiple of the interval after ``now``: ticks never drift with slow scrapes."""
    return (now // interval_s + 1.0) * interval_s


def first_index(now: float, interval_s: float, delay_s: float) -> int:
    """The first window to read after a start at ``now``: the earliest one not yet due."""
    return math.floor((now - delay_s) / interval_s) + 1


def end_of(index: int, interval_s: float) -> float:
    return index * interval_s


def due_at(index: int, interval_s: float, delay_s: float) -> float:
    """When window ``index`` may be read: its end plus the ingestion delay."""
    return index * interval_s + delay_s


@dataclass(frozen=True)
class CatchUp:
    index: int  # the window to read now
    skipped: tuple[int, ...]  # windows too far behind to read; published as stale


def catch_up(index: int, now: float, interval_s: float, delay_s: float,
             max_backlog: int) -> CatchUp:
    """After a slow window, read every window that is due, in order, unless more than
    ``max_backlog`` are: then the oldest ones are given up (and said so), never silently."""
    latest_due = math.floor((now - delay_s) / interval_s)
    backlog = latest_due - index + 1
    if backlog <= max_backlog:
        return CatchUp(index, ())
    start = latest_due - max_backlog + 1
    return CatchUp(start, tuple(range(index, start)))


@dataclass(frozen=True)
class Resume:
    index: int  # the first window to read
    missed: int  # windows that came due since the last one published: read now, at their ends
    given_up: int  # older missed windows, beyond the backlog: neither read nor published


def resume(last_published_end: float | None, now: float, interval_s: float, delay_s: float,
           max_backlog: int) -> Resume:
    """Where a (re)started collector begins: the window after the last one it published, so the
    windows that came due while it was down are read now, each at its own end (Prometheus keeps
    their samples), up to ``max_backlog`` of them. Nothing published yet: the first window not
    yet due."""
    first = first_index(now, interval_s, delay_s)
    if last_published_end is None:
        return Resume(first, 0, 0)
    # The first window ending after the last one published (the epsilon absorbs a quotient
    # k * interval / interval landing just under k), but never one not yet due (clock stepped back).
    after_last = min(math.floor(last_published_end / interval_s + 1e-9) + 1, first)
    start = max(after_last, first - max_backlog)
    return Resume(start, first - start, start - after_last)
