"""The references beside the clairvoyant: fixed and best fixed fleets, Dynamo tuned by an
operator, and llm-d's token-aware rule; and ``slaplanner simulate`` running them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from shared.perf_model import Profile, default_profile_path, load_profile
from shared.traces import Trace
from sim import references, simulate_cli
from sim.cluster import Cluster, ClusterConfig
from sim.loop import (
    Observation,
    PlanningSetup,
    ServicePlanner,
    StaticPlanner,
    run_closed_loop,
    snapshot_of,
)
from sim.references import DynamoKnobs, DynamoOpenLoop, Hpa, HpaBehaviour, Workload
from sim.synth import write_mooncake


@pytest.fixture(scope="module")
def profile() -> Profile:
    return load_profile(default_profile_path())


def bursty(seed: int, seconds: float, rate: float, osl_high: int = 300) -> Trace:
    """Poisson arrivals with a burst a third of the way in."""
    rng = np.random.default_rng(seed)
    arrival = np.sort(np.concatenate([
        rng.uniform(0, seconds, rng.poisson(rate * seconds)),
        rng.uniform(seconds / 3, seconds / 3 + 2, int(rate * 4)),
    ]))
    n = arrival.size
    return Trace(arrival, rng.integers(1000, 8000, n), rng.integers(20, osl_high, n))


SETUP = PlanningSetup.build(ttft_target_s=1.0, itl_target_s=0.02, adjustment_interval_s=15.0,
                               max_total_gpus=12)


def test_best_fixed_is_the_cheapest_constant_fleet_a_scan_finds(profile: Profile) -> None:
    trace = bursty(1, 120.0, 20.0)
    config = ClusterConfig(startup_delay_s=30.0)
    workload = Workload(trace, profile, SETUP, config)
    found = references.best_fixed(workload, 0.99)
    scan = []
    for p in range(1, 8):
        for d in range(1, 5):
            run = run_closed_loop(
                trace, profile, replace(config, start_prefill=p, start_decode=d),
                StaticPlanner(p, d), SETUP.interval_s, SETUP.ttft_target_s, SETUP.itl_target_s,
            )
            if run.scores["sla_attainment"] >= 0.99:
                scan.append((run.scores["gpu_hours"], p, d))
    cheapest = min(scan)
    assert found.detail["reached_goal"]
    assert (found.detail["prefill"], found.detail["decode"]) == cheapest[1:]
    assert found.run.scores["gpu_hours"] == pytest.approx(cheapest[0])


def test_dynamo_decided_open_loop_is_what_it_decides_in_the_closed_loop(
    profile: Profile,
) -> None:
    # Without correction, Dynamo's decisions depend on the trace's load only.
    trace = bursty(2, 180.0, 15.0)
    workload = Workload(trace, profile, SETUP, ClusterConfig(startup_delay_s=30.0))
    knobs = DynamoKnobs(prefill_headroom=1.5, min_prefill=2, min_decode=1,
                        planned_itl_share=0.7)
    prefill, decode = DynamoOpenLoop(workload, (3, 2)).schedule(knobs)
    closed = workload.run(references.dynamo_planner(workload, knobs), (3, 2))
    assert [r.prefill for r in closed.records[:-1]] == prefill[:-1].tolist()
    assert [r.decode for r in closed.records[:-1]] == decode[:-1].tolist()


def test_dynamo_tuned_reaches_the_goal_where_some_setting_does(profile: Profile) -> None:
    trace = bursty(3, 240.0, 20.0)
    config = ClusterConfig(startup_delay_s=30.0, perf_skew=1.2)
    workload = Workload(trace, profile, SETUP, config)
    untuned = workload.run(ServicePlanner(SETUP.with_knobs(policy="dynamo")), (3, 2))
    assert untuned.scores["sla_attainment"] < 0.99  # Dynamo as shipped misses here
    found = references.dynamo_tuned(workload, 0.99, (3, 2))
    assert found.detail["reached_goal"]
    assert found.run.scores["sla_attainment"] >= 0.99
    # The run reported is Dynamo's own closed loop with those knobs.
    knobs = DynamoKnobs(found.detail["prefill_headroom"], found.detail["min_prefill"],
                        found.detail["min_decode"], found.detail["planned_itl_share"])
    again = workload.run(references.dynamo_planner(workload, knobs), (3, 2))
    assert again.scores["sla_attainment"] == found.run.scores["sla_attainment"]
    assert again.scores["gpu_hours"] == found.run.scores["gpu_hours"]


def test_the_hpa_of_llm_d_scales_up_one_pod_per_3_minutes_and_down_after_5(
) -> None:
    hpa = Hpa(HpaBehaviour(max_replicas=10))
    # A metric of 4.5 per 1.0 target wants 5 replicas; one pod at a time, 180 s apart.
    assert hpa.scale(0.0, 4.5, 1.0, 1) == 2
    assert hpa.scale(60.0, 4.5, 1.0, 2) == 2  # the last pod was added 60 s ago
    assert hpa.scale(180.0, 4.5, 1.0, 2) == 3
    assert hpa.scale(360.0, 4.5, 1.0, 3) == 4
    # The load falls: nothing leaves while a higher recommendation is inside the 300 s window.
    assert hpa.scale(420.0, 0.5, 1.0, 4) == 4  # t0 + 420: 5 was recommended at 360
    assert hpa.scale(600.0, 0.5, 1.0, 4) == 4  # still inside the window (360 + 300 > 600)
    assert hpa.scale(661.0, 0.5, 1.0, 4) == 3  # then one pod, and one per 300 s
    assert hpa.scale(900.0, 0.5, 1.0, 3) == 3
    assert hpa.scale(961.0, 0.5, 1.0, 3) == 2


@pytest.mark.parametrize(
    ("value", "target", "current", "expected"),
    [
        (4.5, 1.0, 1, 5),  # ceil(4.5 / 1.0)
        (2.05, 1.0, 2, 2),  # 2.05 / (1.0 x 2) is within the HPA's 10 % tolerance
        (0.0, 0.8, 3, 0),  # nothing to do (the minimum replicas apply later)
        (2.0, 0.8, 2, 3),  # ceil(2.0 / 0.8)
    ],
    ids=["ceil-of-metric-over-target", "within-tolerance", "idle", "kv-usage"],
)
def test_the_hpa_wants_the_metric_over_its_average_value_target(
    value: float, target: float, current: int, expected: int
) -> None:
    assert Hpa(HpaBehaviour()).desired(value, target, current) == expected


def test_token_aware_takes_its_rate_and_threshold_from_the_guides_calibration(
    profile: Profile,
) -> None:
    trace = Trace(np.array([0.0, 1.0, 2.0, 3.0]), np.full(4, 8192), np.full(4, 10))
    workload = Workload(trace, profile, SETUP, ClusterConfig(perf_skew=1.2))
    planner = references.TokenAwarePlanner(workload, HpaBehaviour())
    chunk_s = float(workload.cluster.times.prefill_s(np.array([8192.0]))[0]) * 1.2
    assert planner.tokens_per_s == pytest.approx(8192 / chunk_s)  # V_P on the real engines
    # threshold = TTFT target - ISL / V_P: here one request's prefill time
    assert planner.threshold_s == pytest.approx(1.0 - chunk_s)


def test_token_aware_scales_prefill_on_the_seconds_of_queued_prompt_tokens(
    profile: Profile,
) -> None:
    # 40 prompts of 8,192 tokens at once on 2 engines: the window ends with most of them queued.
    trace = Trace(np.zeros(40), np.full(40, 8192), np.full(40, 10))
    setup = SETUP.with_knobs(adjustment_interval_s=1.0)
    workload = Workload(trace, profile, setup, ClusterConfig())
    planner = references.TokenAwarePlanner(workload, HpaBehaviour())
    cluster = Cluster(trace, profile, ClusterConfig(start_prefill=2, start_decode=1))
    stats = cluster.advance(1.0)
    backlog_s = stats.prefill_tokens_pending / planner.tokens_per_s
    step = planner.plan(Observation(stats, snapshot_of(stats), (2, 1), 1.0))
    assert backlog_s / planner.threshold_s > 3  # wants more than 3 engines ...
    assert step.prefill == 3  # ... but the HPA behaviour adds one pod at a time


def test_token_aware_runs_from_the_given_fleet(profile: Profile) -> None:
    trace = bursty(4, 240.0, 10.0)
    workload = Workload(trace, profile, SETUP, ClusterConfig(startup_delay_s=30.0))
    found = references.token_aware(workload, (4, 2))
    assert found.run.start == (4, 2) and found.run.planner == "token-aware"
    assert found.detail["decode_kv_threshold"] == 0.8


def test_simulate_runs_a_fixed_fleet_and_reports_it(tmp_path: Path) -> None:
    trace_file = tmp_path / "t.jsonl"
    write_mooncake(bursty(5, 120.0, 10.0), trace_file)
    out = tmp_path / "fixed.json"
    code = simulate_cli.main([
        "--trace", str(trace_file), "--policy", "fixed", "--prefill", "3", "--decode", "2",
        "--interval", "15s", "--ttft", "1s", "--itl", "20ms", "--quiet", "--json", str(out),
    ])
    report = json.loads(out.read_text())
    assert code == 0 and report["planner"] == "fixed"
    assert report["start_replicas"] == {"prefill": 3, "decode": 2}
    assert report["scaling_actions"] == 0 and report["reference"]["prefill"] == 3


def test_simulate_runs_the_clairvoyant_and_reports_how_it_was_found(tmp_path: Path) -> None:
    trace_file = tmp_path / "t.jsonl"
    write_mooncake(bursty(6, 120.0, 10.0), trace_file)
    out = tmp_path / "cv.json"
    code = simulate_cli.main([
        "--trace", str(trace_file), "--policy", "clairvoyant", "--goal", "0.95",
        "--interval", "15s", "--startup-delay", "30s", "--ttft", "1s", "--itl", "20ms",
        "--quiet", "--json", str(out),
    ])
    report = json.loads(out.read_text())
    assert code == 0 and report["reference"]["goal"] == 0.95
    assert report["reference"]["reached_goal"] and report["sla_attainment"] >= 0.95


@pytest.mark.parametrize("goal", ["0", "1.5", "99", "99%", "high"])
def test_simulate_refuses_a_goal_outside_zero_to_one_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], goal: str
) -> None:
    trace_file = tmp_path / "t.jsonl"
    write_mooncake(bursty(7, 30.0, 5.0), trace_file)
    code = simulate_cli.main(["--trace", str(trace_file), "--policy", "clairvoyant",
                              "--goal", goal])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("slaplanner simulate: --goal: a fraction of requests in (0, 1]")


def test_simulate_help_explains_each_reference_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        simulate_cli.main(["--help"])
    out = capsys.readouterr().out
    for name in references.NAMES:
        assert f"  {name}  " in out
