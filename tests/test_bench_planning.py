"""The planning benchmark's scenarios, its cache of searched references and its verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import planning_benchmark, planning_report
from bench.planning_benchmark import Policy, back_to_back
from bench.planning_cache import Cache
from shared.perf_model import default_profile_path
from shared.traces import Trace


def test_the_config_has_the_three_first_scenarios_and_the_long_ones() -> None:
    bench = planning_benchmark.load_config(planning_benchmark.CONFIG)
    names = [s.name for s in bench.scenarios]
    assert names[:3] == ["azure-code-x10", "mooncake-conversation-x5", "dynamo-sine"]
    assert {"day", "flash-crowd", "slow-ramp", "azure-code-x10-twice",
            "mooncake-conversation-x5-twice"} <= set(names)
    assert bench.goal == 0.99 and bench.warm_start == "clairvoyant"
    planners = {p.planner for p in bench.policies}
    assert {"clairvoyant", "best-fixed", "dynamo-tuned", "token-aware", "slaplanner"} <= planners


@pytest.mark.parametrize("name", ["azure-code-x10-twice", "mooncake-conversation-x5-twice",
                                  "flash-crowd", "slow-ramp"])
def test_each_new_scenario_lasts_at_least_40_intervals(name: str) -> None:
    bench = planning_benchmark.load_config(planning_benchmark.CONFIG)
    scenario = next(s for s in bench.scenarios if s.name == name)
    trace = planning_benchmark._trace(scenario)
    assert float(trace.arrival_s[-1]) // scenario.interval_s + 1 >= 40


def test_a_trace_played_back_to_back_starts_again_at_an_interval_boundary() -> None:
    trace = Trace(np.array([0.5, 20.0, 31.0]), np.array([1, 2, 3]), np.array([4, 5, 6]))
    twice = back_to_back(trace, 2, 15.0)
    # The first copy's last request is in the third 15 s interval: the second starts at 45 s.
    assert twice.arrival_s.tolist() == [0.5, 20.0, 31.0, 45.5, 65.0, 76.0]
    assert twice.isl_tokens.tolist() == [1, 2, 3, 1, 2, 3]


def test_a_cache_entry_is_found_only_for_the_same_trace_and_settings(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    trace = Trace(np.array([0.0, 1.0]), np.array([10, 20]), np.array([5, 5]))
    other = Trace(np.array([0.0, 1.5]), np.array([10, 20]), np.array([5, 5]))
    profile = default_profile_path()
    key = cache.key("clairvoyant", trace, profile, {"goal": 0.99})
    cache.put(key, {"gpu_hours": 1.0})
    assert cache.get(key) == {"gpu_hours": 1.0}
    assert cache.get(cache.key("clairvoyant", other, profile, {"goal": 0.99})) is None
    assert cache.get(cache.key("clairvoyant", trace, profile, {"goal": 0.95})) is None
    assert cache.get(cache.key("best-fixed", trace, profile, {"goal": 0.99})) is None
    assert Cache(tmp_path, enabled=False).get(key) is None


def _row(policy: str, attainment: float, gpu_hours: float) -> dict[str, Any]:
    return {"scenario": "s", "perf_skew": 1.0, "policy": policy, "sla_attainment": attainment,
            "gpu_hours": gpu_hours, "requests": 1000}


def _verdict(ours: tuple[float, float]) -> str:
    bench = planning_benchmark.load_config(planning_benchmark.CONFIG)
    rows = [_row("slaplanner", *ours), _row("clairvoyant", 0.99, 1.0),
            _row("best fixed", 0.995, 1.3), _row("dynamo-tuned", 0.992, 1.2)]
    by = {(r["scenario"], r["perf_skew"], r["policy"]): r for r in rows}
    return planning_report.verdict(bench, by, "s", 1.0)[0]


@pytest.mark.parametrize(
    ("ours", "phrases"),
    [
        ((0.995, 1.05), ["meets 99 %", "1.05 x the clairvoyant (within 1.10 x)",
                         "0.81 x the best fixed fleet (cheaper than it)",
                         "beats `dynamo-tuned`"]),
        ((0.975, 1.5), ["misses 99 %", "1.50 x the clairvoyant (over 1.10 x)",
                        "no cheaper than it, at lower attainment",
                        "below `dynamo-tuned`'s attainment"]),
        ((0.996, 1.25), ["as good as `dynamo-tuned` (99.20 %) but 1.04 x its cost"]),
    ],
    ids=["meets-everything", "misses-everything", "costlier-than-tuned-dynamo"],
)
def test_the_verdict_says_where_slaplanner_meets_and_where_it_misses(
    ours: tuple[float, float], phrases: list[str]
) -> None:
    line = _verdict(ours)
    for phrase in phrases:
        assert phrase in line


def test_goodput_counts_the_requests_that_met_both_targets_per_gpu_hour() -> None:
    assert planning_report.goodput_per_gpu_hour(_row("x", 0.98, 2.0)) == pytest.approx(490.0)


def test_a_policy_the_decider_does_not_know_gets_a_row_saying_so() -> None:
    bench = planning_benchmark.load_config(planning_benchmark.CONFIG)
    row = planning_benchmark.run_one(bench, bench.scenarios[0], 1.0,
                                     Policy("new", "not-a-policy", "constant"))
    assert "not registered" in row["skipped"]
