"""``slaplanner status``, ``watch`` and ``publish``: the conditions table, the watch timeline, and
the commands themselves against a replay through the real services on a real nats-server."""

from __future__ import annotations

import asyncio
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry

from services.decider import gauges
from shared import bus, conditions, describe, embedded_nats, window_stats
from shared.conditions import Status
from shared.messages import (
    FORECAST_SUBJECT,
    METRICS_SUBJECT,
    SCALED_SUBJECT,
    TARGET_SUBJECT,
    DeploymentKey,
    LoadForecast,
    MetricSnapshot,
    ReplicaTarget,
    RoleChange,
    ScaleEvent,
)
from shared.perf_model import default_profile_path, load_profile
from shared.service_settings import ServiceSettings
from sim.cluster import ClusterConfig
from sim.loop import DEPLOYMENT, EPOCH_S, PlanningSetup
from sim.replay import run_replay
from sim.synth import SineLoad, generate
from tests.conftest import REPO, NatsEndpoint

KEY = DeploymentKey(namespace="prod", name="llama")
T0 = 1_732_345_200.0


def _target(window_end: float = T0, forecast_id: str | None = "f1", prefill: int = 3,
            decode: int = 2, **explanation: Any) -> ReplicaTarget:
    why = {"prefill_bound_by": "queueing_model", "decode_bound_by": "itl_curve", **explanation}
    return ReplicaTarget(id=f"t{window_end:.0f}{forecast_id}", deployment=KEY,
                         window_end=window_end, window_s=60.0, policy="slaplanner",
                         prefill_replicas=prefill, decode_replicas=decode,
                         forecast_id=forecast_id, explanation=why)


def _event(target: ReplicaTarget, outcome: str, reason: str | None = None,
           before: tuple[int, int] = (2, 2)) -> ScaleEvent:
    return ScaleEvent(
        deployment=KEY, window_end=target.window_end, window_s=60.0, target_id=target.id,
        outcome=outcome, backend="dynamo", reason=reason,  # type: ignore[arg-type]
        prefill=RoleChange.model_validate({"from": before[0], "to": target.prefill_replicas}),
        decode=RoleChange.model_validate({"from": before[1], "to": target.decode_replicas}),
    )


def _snapshot(window_end: float = T0, **fields: Any) -> MetricSnapshot:
    values = {"num_requests": 600.0, "isl_avg": 3000.0, "osl_avg": 300.0,
              "prefill_workers": 2, "decode_workers": 2, **fields}
    return MetricSnapshot(deployment=KEY, window_end=window_end, window_s=60.0, **values)


def _forecast(window_end: float = T0, requests: float = 660.0) -> LoadForecast:
    return LoadForecast.model_validate({
        "id": "f1", "deployment": KEY, "window_end": window_end, "window_s": 60.0,
        "model": "constant", "steps": [{
            "window_end": window_end + 60, "num_requests": requests,
            "num_requests_upper": requests * 1.5, "isl_avg": 3000.0, "isl_avg_upper": 3000.0,
            "osl_avg": 300.0, "osl_avg_upper": 300.0}],
    })


# --- the conditions, one table per condition ------------------------------------------------

PLANNED = _target()
BUDGET = _target(prefill_bound_by="gpu_budget_sla_split", gpu_budget={
    "max_gpus": 8, "binds": True, "wanted": {"prefill": 31, "decode": 23},
    "chosen": {"prefill": 4, "decode": 4}, "predicted_attainment": 0.0})


@pytest.mark.parametrize(("target", "event", "now", "status", "reason"), [
    pytest.param(None, None, T0, Status.UNKNOWN, "NoScaleEvent", id="nothing yet is unknown"),
    pytest.param(PLANNED, None, T0 + 30, Status.UNKNOWN, "NoScaleEvent",
                 id="a target just sent waits for its event without alarm"),
    pytest.param(PLANNED, None, T0 + 61, Status.UNKNOWN, "AwaitingActuator",
                 id="a target a whole window without its event asks for the actuator"),
    pytest.param(PLANNED, _event(PLANNED, "applied"), T0, Status.TRUE, "SucceededRescale",
                 id="an applied target can scale"),
    pytest.param(PLANNED, _event(PLANNED, "unchanged"), T0, Status.TRUE, "ReadyForNewScale",
                 id="a workload at target is ready for the next scale"),
    pytest.param(PLANNED, _event(PLANNED, "dry-run"), T0, Status.FALSE, "DryRun",
                 id="the dry run cannot scale"),
    pytest.param(PLANNED, _event(PLANNED, "refused", "not in the allowlist"), T0, Status.FALSE,
                 "ScaleRefused", id="a refusal cannot scale"),
    pytest.param(PLANNED, _event(PLANNED, "failed", "forbidden"), T0, Status.FALSE,
                 "FailedUpdateScale", id="a failed write cannot scale"),
    pytest.param(_target(prefill_bound_by="scale_down_stabilised"),
                 _event(_target(prefill_bound_by="scale_down_stabilised"), "unchanged"), T0,
                 Status.TRUE, "ScaleDownStabilized",
                 id="a scale-down held by the window is reported as the HPA does"),
])
def test_able_to_scale_follows_the_actuators_last_outcome(
    target: ReplicaTarget | None, event: ScaleEvent | None, now: float, status: Status,
    reason: str,
) -> None:
    found = conditions.able_to_scale(target, event, now)
    assert (found.status, found.reason) == (status, reason)


