"""``slaplanner dry-run --policy slaplanner``: every predictor, the table's marks, the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from services.decider.knobs import DeploymentKnobs
from services.forecaster.predictors import PredictorUnavailable, ensure_available
from services.forecaster.settings import PREDICTOR_NAMES
from shared import traces
from sim import dryrun
from sim.synth import write_mooncake
from tests.test_slaplanner_policy_support import PROFILE

AZURE = str(traces.bundled_trace_path("azure_llm_2023_code.csv"))
ARGS = ["--trace", AZURE, "--speedup", "10", "--interval", "15s", "--ttft", "500ms",
        "--itl", "20ms", "--max-gpu-budget", "64", "--policy", "slaplanner"]


class Erratic:
    """A predictor that says anything: NaN, infinities, negatives, huge numbers."""

    VALUES = (math.nan, math.inf, -5.0, 1e12, 0.0, -math.inf)

    def __init__(self) -> None:
        self.calls = 0

    def add(self, value: float) -> None:
        self.calls += 1

    def predict_next(self) -> float:
        return self.VALUES[self.calls % len(self.VALUES)]


@pytest.fixture
def with_erratic_predictor() -> object:
    dryrun.register_predictor("erratic", Erratic)
    yield
    del dryrun.PREDICTORS["erratic"]


def installed(name: str) -> bool:
    try:
        ensure_available(name)
    except (PredictorUnavailable, KeyError):
        return name in dryrun.PREDICTORS
    return True


@pytest.mark.usefixtures("with_erratic_predictor")
def test_the_slaplanner_dry_run_works_with_every_predictor_it_knows(tmp_path: Path) -> None:
    # Dynamo's one-step predictors and every one of the forecaster (prophet where installed);
    # the forecaster's fit models, on the first three minutes of the trace.
    names = dryrun.predictor_names()
    assert {"constant", "erratic", *PREDICTOR_NAMES} <= set(names)
    short = tmp_path / "first-minutes.jsonl"
    write_mooncake(traces.load_trace(AZURE).between(0.0, 1800.0), short)  # 3 min at x10
    for name in filter(installed, names):
        out = tmp_path / f"{name}.json"
        argv = ARGS if name in dryrun.PREDICTORS else [*ARGS, "--trace", str(short)]
        assert dryrun.main([*argv, "--predictor", name, "--json", str(out), "--quiet"]) == 0
        document = json.loads(out.read_text())
        per_interval = document["per_interval"]
        assert document["policy"] == "slaplanner"
        assert len(per_interval["num_p"]) == len(per_interval["time"]) > 10
        assert all(n >= 1 for n in per_interval["num_p"] + per_interval["num_d"])
        assert isinstance(document["fast_path_events"], list)


def test_the_table_and_the_plot_show_stabilisation_and_the_fast_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "dry-run.png"
    out = tmp_path / "dry-run.json"
    assert dryrun.main([*ARGS, "--plot", str(plot), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].split()[-2:] == ["num_p", "num_d"]
    # the Azure code trace x10 bursts within its 15 s intervals: the fast path raises prefill
    # between planning intervals, and stabilisation holds it through the lulls
    assert any(line.rstrip().endswith("F") for line in lines[1:])
    assert any(line.rstrip().endswith("S") for line in lines[1:])
    assert "S scale-down held by the stabilisation window" in table
    assert "F the fast path scaled up during the interval" in table
    document = json.loads(out.read_text())
    events = document["fast_path_events"]
    assert events and all(e["num_p"] >= 1 for e in events)
    per_interval = document["per_interval"]
    held = [i for i, b in enumerate(per_interval["prefill_bound_by"])
            if b == "scale_down_stabilised"]
    assert held and all(per_interval["num_p"][i] > per_interval["need_p"][i] for i in held)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_fast_path_interval_must_divide_the_interval(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert dryrun.main([*ARGS, "--fast-path-interval", "7s", "--quiet"]) == 2
    assert "must divide the interval" in capsys.readouterr().err
    assert dryrun.main([*ARGS, "--fast-path-interval", "0s", "--quiet"]) == 0


def test_short_windows_change_nothing_for_dynamo() -> None:
    trace = traces.load_trace(AZURE).sped_up(10)
    knobs = DeploymentKnobs(policy="dynamo", ttft_target_s=0.1, itl_target_s=0.01,
                            adjustment_interval_s=15.0, max_total_gpus=64)
    plain = dryrun.run_dry_run(trace, knobs, profile=PROFILE)
    with_short = dryrun.run_dry_run(trace, knobs, profile=PROFILE, fast_path_s=5.0)
    assert (with_short.num_p, with_short.num_d) == (plain.num_p, plain.num_d)
    assert with_short.fast_path == []


def test_the_dry_run_defaults_to_dynamos_policy_and_says_so() -> None:
    parser = dryrun.build_parser()
    assert parser.parse_args(["--trace", AZURE]).policy == "dynamo"
    assert "defaults to Dynamo's policy" in " ".join(parser.format_help().split())
