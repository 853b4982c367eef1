"""Progress of a long run on a terminal: one line on stderr, rewritten in place, gone at the end.

Nothing is written when stderr is not a terminal (a log file, a pipe, a test), so the output of
a run stays what it was.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

# Redraw at most this often: a replay of a day at 5 s windows has 17,280 intervals.
REDRAW_S = 0.25


def eta_text(done: int, total: int, elapsed_s: float, unit: str = "intervals") -> str:
    """``120/1440 intervals (8 %), 12 s, about 2 min left``."""
    text = f"{done}/{total} {unit} ({100 * done / total:.0f} %), {_duration(elapsed_s)}"
    if 0 < done < total:
        text += f", about {_duration(elapsed_s / done * (total - done))} left"
    return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """``progress(done, total)`` after each step (an interval, a run); ``close()`` at the end."""

    def __init__(self, label: str, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, unit: str = "intervals") -> None:
        self.label, self.unit = label, unit
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty()
        self._clock = clock
        self._started = clock()
        self._drawn_at: float | None = None
        self._last: tuple[int, int] | None = None
        self._run = 1  # a search (a reference policy) simulates several runs, one after another

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        now = self._clock()
        if self._last is not None and done < self._last[0]:
            # counting from the start again: the next run of a search, timed on its own
            self._run += 1
            self._started = now
            self._drawn_at = None
        self._last = (done, total)
        if self._drawn_at is not None and now - self._drawn_at < REDRAW_S and done < total:
            return
        self._draw(now)

    def _draw(self, now: float) -> None:
        assert self._last is not None
        self._drawn_at = now
        done, total = self._last
        text = eta_text(done, total, now - self._started, self.unit)
        run = f"run {self._run}: " if self._run > 1 else ""
        self.stream.write(f"\r\033[K{self.label}: {run}{text}")
        self.stream.flush()

    def above(self, line: str, out: TextIO | None = None) -> None:
        """Print ``line`` (to stdout) with the progress line, if drawn, moved under it: a run
        that reports as it goes keeps one progress line at the bottom of the terminal."""
        drawn = self.enabled and self._drawn_at is not None
        if drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
        print(line, file=sys.stdout if out is None else out, flush=True)
        if drawn:
            self._draw(self._clock())

    def close(self) -> None:
        if self.enabled and self._drawn_at is not None:
            self.stream.write("\r\033[K")
            self.stream.flush()