@pytest.mark.parametrize(("target", "status", "reason"), [
    pytest.param(None, Status.UNKNOWN, "NoTarget", id="no target is unknown"),
    pytest.param(PLANNED, Status.TRUE, "ValidMetricFound", id="a planned target is active"),
    pytest.param(_target(forecast_id=None, prefill_bound_by="fast_path"), Status.TRUE,
                 "ValidMetricFound", id="a fast-path target is active"),
    pytest.param(_target(held=True, hold_reason="held_stale_metrics",
                         hold_detail="Prometheus cannot be read",
                         prefill_bound_by="held_stale_metrics"),
                 Status.FALSE, "HeldStaleMetrics", id="a held target is not active, with why"),
])
def test_scaling_active_is_false_while_the_decider_holds(
    target: ReplicaTarget | None, status: Status, reason: str
) -> None:
    found = conditions.scaling_active(target)
    assert (found.status, found.reason) == (status, reason)


@pytest.mark.parametrize(("prefill_rule", "decode_rule", "status", "reason"), [
    pytest.param("queueing_model", "itl_curve", Status.FALSE, "DesiredWithinRange",
                 id="sizing models are not limits"),
    pytest.param("scale_down_stabilised", "kv_capacity", Status.FALSE, "DesiredWithinRange",
                 id="stabilisation shows under AbleToScale, not here"),
    pytest.param("max_replicas", "itl_curve", Status.TRUE, "TooManyReplicas",
                 id="the maximum limits"),
    pytest.param("queueing_model", "min_replicas", Status.TRUE, "TooFewReplicas",
                 id="the minimum limits"),
    pytest.param("step_limit_up", "itl_curve", Status.TRUE, "ScaleUpLimit",
                 id="the scale-up step limits"),
    pytest.param("gpu_budget", "gpu_budget", Status.TRUE, "GpuBudget",
                 id="Dynamo's budget cut limits"),
    pytest.param("queueing_model", "gpu_budget_sla_split", Status.TRUE, "GpuBudget",
                 id="the budget split limits"),
])
def test_scaling_limited_names_the_rule_that_cut_the_count(
    prefill_rule: str, decode_rule: str, status: Status, reason: str
) -> None:
    found = conditions.scaling_limited(
        _target(prefill_bound_by=prefill_rule, decode_bound_by=decode_rule))
    assert (found.status, found.reason) == (status, reason)


def test_a_binding_gpu_budget_says_what_was_wanted_and_the_predicted_attainment() -> None:
    found = conditions.scaling_limited(BUDGET)
    assert found.reason == "GpuBudget"
    assert "wanted prefill 31 + decode 23, got 4 + 4" in found.message
    assert "predicted attainment 0.00 %" in found.message
    assert conditions.predicted_attainment(BUDGET) == 0.0


@pytest.mark.parametrize(("snapshot", "now", "status", "reason"), [
    pytest.param(None, T0, Status.TRUE, "NoSnapshot", id="no snapshot at all is stale"),
    pytest.param(_snapshot(stale=True, gaps={"num_requests": "Prometheus cannot be read"}),
                 T0, Status.TRUE, "SourceUnreadable", id="a stale snapshot is stale"),
    pytest.param(_snapshot(), T0 + 3 * 60 + 1, Status.TRUE, "NoRecentSnapshot",
                 id="three windows without a snapshot is stale"),
    pytest.param(_snapshot(), T0 + 3 * 60, Status.FALSE, "FreshMetrics",
                 id="within three windows is fresh"),
    pytest.param(_snapshot(num_requests=None, gaps={"num_requests": "no samples"}), T0,
                 Status.TRUE, "MissingMetrics", id="a snapshot without the request count"),
])
def test_metrics_stale_judges_the_last_snapshot_at_the_time_given(
    snapshot: MetricSnapshot | None, now: float, status: Status, reason: str
) -> None:
    found = conditions.metrics_stale(snapshot, now)
    assert (found.status, found.reason) == (status, reason)


