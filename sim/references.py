"""References a policy is compared with, beside the clairvoyant (``sim.clairvoyant``).

- ``fixed``: constant prefill and decode counts, given;
- ``best-fixed``: the cheapest constant counts that reach the attainment goal, found with
  hindsight, as an operator sizes a static fleet from last week's traffic;
- ``dynamo-tuned``: Dynamo's policy with the knobs an operator has when it misses its targets:
  a prefill headroom multiplier, a replica floor (Dynamo's ``min_endpoint``) and an ITL target
  planned tighter than the real one, set to the cheapest combination that reaches the goal;
- ``token-aware``: llm-d's token-aware KEDA autoscaling for a P/D-disaggregated deployment as
  shipped (``guides/workload-autoscaling/keda-epp-token-aware/pd-disaggregation/base/`` in
  llm-d/llm-d): prefill replicas = ceil(queued prefill tokens / V_P / threshold) with V_P the
  calibrated prefill tokens per second of one engine (8,192 / its TTFT at 8,192 tokens, as the
  guide's ``calibrate.sh``) and threshold = TTFT target - ISL / V_P seconds (the guide's rule for
  choosing it); decode replicas = ceil(sum of the decode engines' KV-cache usage / 0.8); each
  through the HPA with the ScaledObjects' behaviour: no scale-up stabilisation and at most one
  pod added per 180 s, a 300 s scale-down stabilisation window and at most one pod removed per
  300 s, the HPA's 10 % tolerance.

The searches evaluate candidates with fast, exact prefill replays (``sim.fcfs``) and a fluid
estimate of decode (``sim.fluid``); every pick is then run in the simulator, and that run is
what is reported.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from services.decider.knobs import DeploymentKnobs
from services.decider.policies import dynamo
from services.decider.policies.contract import PlannedLoad, PolicyState
from services.forecaster.core import Forecaster
from services.forecaster.settings import ForecasterSettings
from shared import settings as settings_mod
from shared import window_stats
from shared.messages import MetricSnapshot
from shared.perf_model import Profile
from shared.traces import Trace
from sim import metrics
from sim.cluster import Cluster, ClusterConfig, WindowStats
from sim.fcfs import PrefillReplay
from sim.fluid import DecodeFluid
from sim.loop import (
    LoopResult,
    Observation,
    Planner,
    PlanningSetup,
    ServicePlanner,
    StaticPlanner,
    Step,
    cut,
    run_closed_loop,
    snapshot_of,
    trace_needs,
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# One line each, for ``slaplanner simulate --help``.
HELP = {
    "clairvoyant": "cheapest fleet per interval reaching --goal, knowing the future",
    "fixed": "constant --prefill N and --decode M engines",
    "best-fixed": "cheapest constant fleet reaching --goal, found with hindsight",
    "dynamo-tuned": "Dynamo with the cheapest headroom, floors, ITL reaching --goal",
    "token-aware": "llm-d's token-aware KEDA rule as shipped (queued tokens, KV)",
}
NAMES = tuple(HELP)


class Workload:
    """A trace on a simulated cluster, with what the searches reuse across candidates.
    ``progress(done, total)`` is told each interval of each run in the simulator."""

    def __init__(
        self, trace: Trace, profile: Profile, setup: PlanningSetup, config: ClusterConfig,
        max_intervals: int | None = None, progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.progress = progress
        self.trace = cut(trace, setup.interval_s, max_intervals)
        self.profile, self.setup, self.config = profile, setup, config
        self.max_intervals = max_intervals
        self.cluster = Cluster(self.trace, profile, replace(config, start_prefill=0,
                                                            start_decode=0))
        interval = setup.interval_s
        self.intervals = math.floor(float(self.cluster.arrival[-1]) / interval) + 1
        if max_intervals:
            self.intervals = min(self.intervals, max_intervals)
        self.requests = int(self.cluster.arrival.size)
        self.needs = trace_needs(self.trace, profile, setup, config)
        self.replay = PrefillReplay(self.cluster)

    def run(self, planner: Planner, start: tuple[int, int]) -> LoopResult:
        """``planner`` on this workload in the simulator, from ``start`` engines."""
        return run_closed_loop(
            self.trace, self.profile,
            replace(self.config, start_prefill=start[0], start_decode=start[1]),
            planner, self.setup.interval_s, self.setup.ttft_target_s, self.setup.itl_target_s,
            max_intervals=self.max_intervals, needs=self.needs, progress=self.progress,
        )

    def ttft_met(self, start: int, requested: list[int]) -> tuple[BoolArray, FloatArray]:
        """Exactly as the simulator: per request, TTFT met; and the first-token times."""
        first = self.replay.first_token_s(self.setup.interval_s, start, requested)
        ttft = first - self.cluster.arrival
        return np.isfinite(ttft) & (ttft <= self.setup.ttft_target_s), first

    def itl_met(self, first_token_s: FloatArray, serving: IntArray) -> BoolArray:
        """The fluid estimate with ``serving[k]`` decode engines serving in interval ``k``."""
        c = self.cluster
        fluid = DecodeFluid(first_token_s, c.isl, c.osl, c.times, c.config.perf_skew,
                            self.setup.itl_target_s)
        per_bin = np.repeat(serving.astype(np.float64),
                            round(self.setup.interval_s / fluid.bin_s))
        engines = np.full(fluid.bins, float(serving[-1]))
        engines[: min(per_bin.size, fluid.bins)] = per_bin[: fluid.bins]
        return fluid.itl_met(engines)

    def serving(self, start: int, requested: list[int]) -> IntArray:
        """Engines serving in each interval for a schedule: one asked for at the end of window
        ``j`` serves from the startup delay on, and a scale-down cancels the newest first, so
        interval ``k`` is served by the fewest asked for over the startup delay before it."""
        asked = np.asarray([start, *requested[:-1]], dtype=np.int64)
        delay = math.ceil(self.config.startup_delay_s / self.setup.interval_s - 1e-9)
        out = asked.copy()
        for shift in range(1, delay + 1):
            out[shift:] = np.minimum(out[shift:], asked[:-shift])
        return out

    def cost(self, start: tuple[int, int], prefill: list[int], decode: list[int]) -> float:
        """GPU-intervals billed for the requests (starting engines included)."""
        p = np.asarray([start[0], *prefill[:-1]]) * self.config.prefill_engine_gpus
        d = np.asarray([start[1], *decode[:-1]]) * self.config.decode_engine_gpus
        return float((p + d).sum())


@dataclass
class Reference:
    """A reference's validated run and how it was found."""

    run: LoopResult
    detail: dict[str, Any] = field(default_factory=dict)


