"""A discrete-event simulator of one prefill/decode deployment, in virtual time.

Requests come from a trace (arrival time, input tokens, output tokens). Each one:

1. is shortened to the engine's context limit if ``input + output`` does not fit (the input is cut;
   the request is counted as clipped);
2. waits in one FCFS queue for the first free prefill worker and takes the profiled prefill time of
   its input length there (times ``perf_skew``, times optional noise); its first token comes at the
   end of prefill, so TTFT = wait + prefill time;
3. is routed to the least loaded decode worker (fewest KV-cache tokens reserved) once that worker
   has room for its whole final context (``input + output`` tokens reserved at admission, so no
   preemption is ever needed); requests wait in arrival order while no worker has room;
4. decodes its remaining ``output - 1`` tokens under continuous batching: every token of every
   request on a worker takes the profiled inter-token latency (ITL) at that worker's current KV
   usage and mean context length, the same grid point the decider reads
   (``Profile.decode.at``), times ``perf_skew`` and noise. Its mean ITL is
   ``(finish - first token) / (output - 1)``, so time spent waiting for KV room counts.

Decode runs in time slices of at most ``decode_slice_s`` (default 0.25 s): each worker's ITL for
a slice is the profile's at its load averaged over the slice (a request counts for the part of
the slice it spends on the worker), requests join and finish at their own times inside a slice,
and a request joining a running batch waits half an iteration for the next one.
``decode_model="token"`` instead runs one event per engine iteration (one token for the whole
batch, new requests join at the next iteration), which is exact but 20 to 50 times slower;
``docs/benchmarks.md`` gives the measured difference (means and p99s within about 2 %).

Workers are billed from the moment they are requested and serve only after ``startup_delay_s``.
A scale-down first cancels workers still starting (billed until cancelled), then stops the least
loaded serving ones from taking new work; those are billed until their running requests finish.

Time is an argument everywhere (``advance(until_s)``); nothing here reads a clock.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from shared import window_stats
from shared.perf_model import Profile
from shared.roles import Role
from shared.traces import Trace

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# The shortest prefill the simulator accepts from the profile's cubic spline: a guard against an
# overshoot below zero, far below any profiled point (the H200 profile starts at 19.5 ms).
_MIN_PREFILL_S = 1e-4


class DecodeModel(StrEnum):
    SLICED = "sliced"
    TOKEN = "token"


@dataclass(frozen=True)
class ClusterConfig:
    """How the simulated deployment behaves. Units are in the names."""

    startup_delay_s: float = 180.0
    """Seconds from the request of a worker to its first request served (it is billed meanwhile)."""
    perf_skew: float = 1.0
    """Engines are this many times slower than profiled (1.2: 20 % slower), prefill and decode."""
    noise_cv: float = 0.0
    """Coefficient of variation of a mean-1 lognormal factor on every prefill time and on every
    decode slice's ITL of each worker (0: none). Drawn from ``seed``."""
    seed: int = 0
    max_context_tokens: int | None = None
    """Input + output limit of one request; ``None``: the profile's (16,384 for the H200 one)."""
    prefill_engine_gpus: int = 1
    decode_engine_gpus: int = 1
    start_prefill: int = 1
    """Prefill workers serving at time 0 (billed from 0)."""
    start_decode: int = 1
    decode_model: DecodeModel = DecodeModel.SLICED
    decode_slice_s: float = 0.25
    """Longest decode time slice, seconds (``decode_model="sliced"`` only); at most 1 s."""

    def __post_init__(self) -> None:
        if not (self.startup_delay_s >= 0 and math.isfinite(self.startup_delay_s)):
            raise ValueError(f"startup_delay_s must be >= 0, got {self.startup_delay_s!r}")
        if not (self.perf_skew > 0 and math.isfinite(self.perf_skew)):
            raise ValueError(f"perf_skew must be positive, got {self.perf_skew!r}")
        if not (self.noise_cv >= 0 and math.isfinite(self.noise_cv)):
            raise ValueError(f"noise_cv must be >= 0, got {self.noise_cv!r}")
        if self.max_context_tokens is not None and self.max_context_tokens < 2:
            raise ValueError(f"max_context_tokens must be >= 2, got {self.max_context_tokens!r}")
        if self.prefill_engine_gpus < 1 or self.decode_engine_gpus < 1:
            raise ValueError("GPUs per engine must be >= 1")
        if self.start_prefill < 0 or self.start_decode < 0:
            raise ValueError("start counts must be >= 0")
        if not 0 < self.decode_slice_s <= 1.0:
            raise ValueError(f"decode_slice_s must be in (0, 1], got {self.decode_slice_s!r}")


class ServiceTimes:
    """The profile's look-ups (``shared.perf_model``) for many requests or engines at once.

    Prefill: the profile's cubic spline over input lengths, the length clamped to the profiled
    range. Decode: its 100 x 100 grid, the nearest grid point to (KV usage, context).
    """

    def __init__(self, profile: Profile) -> None:
        self._prefill = profile.prefill
        self._decode = profile.decode
        self.max_kv_tokens = float(profile.decode.max_kv_tokens)

    def prefill_s(self, isl_tokens: FloatArray) -> FloatArray:
        return np.maximum(self._prefill.ttft_s_many(isl_tokens), _MIN_PREFILL_S)

    def itl_s(self, kv_tokens: FloatArray, mean_context_tokens: FloatArray) -> FloatArray:
        """ITL of engines holding ``kv_tokens`` over requests of ``mean_context_tokens`` each."""
        return self._decode.itl_s_at_kv(kv_tokens, mean_context_tokens)