def test_a_condition_has_the_shape_kubernetes_wants() -> None:
    from datetime import UTC, datetime

    body = conditions.scaling_limited(BUDGET).as_kubernetes(
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), observed_generation=7)
    assert body["type"] == "ScalingLimited" and body["status"] == "True"
    assert re.fullmatch(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?", body["reason"])
    assert body["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert body["observedGeneration"] == 7


@pytest.mark.parametrize(("p90", "p99", "target", "expected"), [
    pytest.param(0.3, 0.45, 0.5, "at least 99 %", id="p99 within the target"),
    pytest.param(0.3, 0.8, 0.5, "90 % to 99 %", id="p90 within, p99 over"),
    pytest.param(0.6, 0.8, 0.5, "under 90 %", id="p90 over"),
    pytest.param(None, 0.8, 0.5, "under 99 %", id="only p99, over"),
])
def test_percentiles_bracket_the_share_within_a_target(
    p90: float | None, p99: float | None, target: float, expected: str
) -> None:
    bracket = describe.within_target(p90, p99, target)
    assert bracket is not None and bracket.text() == expected


TARGETS: dict[str, Any] = {"config": {"ttft_target_s": 0.5, "itl_target_s": 0.05}}


@pytest.mark.parametrize(("fields", "expected"), [
    pytest.param({"ttft_target_s": 0.5, "ttft_under_target_share": 0.9761,
                  "ttft_share_method": "per_request", "itl_target_s": 0.05,
                  "itl_under_target_share": 1.0, "itl_share_method": "per_request",
                  "ttft_p99_s": 2.4, "itl_p99_s": 0.01},
                 "TTFT 97.61 %, ITL 100.00 %, both 97.61 % of the requests of 07:00:00Z "
                 "(per request)", id="measured shares win over the percentiles"),
    pytest.param({"ttft_target_s": 0.5, "ttft_under_target_share": 0.95,
                  "ttft_share_method": "interpolated", "itl_target_s": 0.05,
                  "itl_under_target_share": 0.98, "itl_share_method": "bucket_edge"},
                 "TTFT about 95.00 %, ITL 98.00 %, both 93 % to 95 % of the requests of "
                 "07:00:00Z (TTFT interpolated in a histogram bucket, ITL histogram bucket at "
                 "the target)", id="an interpolated share is about, both is their overlap"),
    pytest.param({"ttft_target_s": 0.5, "ttft_under_target_share": 0.8123,
                  "ttft_share_method": "beyond_buckets", "itl_p90_s": 0.01, "itl_p99_s": 0.02},
                 "TTFT at least 81.23 %, ITL at least 99 %, both at least 80.23 % of the "
                 "requests of 07:00:00Z (TTFT histogram, target beyond its buckets, ITL from "
                 "p90, p99)", id="a target beyond the buckets is a lower bound; a missing share "
                 "falls back to the percentiles"),
    pytest.param({"ttft_target_s": 2.0, "ttft_under_target_share": 0.5,
                  "ttft_share_method": "per_request", "ttft_p90_s": 0.3, "ttft_p99_s": 0.8},
                 "TTFT 90 % to 99 %, ITL - of the requests of 07:00:00Z (from p90, p99)",
                 id="a share measured against another target is not this target's"),
    pytest.param({"ttft_p90_s": 0.3, "ttft_p99_s": 0.45, "itl_p90_s": 0.04, "itl_p99_s": 0.06},
                 "TTFT at least 99 %, ITL 90 % to 99 %, both 89 % to 99 % of the requests of "
                 "07:00:00Z (from p90, p99)", id="a version 1 snapshot: the percentiles only"),
])
def test_status_shows_the_observed_attainment_the_snapshot_measured(
    fields: dict[str, Any], expected: str
) -> None:
    latest = describe.Latest(snapshot=_snapshot(**fields), target=_target(**TARGETS))
    out = describe.describe(KEY, latest, T0)
    assert f"Observed attainment:  {expected}\n" in out, out


def test_the_decider_exports_the_shares_measured_against_its_own_targets() -> None:
    registry = CollectorRegistry()
    recorder = gauges.DeciderGauges(registry=registry)
    measured = _snapshot(ttft_target_s=0.5, ttft_under_target_share=0.9761,
                         ttft_share_method="per_request", itl_target_s=0.1,
                         itl_under_target_share=0.5, itl_share_method="per_request")
    recorder.record(_target(**TARGETS), measured)
    value = registry.get_sample_value
    labels = {"namespace": "prod", "deployment": "llama"}
    assert value("slaplanner_decider_observed_ttft_attainment_ratio", labels) == 0.9761
    # measured against 100 ms, not the decider's 50 ms: not its attainment
    assert math.isnan(value("slaplanner_decider_observed_itl_attainment_ratio", labels) or 0.0)
    recorder.record(_target(window_end=T0 + 60, **TARGETS), _snapshot(window_end=T0 + 60))
    # a window without a share does not keep the last one's
    assert math.isnan(value("slaplanner_decider_observed_ttft_attainment_ratio", labels) or 0.0)


# --- the watch timeline --------------------------------------------------------------------------

def test_watch_shows_a_decision_once_with_its_inputs_and_the_actuators_outcome() -> None:
    watch = describe.Watch()
    target = _target(prefill=4, decode=3)
    # t0: the snapshot and forecast of the window, then the target: nothing yet
    assert watch.add(_snapshot(ttft_p99_s=1.2, itl_p99_s=0.031)) == []
    assert watch.add(_forecast()) == []
    assert watch.add(target) == []
    # its ScaleEvent: one line with everything
    [line] = watch.add(_event(target, "applied"))
    assert line.startswith("07:00:00Z prod/llama  load 10.0/s  forecast 11.0/s (upper 16.5/s)")
    assert "P 2->4 D 2->3  bound by P queueing_model, D itl_curve" in line
    assert "TTFT p99 1.20 s, ITL p99 31 ms  applied" in line  # no targets known: no shares
    # a refusal of a target already shown is shown on its own
    [refusal] = watch.add(_event(target, "refused", "not in the allowlist"))
    assert refusal.endswith("actuator: refused (not in the allowlist)")


def test_watch_shows_a_decision_without_event_when_the_next_window_starts() -> None:
    watch = describe.Watch()
    watch.add(_snapshot())
    assert watch.add(_target()) == []
    [line] = watch.add(_snapshot(window_end=T0 + 60))  # t0 + 60: no ScaleEvent came
    assert line.endswith("actuator: -")
    fast = _target(window_end=T0 + 60, forecast_id=None, prefill=6,
                   prefill_bound_by="fast_path")
    assert watch.add(fast) == []
    [flushed] = watch.flush()  # the shell flushes after a quiet moment
    assert "fast path" in flushed and "P 2->6" in flushed


# --- the commands against a replay ---------------------------------------------------------------

def slaplanner(*args: str, env_url: str | None = None,
               timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    if env_url is not None:
        env["SLAPLANNER_NATS_URL"] = env_url
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.filterwarnings("ignore::Warning:statsmodels")
async def test_watch_and_status_tell_what_a_replay_decided_and_why(
    nats_server: NatsEndpoint, nc: NATS, tmp_path: Path
) -> None:
    # 20-40 requests/s of 3,000-token prompts on a budget of 4 GPUs: the budget binds from the
    # second window on, and the fast path acts in the first.
    trace = generate(SineLoad(240, 20, 40, 240, 3000, 300, seed=1))
    setup = PlanningSetup.build(policy="slaplanner", predictor="constant", ttft_target_s=0.5,
                                itl_target_s=0.05, adjustment_interval_s=30.0,
                                max_total_gpus=4, worker_startup_s=30.0)
    replay = await run_replay(trace, load_profile(default_profile_path()), setup,
                              ClusterConfig(startup_delay_s=30.0), nats_server.url, tmp_path)
    targets, events = replay.targets, {e.target_id: e for e in replay.events}
    assert len(targets) >= 8

    watched = await asyncio.to_thread(
        slaplanner, "watch", str(DEPLOYMENT), "--since", "1h", "--count", str(len(targets)),
        env_url=nats_server.url)
    assert watched.returncode == 0, watched.stderr
    lines = watched.stdout.splitlines()
    assert len(lines) == len(targets)  # one line per decision, fast path included
    for line, target in zip(lines, targets, strict=True):
        assert line.startswith(f"{describe.clock(target.window_end)} {DEPLOYMENT}  load ")
        assert (f"->{target.prefill_replicas} D " in line
                and f"->{target.decode_replicas}  bound by" in line), line
        rules = conditions.bound_by(target)
        assert f"bound by P {rules['prefill']}, D {rules['decode']}" in line
        assert line.endswith(str(events[target.id].outcome)), line
        assert ("fast path" in line) == (target.forecast_id is None)
    assert any("gpu_budget_sla_split" in line for line in lines)
    # The observed attainment of each window, as the replay measured it per request.
    windows = {EPOCH_S + r.stats.end_s: r.stats for r in replay.run.records}
    for line, target in zip(lines, targets, strict=True):
        stats = windows[target.window_end]
        ttft = window_stats.share_per_request(stats.ttft_samples_s, 0.5).share
        itl = window_stats.share_per_request(stats.itl_samples_s, 0.05).share
        shown = ["-" if share is None else conditions.percent(share) for share in (ttft, itl)]
        assert f"within target TTFT {shown[0]}, ITL {shown[1]}  " in line, line

    last = targets[-1]
    at = str(last.window_end + 1)
    status = await asyncio.to_thread(slaplanner, "status", str(DEPLOYMENT), "--at", at,
                                     "--nats-url", nats_server.url)
    assert status.returncode == 0, status.stderr
    out = status.stdout
    assert f"Name:                 {DEPLOYMENT}" in out
    assert re.search(r"Profile:\s+\S*h200_llama31_8b_fp8_tp1", out), out
    running = replay.run.records[-2].stats  # the last window's snapshot, before its decision
    assert re.search(rf"prefill:\s+{running.prefill_serving} / {last.prefill_replicas} / "
                     rf"{last.prefill_replicas} \(", out), out
    assert re.search(rf"decode:\s+{running.decode_serving} / {last.decode_replicas} / "
                     rf"{last.decode_replicas} \(", out), out
    share = conditions.predicted_attainment(last)
    assert share is not None and f"Predicted attainment: {conditions.percent(share)}" in out
    ttft = window_stats.share_per_request(running.ttft_samples_s, 0.5).share
    itl = window_stats.share_per_request(running.itl_samples_s, 0.05).share
    assert ttft is not None and itl is not None
    both = describe.Bracket(max(0.0, ttft + itl - 1.0), min(ttft, itl)).text()
    assert (f"Observed attainment:  TTFT {conditions.percent(ttft)}, ITL "
            f"{conditions.percent(itl)}, both {both} of the requests of "
            f"{describe.clock(last.window_end)} (per request)\n") in out, out
    assert re.search(r"ScalingLimited\s+True\s+GpuBudget\s+prefill \d+ bound by "
                     r"gpu_budget_sla_split", out), out
    assert re.search(r"AbleToScale\s+True", out) and re.search(r"ScalingActive\s+True", out)
    assert re.search(r"MetricsStale\s+False\s+FreshMetrics", out), out

    # Judged now, the replay's virtual 2023 is long past: stale, and it says so.
    now = await asyncio.to_thread(slaplanner, "status", "--nats-url", nats_server.url)
    assert re.search(r"MetricsStale\s+True\s+NoRecentSnapshot", now.stdout), now.stdout
    assert "Services (durable consumers of the stream SLAPLANNER):" in now.stdout


async def test_publish_checks_the_body_first_and_the_stream_drops_a_repeated_id(
    nats_server: NatsEndpoint, nc: NATS
) -> None:
    js = nc.jetstream()
    await js.add_stream(name="SLAPLANNER", subjects=["slaplanner.>"])
    body = orjson.dumps({"schema_version": 1, "id": "typed-1",
                         "deployment": {"namespace": "test", "name": "llama"},
                         "window_end": T0, "window_s": 60, "num_requests": 600}).decode()
    sent = await asyncio.to_thread(slaplanner, "publish", "slaplanner.metrics.test.llama", body,
                                   env_url=nats_server.url)
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == ("published on slaplanner.metrics.test.llama: stream "
                                   "SLAPLANNER, sequence 1")
    again = await asyncio.to_thread(slaplanner, "publish", "slaplanner.metrics.test.llama",
                                    body, env_url=nats_server.url)
    assert "a duplicate of an id the stream has seen: dropped" in again.stdout

    wrong = await asyncio.to_thread(slaplanner, "publish", "slaplanner.metrics.test.other",
                                    body, env_url=nats_server.url)
    assert wrong.returncode == 1
    assert wrong.stderr.splitlines() == [
        "slaplanner publish: the subject names test/other, the body test/llama (slaplanner "
        "schema MetricSnapshot shows the fields; --no-check sends it anyway)"]
    invalid = await asyncio.to_thread(slaplanner, "publish", "slaplanner.metrics.test.llama",
                                      '{"deployment": {"namespace": "test", "name": "llama"}}',
                                      env_url=nats_server.url)
    assert invalid.returncode == 1 and len(invalid.stderr.splitlines()) == 1
    assert "not a valid MetricSnapshot: window_end: Field required" in invalid.stderr
    assert (await js.stream_info("SLAPLANNER")).state.messages == 1  # nothing else went in
    forced = await asyncio.to_thread(
        slaplanner, "publish", "--no-check", "slaplanner.metrics.test.llama", "{}",
        env_url=nats_server.url)
    assert forced.returncode == 0 and (await js.stream_info("SLAPLANNER")).state.messages == 2


def test_an_unreachable_nats_is_one_line_naming_the_url_within_seconds() -> None:
    url = f"nats://127.0.0.1:{embedded_nats.free_port()}"
    for command in (["status"], ["watch"], ["publish", "slaplanner.metrics.a.b", "{}",
                                            "--no-check"]):
        started = time.monotonic()
        result = slaplanner(*command, env_url=url, timeout_s=30)
        assert time.monotonic() - started < 10
        assert result.returncode == 1
        [line] = result.stderr.splitlines()
        assert line.startswith(f"slaplanner {command[0]}: cannot reach NATS at {url} (")
        assert "nats-server -js" in line


def test_a_nats_server_without_jetstream_is_named_as_such(tmp_path: Path) -> None:
    port = embedded_nats.free_port()
    server = subprocess.Popen([embedded_nats.nats_server_binary(), "-a", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        embedded_nats.wait_for_port(port)
        result = slaplanner("status", env_url=f"nats://127.0.0.1:{port}")
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"slaplanner status: NATS at nats://127.0.0.1:{port} has no JetStream: start the "
            "server with -js (nats-server -js)"]
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_deployment_that_is_not_namespace_slash_name_is_refused_in_one_line() -> None:
    result = slaplanner("status", "llama", env_url="nats://127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "slaplanner status: 'llama' is not a deployment: write NAMESPACE/NAME, each a DNS label "
        "(^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$), e.g. prod/llama"]


async def test_watch_started_while_a_decision_is_made_shows_that_one_with_its_inputs(
    nats_server: NatsEndpoint, nc: NATS
) -> None:
    """`publish` then `watch --count 1`, as the README types them: the snapshot and the forecast
    of the new window are in, its target not yet. Started at the last message of each subject,
    watch showed the previous window's decision, its snapshot and forecast already replaced
    (`load -  forecast -`, seen on a busy machine); it starts at the newest snapshot."""
    js = nc.jetstream()
    await bus.update_streams(js, ServiceSettings(nats_url=[nats_server.url]))
    before, now = _target(T0), _target(T0 + 60, prefill=4)

    subjects: dict[type, str] = {MetricSnapshot: METRICS_SUBJECT, LoadForecast: FORECAST_SUBJECT,
                                 ReplicaTarget: TARGET_SUBJECT, ScaleEvent: SCALED_SUBJECT}

    async def put(message: MetricSnapshot | LoadForecast | ReplicaTarget | ScaleEvent) -> None:
        subject = subjects[type(message)]
        await js.publish(subject.format(namespace=KEY.namespace, name=KEY.name),
                         message.model_dump_json(by_alias=True).encode())

    for message in (_snapshot(T0), _forecast(T0), before, _event(before, "applied"),
                    _snapshot(T0 + 60, num_requests=1200.0), _forecast(T0 + 60)):
        await put(message)
    watching = asyncio.create_task(asyncio.to_thread(
        slaplanner, "watch", str(KEY), "--count", "1", env_url=nats_server.url))
    await asyncio.sleep(3.0)  # watch has started (or is starting): the decision comes now
    await put(now)
    await put(_event(now, "applied"))
    watched = await asyncio.wait_for(watching, 90.0)
    assert watched.returncode == 0, watched.stderr
    [line] = watched.stdout.splitlines()
    assert line.startswith(f"{describe.clock(T0 + 60)} {KEY}  load 20.0/s  forecast 11.0/s"), line
    assert "->4 D " in line and line.endswith("applied"), line
