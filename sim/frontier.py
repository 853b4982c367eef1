"""The cheapest engine counts per interval for every miss budget, by dynamic programming.

One role (prefill or decode) at a time. Each interval ``t`` has a table ``misses[t, l]``: the
requests that miss their target if ``l + 1`` engines serve it. A schedule picks one count per
interval; it costs ``gpus`` per engine and interval, plus ``startup`` intervals of billing for
every engine added (a new engine is requested, and billed, one startup delay before the interval
that needs it). No engine can be added in intervals ``1 .. startup``: the run starts with the
engines of interval 0 and the first decision can only be served after a startup delay.

With ``startup = 0`` this is a multiple-choice knapsack (one choice per interval, cost to
minimise, misses within a budget); with a startup cost the choice of interval ``t`` also depends
on the count of interval ``t - 1``, so the state is (interval, count, misses so far). Either way
the dynamic program over the miss budget is exact: ``cost(b)`` is the least cost of any
schedule with at most ``b`` misses, for every ``b`` up to the budget at once, which is what lets
the two roles share one budget (``split``).

The tables of a long run are big (a count per level and budget), so only every ``stride``-th is
kept; a schedule is read back by recomputing one stretch at a time from its checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
Table = npt.NDArray[np.int32]

INF = np.int32(1 << 30)


@dataclass
class Frontier:
    """The least cost per miss budget of one role; ``schedule(b)`` gives a schedule that
    achieves ``cost[b]``."""

    misses: IntArray  # (intervals, levels): misses with level + 1 engines
    gpus: int
    startup: int
    budget: int
    cost: IntArray = field(init=False)  # (budget + 1,)
    _checkpoints: dict[int, Table] = field(init=False, repr=False)
    _stride: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        intervals, levels = self.misses.shape
        if intervals == 0 or levels == 0:
            raise ValueError("a frontier needs at least one interval and one level")
        if self.budget < 0:
            raise ValueError(f"the miss budget must be >= 0, got {self.budget}")
        self._stride = max(1, math.isqrt(intervals))
        self._checkpoints = {}
        table = self._first()
        for t in range(1, intervals):
            if (t - 1) % self._stride == 0:
                self._checkpoints[t - 1] = table
            table = self._step(table, t)
        self._last = table
        self.cost = table.min(axis=0).astype(np.int64)

    @property
    def levels(self) -> int:
        return int(self.misses.shape[1])

    def _costs(self) -> npt.NDArray[np.int32]:
        return (np.arange(1, self.levels + 1) * self.gpus).astype(np.int32)

    def _place(self, best: Table, t: int) -> Table:
        """This interval's misses and serving cost on top of the best way to reach each level."""
        table = np.full((self.levels, self.budget + 1), INF, dtype=np.int32)
        costs = self._costs()
        for level in range(self.levels):
            m = int(self.misses[t, level])
            if m <= self.budget:
                table[level, m:] = best[level, : self.budget + 1 - m] + costs[level]
        np.minimum(table, INF, out=table)
        return table

    def _first(self) -> Table:
        return self._place(np.zeros((self.levels, self.budget + 1), dtype=np.int32), 0)

    def _arrivals(self, previous: Table, t: int) -> Table:
        """Per level, the least cost of arriving at it in interval ``t`` (its own costs not yet
        added): from a level at or above it (engines stopped at once, nothing to pay) or, once
        engines can be added, from a lower one plus the startup billing of the added engines."""
        down = np.minimum.accumulate(previous[::-1], axis=0)[::-1]
        if t <= self.startup:
            return down
        step = np.int32(self.startup * self.gpus)
        up = np.full_like(previous, INF)
        running = np.full(previous.shape[1], INF, dtype=np.int32)
        for level in range(1, self.levels):
            np.minimum(running, previous[level - 1], out=running)
            running = np.minimum(running + step, INF)
            up[level] = running
        return np.minimum(down, up)

    def _step(self, previous: Table, t: int) -> Table:
        return self._place(self._arrivals(previous, t), t)

    def schedule(self, budget: int) -> IntArray:
        """Engines per interval of a least-cost schedule with at most ``budget`` misses."""
        return self.schedules([budget])[0]

    def schedules(self, budgets: list[int]) -> list[IntArray]:
        """``schedule`` for several budgets, recomputing the tables once."""
        for budget in budgets:
            if not 0 <= budget <= self.budget:
                raise ValueError(f"budget {budget} outside 0..{self.budget}")
            if self.cost[budget] >= INF:
                raise ValueError(f"no schedule misses at most {budget} requests")
        intervals = self.misses.shape[0]
        out = [np.zeros(intervals, dtype=np.int64) for _ in budgets]
        levels = [int(np.argmin(self._last[:, budget])) for budget in budgets]
        left = list(budgets)
        t = intervals - 1
        for checkpoint in sorted(self._checkpoints, reverse=True):
            tables = [self._checkpoints[checkpoint]]
            for u in range(checkpoint + 1, t):
                tables.append(self._step(tables[-1], u))
            while t > checkpoint:
                previous = tables[t - 1 - checkpoint]
                for i, level in enumerate(levels):
                    out[i][t] = level
                    left[i] -= int(self.misses[t, level])
                    levels[i] = self._predecessor(previous, t, level, left[i])
                t -= 1
        for i, level in enumerate(levels):
            out[i][0] = level
        return [schedule + 1 for schedule in out]

    def _predecessor(self, previous: Table, t: int, level: int, b: int) -> int:
        """The level of interval ``t - 1`` the optimum came from: the same level if it is one
        of the best (no scaling action), else the nearest."""
        column = previous[:, b].astype(np.int64)
        lower = np.arange(self.levels) < level
        if t <= self.startup:
            column = np.where(lower, np.int64(INF), column)
        else:
            column = column + np.where(
                lower, (level - np.arange(self.levels)) * self.startup * self.gpus, 0
            )
        best = column.min()
        if column[level] == best:
            return level
        ties = np.flatnonzero(column == best)
        return int(ties[np.argmin(np.abs(ties - level))])


def split(prefill: Frontier, decode: Frontier, budget: int) -> tuple[int, int]:
    """The budgets of the two roles (summing to at most ``budget``) with the least total cost;
    among equal costs, the one that leaves decode the most (its estimate is the rougher)."""
    if budget > prefill.budget or budget > decode.budget:
        raise ValueError("the frontiers were built for a smaller budget")
    b = np.arange(budget + 1)
    total = prefill.cost[b] + decode.cost[budget - b]
    best = int(np.flatnonzero(total == total.min())[0])
    if total[best] >= INF:
        raise ValueError(f"no pair of schedules misses at most {budget} requests")
    return best, budget - best
