"""The closed loop, its scores and baselines, the synthetic traces and the command lines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from shared import traces
from shared.messages import MetricSnapshot
from shared.perf_model import Profile, default_profile_path, load_profile
from shared.traces import Trace
from sim import metrics, simulate_cli, synth_cli
from sim.cluster import Cluster, ClusterConfig, SimResult, WindowStats
from sim.loop import (
    EPOCH_S,
    Observation,
    PlanningSetup,
    ReactivePlanner,
    ReactiveSettings,
    simulate,
    snapshot_of,
)
from sim.synth import DYNAMO_SINE, SineLoad, generate, write_mooncake


@pytest.fixture(scope="module")
def profile() -> Profile:
    return load_profile(default_profile_path())


def steady(rate_per_s: float, duration_s: float, isl: int = 3000, osl: int = 300) -> Trace:
    """Evenly spaced arrivals: exactly ``rate * interval`` requests in every interval."""
    n = round(rate_per_s * duration_s)
    arrival = (np.arange(n, dtype=np.float64) + 0.5) / float(rate_per_s)
    return Trace(arrival, np.full(n, isl, dtype=np.int64), np.full(n, osl, dtype=np.int64))


def test_the_snapshot_is_what_a_collector_would_have_published(profile: Profile) -> None:
    cluster = Cluster(steady(10, 120), profile, ClusterConfig())
    snapshot = snapshot_of(cluster.advance(60.0))
    assert snapshot.window_end == EPOCH_S + 60.0 and snapshot.window_s == 60.0
    assert (snapshot.num_requests, snapshot.isl_avg, snapshot.osl_avg) == (600.0, 3000.0, 300.0)
    assert snapshot.ttft_avg_s == pytest.approx(profile.prefill.ttft_s(3000), rel=1e-6)
    assert snapshot.prefill_workers == 1 and snapshot.decode_workers == 1
    assert snapshot.gaps == {}
    # It is valid on the bus, as typed by a person or sent by a service.
    assert MetricSnapshot.from_json(snapshot.to_json()) == snapshot


def test_the_version_2_fields_are_what_a_collector_reading_every_second_would_publish(
    profile: Profile,
) -> None:
    # 10 requests in each of seconds 0..9, then one per second: bursty, and a queue forms
    arrival = np.concatenate([np.repeat(np.arange(10.0), 10) + 0.5, np.arange(10.0, 60.0) + 0.5])
    n = arrival.size
    trace = Trace(arrival, np.full(n, 2000, dtype=np.int64), np.full(n, 100, dtype=np.int64))
    cluster = Cluster(trace, profile, ClusterConfig())
    stats = cluster.advance(60.0)
    snapshot = snapshot_of(stats, ttft_target_s=0.5, itl_target_s=0.05)
    assert snapshot.schema_version == 2
    counts = np.array([10.0] * 10 + [1.0] * 50)
    assert snapshot.arrival_bin_s == 1.0 and snapshot.arrival_peaks_exact is True
    assert snapshot.arrival_signal == "request_start", "the simulator counts each arrival"
    assert snapshot.arrivals_peak_1s == 10.0 and snapshot.arrivals_peak_10s == 100.0
    assert snapshot.arrival_dispersion == pytest.approx(counts.var() / counts.mean())
    assert snapshot.isl_p50 == snapshot.isl_p99 == 2000.0
    # TTFT is queueing plus compute, request by request
    assert snapshot.queue_time_avg_s is not None and snapshot.prefill_time_avg_s is not None
    assert snapshot.ttft_avg_s == pytest.approx(
        snapshot.queue_time_avg_s + snapshot.prefill_time_avg_s)
    assert snapshot.prefill_time_avg_s == pytest.approx(profile.prefill.ttft_s(2000), rel=1e-6)
    assert snapshot.queue_time_avg_s > 0.0
    # the shares under target: every request known, counted exactly
    result = cluster.finish_run(60.0)
    first = result.first_token_s < 60.0
    assert snapshot.ttft_under_target_share == pytest.approx(
        np.mean(result.ttft_s[first] <= 0.5))
    assert snapshot.ttft_share_method == "per_request" and snapshot.ttft_target_s == 0.5
    assert snapshot.requests_failed == 0.0
    assert MetricSnapshot.from_json(snapshot.to_json()) == snapshot


def test_the_prefill_backlog_at_the_windows_end_is_the_requests_without_a_first_token(
    profile: Profile,
) -> None:
    arrival = np.full(50, 59.999)  # at the very end of the window: none has its first token
    trace = Trace(arrival, np.full(50, 4000, dtype=np.int64), np.full(50, 10, dtype=np.int64))
    snapshot = snapshot_of(Cluster(trace, profile, ClusterConfig()).advance(60.0))
    assert snapshot.requests_before_first_token == 50.0
    assert snapshot.prefill_tokens_pending == 50 * 4000.0
    assert snapshot.ttft_under_target_share is None, "no targets given, no share"


def test_a_window_without_requests_reports_nulls_with_reasons_not_zeros(profile: Profile) -> None:
    cluster = Cluster(steady(1, 10), profile, ClusterConfig())
    cluster.advance(60.0)
    snapshot = snapshot_of(cluster.advance(120.0))
    assert snapshot.num_requests == 0.0
    assert snapshot.isl_avg is None and snapshot.gaps["isl_avg"] == "no requests in window"
    assert snapshot.ttft_avg_s is None and "first token" in snapshot.gaps["ttft_avg_s"]


def test_the_lower_bound_counts_the_engines_each_interval_needs(profile: Profile) -> None:
    arrival = np.array([10.0] * 60 + [70.0] * 1200)
    isl = np.full(arrival.size, 3000, dtype=np.int64)
    osl = np.full(arrival.size, 301, dtype=np.int64)
    needs = metrics.interval_needs(arrival, isl, osl, profile, 60.0, 0.02, intervals=3)
    busy = 1200 * profile.prefill.ttft_s(3000)  # 72.6 s of prefill in the second interval
    point = profile.decode.best_thpt_per_gpu(0.02, 3000 + 301 / 2)
    assert needs.prefill.tolist() == [1, math.ceil(busy / 60), 0]  # idle interval: nothing
    decode = math.ceil(1200 * 300 / 60 / point.thpt_tokens_per_s_per_gpu)  # tokens/s / per engine
    assert needs.decode.tolist() == [1, decode, 0]
    assert needs.gpu_hours() == pytest.approx((1 + 1 + 2 + needs.decode[1]) / 60)
    assert needs.peak() == (2, int(needs.decode[1]))


def test_attainment_counts_both_targets_and_an_unserved_request_as_a_miss() -> None:
    result = SimResult(
        arrival_s=np.zeros(4),
        isl_tokens=np.full(4, 100, dtype=np.int64),
        osl_tokens=np.array([11, 11, 1, 11], dtype=np.int64),
        clipped=np.zeros(4, dtype=bool),
        prefill_start_s=np.zeros(4),
        first_token_s=np.array([0.1, 0.9, 0.2, np.nan]),
        finish_s=np.array([0.3, 1.0, 0.2, np.nan]),  # ITL 20 ms, 10 ms, none, never served
        workers=[],
        end_s=1.0,
    )
    ttft_ok, itl_ok = metrics.attainment(result, ttft_target_s=0.5, itl_target_s=0.015)
    assert ttft_ok.tolist() == [True, False, True, False]
    assert itl_ok.tolist() == [False, True, True, False]


def test_the_loop_applies_a_target_at_the_end_of_a_window_and_it_serves_after_the_delay(
    profile: Profile,
) -> None:
    # 40 requests/s of ISL 3000 need ceil(2400 * 3000 / 60 / 49,846) = 3 prefill engines.
    setup = PlanningSetup.build(policy="dynamo", predictor="constant", no_correction=True,
                                max_total_gpus=16)
    run = simulate(steady(40, 300), profile, setup, ClusterConfig(startup_delay_s=90.0))
    first, second, third = run.records[:3]
    assert (first.prefill, first.outcome) == (3, "applied")  # t0 + 60 -> 3 prefill asked for
    assert second.stats.prefill_serving == 1  # t0 + 120 -> still starting
    assert third.stats.prefill_serving == 3  # t0 + 180 -> serving since t0 + 150
    assert run.report()["replica_timeline"][1]["t_s"] == 60.0


def test_the_static_baseline_runs_the_peak_from_the_start_and_never_scales(
    profile: Profile,
) -> None:
    run = simulate(steady(40, 300), profile, PlanningSetup(), ClusterConfig(), "static")
    assert run.scaling_actions == 0
    assert run.start == run.needs.peak()
    assert run.scores["sla_attainment"] == 1.0


@pytest.mark.parametrize(
    ("busy", "waiting", "replicas", "expected"),
    [
        pytest.param(1.4, 0, 2, 2, id="at its 0.7 busy target it stays (ratio 1.0)"),
        pytest.param(1.5, 0, 2, 2, id="within the 10 % tolerance it stays (1.07)"),
        pytest.param(2.8, 0, 2, 4, id="twice busier doubles: ceil(2 * 2.8 / 1.4) = 4"),
        pytest.param(1.4, 40, 2, 6, id="the queue wins, limited to 2 + 4: ceil(40 / 2) = 20"),
        pytest.param(0.35, 0, 2, 1, id="a quarter as busy: ceil(2 * 0.35 / 1.4) = 1"),
    ],
)
def test_the_reactive_baseline_does_hpa_arithmetic(
    busy: float, waiting: int, replicas: int, expected: int
) -> None:
    planner = ReactivePlanner(ReactiveSettings(decode_kv_target=0.5))
    stats = _stats(busy_fraction=busy / replicas, serving=replicas, waiting=waiting)
    step = planner.plan(_observation(stats, replicas, now_s=0.0))
    assert step.prefill == expected


def test_the_reactive_baseline_scales_down_once_the_window_has_passed() -> None:
    planner = ReactivePlanner(ReactiveSettings(decode_kv_target=0.5))
    busy = _stats(busy_fraction=0.7, serving=4, waiting=0)
    idle = _stats(busy_fraction=0.1, serving=4, waiting=0)
    assert planner.plan(_observation(busy, 4, now_s=0.0)).prefill == 4  # t0 -> 4
    assert planner.plan(_observation(idle, 4, now_s=240.0)).prefill == 4  # t0 + 240: held
    assert planner.plan(_observation(idle, 4, now_s=300.0)).prefill == 1  # t0 + 300: down


def _stats(busy_fraction: float, serving: int, waiting: int) -> WindowStats:
    return WindowStats(
        start_s=0.0, end_s=60.0, num_requests=100, isl_avg=3000.0, osl_avg=300.0,
        isl_p90=3000.0, osl_p90=300.0, first_tokens=100, ttft_avg_s=0.1, ttft_p90_s=0.1,
        ttft_p99_s=0.1, finished=100, itl_avg_s=0.01, itl_p90_s=0.01, itl_p99_s=0.01,
        request_duration_avg_s=3.0, prefill_waiting=waiting, prefill_running=0,
        decode_waiting=0, decode_running=10, kv_cache_usage=0.1,
        prefill_busy_fraction=busy_fraction, prefill_serving=serving, decode_serving=1,
        prefill_starting=0, decode_starting=0,
    )


def _observation(stats: WindowStats, replicas: int, now_s: float) -> Observation:
    return Observation(stats, snapshot_of(stats), (replicas, 1), now_s)


def test_the_dynamo_sine_scenario_has_the_published_shape() -> None:
    trace = generate(DYNAMO_SINE)
    # mean rate 24/s over 1,800 s: 43,200 requests, give or take Poisson noise (sd ~208)
    assert abs(len(trace) - 43_200) < 1_000
    first_minute = np.sum(trace.arrival_s < 60)
    peak_minute = np.sum((trace.arrival_s >= 270) & (trace.arrival_s < 330))
    assert first_minute < 15 * 60 < 33 * 60 < peak_minute  # starts at 12/s, peaks at 36/s
    assert set(trace.isl_tokens.tolist()) == {3000} and set(trace.osl_tokens.tolist()) == {300}


def test_a_synthetic_trace_reads_back_as_written(tmp_path: Path) -> None:
    trace = generate(SineLoad(120, 2, 8, 60, 2000, 100, isl_cv=0.5, seed=1))
    path = tmp_path / "sine.jsonl"
    write_mooncake(trace, path)
    back = traces.load_trace(path)
    assert back.isl_tokens.tolist() == trace.isl_tokens.tolist()
    assert np.allclose(back.arrival_s, trace.arrival_s, atol=5e-4)  # whole milliseconds


def test_trace_synth_writes_the_file_it_is_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    code = synth_cli.trace_main(["synth", "--out", str(out), "--duration", "2m", "--period",
                                 "1m", "--rate-min", "1", "--rate-max", "3", "--osl-cv", "1"])
    assert code == 0 and len(traces.load_trace(out)) > 100
    assert synth_cli.trace_main(["shuffle"]) == 2


def test_simulate_writes_a_report_with_the_promised_keys(tmp_path: Path) -> None:
    trace_file = tmp_path / "t.jsonl"
    write_mooncake(generate(SineLoad(300, 5, 15, 150, 3000, 200, seed=2)), trace_file)
    out = tmp_path / "report.json"
    code = simulate_cli.main([
        "--trace", str(trace_file), "--ttft", "300ms", "--itl", "20ms", "--interval", "30s",
        "--startup-delay", "60s", "--perf-skew", "1.2", "--json", str(out),
        "--plot", str(tmp_path / "run.png"), "--requests", str(tmp_path / "requests.csv"),
        "--quiet",
    ])
    assert code == 0
    report = json.loads(out.read_text())
    for key in ("sla_attainment", "ttft_attainment", "itl_attainment", "gpu_hours",
                "lower_bound_gpu_hours", "scaling_actions", "ttft_p50_s", "ttft_p90_s",
                "ttft_p99_s", "itl_p50_s", "itl_p90_s", "itl_p99_s", "replica_timeline",
                "clipped_requests"):
        assert key in report
    assert 0.0 <= report["sla_attainment"] <= 1.0
    assert (tmp_path / "run.png").stat().st_size > 10_000
    rows = (tmp_path / "requests.csv").read_text().splitlines()
    assert rows[0] == "arrival_s,isl_tokens,osl_tokens,clipped,ttft_s,itl_s,finish_s"
    assert len(rows) == report["requests"] + 1


def test_simulate_names_the_flag_that_is_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    trace_file = str(traces.bundled_trace_path("azure_llm_2023_code.csv"))
    assert simulate_cli.main(["--trace", trace_file, "--ttft=-300"]) == 2
    assert "--ttft-target-s: must be positive" in capsys.readouterr().err
    assert simulate_cli.main(["--trace", trace_file, "--startup-delay", "soon"]) == 2
    assert "--startup-delay: 'soon' has no unit" in capsys.readouterr().err
    assert simulate_cli.main(["--trace", trace_file, "--startup-delay", "90"]) == 2
    assert "(bare seconds: --startup-delay-s 90)" in capsys.readouterr().err