@dataclass
class Worker:
    """One engine: billed from ``requested_at`` to ``released_at``."""

    wid: int
    role: Role
    requested_at: float
    ready_at: float
    retired_at: float | None = None  # stopped taking new work (scale-down)
    released_at: float | None = None  # billing ended

    def serving(self, now: float) -> bool:
        return self.retired_at is None and self.ready_at <= now

    def starting(self, now: float) -> bool:
        return self.retired_at is None and self.ready_at > now


@dataclass(frozen=True)
class WindowStats:
    """What happened in ``[start_s, end_s)``, and the state at ``end_s``.

    Latencies are per request: TTFT of the requests whose first token came in the window; ITL
    (mean over a request's tokens) and duration of the requests that finished in it. ``None``
    where the window had no such request.
    """

    start_s: float
    end_s: float
    num_requests: int
    isl_avg: float | None
    osl_avg: float | None
    isl_p90: float | None
    osl_p90: float | None
    first_tokens: int
    ttft_avg_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    finished: int
    itl_avg_s: float | None  # token-weighted, as a Prometheus histogram's sum / count gives it
    itl_p90_s: float | None
    itl_p99_s: float | None
    request_duration_avg_s: float | None
    prefill_waiting: int
    prefill_running: int
    decode_waiting: int
    decode_running: int
    kv_cache_usage: float | None  # mean over serving decode workers
    prefill_busy_fraction: float | None  # busy time / (serving workers x window)
    prefill_serving: int
    decode_serving: int
    prefill_starting: int
    decode_starting: int
    # planning v2 (MetricSnapshot version 2): what a collector reads besides the means
    isl_p50: float | None = None
    isl_p99: float | None = None
    arrivals: window_stats.ArrivalStats | None = None  # per-second counts, as a 1 s scrape
    queue_time_avg_s: float | None = None  # first tokens in the window: waited for a worker
    queue_time_p90_s: float | None = None
    prefill_time_avg_s: float | None = None  # ... and computed
    prefill_time_p90_s: float | None = None
    decode_time_avg_s: float | None = None  # finished in the window
    requests_before_first_token: int = 0  # arrived, first token still ahead, at end_s
    prefill_tokens_pending: float = 0.0  # their input tokens
    ttft_samples_s: FloatArray = field(default_factory=lambda: np.zeros(0), repr=False,
                                       compare=False)
    itl_samples_s: FloatArray = field(default_factory=lambda: np.zeros(0), repr=False,
                                      compare=False)  # per request, mean over its tokens

    @property
    def window_s(self) -> float:
        return self.end_s - self.start_s


@dataclass
class SimResult:
    """Per request and per worker outcome of a run."""

    arrival_s: FloatArray
    isl_tokens: IntArray  # after clipping
    osl_tokens: IntArray
    clipped: BoolArray
    prefill_start_s: FloatArray
    first_token_s: FloatArray
    finish_s: FloatArray  # NaN: never finished
    workers: list[Worker]
    end_s: float
    gpus_per_engine: dict[Role, int] = field(default_factory=dict)

    @property
    def ttft_s(self) -> FloatArray:
        return self.first_token_s - self.arrival_s

    @property
    def itl_s(self) -> FloatArray:
        """Mean ITL per request; NaN for a single-token output (it has no inter-token gap)."""
        gaps = (self.osl_tokens - 1).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(gaps > 0, (self.finish_s - self.first_token_s) / gaps, np.nan)

    @property
    def finished(self) -> BoolArray:
        return np.isfinite(self.finish_s)

    def gpu_seconds(self) -> float:
        total = 0.0
        for worker in self.workers:
            end = worker.released_at if worker.released_at is not None else self.end_s
            total += (end - worker.requested_at) * self.gpus_per_engine[worker.role]
        return total


def clip_to_context(
    isl: IntArray, osl: IntArray, max_context_tokens: int
) -> tuple[IntArray, IntArray, BoolArray]:
    """Shorten the input of requests that do not fit (the output too, if it alone does not)."""
    clipped = isl + osl > max_context_tokens
    osl_out = np.minimum(osl, max_context_tokens - 1)
    isl_out = np.where(clipped, np.maximum(max_context_tokens - osl_out, 1), isl)
    return isl_out.astype(np.int64), osl_out.astype(np.int64), clipped


def _lognormal(rng: np.random.Generator, cv: float, size: int) -> FloatArray:
    """Mean-1 lognormal factors with coefficient of variation ``cv`` (ones when cv is 0)."""
    if cv == 0:
        return np.ones(size)
    sigma = math.sqrt(math.log1p(cv * cv))
    return rng.lognormal(-sigma * sigma / 2.0, sigma, size)


# ---------------------------------------------------------------------------------------------
# Prefill: one FCFS queue, served by the first free worker


