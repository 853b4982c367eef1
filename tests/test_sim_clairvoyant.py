"""The clairvoyant reference: its dynamic program against brute force over every schedule (on the
tables, and in the simulator on small traces), and the fast counts it is built on."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import replace

import numpy as np
import pytest

from shared.perf_model import Profile, default_profile_path, load_profile
from shared.traces import Trace
from sim import clairvoyant
from sim.clairvoyant import Schedule, requested
from sim.cluster import Cluster, ClusterConfig
from sim.fcfs import Carry, PrefillReplay, interval_misses
from sim.fluid import DecodeFluid
from sim.frontier import INF, Frontier, split
from sim.loop import PlanningSetup, Step, run_closed_loop, trace_needs
from sim.metrics import attainment


@pytest.fixture(scope="module")
def profile() -> Profile:
    return load_profile(default_profile_path())


def billed(serving: tuple[int, ...], startup: int, gpus: int) -> int:
    """What a schedule really costs: an engine is asked for ``startup`` intervals before it
    serves and kept meanwhile (the simulator's billing, in engine-intervals)."""
    return gpus * sum(max(serving[t : t + startup + 1]) for t in range(len(serving)))


def brute_force_costs(misses: np.ndarray, startup: int, gpus: int, budget: int) -> list[int]:
    """The least real cost of any schedule with at most b misses, for every b (-1: none)."""
    intervals, levels = misses.shape
    best = [-1] * (budget + 1)
    for serving in itertools.product(range(1, levels + 1), repeat=intervals):
        # No engine can be added before the first decision's engines are ready.
        if any(serving[t] > serving[t - 1] for t in range(1, min(startup + 1, intervals))):
            continue
        missed = sum(int(misses[t, serving[t] - 1]) for t in range(intervals))
        cost = billed(serving, startup, gpus)
        for b in range(missed, budget + 1):
            if best[b] < 0 or cost < best[b]:
                best[b] = cost
    return best


@pytest.mark.parametrize("seed", range(40))
def test_the_frontier_is_the_cheapest_schedule_for_every_miss_budget(seed: int) -> None:
    rng = np.random.default_rng(seed)
    intervals, levels = int(rng.integers(1, 6)), int(rng.integers(1, 4))
    startup, gpus = int(rng.integers(0, 3)), int(rng.integers(1, 3))
    budget = int(rng.integers(0, 15))
    # More engines never miss more.
    misses = np.sort(rng.integers(0, 8, (intervals, levels)), axis=1)[:, ::-1].copy()
    frontier = Frontier(misses, gpus, startup, budget)
    expected = brute_force_costs(misses, startup, gpus, budget)
    assert [int(c) if c < INF else -1 for c in frontier.cost] == expected
    for b in range(budget + 1):
        if expected[b] < 0:
            continue
        schedule = tuple(int(x) for x in frontier.schedule(b))
        assert sum(int(misses[t, schedule[t] - 1]) for t in range(intervals)) <= b
        assert billed(schedule, startup, gpus) == expected[b]


def test_the_two_roles_share_the_budget_where_their_sum_is_least() -> None:
    prefill = Frontier(np.array([[5, 2, 0]]), 1, 0, 6)  # 1, 2, 3 engines miss 5, 2, 0
    decode = Frontier(np.array([[4, 0]]), 1, 0, 6)  # 1, 2 engines miss 4, 0
    # Budget 6: prefill may miss 2 (2 engines) and decode 4 (1 engine): 3 engines, the least.
    assert split(prefill, decode, 6) == (2, 4)
    assert prefill.cost[2] + decode.cost[4] == 3


@pytest.mark.parametrize(
    ("serving", "startup", "expected"),
    [
        # Each engine is asked for 2 intervals before it serves, and kept meanwhile.
        ((1, 1, 3, 3, 1, 1, 1, 1), 2, (3, 3, 3, 3, 1, 1, 1, 1)),
        # A dip of 2 intervals (no longer than the startup) is not scaled into.
        ((3, 3, 1, 1, 3, 3), 2, (3, 3, 3, 3, 3, 3)),
        # A dip of 3 intervals is, for 1 interval: the engine asked again serves after 2.
        ((3, 3, 1, 1, 1, 3), 2, (3, 3, 1, 3, 3, 3)),
        # Instant startup: asked for exactly when needed.
        ((1, 3, 1, 2), 0, (1, 3, 1, 2)),
    ],
    ids=["asked-a-startup-ahead", "short-dip-kept", "long-dip-scaled-into", "instant"],
)
def test_engines_are_asked_for_a_startup_ahead_and_kept_through_short_dips(
    serving: tuple[int, ...], startup: int, expected: tuple[int, ...]
) -> None:
    assert tuple(requested(np.asarray(serving), startup).tolist()) == expected


def small_trace(seed: int, intervals: int, interval_s: float, osl: int) -> Trace:
    rng = np.random.default_rng(seed)
    arrival = np.concatenate([
        k * interval_s + np.sort(rng.uniform(0, interval_s, rng.poisson(rng.uniform(5, 40)
                                                                        * interval_s)))
        for k in range(intervals)
    ])
    n = arrival.size
    return Trace(arrival, rng.integers(2000, 9000, n), np.full(n, osl))


def brute_force_gpu_hours(
    trace: Trace, profile: Profile, setup: PlanningSetup, config: ClusterConfig, goal: float,
    prefill_levels: range, decode_levels: range, intervals: int,
) -> float:
    """The least GPU-hours of any requested schedule reaching ``goal``, each run in the
    simulator."""
    needs = trace_needs(trace, profile, setup, config)
    best = np.inf
    for p in itertools.product(prefill_levels, repeat=intervals):
        for d in itertools.product(decode_levels, repeat=intervals):
            schedule = Schedule((p[0], d[0]), (*p[1:], p[-1]), (*d[1:], d[-1]))
            run = run_closed_loop(
                trace, profile, replace(config, start_prefill=p[0], start_decode=d[0]),
                schedule.planner(setup.interval_s), setup.interval_s, setup.ttft_target_s,
                setup.itl_target_s, needs=needs,
            )
            if run.scores["sla_attainment"] >= goal:
                best = min(best, run.scores["gpu_hours"])
    return float(best)


@pytest.mark.parametrize(
    ("seed", "startup_s", "goal"),
    [(0, 10.0, 0.99), (1, 10.0, 0.99), (2, 0.0, 0.9), (3, 10.0, 0.95), (4, 20.0, 0.95)],
)
def test_on_a_small_trace_no_prefill_schedule_is_cheaper_than_the_clairvoyants(
    profile: Profile, seed: int, startup_s: float, goal: float
) -> None:
    # Four 10 s intervals, one-token answers (decode never misses): every prefill schedule of
    # 1 to 5 engines per interval, run in the simulator.
    trace = small_trace(seed, 4, 10.0, osl=2)
    setup = PlanningSetup.build(ttft_target_s=0.5, itl_target_s=0.05, adjustment_interval_s=10.0,
                               max_total_gpus=8)
    config = ClusterConfig(startup_delay_s=startup_s)
    found = clairvoyant.run(trace, profile, setup, config, goal)
    assert found.reached and found.run.scores["sla_attainment"] >= goal
    least = brute_force_gpu_hours(trace, profile, setup, config, goal, range(1, 6), range(1, 2), 4)
    # Equal schedules can differ by the seconds a retired engine drains its last request.
    assert found.run.scores["gpu_hours"] <= least * (1 + 1e-3)


def test_on_a_small_trace_no_schedule_of_both_roles_is_cheaper_than_the_clairvoyants(
    profile: Profile,
) -> None:
    # Three 10 s intervals of long answers under a tight ITL target: decode matters too.
    trace = small_trace(7, 3, 10.0, osl=200)
    setup = PlanningSetup.build(ttft_target_s=0.5, itl_target_s=0.012, adjustment_interval_s=10.0,
                               max_total_gpus=10)
    config = ClusterConfig(startup_delay_s=10.0)
    found = clairvoyant.run(trace, profile, setup, config, 0.95)
    least = brute_force_gpu_hours(trace, profile, setup, config, 0.95, range(1, 4),
                                  range(1, 4), 3)
    assert found.reached
    assert found.run.scores["gpu_hours"] <= least * (1 + 1e-3)


def test_instant_startup_is_the_pure_bound_and_costs_no_more(profile: Profile) -> None:
    trace = small_trace(5, 6, 10.0, osl=2)
    setup = PlanningSetup.build(ttft_target_s=0.5, itl_target_s=0.05, adjustment_interval_s=10.0,
                               max_total_gpus=8)
    config = ClusterConfig(startup_delay_s=20.0)
    aware = clairvoyant.run(trace, profile, setup, config, 0.99)
    instant = clairvoyant.run(trace, profile, setup, config, 0.99, instant_startup=True)
    assert instant.reached and instant.instant_startup
    assert instant.run.scores["gpu_hours"] <= aware.run.scores["gpu_hours"]


def test_each_intervals_misses_are_those_of_a_heap_simulation_of_it_alone(
    profile: Profile,
) -> None:
    trace = small_trace(11, 5, 15.0, osl=2)
    cluster = Cluster(trace, profile, ClusterConfig())
    table = interval_misses(cluster.arrival, cluster.prefill_service_s, 15.0, 5, 0.4, 6)
    index = (cluster.arrival // 15.0).astype(int)
    for k in range(5):
        arrival, service = cluster.arrival[index == k], cluster.prefill_service_s[index == k]
        assert table[k, 0] == arrival.size
        for n in range(1, 7):
            free = [k * 15.0] * n
            missed = 0
            for a, s in zip(arrival.tolist(), service.tolist(), strict=True):
                end = max(a, heapq.heappop(free)) + s
                heapq.heappush(free, end)
                missed += end - a > 0.4
            assert table[k, n] == missed, (k, n)


def test_a_backlog_carried_into_an_interval_goes_first_and_is_not_counted_there() -> None:
    # One engine; interval 1 starts with a request queued (1 s of work) and the engine busy
    # until 10.5 s: the interval's own request, arriving at 10 s, starts at 11.5 s.
    arrival = np.array([9.0, 9.5, 10.0])
    service = np.array([1.5, 1.0, 0.2])
    carry = Carry(busy_until_s=[np.zeros(0), np.array([10.5])],
                  queued=[np.zeros(0, dtype=np.int64), np.array([1])])
    table = interval_misses(arrival, service, 10.0, 2, 1.0, 2, carry)
    assert table[1, 1] == 1  # TTFT 1.7 s: 10.5 -> 11.5 for the backlog, then 0.2 s
    assert table[1, 2] == 0  # a second engine, free at 10 s, takes it at once
    alone = interval_misses(arrival, service, 10.0, 2, 1.0, 2)
    assert alone[1, 1] == 0


def test_the_prefill_replay_gives_the_simulators_first_tokens(profile: Profile) -> None:
    trace = small_trace(13, 8, 15.0, osl=20)
    config = ClusterConfig(startup_delay_s=30.0, start_prefill=2, start_decode=1)
    asked = [3, 1, 4, 4, 2, 5, 1, 1]

    class Asked:
        name = "asked"

        def __init__(self) -> None:
            self.window = 0

        def plan(self, observation: object) -> Step:
            self.window += 1
            return Step(asked[self.window - 1], 1)

        def close(self) -> None:
            return None

    run = run_closed_loop(trace, profile, config, Asked(), 15.0, 1.0, 0.05)
    replay = PrefillReplay(Cluster(trace, profile, config)).first_token_s(15.0, 2, asked)
    np.testing.assert_array_equal(replay, run.result.first_token_s)


def test_the_decode_estimate_follows_the_simulator_for_fixed_fleets(profile: Profile) -> None:
    rng = np.random.default_rng(3)
    n = 3000
    trace = Trace(np.sort(rng.uniform(0, 300, n)), rng.integers(2000, 12000, n),
                  rng.integers(50, 500, n))
    for decode in (1, 2, 3):
        config = ClusterConfig(start_prefill=8, start_decode=decode)
        run = run_closed_loop(trace, profile, config, _Hold(), 30.0, 5.0, 0.03)
        _, itl_ok = attainment(run.result, 5.0, 0.03)
        cluster = Cluster(trace, profile, config)
        fluid = DecodeFluid(run.result.first_token_s, cluster.isl, cluster.osl, cluster.times,
                            1.0, 0.03)
        assert abs(fluid.itl_met(float(decode)).mean() - itl_ok.mean()) < 0.06, decode


class _Hold:
    name = "hold"

    def plan(self, observation: object) -> Step:
        return Step(None, None)

    def close(self) -> None:
        return None


@pytest.mark.parametrize(
    "goal", [0.0, -0.5, 1.01, 99.0, float("nan")], ids=["zero", "negative", "over-one",
                                                        "a-percentage", "nan"],
)
def test_a_goal_outside_zero_to_one_is_refused_naming_the_flag(goal: float) -> None:
    with pytest.raises(ValueError, match=r"--goal: a fraction of requests in \(0, 1\]"):
        clairvoyant.check_goal(goal)


@pytest.mark.parametrize("goal", [1.0, 0.99, 0.5, 1e-6])
def test_a_goal_in_zero_to_one_is_taken(goal: float) -> None:
    assert clairvoyant.check_goal(goal) == goal
