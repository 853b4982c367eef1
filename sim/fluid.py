"""A fluid estimate of decode: which requests would miss the ITL target with a given fleet.

Used by the references that try many decode fleets (the clairvoyant, the tuned baselines), never
to score a run: each one's pick is run in the simulator, whose figures are reported. The estimate
follows the simulator's decode model in the large: a request decodes its ``output - 1`` tokens
from its first token on, at the profiled ITL of its engine's KV usage and mean context (times the
engines' slowness); engines share the load evenly (the simulator routes to the least loaded);
a request waits for admission while the engines' reserved KV (input + output of every request in
flight) leaves no room for it, and such a wait counts against its ITL. Time is cut into bins; the
load of a bin is averaged over it exactly; a request's ITL is the mean of its bins' ITLs, found
by rounds of a fixed point (a request's lifetime depends on the ITL that the load gives, and
the load on the lifetimes), climbing from an idle engine's ITL.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from sim.cluster import ServiceTimes

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

ROUNDS = 12
# An ITL above this multiple of the target is only a miss; capping it keeps overloaded fleets'
# lifetimes (and the bins they need) finite.
ITL_CAP = 20.0


class DecodeFluid:
    """Requests' decode demand, bin edges and the profile, fixed for many fleets."""

    def __init__(
        self,
        first_token_s: FloatArray,
        isl_tokens: IntArray,
        osl_tokens: IntArray,
        times: ServiceTimes,
        perf_skew: float,
        itl_target_s: float,
        bin_s: float = 0.25,
    ) -> None:
        self.times, self.perf_skew, self.itl_target_s = times, perf_skew, itl_target_s
        self.bin_s = bin_s
        tokens = (osl_tokens - 1).astype(np.float64)
        self.decoding = tokens > 0  # a one-token output finishes with its first token
        self.start = np.asarray(first_token_s, dtype=np.float64)[self.decoding]
        self.tokens = tokens[self.decoding]
        isl = isl_tokens[self.decoding].astype(np.float64)
        self.context = isl + self.tokens / 2.0  # its mean context over its decode
        self.reserve = np.minimum(isl + self.tokens + 1.0, times.max_kv_tokens)
        latest = float(self.start.max()) if self.start.size else 0.0
        longest = float(self.tokens.max()) if self.tokens.size else 0.0
        self.bins = int(np.ceil((latest + longest * ITL_CAP * itl_target_s) / bin_s)) + 2
        position = self.start / bin_s
        self._start_bin = np.floor(position).astype(np.int64)
        self._start_frac = position - self._start_bin
        self.n = self.start.size
        # The starts' share of each bin's load does not depend on the fleet.
        self._start_load = [self._edges(self._start_bin, self._start_frac, w)
                            for w in (None, self.context, self.reserve)]

    def _edges(self, whole: IntArray, frac: FloatArray, weight: FloatArray | None) -> FloatArray:
        """A difference array whose running sum is each bin's mean presence (weighted) of
        intervals that begin at ``whole + frac`` bins."""
        w = np.ones(whole.size) if weight is None else weight
        out = np.bincount(whole, weights=w * (1.0 - frac), minlength=self.bins + 1)
        out = out + np.bincount(whole + 1, weights=w * frac, minlength=self.bins + 1)
        return np.asarray(out[: self.bins + 1], dtype=np.float64)

    def itl_met(self, engines: FloatArray | float) -> BoolArray:
        """Per request (all of them, in the order given): meets the ITL target with
        ``engines`` decode engines serving in each bin (a number for all bins)."""
        met = np.ones(self.decoding.size, dtype=bool)
        if self.n == 0:
            return met
        serving = np.broadcast_to(np.asarray(engines, dtype=np.float64), (self.bins,))
        serving = np.maximum(serving, 1e-9)
        target = self.itl_target_s
        # From an idle engine's ITL up: the load then settles where a cluster that starts empty
        # does (a fleet loaded from the start could settle at a slower fixed point).
        idle = self.times.itl_s(np.zeros(1), np.zeros(1))[0] * self.perf_skew
        itl = np.full(self.n, float(idle))
        blocked = np.zeros(self.n, dtype=bool)
        starts = self._start_bin
        for _ in range(ROUNDS):
            end = (self.start + self.tokens * itl) / self.bin_s
            end_bin = np.minimum(np.floor(end).astype(np.int64), self.bins - 1)
            end_frac = np.minimum(end - end_bin, 1.0)
            load = []
            for begun, weight in zip(self._start_load, (None, self.context, self.reserve),
                                     strict=True):
                ended = self._edges(end_bin, end_frac, weight)
                load.append(np.cumsum(begun - ended)[: self.bins])
            count, kv, reserved = load
            per_engine = np.maximum(kv, 0.0) / serving
            context = np.maximum(kv, 0.0) / np.maximum(count, 1e-9)
            bin_itl = self.times.itl_s(per_engine, context) * self.perf_skew
            area = np.concatenate(([0.0], np.cumsum(bin_itl)))
            # Mean of the bins' ITLs over [start, end], each bin weighted by the time spent in it.
            begin_pos = starts + self._start_frac
            total = _area(area, end_bin, end_frac) - _area(area, starts, self._start_frac)
            span = np.maximum(end_bin + end_frac - begin_pos, 1e-12)
            new = np.minimum(total / span, ITL_CAP * target)
            blocked = reserved[starts] / serving[starts] + self.reserve > self.times.max_kv_tokens
            # Longer lives mean more load and a slower ITL: from below, the rounds climb to the
            # least fixed point; stop once it has settled.
            settled = np.allclose(new, itl, rtol=0.01, atol=0.0)
            itl = new
            if settled:
                break
        met[self.decoding] = (itl <= target) & ~blocked
        return met


def _area(area: FloatArray, whole: IntArray, frac: FloatArray) -> FloatArray:
    """The running integral of the bins' values at ``whole + frac`` bins."""
    return area[whole] + frac * (area[whole + 1] - area[whole])