class _Prefill:
    def __init__(self, arrival: FloatArray, service: FloatArray) -> None:
        self.arrival = arrival
        self._arrival_list: list[float] = arrival.tolist()
        self._service_list: list[float] = service.tolist()
        self.start = np.full(arrival.size, np.nan)
        self.end = np.full(arrival.size, np.nan)
        self.next = 0  # first request not yet started
        self.heap: list[tuple[float, int]] = []  # (free from, wid) of workers taking work
        self.busy_until: dict[int, float] = {}

    def add(self, worker: Worker) -> None:
        heapq.heappush(self.heap, (worker.ready_at, worker.wid))
        self.busy_until[worker.wid] = -math.inf  # end of its last request; none yet

    def remove(self, wids: set[int]) -> None:
        self.heap = [entry for entry in self.heap if entry[1] not in wids]
        heapq.heapify(self.heap)

    def run(self, until: float) -> None:
        """Start, in arrival order, every request whose start falls before ``until``.

        Start times of an FCFS queue are non-decreasing, so the first request that would start at
        or after ``until`` stops the loop: workers added or removed at ``until`` cannot change
        what started before it.
        """
        heap, arrival, service = self.heap, self._arrival_list, self._service_list
        i, n = self.next, len(arrival)
        starts: list[float] = []
        ends: list[float] = []
        busy = self.busy_until
        while i < n and heap:
            a = arrival[i]
            if a >= until:
                break
            free, wid = heap[0]
            start = a if a > free else free
            if start >= until:
                break
            end = start + service[i]
            heapq.heapreplace(heap, (end, wid))
            busy[wid] = end
            starts.append(start)
            ends.append(end)
            i += 1
        if starts:
            self.start[self.next : i] = starts
            self.end[self.next : i] = ends
        self.next = i

    def waiting(self, at: float) -> int:
        return max(0, int(np.searchsorted(self.arrival, at, side="left")) - self.next)

    def running(self, at: float) -> int:
        return sum(1 for until in self.busy_until.values() if until > at)


# ---------------------------------------------------------------------------------------------
# Decode: continuous batching per worker, KV admission, least-loaded routing


class _Decode:
    """Worker slots, the admission queue and KV bookkeeping shared by both decode models."""

    def __init__(
        self,
        times: ServiceTimes,
        config: ClusterConfig,
        context0: FloatArray,
        tokens: FloatArray,
        reserve: FloatArray,
        finish: FloatArray,
        rng: np.random.Generator,
    ) -> None:
        self.times = times
        self.config = config
        self.context0 = context0  # input tokens of each request (its context at decode start)
        self.tokens = tokens  # tokens each request decodes (output - 1)
        self.reserve = reserve  # KV tokens reserved at admission (input + output)
        self.reserve_list: list[float] = reserve.tolist()
        self.finish = finish  # shared with the cluster
        self.rng = rng
        self.max_kv = times.max_kv_tokens
        self.slots: list[Worker] = []
        self.reserved_kv: FloatArray = np.zeros(0)  # per slot
        self.last_finish: FloatArray = np.zeros(0)  # per slot, kept while ``track_finish``
        # Per slot, the ITL of its last slice (the estimate of when requests leave in the next).
        self.slot_itl: FloatArray = np.zeros(0)
        self.track_finish = False  # while some worker drains, or after the planning horizon
        self.finishing = False
        self.q_ids: IntArray = np.zeros(0, dtype=np.int64)
        self.q_time: FloatArray = np.zeros(0)
        self.head = 0
        self.setup()

    def setup(self) -> None:
        """Model-specific state."""

    # -- workers

    def add(self, worker: Worker) -> None:
        self.slots.append(worker)
        self.reserved_kv = np.append(self.reserved_kv, 0.0)
        self.last_finish = np.append(self.last_finish, -math.inf)
        idle = self.times.itl_s(np.zeros(1), np.zeros(1)) * self.config.perf_skew
        self.slot_itl = np.append(self.slot_itl, idle)

    def slot_of(self, wid: int) -> int:
        for slot, worker in enumerate(self.slots):
            if worker.wid == wid:
                return slot
        raise KeyError(wid)

    def active_per_slot(self) -> IntArray:
        raise NotImplementedError

    def retired(self) -> None:
        """Some workers stopped taking work: note when their last requests finish."""
        self.track_finish = True
        self.release_idle_retired()

    def release_idle_retired(self) -> None:
        """Stop billing retired workers that have nothing left to run."""
        active: IntArray | None = None
        draining = False
        for slot, worker in enumerate(self.slots):
            if worker.retired_at is not None and worker.released_at is None:
                if active is None:
                    active = self.active_per_slot()
                if active[slot] == 0:
                    worker.released_at = max(worker.retired_at, float(self.last_finish[slot]))
                else:
                    draining = True
        self.track_finish = draining or self.finishing

    # -- queue

    def enqueue(self, ids: IntArray, times: FloatArray) -> None:
        if ids.size == 0:
            return
        q_ids = np.concatenate([self.q_ids[self.head :], ids])
        q_time = np.concatenate([self.q_time[self.head :], times])
        order = np.argsort(q_time, kind="stable")
        self.q_ids, self.q_time, self.head = q_ids[order], q_time[order], 0

    def waiting(self, at: float) -> int:
        return max(0, int(np.searchsorted(self.q_time, at, side="left")) - self.head)

    def pick(self, at: float, size: float) -> int | None:
        """The least loaded worker serving at ``at``, if it has room for ``size`` KV tokens."""
        best, best_load = -1, math.inf
        for slot, worker in enumerate(self.slots):
            if worker.retired_at is None and worker.ready_at <= at:
                load = float(self.reserved_kv[slot])
                if load < best_load:
                    best, best_load = slot, load
        if best < 0 or best_load + size > self.max_kv:
            return None
        return best

    # -- state

    def kv_tokens_per_slot(self) -> FloatArray:
        raise NotImplementedError

    def running(self) -> int:
        raise NotImplementedError

    def run(self, until: float) -> list[int]:
        raise NotImplementedError


