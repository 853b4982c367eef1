"""The planning benchmark's warm start: every policy starts with what keeps the SLA, not with the
lower bound's counts, which ignore queueing."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from bench import planning_benchmark, planning_feasibility
from sim.cluster import Cluster
from sim.loop import PlanningSetup, simulate, trace_needs


def _azure() -> tuple[planning_benchmark.Bench, planning_benchmark.Scenario]:
    bench = planning_benchmark.load_config(planning_benchmark.CONFIG)
    return bench, next(s for s in bench.scenarios if s.name == "azure-code-x10")


def _worst_interval_met(
    bench: planning_benchmark.Bench, scenario: planning_benchmark.Scenario,
    counts: tuple[int, int],
) -> float:
    """The worst share of TTFTs met over the intervals before a first new worker could serve,
    with ``counts`` engines from time 0 and nothing else."""
    config = replace(planning_feasibility._config(scenario, bench, 1.0),
                     start_prefill=counts[0], start_decode=counts[1])
    first = math.ceil(scenario.startup_delay_s / scenario.interval_s) + 1
    cluster = Cluster(planning_benchmark._trace(scenario), planning_benchmark._profile(), config)
    cluster.advance(first * scenario.interval_s + 30.0)
    shares = []
    for k in range(first):
        start, end = k * scenario.interval_s, (k + 1) * scenario.interval_s
        mine = (cluster.arrival >= start) & (cluster.arrival < end)
        ttft = cluster.prefill.end[mine] - cluster.arrival[mine]
        shares.append(float(np.mean(ttft <= scenario.ttft_s)))
    return min(shares)


def test_the_sla_start_keeps_the_first_intervals_where_the_lower_bound_start_cannot() -> None:
    bench, scenario = _azure()
    setup = PlanningSetup.build(policy="dynamo", predictor="constant",
                                ttft_target_s=scenario.ttft_s, itl_target_s=scenario.itl_s,
                                adjustment_interval_s=scenario.interval_s)
    config = planning_feasibility._config(scenario, bench, 1.0)
    needs = trace_needs(planning_benchmark._trace(scenario), planning_benchmark._profile(),
                        setup, config)
    lower = needs.start_counts(scenario.startup_delay_s)
    sla = planning_feasibility.sla_start_counts(bench, scenario, 1.0)
    # The second interval's burst (718 requests, 327 in one second) needs more prefill engines
    # than its average does; decode is the lower bound's either way.
    assert sla[0] > lower[0] and sla[1] == lower[1]
    assert _worst_interval_met(bench, scenario, lower) < 0.9
    assert _worst_interval_met(bench, scenario, sla) >= 0.99


def test_every_policy_but_the_static_peak_starts_with_the_given_counts() -> None:
    bench, scenario = _azure()
    trace = planning_benchmark._trace(scenario).between(0.0, 3 * scenario.interval_s)
    setup = PlanningSetup.build(policy="dynamo", predictor="constant",
                                ttft_target_s=scenario.ttft_s, itl_target_s=scenario.itl_s,
                                adjustment_interval_s=scenario.interval_s)
    config = planning_feasibility._config(scenario, bench, 1.0)
    profile = planning_benchmark._profile()
    reactive = simulate(trace, profile, setup, config, "reactive", warm_start=True, start=(7, 2))
    static = simulate(trace, profile, setup, config, "static", warm_start=True, start=(7, 2))
    assert reactive.start == (7, 2)
    assert static.start == static.needs.peak() != (7, 2)
