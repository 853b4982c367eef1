"""The decider core end to end (forecast in, target out), its gauges, and the profile command."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from services.decider import gauges
from services.decider.core import Decider, gauge_values
from services.decider.settings import DeciderSettings
from shared import profile_cli
from shared.messages import (
    DeploymentKey,
    ForecastStep,
    LoadForecast,
    MetricSnapshot,
    ReplicaTarget,
    derived_id,
)
from shared.perf_model import default_profile_path, load_profile

LLAMA = DeploymentKey(namespace="prod", name="llama")
T0 = 1_700_000_000.0


def forecast(
    num_requests: float = 1800.0,
    forecast_id: str = "f-1",
    deployment: DeploymentKey = LLAMA,
    **observed_fields: Any,
) -> LoadForecast:
    fields: dict[str, Any] = {
        "deployment": deployment,
        "window_end": T0,
        "window_s": 60.0,
        "num_requests": 1800.0,
        "isl_avg": 3000.0,
        "osl_avg": 300.0,
        "ttft_avg_s": 0.12,
        "itl_avg_s": 0.009,
        "request_duration_avg_s": 3.0,
        "prefill_workers": 2,
        "decode_workers": 2,
    }
    fields.update(observed_fields)
    observed = MetricSnapshot(**fields)
    return LoadForecast(
        id=forecast_id,
        deployment=deployment,
        window_end=T0,
        window_s=60.0,
        model="constant",
        steps=[
            ForecastStep(
                window_end=T0 + 60,
                num_requests=num_requests,
                num_requests_upper=num_requests,
                isl_avg=3000.0,
                isl_avg_upper=3000.0,
                osl_avg=300.0,
                osl_avg_upper=300.0,
            )
        ],
        observed=observed,
    )


PROFILE = load_profile(default_profile_path())


def make_decider(**knobs: Any) -> Decider:
    """A decider on the bundled profile, loaded once for this module."""
    values: dict[str, Any] = {"policy": "dynamo", "ttft_target_s": 0.1, "itl_target_s": 0.01,
                              **knobs}
    return Decider(DeciderSettings(**values), {str(default_profile_path()): PROFILE})


@pytest.fixture(scope="module")
def decider() -> Decider:
    return make_decider(no_correction=True)


def test_a_target_answers_a_forecast_with_an_id_derived_from_it(decider: Decider) -> None:
    target = decider.decide(forecast(forecast_id="answer-me"))
    assert target.id == derived_id("target", "answer-me")
    assert target.forecast_id == "answer-me"
    assert target.deployment == LLAMA
    assert target.policy == "dynamo"
    # ceil(90,000 / 49,481.09) = 2 and ceil(9,000 / 4,555.68) = 2
    assert (target.prefill_replicas, target.decode_replicas) == (2, 2)
    assert ReplicaTarget.from_json(target.to_json()) == target


def test_a_redelivered_forecast_gets_the_very_same_target() -> None:
    decider = make_decider()
    first = decider.decide(forecast(forecast_id="again"))
    state = decider.state_of(LLAMA)
    again = decider.decide(forecast(forecast_id="again"))
    assert again == first
    assert decider.state_of(LLAMA) == state


def test_the_explanation_names_the_forecast_the_profile_and_the_binding_rules(
    decider: Decider,
) -> None:
    why = decider.decide(forecast(forecast_id="why")).explanation
    assert why["forecast"]["model"] == "constant"
    assert why["forecast"]["num_requests"] == 1800.0
    assert Path(why["profile"]) == default_profile_path()
    # the model the profile was measured on, for the actuator's check against the workload
    assert why["profile_model"] == "nvidia/Llama-3.1-8B-Instruct-FP8"
    assert why["prefill_bound_by"] == "profile_capacity"
    assert why["decode"]["capacity_per_replica_tokens_per_s"] == pytest.approx(4555.68, 1e-6)
    json.dumps(why)


def test_corrections_carry_over_between_forecasts_of_one_deployment() -> None:
    decider = make_decider()
    decider.decide(forecast(forecast_id="c1", ttft_avg_s=0.03))
    state = decider.state_of(LLAMA)
    assert state is not None
    # 0.03 s observed / 0.0604587 s profiled at ISL 3000
    assert state.prefill_correction == pytest.approx(0.03 / 0.06045866867507648)
    other = DeploymentKey(namespace="prod", name="other")
    assert decider.state_of(other) is None


def test_each_deployment_uses_its_own_configuration(tmp_path: Path) -> None:
    path = tmp_path / "deployments.toml"
    path.write_text('[deployments."prod/llama"]\nmin_prefill_replicas = 3\nmax_total_gpus = 10\n')
    decider = make_decider(no_correction=True, deployment_config_file=str(path))
    llama = decider.decide(forecast(forecast_id="l"))
    other = decider.decide(
        forecast(forecast_id="o", deployment=DeploymentKey(namespace="prod", name="other"))
    )
    assert (llama.prefill_replicas, other.prefill_replicas) == (3, 2)
    assert llama.explanation["config"]["max_total_gpus"] == 10


def test_gauge_values_read_the_target_and_leave_the_unobserved_empty(decider: Decider) -> None:
    target = decider.decide(forecast(forecast_id="g", ttft_avg_s=None))
    values = gauge_values(target)
    assert values["observed_ttft_seconds"] is None
    assert values["observed_itl_seconds"] == 0.009
    assert values["ttft_target_seconds"] == 0.1
    assert values["observed_request_rate_per_second"] == 30.0  # 1800 requests / 60 s
    assert values["forecast_request_rate_per_second"] == 30.0
    assert values["prefill_target_replicas"] == float(target.prefill_replicas)
    assert values["prefill_correction_factor"] == 1.0


def test_gauges_are_recorded_per_deployment(decider: Decider) -> None:
    registry = CollectorRegistry()
    recorder = gauges.DeciderGauges(registry)
    target = decider.decide(forecast(forecast_id="rec", ttft_avg_s=None))
    recorder.record(target)
    labels = {"namespace": "prod", "deployment": "llama"}
    decode = {**labels, "role": "decode"}
    assert registry.get_sample_value("slaplanner_decider_desired_replicas", decode) == 2.0
    assert registry.get_sample_value("slaplanner_decider_itl_target_seconds", labels) == 0.01
    observed_ttft = registry.get_sample_value("slaplanner_decider_observed_ttft_seconds", labels)
    assert observed_ttft is not None and math.isnan(observed_ttft)
    assert registry.get_sample_value("slaplanner_decider_target_held", labels) == 0.0
    assert registry.get_sample_value("slaplanner_decider_last_decision_timestamp_seconds",
                                     labels) == target.window_end
    rule = target.explanation["decode_bound_by"]
    assert registry.get_sample_value("slaplanner_decider_binding_rule",
                                     {**decode, "rule": rule}) == 1.0


def test_the_binding_rule_of_a_role_is_one_series_that_follows_the_rule(
    decider: Decider,
) -> None:
    registry = CollectorRegistry()
    recorder = gauges.DeciderGauges(registry)
    first = decider.decide(forecast(forecast_id="r1"))
    recorder.record(first)
    held = first.model_copy(update={"id": "r2", "explanation": {
        **first.explanation, "prefill_bound_by": "held_stale_metrics"}})
    recorder.record(held)
    series = [s.labels for m in registry.collect() if m.name == "slaplanner_decider_binding_rule"
              for s in m.samples if s.labels["role"] == "prefill"]
    assert series == [{"namespace": "prod", "deployment": "llama", "role": "prefill",
                       "rule": "held_stale_metrics"}]


def test_every_gauge_is_documented() -> None:
    documented = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    for key in [*gauges.GAUGES, *gauges.SNAPSHOT_GAUGES, *gauges.TARGET_GAUGES,
                *gauges.ROLE_GAUGES, gauges.BINDING_RULE]:
        assert f"`{gauges.PREFIX}{key}`" in documented


# --- slaplanner profile -----------------------------------------------------------------------


def test_profile_show_prints_the_summary_and_plots_the_curves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "profile.png"
    assert profile_cli.main(["show", str(default_profile_path()), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "nvidia/Llama-3.1-8B-Instruct-FP8" in out
    assert "max_kv_tokens 945029" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert profile_cli.main(["show", str(default_profile_path()), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["max_context_tokens"] == 16_384


def test_profile_convert_goes_both_ways_and_keeps_the_numbers(tmp_path: Path) -> None:
    as_json = tmp_path / "h200.json"
    as_dir = tmp_path / "h200"
    assert profile_cli.main(["convert", str(default_profile_path()), str(as_json)]) == 0
    assert profile_cli.main(["convert", str(as_json), str(as_dir)]) == 0
    original, converted = PROFILE, load_profile(as_dir)
    assert converted.prefill.thpt_per_gpu(3000) == original.prefill.thpt_per_gpu(3000)
    assert (converted.decode.thpt_grid == original.decode.thpt_grid).all()
    # ITL passes through seconds in the JSON form: equal to the last bit or so
    assert converted.decode.itl_grid_s == pytest.approx(original.decode.itl_grid_s, rel=1e-12)
    assert converted.provenance == original.provenance
    # no silent overwrite
    assert profile_cli.main(["convert", str(as_json), str(as_dir)]) == 2


def test_profile_convert_needs_provenance_the_source_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare"
    assert profile_cli.main(["convert", str(default_profile_path()), str(bare)]) == 0
    (bare / "metadata.json").unlink()
    out = tmp_path / "bare.json"
    assert profile_cli.main(["convert", str(bare), str(out)]) == 2
    assert "field 'provenance.model'" in capsys.readouterr().err
    assert (
        profile_cli.main(
            [
                "convert", str(bare), str(out), "--model", "m", "--gpu", "g",
                "--source", "a test", "--synthetic", "false", "--max-context-tokens", "16384",
            ]
        )
        == 0
    )  # fmt: skip
    assert load_profile(out).provenance.model == "m"


def test_profile_show_of_a_bad_path_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert profile_cli.main(["show", "/nonexistent/profile"]) == 2
    assert "no such profile" in capsys.readouterr().err


def test_the_decider_names_its_policy_targets_and_profile_for_the_start_log(
    tmp_path: Path,
) -> None:
    overrides = tmp_path / "deployments.toml"
    overrides.write_text('[deployments."prod/llama"]\npolicy = "dynamo"\nttft_target_s = "2s"\n')
    settings = DeciderSettings(ttft_target_s=0.3, deployment_config_file=str(overrides))
    lines = Decider(settings, {str(default_profile_path()): PROFILE}).describe()
    model = PROFILE.provenance.model
    assert model and len(lines) == 2
    assert lines[0].startswith("every deployment: policy slaplanner, TTFT target 0.3 s")
    assert lines[1].startswith("deployment prod/llama: policy dynamo, TTFT target 2 s")
    assert all(str(default_profile_path()) in line and model in line for line in lines)