# Columns of the sliced model's requests in flight, one row per request.
_ID, _SLOT, _CTX, _LEFT, _JOIN = range(5)


class _SlicedDecode(_Decode):
    """Time slices of at most ``decode_slice_s``; vectorised over the requests in flight.

    The requests in flight are one float array, a row each: request id, worker slot, context
    tokens, tokens still to decode, and when it joined (at most the slice start for those already
    in flight), so that a slice concatenates and filters once.
    """

    def setup(self) -> None:
        self.now = 0.0
        self.active: FloatArray = np.zeros((0, 5))
        # Per request, the row it enters with (slot and join filled in at admission).
        n = self.context0.size
        self.rows: FloatArray = np.zeros((n, 5))
        self.rows[:, _ID] = np.arange(n)
        self.rows[:, _CTX] = self.context0
        self.rows[:, _LEFT] = self.tokens
        # Where and when requests finished in the last slice: when room appeared on a worker.
        self._last_slice: tuple[float, IntArray, FloatArray] | None = None
        self._serving: list[int] = []
        self._serving_key: tuple[int, float] = (-1, -math.inf)
        self.version = 0  # bumped whenever the worker set changes

    def add(self, worker: Worker) -> None:
        super().add(worker)
        self.version += 1

    def retired(self) -> None:
        self.version += 1
        super().retired()

    def _slots(self) -> IntArray:
        return self.active[:, _SLOT].astype(np.intp)

    def active_per_slot(self) -> IntArray:
        return np.bincount(self._slots(), minlength=len(self.slots)).astype(np.int64)

    def kv_tokens_per_slot(self) -> FloatArray:
        kv = np.bincount(self._slots(), weights=self.active[:, _CTX], minlength=len(self.slots))
        return np.asarray(kv, dtype=np.float64)

    def running(self) -> int:
        return int(self.active.shape[0])

    def serving_slots(self, t0: float) -> list[int]:
        """Slots taking new requests at ``t0``; cached until the worker set changes or a worker
        still starting becomes ready."""
        version, valid_until = self._serving_key
        if version != self.version or t0 >= valid_until:
            live = [(slot, w) for slot, w in enumerate(self.slots) if w.retired_at is None]
            self._serving = [slot for slot, w in live if w.ready_at <= t0]
            ready_next = min((w.ready_at for _, w in live if w.ready_at > t0), default=math.inf)
            self._serving_key = (self.version, ready_next)
        return self._serving

    def _admit(self, t0: float, t1: float) -> None:
        """Admit, in order, queued requests that reached decode before ``t1``, while they fit."""
        head = self.head
        end = int(self.q_time.searchsorted(t1))
        if end <= head:
            return
        serving = self.serving_slots(t0)
        if not serving:
            return
        reserve, max_kv = self.reserve_list, self.max_kv
        reserved: list[float] = self.reserved_kv.tolist()
        new_slot: list[int] = []
        if len(serving) == 1:
            slot = serving[0]
            for rid in self.q_ids[head:end].tolist():
                size = reserve[rid]
                if reserved[slot] + size > max_kv:
                    break  # FCFS: the head waits for room, and everything behind it
                reserved[slot] += size
                new_slot.append(slot)
        else:
            load = reserved.__getitem__
            for rid in self.q_ids[head:end].tolist():
                size = reserve[rid]
                slot = min(serving, key=load)
                if reserved[slot] + size > max_kv:
                    break  # FCFS: the head waits for room, and everything behind it
                reserved[slot] += size
                new_slot.append(slot)
        taken = len(new_slot)
        if not taken:
            return
        self.reserved_kv = np.asarray(reserved)
        ids = self.q_ids[head : head + taken]
        slots = np.asarray(new_slot, dtype=np.intp)
        arrived = self.q_time[head : head + taken]
        # A request that reached decode before this slice waited for room (or for a worker):
        # it joins when the room appeared, at the last finish on its worker in the last slice or
        # when the worker became ready, not at the slice start.
        ready = np.maximum(arrived, t0)
        if arrived[0] < t0:
            ready = np.maximum(arrived, self._room_since(slots, t0))
        # A request that joins a running batch waits for the iteration under way to end: half an
        # iteration on average. An idle worker starts at once.
        running = np.zeros(len(self.slots), dtype=bool)
        running[self._slots()] = True
        wait = 0.5 * self.slot_itl[slots] * running[slots]
        rows = self.rows[ids]
        rows[:, _SLOT] = slots
        rows[:, _JOIN] = np.minimum(ready + wait, t1)
        self.head = head + taken
        self.active = np.concatenate((self.active, rows))

    def _room_since(self, slots: IntArray, t0: float) -> FloatArray:
        """When room appeared on each of ``slots`` during the last slice: its last finish there,
        else when the worker became ready, else ``t0``."""
        since = np.full(len(self.slots), t0)
        ready = np.asarray([w.ready_at for w in self.slots])
        became_ready = (ready > t0 - self.config.decode_slice_s) & (ready <= t0)
        since[became_ready] = ready[became_ready]
        last = self._last_slice
        if last is not None and last[0] == t0:
            freed = np.full(len(self.slots), -math.inf)
            np.maximum.at(freed, last[1], last[2])
            finished_there = np.isfinite(freed)
            since[finished_there] = freed[finished_there]
        return since[slots]

    def _slice(self, t0: float, t1: float) -> list[int]:
        """Decode every request in flight from ``t0`` (or its join) to ``t1``.

        Each worker's ITL for the slice comes from its load averaged over the slice: a request
        counts in proportion to the part of the slice it spends there, from its join (exact) to
        its finish (estimated with the worker's ITL of the previous slice).
        """
        nslots = len(self.slots)
        active = self.active
        slot = active[:, _SLOT].astype(np.intp)
        ctx, left = active[:, _CTX], active[:, _LEFT]
        # Every request in flight before this slice joined at t0; one that waited for room may
        # have joined a little before (see _admit), and decodes from then.
        start = active[:, _JOIN]
        present = t1 - start
        weight = np.minimum(present, left * self.slot_itl[slot])
        weight /= t1 - t0
        np.minimum(weight, 1.0, out=weight)
        kv = np.asarray(np.bincount(slot, weights=ctx * weight, minlength=nslots), np.float64)
        count = np.bincount(slot, weights=weight, minlength=nslots)
        itl = self.times.itl_s(kv, kv / np.maximum(count, 1e-9))
        itl *= self.config.perf_skew
        if self.config.noise_cv > 0:
            itl *= _lognormal(self.rng, self.config.noise_cv, nslots)
        busy = count > 0
        self.slot_itl[busy] = itl[busy]
        per_request = itl[slot]
        possible = present / per_request
        remaining = left - possible
        done = remaining <= 0
        if not done.any():
            active[:, _LEFT] = remaining
            active[:, _CTX] += possible
            active[:, _JOIN] = t1
            self._last_slice = None
            return []
        finish = (start + left * per_request)[done]
        ids = active[done, _ID].astype(np.int64)
        self.finish[ids] = finish
        done_slots = slot[done]
        self.reserved_kv -= np.bincount(done_slots, weights=self.reserve[ids], minlength=nslots)
        if self.track_finish:
            np.maximum.at(self.last_finish, done_slots, finish)
        active[:, _LEFT] = remaining
        active[:, _CTX] += possible
        active[:, _JOIN] = t1
        self.active = active[~done]
        self._last_slice = (t1, done_slots, finish)
        finished: list[int] = ids.tolist()
        return finished

    def run(self, until: float) -> list[int]:
        finished: list[int] = []
        dt = self.config.decode_slice_s
        t = self.now
        while t < until:
            if self.active.shape[0] == 0:
                if self.head >= self.q_ids.size or self.q_time[self.head] >= until:
                    break
                # Idle: jump to the slice in which the next request reaches decode, or, with no
                # worker serving, to the slice in which the next one becomes ready.
                resume = float(self.q_time[self.head])
                if not any(w.serving(t) for w in self.slots):
                    ready = [w.ready_at for w in self.slots if w.retired_at is None]
                    resume = max(resume, min(ready, default=until))
                    if resume >= until:
                        break
                t = max(t, math.floor(resume / dt) * dt)
            t1 = min((math.floor(t / dt) + 1) * dt, until)
            if t1 <= t:  # float rounding at a slice boundary
                t1 = min(t + dt, until)
            self._admit(t, t1)
            if self.active.shape[0]:
                finished += self._slice(t, t1)
                if self.track_finish and not self.finishing:
                    self.release_idle_retired()
            t = t1
        self.now = until
        self._compact()
        return finished

    def _compact(self) -> None:
        """Forget released workers, so that a day of scaling does not slow every slice down."""
        released = sum(1 for w in self.slots if w.released_at is not None)
        if released < 16 or 2 * released < len(self.slots):
            return
        keep = [slot for slot, w in enumerate(self.slots) if w.released_at is None]
        mapping = np.full(len(self.slots), -1, dtype=np.int64)
        mapping[keep] = np.arange(len(keep))
        self.active[:, _SLOT] = mapping[self._slots()]
        self.slots = [self.slots[slot] for slot in keep]
        self.reserved_kv = self.reserved_kv[keep]
        self.last_finish = self.last_finish[keep]
        self.slot_itl = self.slot_itl[keep]
        self.version += 1