def fixed(workload: Workload, prefill: int, decode: int) -> Reference:
    if prefill < 1 or decode < 1:
        raise ValueError(f"--prefill and --decode: at least 1 engine each, got {prefill}, {decode}")
    planner = StaticPlanner(prefill, decode, name="fixed")
    return Reference(workload.run(planner, (prefill, decode)),
                     {"prefill": prefill, "decode": decode})


# The decode estimate decides nothing alone: a pair (or setting) is run in the simulator unless
# its estimate falls this far below the goal; once a decode fleet has been run, its measured
# ITL outcome replaces the estimate.
ESTIMATE_MARGIN = 0.02


def _itl_measured(result: LoopResult, itl_target_s: float) -> BoolArray:
    return metrics.attainment(result.result, 0.0, itl_target_s)[1]


def _reached(result: LoopResult, goal: float) -> bool:
    attainment = result.scores["sla_attainment"]
    return attainment is not None and attainment >= goal - 1e-12


# --------------------------------------------------------------------------------------------
# best-fixed


def fewest_fixed_prefill(workload: Workload, goal: float, most: int | None = None,
                         cache: dict[int, tuple[BoolArray, FloatArray]] | None = None) -> int:
    """The fewest constant prefill engines whose TTFTs alone reach ``goal`` (more engines
    never miss more), by bisection over exact replays; ``cache`` keeps the replays."""
    most = most or max(1, workload.setup.knobs.max_total_gpus - 1)
    cache = {} if cache is None else cache
    low, high = 1, most
    while low < high:
        mid = (low + high) // 2
        if mid not in cache:
            cache[mid] = workload.ttft_met(mid, [mid] * workload.intervals)
        if cache[mid][0].mean() >= goal:
            high = mid
        else:
            low = mid + 1
    if low not in cache:
        cache[low] = workload.ttft_met(low, [low] * workload.intervals)
    return low


