"""Fast counts of what the prefill queue does, for references that try many fleets.

The simulator's prefill is one FCFS queue served by the first free worker (``sim.cluster``);
whether a request meets the TTFT target depends on the prefill fleet only, never on decode. Two
tools exploit that:

- ``interval_misses``: for each interval alone (its own requests, every worker free at its
  start) and each prefill count, how many of its requests miss the TTFT target. All intervals
  are run side by side, one request position at a time, as numpy rows, so that a day of
  1,440 intervals costs a few thousand vector steps per count instead of a heap operation per
  request and count;
- ``PrefillReplay``: the whole run's first-token times for a schedule of prefill counts, with
  the startup delay, exactly as the simulator computes them (the same queue, the same choice of
  workers to cancel or retire), without simulating decode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from sim.cluster import Cluster, Role, Worker, _Prefill

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def interval_index(arrival_s: FloatArray, interval_s: float) -> IntArray:
    """The window of each arrival, as the simulator's loop counts windows."""
    return np.floor_divide(arrival_s, interval_s).astype(np.int64)


@dataclass(frozen=True)
class Carry:
    """What a whole run leaves at the start of each interval: the prefill workers' busy-until
    times (of the requests they are serving then) and the requests still queued."""

    busy_until_s: list[FloatArray]  # per interval, descending
    queued: list[IntArray]  # per interval, indices of queued requests in arrival order

    @classmethod
    def of_run(
        cls, arrival_s: FloatArray, start_s: FloatArray, end_s: FloatArray, interval_s: float,
        intervals: int,
    ) -> Carry:
        """From a run's prefill start and end times (NaN where a request never started)."""
        start = np.where(np.isnan(start_s), np.inf, start_s)
        end = np.where(np.isnan(end_s), np.inf, end_s)
        busy: list[list[float]] = [[] for _ in range(intervals)]
        # In service across a boundary k * interval: start < boundary < end.
        first = np.floor_divide(start, interval_s) + 1
        last = np.ceil(end / interval_s) - 1
        for i in np.flatnonzero((first <= last) & np.isfinite(start)).tolist():
            for k in range(int(first[i]), min(int(last[i]), intervals - 1) + 1):
                busy[k].append(float(end[i]))
        queued: list[list[int]] = [[] for _ in range(intervals)]
        # Queued at a boundary: arrival < boundary <= start.
        first = np.floor_divide(arrival_s, interval_s) + 1
        last = np.floor_divide(np.minimum(start, intervals * interval_s), interval_s)
        for i in np.flatnonzero(first <= last).tolist():
            for k in range(int(first[i]), min(int(last[i]), intervals - 1) + 1):
                queued[k].append(i)
        return cls(
            [np.sort(np.asarray(b, dtype=np.float64))[::-1] for b in busy],
            [np.asarray(q, dtype=np.int64) for q in queued],
        )