class _TokenDecode(_Decode):
    """One event per engine iteration: exact continuous batching, for small runs and checks.

    A worker runs iterations back to back while it has requests; an iteration takes the
    profiled ITL of the batch at its start and gives every request in the batch one token.
    A request admitted during an iteration joins at the next one, as in vLLM.
    """

    _ITERATION, _READY = 0, 1

    def setup(self) -> None:
        self.clock = 0.0  # time of the last event handled
        self.batch: list[list[int]] = []  # request ids per slot
        self.left: dict[int, int] = {}  # tokens still to decode per request in flight
        self.ctx: dict[int, float] = {}
        self.joining: list[list[int]] = []  # admitted, join at the slot's next iteration
        self.busy: list[bool] = []
        self.events: list[tuple[float, int, int, int]] = []  # (time, seq, kind, slot)
        self.seq = 0
        self.blocked = False

    def add(self, worker: Worker) -> None:
        super().add(worker)
        self.batch.append([])
        self.joining.append([])
        self.busy.append(False)
        self._push(worker.ready_at, self._READY, len(self.slots) - 1)

    def _push(self, time: float, kind: int, slot: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (time, self.seq, kind, slot))

    def active_per_slot(self) -> IntArray:
        return np.asarray(
            [len(b) + len(j) for b, j in zip(self.batch, self.joining, strict=True)],
            dtype=np.int64,
        )

    def kv_tokens_per_slot(self) -> FloatArray:
        return np.asarray(
            [sum(self.ctx[r] for r in b + j) for b, j in zip(self.batch, self.joining, strict=True)]
        )

    def running(self) -> int:
        return len(self.left)

    def enqueue(self, ids: IntArray, times: FloatArray) -> None:
        super().enqueue(ids, times)
        self.blocked = False

    def _start_iteration(self, slot: int, at: float) -> None:
        batch = self.batch[slot]
        batch += self.joining[slot]
        self.joining[slot] = []
        if not batch:
            self.busy[slot] = False
            return
        kv = sum(self.ctx[r] for r in batch)
        itl = float(self.times.itl_s(np.asarray([kv]), np.asarray([kv / len(batch)]))[0])
        itl *= self.config.perf_skew
        if self.config.noise_cv > 0:
            itl *= float(_lognormal(self.rng, self.config.noise_cv, 1)[0])
        self.busy[slot] = True
        self._push(at + itl, self._ITERATION, slot)

    def _end_iteration(self, slot: int, at: float, finished: list[int]) -> None:
        still: list[int] = []
        for rid in self.batch[slot]:
            self.left[rid] -= 1
            self.ctx[rid] += 1.0
            if self.left[rid] <= 0:
                del self.left[rid], self.ctx[rid]
                self.finish[rid] = at
                self.reserved_kv[slot] -= self.reserve[rid]
                self.last_finish[slot] = at
                finished.append(rid)
            else:
                still.append(rid)
        self.batch[slot] = still
        self.blocked = False
        self._start_iteration(slot, at)

    def _admit_head(self) -> bool:
        """Admit the queue's head (at its arrival, or now if it waited) if a worker has room."""
        rid = int(self.q_ids[self.head])
        when = max(float(self.q_time[self.head]), self.clock)
        slot = self.pick(when, float(self.reserve[rid]))
        if slot is None:
            return False
        self.head += 1
        self.reserved_kv[slot] += self.reserve[rid]
        self.left[rid] = int(self.tokens[rid])
        self.ctx[rid] = float(self.context0[rid])
        self.joining[slot].append(rid)
        if not self.busy[slot]:
            self._start_iteration(slot, when)
        return True

    def run(self, until: float) -> list[int]:
        finished: list[int] = []
        while True:
            arrival = (
                float(self.q_time[self.head])
                if self.head < self.q_ids.size and not self.blocked
                else math.inf
            )
            event = self.events[0][0] if self.events else math.inf
            if min(arrival, event) >= until:
                break
            if arrival <= event:
                self.clock = max(self.clock, arrival)
                if not self._admit_head():
                    self.blocked = True
                continue
            at, _, kind, slot = heapq.heappop(self.events)
            self.clock = at
            if kind == self._ITERATION:
                self._end_iteration(slot, at, finished)
            else:
                self.blocked = False  # a new worker may take the head
            # A blocked head waited for room; it joins when room appears, not at its arrival.
            while not self.blocked and self.head < self.q_ids.size:
                if float(self.q_time[self.head]) > at:
                    break
                if not self._admit_head():
                    self.blocked = True
            self.release_idle_retired()
        self.clock = max(self.clock, until)
        return finished