def best_fixed(
    workload: Workload, goal: float, most: int | None = None, validations: int = 6
) -> Reference:
    """The cheapest constant (prefill, decode) reaching ``goal``.

    Each pair is scored from its exact TTFT outcome and its decode estimate; pairs that may
    reach the goal are run in the simulator, cheapest first, until one does there. If none
    does, the one that came closest is reported, and the detail says so.
    """
    most = most or max(1, workload.setup.knobs.max_total_gpus - 1)
    windows = workload.intervals
    ttft: dict[int, tuple[BoolArray, FloatArray]] = {}

    def prefill_met(p: int) -> BoolArray:
        if p not in ttft:
            ttft[p] = workload.ttft_met(p, [p] * windows)
        return ttft[p][0]

    p_min = fewest_fixed_prefill(workload, goal, most, ttft)
    first = ttft[p_min][1]
    estimated: dict[int, BoolArray] = {}
    measured: dict[int, BoolArray] = {}  # ITL outcomes of decode fleets run in the simulator

    def estimate(p: int, d: int) -> tuple[float, float]:
        """Estimated attainment of (p, d), and the margin it is held to."""
        if d in measured:
            return float((prefill_met(p) & measured[d]).mean()), 0.0
        if d not in estimated:
            estimated[d] = workload.itl_met(first, np.full(windows, d))
        return float((prefill_met(p) & estimated[d]).mean()), ESTIMATE_MARGIN

    gp, gd = workload.config.prefill_engine_gpus, workload.config.decode_engine_gpus
    pairs = sorted((p * gp + d * gd, p, d) for p in range(p_min, most + 1)
                   for d in range(1, most + 2 - p))
    tried: list[dict[str, Any]] = []
    closest: tuple[float, int, int, LoopResult] | None = None
    for _, p, d in pairs:
        value, margin = estimate(p, d)
        if value < goal - margin:
            continue
        result = fixed(workload, p, d).run
        measured[d] = _itl_measured(result, workload.setup.itl_target_s)
        achieved = float(result.scores["sla_attainment"])
        tried.append({"prefill": p, "decode": d, "sla_attainment": achieved})
        if closest is None or achieved > closest[0]:
            closest = (achieved, p, d, result)
        if _reached(result, goal) or len(tried) >= validations:
            break
    if closest is None:  # nothing is estimated to reach it: the most engines there are
        p, d = max(p_min, most - 1), min(2, most)
        result = fixed(workload, p, d).run
        closest = (float(result.scores["sla_attainment"]), p, d, result)
    attainment, p, d, result = closest
    result.planner = "best-fixed"
    return Reference(result, {"prefill": p, "decode": d, "tried": tried,
                              "reached_goal": attainment >= goal - 1e-12})


# --------------------------------------------------------------------------------------------
# dynamo-tuned

HEADROOMS = (1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.75, 2.0, 2.5, 3.0)
PLANNED_ITL_SHARES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


