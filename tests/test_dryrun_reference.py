"""Our dry run against Dynamo's own dry-run decisions on the bundled traces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.decider.knobs import DeploymentKnobs
from shared import traces
from shared.perf_model import load_profile
from sim import dryrun

REFERENCE_DIR = Path(__file__).parent / "data" / "reference"
REFERENCES = sorted(REFERENCE_DIR.glob("*.json"))


def dry_run_argv(reference: dict[str, Any], json_out: Path) -> list[str]:
    assert reference["load_predictor"] == "constant"
    assert reference["profile"].endswith("h200_llama31_8b_fp8_tp1")  # the bundled default
    return [
        "--trace", str(traces.bundled_trace_path(reference["trace"])),
        "--speedup", str(reference["speedup"]),
        "--interval", f"{reference['adjustment_interval_s']}s",
        "--ttft", f"{reference['ttft_s'] * 1000:g}ms",
        "--itl", f"{reference['itl_s'] * 1000:g}ms",
        "--max-gpu-budget", str(reference["max_gpu_budget"]),
        "--min-endpoint", str(reference["min_endpoint"]),
        "--prefill-engine-num-gpu", str(reference["prefill_engine_num_gpu"]),
        "--decode-engine-num-gpu", str(reference["decode_engine_num_gpu"]),
        "--start-prefill", str(reference["start_num_p"]),
        "--start-decode", str(reference["start_num_d"]),
        "--predictor", reference["load_predictor"],
        "--policy", "dynamo",
        "--json", str(json_out),
        "--quiet",
    ]  # fmt: skip


def test_the_reference_files_are_there() -> None:
    assert len(REFERENCES) >= 3


@pytest.mark.parametrize("path", REFERENCES, ids=[p.stem for p in REFERENCES])
def test_our_dry_run_gives_dynamos_replicas_in_every_interval(path: Path, tmp_path: Path) -> None:
    reference = json.loads(path.read_text())
    expected = reference["per_interval"]
    out = tmp_path / "ours.json"
    assert dryrun.main(dry_run_argv(reference, out)) == 0
    ours = json.loads(out.read_text())["per_interval"]

    assert len(ours["num_p"]) == len(expected["num_p"])
    assert ours["num_p"] == [int(n) for n in expected["num_p"]]
    assert ours["num_d"] == [int(n) for n in expected["num_d"]]
    assert ours["time"] == expected["time"]
    for key in ("rr", "isl", "osl", "est_rr", "est_isl", "est_osl"):
        assert ours[key] == pytest.approx(expected[key], rel=1e-9, abs=0), key


def test_the_dry_run_prints_a_table_and_plots_load_forecast_and_replicas(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = json.loads(REFERENCES[0].read_text())
    argv = [a for a in dry_run_argv(reference, tmp_path / "x.json") if a != "--quiet"]
    plot = tmp_path / "dry-run.png"
    assert dryrun.main([*argv, "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == [
        "time_s", "rr", "est_rr", "isl", "est_isl", "osl", "est_osl", "num_p", "num_d",
    ]  # fmt: skip
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_dry_run_marks_intervals_where_dynamos_cut_exceeds_the_budget() -> None:
    # Azure code trace x50, 15 s: prefill-heavy bursts; min_endpoint 2 and budget 8 make
    # Dynamo's cut leave 7 prefill + 2 decode = 9 GPUs in one interval.
    trace = traces.load_trace(traces.bundled_trace_path("azure_llm_2023_code.csv")).sped_up(50)
    knobs = DeploymentKnobs(policy="dynamo", min_endpoint=2, ttft_target_s=0.1,
                            itl_target_s=0.01, adjustment_interval_s=15.0)
    profile = load_profile(knobs.profile_path)

    dynamo_exact = knobs.model_copy(update={"enforce_gpu_budget": False})
    exact = dryrun.run_dry_run(trace, dynamo_exact, profile=profile)
    assert "      7      2 !" in dryrun.format_table(exact)
    guarded = dryrun.format_table(dryrun.run_dry_run(trace, knobs, profile=profile))
    assert " !" not in guarded
    assert "      6      2 ~" in guarded


@pytest.mark.parametrize(
    ("flag", "value", "error"),
    [
        pytest.param("--ttft", "-2s", "--ttft-target-s: must be positive, got '-2s'",
                     id="a negative target is not positive, whatever its unit"),
        pytest.param("--ttft", "0", "--ttft-target-s: must be positive, got '0ms'",
                     id="a zero target in Dynamo's milliseconds is not positive"),
        pytest.param("--itl-target-s", "soon", "--itl-target-s: 'soon' is not a duration",
                     id="text that is no duration is named with its flag"),
    ],
)
def test_a_bad_target_gets_one_line_naming_its_flag(
    flag: str, value: str, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = str(traces.bundled_trace_path("azure_llm_2023_code.csv"))
    assert dryrun.main(["--trace", trace, f"{flag}={value}"]) == 2
    err = capsys.readouterr().err
    assert error in err and len(err.strip().splitlines()) == 1


def test_other_predictors_can_be_plugged_in_by_name() -> None:
    class Doubling:
        def __init__(self) -> None:
            self.last = 0.0

        def add(self, value: float) -> None:
            self.last = value

        def predict_next(self) -> float:
            return 2 * self.last

    dryrun.register_predictor("doubling", Doubling)
    try:
        trace = traces.load_trace(traces.bundled_trace_path("mooncake_conversation.jsonl"))
        knobs = DeploymentKnobs(policy="dynamo", max_total_gpus=64, ttft_target_s=0.1,
                                itl_target_s=0.01, adjustment_interval_s=30.0)
        profile = load_profile(knobs.profile_path)
        result = dryrun.run_dry_run(trace.sped_up(5), knobs, predictor="doubling",
                                    profile=profile)
        assert result.est_rr[1] == 2 * result.rr[0]
        assert result.num_p[1] >= 5  # twice the load of the constant predictor's 5
    finally:
        del dryrun.PREDICTORS["doubling"]