# ---------------------------------------------------------------------------------------------
# The cluster


class Cluster:
    """One P/D deployment driven by a trace; ``advance`` it, ``scale`` it, ``finish`` it."""

    def __init__(self, trace: Trace, profile: Profile, config: ClusterConfig) -> None:
        self.config = config
        self.profile = profile
        self.times = ServiceTimes(profile)
        limit = config.max_context_tokens or profile.max_context_tokens
        if limit is None:
            raise ValueError("the profile gives no max_context_tokens; set max_context_tokens")
        self.max_context_tokens = int(limit)
        order = np.argsort(trace.arrival_s, kind="stable")
        self.arrival: FloatArray = np.asarray(trace.arrival_s, dtype=np.float64)[order]
        isl, osl, clipped = clip_to_context(
            np.asarray(trace.isl_tokens, dtype=np.int64)[order],
            np.maximum(np.asarray(trace.osl_tokens, dtype=np.int64)[order], 1),
            self.max_context_tokens,
        )
        self.isl, self.osl, self.clipped = isl, osl, clipped
        n = self.arrival.size
        rng = np.random.default_rng(config.seed)
        service = self.times.prefill_s(isl.astype(np.float64)) * config.perf_skew
        service = service * _lognormal(rng, config.noise_cv, n)
        self.prefill_service_s = service
        self.finish: FloatArray = np.full(n, np.nan)
        self.prefill = _Prefill(self.arrival, service)
        tokens = (osl - 1).astype(np.float64)
        self.decode_tokens = tokens
        decode_cls = _SlicedDecode if config.decode_model is DecodeModel.SLICED else _TokenDecode
        self.decode: _Decode = decode_cls(
            self.times,
            config,
            isl.astype(np.float64),
            tokens,
            # A request larger than a whole engine's KV cache still runs, alone.
            np.minimum(isl + osl, self.times.max_kv_tokens).astype(np.float64),
            self.finish,
            rng,
        )
        self.workers: list[Worker] = []
        self.now = 0.0
        self._carry: IntArray = np.zeros(0, dtype=np.int64)  # started, first token still ahead
        self._prev_started: IntArray = np.zeros(0, dtype=np.int64)
        for _ in range(config.start_prefill):
            self._add(Role.PREFILL, ready_at=0.0)
        for _ in range(config.start_decode):
            self._add(Role.DECODE, ready_at=0.0)

    # -- workers

    def _add(self, role: Role, ready_at: float) -> None:
        worker = Worker(len(self.workers), role, self.now, ready_at)
        self.workers.append(worker)
        if role is Role.PREFILL:
            self.prefill.add(worker)
        else:
            self.decode.add(worker)

    def active(self, role: Role) -> list[Worker]:
        """Workers of a role that count towards its replicas: serving or starting."""
        return [w for w in self.workers if w.role is role and w.retired_at is None]

    def replicas(self) -> tuple[int, int]:
        return len(self.active(Role.PREFILL)), len(self.active(Role.DECODE))

    def serving(self) -> tuple[int, int]:
        now = self.now
        return (
            sum(1 for w in self.active(Role.PREFILL) if w.ready_at <= now),
            sum(1 for w in self.active(Role.DECODE) if w.ready_at <= now),
        )

    def scale(self, prefill: int, decode: int) -> None:
        """Ask for ``prefill`` and ``decode`` workers from now on."""
        if prefill < 0 or decode < 0:
            raise ValueError("replica counts must be >= 0")
        for role, wanted in ((Role.PREFILL, prefill), (Role.DECODE, decode)):
            active = self.active(role)
            if wanted > len(active):
                for _ in range(wanted - len(active)):
                    self._add(role, ready_at=self.now + self.config.startup_delay_s)
            elif wanted < len(active):
                self._retire(role, active, len(active) - wanted)

    def _retire(self, role: Role, active: list[Worker], count: int) -> None:
        now = self.now
        starting = sorted((w for w in active if w.ready_at > now), key=lambda w: -w.wid)
        serving = [w for w in active if w.ready_at <= now]
        if role is Role.PREFILL:
            busy = self.prefill.busy_until
            serving.sort(key=lambda w: (busy.get(w.wid, 0.0), w.wid))
        else:
            kv = self.decode.reserved_kv
            serving.sort(key=lambda w: (float(kv[self.decode.slot_of(w.wid)]), w.wid))
        chosen = (starting + serving)[:count]
        for worker in chosen:
            worker.retired_at = now
            if worker.ready_at > now:  # cancelled before it served
                worker.released_at = now
        if role is Role.PREFILL:
            self.prefill.remove({w.wid for w in chosen})
            for worker in chosen:
                if worker.released_at is None:
                    worker.released_at = max(now, self.prefill.busy_until.get(worker.wid, now))
        else:
            self.decode.retired()

    # -- time

    def advance(self, until_s: float) -> WindowStats:
        """Simulate up to ``until_s``; what happened in ``[now, until_s)``."""
        if until_s < self.now:
            raise ValueError(f"time goes forward: {until_s} < {self.now}")
        start_s = self.now
        first = self.prefill.next
        self.prefill.run(until_s)
        started = np.arange(first, self.prefill.next, dtype=np.int64)
        to_decode = started[self.decode_tokens[started] > 0]
        self.decode.enqueue(to_decode, self.prefill.end[to_decode])
        single = started[self.decode_tokens[started] <= 0]
        self.finish[single] = self.prefill.end[single]
        finished = self.decode.run(until_s)
        self.now = until_s
        return self._window(start_s, until_s, started, finished)

    def _window(
        self, start_s: float, end_s: float, started: IntArray, finished_decode: list[int]
    ) -> WindowStats:
        lo = int(np.searchsorted(self.arrival, start_s, side="left"))
        hi = int(np.searchsorted(self.arrival, end_s, side="left"))
        isl = self.isl[lo:hi].astype(np.float64)
        osl = self.osl[lo:hi].astype(np.float64)

        candidates = np.concatenate([self._carry, started])
        first_token = self.prefill.end[candidates]
        in_window = first_token < end_s
        now_first = candidates[in_window]
        self._carry = candidates[~in_window]
        ttft = self.prefill.end[now_first] - self.arrival[now_first]

        single = now_first[self.decode_tokens[now_first] <= 0]
        done = np.concatenate([np.asarray(finished_decode, dtype=np.int64), single])
        gaps = self.decode_tokens[done]
        decode_time = self.finish[done] - self.prefill.end[done]
        with_gaps = gaps > 0
        per_request_itl = decode_time[with_gaps] / gaps[with_gaps]

        busy = self._prefill_busy(start_s, end_s, started)
        prefill_serving, decode_serving = self.serving()
        p_all, d_all = self.replicas()
        kv = self.decode.kv_tokens_per_slot()
        serving_slots = [
            slot for slot, w in enumerate(self.decode.slots) if w.serving(end_s)
        ]
        window = end_s - start_s
        queue = self.prefill.start[now_first] - self.arrival[now_first]
        compute = self.prefill.end[now_first] - self.prefill.start[now_first]
        # first token still ahead at end_s: started (carried) or not started yet
        pending = np.concatenate([self._carry, np.arange(self.prefill.next, hi)])
        return WindowStats(
            start_s=start_s,
            end_s=end_s,
            num_requests=hi - lo,
            isl_avg=_mean(isl),
            osl_avg=_mean(osl),
            isl_p90=_pct(isl, 90),
            osl_p90=_pct(osl, 90),
            first_tokens=int(now_first.size),
            ttft_avg_s=_mean(ttft),
            ttft_p90_s=_pct(ttft, 90),
            ttft_p99_s=_pct(ttft, 99),
            finished=int(done.size),
            itl_avg_s=float(decode_time[with_gaps].sum() / gaps[with_gaps].sum())
            if with_gaps.any()
            else None,
            itl_p90_s=_pct(per_request_itl, 90),
            itl_p99_s=_pct(per_request_itl, 99),
            request_duration_avg_s=_mean(self.finish[done] - self.arrival[done]),
            prefill_waiting=self.prefill.waiting(end_s),
            prefill_running=self.prefill.running(end_s),
            decode_waiting=self.decode.waiting(end_s),
            decode_running=self.decode.running(),
            kv_cache_usage=float(np.mean(kv[serving_slots]) / self.times.max_kv_tokens)
            if serving_slots
            else None,
            prefill_busy_fraction=busy / (prefill_serving * window)
            if prefill_serving and window > 0
            else None,
            prefill_serving=prefill_serving,
            decode_serving=decode_serving,
            prefill_starting=p_all - prefill_serving,
            decode_starting=d_all - decode_serving,
            isl_p50=_pct(isl, 50),
            isl_p99=_pct(isl, 99),
            arrivals=window_stats.arrival_stats(
                window_stats.counts_per_bin(self.arrival[lo:hi], start_s, end_s), 1.0
            )
            if window > 0
            else None,
            queue_time_avg_s=_mean(queue),
            queue_time_p90_s=_pct(queue, 90),
            prefill_time_avg_s=_mean(compute),
            prefill_time_p90_s=_pct(compute, 90),
            decode_time_avg_s=_mean(decode_time),
            requests_before_first_token=int(pending.size),
            prefill_tokens_pending=float(self.isl[pending].sum()),
            ttft_samples_s=ttft,
            itl_samples_s=per_request_itl,
        )

    def _prefill_busy(self, start_s: float, end_s: float, started: IntArray) -> float:
        """Prefill busy seconds inside the window (requests started in it or just before)."""
        ids = np.concatenate([self._prev_started, started])
        self._prev_started = started
        if ids.size == 0:
            return 0.0
        begin = np.maximum(self.prefill.start[ids], start_s)
        end = np.minimum(self.prefill.end[ids], end_s)
        return float(np.clip(end - begin, 0.0, None).sum())

    def finish_run(self, horizon_s: float, max_drain_s: float = 86_400.0) -> SimResult:
        """Stop planning at ``horizon_s``; let the requests in flight finish (up to
        ``max_drain_s`` more), and bill every worker until then or until its work is done."""
        if horizon_s > self.now:
            self.advance(horizon_s)
        self.decode.finishing = self.decode.track_finish = True
        step = max(self.config.startup_delay_s, 60.0)
        deadline = self.now + max_drain_s
        n = self.arrival.size
        while self.now < deadline:
            all_started = self.prefill.next >= n
            if all_started and not np.isnan(self.finish).any():
                break
            if not any(w.released_at is None for w in self.workers):
                break  # nobody left to serve what remains
            self.advance(min(self.now + step, deadline))
        end = max(horizon_s, self._last_finish())
        for worker in self.workers:
            if worker.released_at is None:
                if worker.retired_at is None:
                    worker.retired_at = horizon_s
                worker.released_at = max(horizon_s, self._busy_end(worker))
        return SimResult(
            arrival_s=self.arrival,
            isl_tokens=self.isl,
            osl_tokens=self.osl,
            clipped=self.clipped,
            prefill_start_s=self.prefill.start,
            first_token_s=self.prefill.end,
            finish_s=self.finish,
            workers=self.workers,
            end_s=end,
            gpus_per_engine={
                Role.PREFILL: self.config.prefill_engine_gpus,
                Role.DECODE: self.config.decode_engine_gpus,
            },
        )

    def _last_finish(self) -> float:
        done = self.finish[np.isfinite(self.finish)]
        return float(done.max()) if done.size else 0.0

    def _busy_end(self, worker: Worker) -> float:
        if worker.role is Role.PREFILL:
            return self.prefill.busy_until.get(worker.wid, -math.inf)
        return float(self.decode.last_finish[self.decode.slot_of(worker.wid)])


def _mean(values: FloatArray) -> float | None:
    return float(values.mean()) if values.size else None


def _pct(values: FloatArray, q: float) -> float | None:
    return float(np.percentile(values, q)) if values.size else None