@dataclass(frozen=True)
class DynamoKnobs:
    """What an operator sets on Dynamo's planner (correction off, constant predictor)."""

    prefill_headroom: float = 1.0
    min_prefill: int = 1  # the replica floors
    min_decode: int = 1
    planned_itl_share: float = 1.0  # the ITL target planned for, over the real one

    def of(self, setup: PlanningSetup) -> PlanningSetup:
        """Dynamo's policy with these knobs over ``setup``'s (its real ITL target is what the
        run is scored on; the decider plans for the tighter one)."""
        tuned = setup.with_knobs(
            policy="dynamo", no_correction=True, prefill_headroom=self.prefill_headroom,
            min_prefill_replicas=self.min_prefill, min_decode_replicas=self.min_decode,
            itl_target_s=setup.itl_target_s * self.planned_itl_share,
        )
        return replace(tuned, predictor="constant", planner=None)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def trace_snapshots(workload: Workload, start: tuple[int, int]) -> Iterator[MetricSnapshot]:
    """The snapshots of each window as far as they come from the trace alone (requests, their
    lengths, their arrivals per second); the cluster's latencies are left unobserved."""
    c, interval = workload.cluster, workload.setup.interval_s
    bounds = np.searchsorted(c.arrival, np.arange(workload.intervals + 1) * interval)
    for k in range(workload.intervals - 1):
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        isl = c.isl[lo:hi].astype(np.float64)
        osl = c.osl[lo:hi].astype(np.float64)
        some = isl.size > 0
        begin, end = k * interval, (k + 1) * interval

        def pct(values: FloatArray, q: float, some: bool = some) -> float | None:
            return float(np.percentile(values, q)) if some else None

        yield snapshot_of(WindowStats(
            start_s=begin, end_s=end, num_requests=int(isl.size),
            isl_avg=float(isl.mean()) if some else None,
            osl_avg=float(osl.mean()) if some else None,
            isl_p90=pct(isl, 90), osl_p90=pct(osl, 90), isl_p50=pct(isl, 50),
            isl_p99=pct(isl, 99),
            arrivals=window_stats.arrival_stats(
                window_stats.counts_per_bin(c.arrival[lo:hi], begin, end), 1.0
            ),
            first_tokens=0, ttft_avg_s=None, ttft_p90_s=None, ttft_p99_s=None, finished=0,
            itl_avg_s=None, itl_p90_s=None, itl_p99_s=None, request_duration_avg_s=None,
            prefill_waiting=0, prefill_running=0, decode_waiting=0, decode_running=0,
            kv_cache_usage=None, prefill_busy_fraction=None, prefill_serving=start[0],
            decode_serving=start[1], prefill_starting=0, decode_starting=0,
        ))


class DynamoOpenLoop:
    """Dynamo's decisions without correction depend on the trace's load only (requests and
    lengths per window), not on what the cluster did; so every knob setting is decided here
    from one pass of the forecaster, with Dynamo's own ``decide``."""

    def __init__(self, workload: Workload, start: tuple[int, int]) -> None:
        self.workload, self.start = workload, start
        setup = DynamoKnobs().of(workload.setup)
        forecaster = Forecaster(
            settings_mod.settings_from(ForecasterSettings, {}, setup.service_env()["forecaster"])
        )
        self.steps: list[tuple[PlannedLoad, MetricSnapshot | None]] = []
        for snapshot in trace_snapshots(workload, start):
            forecaster.observe(snapshot)
            forecast = forecaster.forecast(snapshot)
            step = forecast.steps[0]
            load = PlannedLoad(step.num_requests, step.isl_avg, step.osl_avg, forecast.window_s,
                               forecast)
            self.steps.append((load, forecast.observed))

    def knobs(self, knobs: DynamoKnobs) -> DeploymentKnobs:
        return knobs.of(self.workload.setup).knobs

    def schedule(self, knobs: DynamoKnobs) -> tuple[IntArray, IntArray]:
        """Replicas asked for at the end of each window (the last window's repeated)."""
        config, profile = self.knobs(knobs), self.workload.profile
        state = PolicyState()
        prefill: list[int] = []
        decode: list[int] = []
        for load, observed in self.steps:
            decision = dynamo.decide(load, observed, profile, config, state)
            state = decision.state
            prefill.append(decision.prefill_replicas)
            decode.append(decision.decode_replicas)
        last = (prefill[-1], decode[-1]) if prefill else self.start
        return np.asarray([*prefill, last[0]]), np.asarray([*decode, last[1]])