def interval_misses(
    arrival_s: FloatArray,
    service_s: FloatArray,
    interval_s: float,
    intervals: int,
    ttft_target_s: float,
    most: int,
    carry: Carry | None = None,
) -> IntArray:
    """``misses[k, n]``: requests of interval ``k`` over the TTFT target with ``n`` prefill
    workers serving it (``n`` = 0: all of them).

    Each interval is run alone: from an empty queue and idle workers, or, with ``carry``, from
    what a whole run left at its start (the ``n`` busiest workers keep their work, as a
    scale-down stops the least loaded; the queued requests go first and are not counted here,
    they belong to an earlier interval). Arrivals must be sorted; ``service_s`` is each
    request's prefill time on the real engines. Counts above the first that misses nothing are
    not run (with FCFS one more worker never delays a request).
    """
    index = interval_index(arrival_s, interval_s)
    if index.size and (index[0] < 0 or index[-1] >= intervals):
        raise ValueError("every arrival must fall in one of the intervals")
    counts = np.bincount(index, minlength=intervals).astype(np.int64)
    table = np.zeros((intervals, most + 1), dtype=np.int64)
    table[:, 0] = counts
    if index.size == 0 or most < 1:
        return table
    queued = [np.zeros(0, dtype=np.int64)] * intervals if carry is None else carry.queued
    lengths = counts + np.asarray([q.size for q in queued], dtype=np.int64)
    # One row per interval with requests, longest first, so that the rows still running at
    # request position i are always a prefix.
    rows = np.argsort(-lengths, kind="stable")
    rows = rows[counts[rows] > 0]
    width = int(lengths[rows].max())
    arrival = np.full((rows.size, width), np.inf)
    service = np.zeros_like(arrival)
    counted = np.zeros((rows.size, width), dtype=bool)
    start_of = np.searchsorted(index, np.arange(intervals), side="left")
    for r, k in enumerate(rows.tolist()):
        ahead = queued[k]
        own = slice(int(start_of[k]), int(start_of[k] + counts[k]))
        arrival[r, : ahead.size] = arrival_s[ahead]
        service[r, : ahead.size] = service_s[ahead]
        arrival[r, ahead.size : lengths[k]] = arrival_s[own]
        service[r, ahead.size : lengths[k]] = service_s[own]
        counted[r, ahead.size : lengths[k]] = True
    begin = np.repeat((rows * interval_s).astype(np.float64)[:, None], most, axis=1)
    if carry is not None:
        for r, k in enumerate(rows.tolist()):
            busy = carry.busy_until_s[k][:most]
            begin[r, : busy.size] = np.maximum(busy, begin[r, : busy.size])
    active = np.arange(rows.size)  # positions in ``rows`` still missing something
    for n in range(1, most + 1):
        if active.size == 0:
            break
        row_length = lengths[rows[active]]
        free = begin[active, :n].copy()
        missed = np.zeros(active.size, dtype=np.int64)
        a_rows, s_rows, c_rows = arrival[active], service[active], counted[active]
        alive = active.size
        for i in range(int(row_length[0])):
            while row_length[alive - 1] <= i:
                alive -= 1
            f = free[:alive]
            pick = f.argmin(axis=1)
            lane = np.arange(alive)
            a = a_rows[:alive, i]
            start = np.maximum(a, f[lane, pick])
            end = start + s_rows[:alive, i]
            f[lane, pick] = end
            missed[:alive] += (end - a > ttft_target_s) & c_rows[:alive, i]
        table[rows[active], n] = missed
        active = active[missed > 0]
    return table


class PrefillReplay:
    """First-token times of a whole run for a schedule of prefill counts, as the simulator's.

    The requests, their clipping and their prefill times are the cluster's own (built by
    ``Cluster``); the queue is its ``_Prefill``; scaling follows ``Cluster.scale``: new workers
    serve after the startup delay, a scale-down cancels the newest starting workers first, then
    stops the serving ones that are free soonest.
    """

    def __init__(self, cluster: Cluster) -> None:
        self.arrival: FloatArray = cluster.arrival
        self.service: FloatArray = cluster.prefill_service_s
        self.startup_delay_s = cluster.config.startup_delay_s

    def first_token_s(
        self, interval_s: float, start: int, requested: Sequence[int]
    ) -> FloatArray:
        """``requested[j]``: the prefill count asked for at the end of window ``j`` (as a
        planner's answer; the last window's is not used, as in the loop)."""
        queue = _Prefill(self.arrival, self.service)
        workers: list[Worker] = []
        now = 0.0

        def add(ready_at: float) -> None:
            worker = Worker(len(workers), Role.PREFILL, now, ready_at)
            workers.append(worker)
            queue.add(worker)

        for _ in range(start):
            add(0.0)
        windows = len(requested)
        for j in range(windows):
            now = (j + 1) * interval_s
            queue.run(now)
            if j == windows - 1:
                break
            active = [w for w in workers if w.retired_at is None]
            wanted = int(requested[j])
            if wanted > len(active):
                for _ in range(wanted - len(active)):
                    add(now + self.startup_delay_s)
            elif wanted < len(active):
                starting = sorted((w for w in active if w.ready_at > now), key=lambda w: -w.wid)
                serving = sorted(
                    (w for w in active if w.ready_at <= now),
                    key=lambda w: (queue.busy_until.get(w.wid, 0.0), w.wid),
                )
                chosen = (starting + serving)[: len(active) - wanted]
                for worker in chosen:
                    worker.retired_at = now
                queue.remove({w.wid for w in chosen})
        queue.run(math.inf)
        return queue.end.copy()