def dynamo_tuned(
    workload: Workload, goal: float, start: tuple[int, int], validations: int = 6
) -> Reference:
    """The cheapest Dynamo knob setting (headroom, floors, planned ITL) that reaches ``goal``.

    Every setting is decided open loop (``DynamoOpenLoop``): the headroom moves prefill only,
    the planned ITL decode only, and a floor raises its role to it, so one pass per headroom and
    per planned ITL gives every combination (exact while the GPU budget does not bind, which the
    simulator's run of the pick then checks). Settings are scored cheapest first, from their
    exact TTFT outcome and their decode estimate, skipping those that a cheaper failure already
    rules out; those that may reach the goal are run in the simulator until one does there.
    Floors go up to the constant fleet whose TTFTs alone reach the goal, and to the lower
    bound's busiest decode interval plus one.
    """
    open_loop = DynamoOpenLoop(workload, start)
    prefill_floors = range(1, fewest_fixed_prefill(workload, goal) + 1)
    decode_floors = range(1, workload.needs.peak()[1] + 2)
    by_headroom = {h: open_loop.schedule(DynamoKnobs(h))[0] for h in HEADROOMS}
    by_itl = {r: open_loop.schedule(DynamoKnobs(planned_itl_share=r))[1]
              for r in PLANNED_ITL_SHARES}
    settings = [DynamoKnobs(h, fp, fd, r) for h in HEADROOMS for fp in prefill_floors
                for fd in decode_floors for r in PLANNED_ITL_SHARES]

    def counts(knobs: DynamoKnobs) -> tuple[IntArray, IntArray]:
        return (np.maximum(by_headroom[knobs.prefill_headroom], knobs.min_prefill),
                np.maximum(by_itl[knobs.planned_itl_share], knobs.min_decode))

    # Settings that ask for the same replicas are one: the first in the order below stands for
    # them (the least headroom, the lowest floors, the loosest planned ITL).
    order = sorted(settings, key=lambda k: (k.prefill_headroom, k.min_prefill, k.min_decode,
                                            -k.planned_itl_share))
    distinct: dict[tuple[bytes, bytes], DynamoKnobs] = {}
    for knobs in order:
        prefill, decode = counts(knobs)
        distinct.setdefault((prefill.tobytes(), decode.tobytes()), knobs)

    ttft: dict[bytes, tuple[BoolArray, FloatArray]] = {}
    itl: dict[bytes, BoolArray] = {}
    measured: dict[bytes, BoolArray] = {}  # decode schedules run in the simulator
    short_ttft: list[tuple[float, int]] = []  # (headroom, floor) whose TTFTs miss the goal
    short_itl: list[tuple[float, int]] = []  # (planned share, floor) whose ITLs miss it

    def estimate(knobs: DynamoKnobs) -> float:
        """The estimated attainment, plus the margin it is given (0 where ruled out)."""
        h, fp = knobs.prefill_headroom, knobs.min_prefill
        r, fd = knobs.planned_itl_share, knobs.min_decode
        if any(h <= h0 and fp <= f0 for h0, f0 in short_ttft):
            return 0.0  # less prefill than a setting that already missed
        if any(r >= r0 and fd <= f0 for r0, f0 in short_itl):
            return 0.0  # less decode than a setting that already missed
        prefill, decode = counts(knobs)
        key_p, key_d = prefill.tobytes(), decode.tobytes()
        if key_p not in ttft:
            ttft[key_p] = workload.ttft_met(start[0], prefill.tolist())
        met_p, first = ttft[key_p]
        if met_p.mean() < goal:
            short_ttft.append((h, fp))
            return float(met_p.mean())
        if key_d in measured:
            return float((met_p & measured[key_d]).mean())
        if key_d not in itl:
            itl[key_d] = workload.itl_met(first, workload.serving(start[1], decode.tolist()))
        if itl[key_d].mean() < goal - ESTIMATE_MARGIN:
            short_itl.append((r, fd))
        return float((met_p & itl[key_d]).mean()) + ESTIMATE_MARGIN

    gp, gd = workload.config.prefill_engine_gpus, workload.config.decode_engine_gpus

    def cost(knobs: DynamoKnobs) -> float:
        prefill, decode = counts(knobs)
        return float(gp * (start[0] + prefill[:-1].sum()) + gd * (start[1] + decode[:-1].sum()))

    ranked = sorted(distinct.values(), key=lambda k: (cost(k), k.prefill_headroom,
                                                      k.min_prefill, k.min_decode,
                                                      -k.planned_itl_share))
    tried: list[dict[str, Any]] = []
    closest: tuple[float, DynamoKnobs, LoopResult] | None = None
    for knobs in ranked:
        if estimate(knobs) < goal:
            continue
        result = workload.run(dynamo_planner(workload, knobs), start)
        measured[counts(knobs)[1].tobytes()] = _itl_measured(result, workload.setup.itl_target_s)
        attainment = float(result.scores["sla_attainment"])
        tried.append({**knobs.as_dict(), "sla_attainment": attainment})
        if closest is None or attainment > closest[0]:
            closest = (attainment, knobs, result)
        if _reached(result, goal) or len(tried) >= validations:
            break
    if closest is None:  # no setting is estimated to reach the goal: the most generous one
        knobs = DynamoKnobs(HEADROOMS[-1], prefill_floors[-1], decode_floors[-1],
                            PLANNED_ITL_SHARES[-1])
        result = workload.run(dynamo_planner(workload, knobs), start)
        closest = (float(result.scores["sla_attainment"]), knobs, result)
    attainment, knobs, result = closest
    result.planner = "dynamo-tuned"
    return Reference(result, {**knobs.as_dict(), "reached_goal": attainment >= goal - 1e-12,
                              "tried": tried, "settings": len(settings),
                              "distinct_settings": len(distinct),
                              "schedules_estimated": len(ttft) + len(itl)})


def dynamo_planner(workload: Workload, knobs: DynamoKnobs) -> Planner:
    return ServicePlanner(knobs.of(workload.setup))


# --------------------------------------------------------------------------------------------
# token-aware (llm-d)

CALIBRATION_CHUNK_TOKENS = 8192  # the guide's calibrate.sh default CHUNK_SIZE
DECODE_KV_THRESHOLD = 0.8


@dataclass(frozen=True)
class HpaBehaviour:
    """The ``behavior`` of llm-d's token-aware ScaledObjects, and the HPA's tolerance."""

    up_pods: int = 1
    up_period_s: float = 180.0
    down_pods: int = 1
    down_period_s: float = 300.0
    down_window_s: float = 300.0
    tolerance: float = 0.1
    min_replicas: int = 1
    max_replicas: int = 10


class Hpa:
    """One HPA on one external metric with ``AverageValue`` target (Kubernetes'
    ``replica_calculator`` and ``normalizeDesiredReplicasWithBehaviors``)."""

    def __init__(self, behaviour: HpaBehaviour) -> None:
        self.b = behaviour
        self.recommendations: deque[tuple[float, int]] = deque()
        self.events: deque[tuple[float, int]] = deque()  # (time, change in replicas)

    def desired(self, value: float, target: float, current: int) -> int:
        want = math.ceil(value / target - 1e-12) if value > 0 else 0
        if current > 0 and abs(value / (target * current) - 1.0) <= self.b.tolerance:
            want = current
        return want

    def scale(self, now_s: float, value: float, target: float, current: int) -> int:
        b = self.b
        proposed = self.desired(value, target, current)
        self.recommendations.append((now_s, proposed))
        while self.recommendations and self.recommendations[0][0] <= now_s - b.down_window_s:
            self.recommendations.popleft()
        down = max(r for _, r in self.recommendations)
        recommendation = current
        if recommendation < proposed:  # no scale-up stabilisation
            recommendation = proposed
        if recommendation > down:
            recommendation = down
        added = sum(c for t, c in self.events if c > 0 and t > now_s - b.up_period_s)
        removed = -sum(c for t, c in self.events if c < 0 and t > now_s - b.down_period_s)
        recommendation = min(recommendation, current - added + b.up_pods)
        recommendation = max(recommendation, current + removed - b.down_pods)
        recommendation = min(max(recommendation, b.min_replicas), b.max_replicas)
        if recommendation != current:
            self.events.append((now_s, recommendation - current))
        while self.events and self.events[0][0] <= now_s - max(b.up_period_s, b.down_period_s):
            self.events.popleft()
        return recommendation


class TokenAwarePlanner:
    """llm-d's token-aware rule on the window's serving metrics: the prompt tokens of requests
    still before their first token (the router's ``llm_d_epp_inflight_tokens``: dispatched,
    not yet prefilled) and the decode engines' KV-cache usage (vLLM's
    ``kv_cache_usage_perc``)."""

    name = "token-aware"

    def __init__(self, workload: Workload, behaviour: HpaBehaviour) -> None:
        c = workload.cluster
        # calibrate.sh: V_P = CHUNK_SIZE / median TTFT of one chunk on an idle engine.
        chunk = float(CALIBRATION_CHUNK_TOKENS)
        idle_ttft_s = float(c.times.prefill_s(np.asarray([chunk]))[0]) * c.config.perf_skew
        self.tokens_per_s = chunk / idle_ttft_s
        isl_avg = float(c.isl.mean()) if c.isl.size else 0.0
        ttft = workload.setup.ttft_target_s
        # threshold ~= TTFT SLO - ISL / V_P (the guide); at least a tenth of the target.
        self.threshold_s = max(ttft - isl_avg / self.tokens_per_s, 0.1 * ttft)
        self.prefill, self.decode = Hpa(behaviour), Hpa(behaviour)

    def plan(self, observation: Observation) -> Step:
        stats, now = observation.stats, observation.now_s
        prefill_now, decode_now = observation.replicas
        backlog_s = stats.prefill_tokens_pending / self.tokens_per_s
        kv = (stats.kv_cache_usage or 0.0) * stats.decode_serving
        return Step(
            self.prefill.scale(now, backlog_s, self.threshold_s, prefill_now),
            self.decode.scale(now, kv, DECODE_KV_THRESHOLD, decode_now),
        )

    def close(self) -> None:
        return None


def token_aware(workload: Workload, start: tuple[int, int]) -> Reference:
    behaviour = HpaBehaviour(max_replicas=max(1, workload.setup.knobs.max_total_gpus - 1))
    planner = TokenAwarePlanner(workload, behaviour)
    return Reference(workload.run(planner, start), {
        "prefill_tokens_per_s": planner.tokens_per_s, "threshold_s": planner.threshold_s,
        "decode_kv_threshold": DECODE_KV_THRESHOLD,
    })


def run(
    name: str,
    trace: Trace,
    profile: Profile,
    setup: PlanningSetup,
    config: ClusterConfig,
    goal: float = 0.99,
    instant_startup: bool = False,
    counts: tuple[int, int] | None = None,
    start: tuple[int, int] | None = None,
    max_intervals: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Reference:
    """One reference by name (``NAMES``). ``counts``: the fixed fleet's; ``start``: what the
    adaptive ones (``dynamo-tuned``, ``token-aware``) have at time 0 (default: the
    clairvoyant's); ``progress(done, total)``: told each interval of each run simulated."""
    from sim import clairvoyant  # it builds on this module's neighbours, not on this module

    goal = clairvoyant.check_goal(goal)
    if name == "clairvoyant":
        found = clairvoyant.run(trace, profile, setup, config, goal, instant_startup,
                                max_intervals, progress)
        return Reference(found.run, found.detail())
    workload = Workload(trace, profile, setup, config, max_intervals, progress)
    if name == "fixed":
        if counts is None:
            raise ValueError("fixed: give --prefill N and --decode M")
        return fixed(workload, *counts)
    if name == "best-fixed":
        return best_fixed(workload, goal)
    if start is None:
        start = clairvoyant.run(trace, profile, setup, config, goal,
                                max_intervals=max_intervals, progress=progress).schedule.start
    if name == "dynamo-tuned":
        return dynamo_tuned(workload, goal, start)
    if name == "token-aware":
        return token_aware(workload, start)
    raise ValueError(f"unknown reference {name!r}; known: {', '.join(NAMES)}")
