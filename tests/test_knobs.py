"""The knob model: each planner knob declared once reaches every place that sets it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import create_model

from services.decider import knobs as knob_model
from services.decider.knobs import SLAPLANNER, DeploymentKnobs, knob
from services.decider.settings import DeciderSettings
from shared import settings
from shared.settings import DurationS
from sim import dryrun, options, simulate_cli

DOCS = Path(__file__).resolve().parent.parent / "docs" / "decider.md"
AZURE = "shared/traces/azure_llm_2023_code.csv"


def extended() -> type[DeploymentKnobs]:
    """The knob model with one more knob, declared as every knob is: one field."""
    return create_model(
        "WithBurstGuard",
        __base__=DeploymentKnobs,
        burst_guard_s=(DurationS, knob(
            30.0, unit="s", gt=0.0, policies=SLAPLANNER, dynamo="--burst-guard",
            dynamo_unit="ms", description="how long a burst is guarded against",
        )),
    )


def guard(knobs: object) -> float:
    """The new knob's value (the class is made at run time, so the type checker cannot see it)."""
    assert isinstance(knobs, DeploymentKnobs)
    return float(knobs.model_dump()["burst_guard_s"])


def test_a_knob_declared_once_is_a_flag_with_its_dynamo_spelling() -> None:
    cls = extended()
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, cls)
    given = settings.settings_from(cls, parser.parse_args(["--burst-guard-s", "12"]), {})
    dynamo = settings.settings_from(cls, parser.parse_args(["--burst-guard", "500"]), {})
    assert (guard(given), guard(dynamo)) == (12.0, 0.5)


def test_a_knob_declared_once_is_an_environment_variable_both_ways() -> None:
    cls = extended()
    read = settings.settings_from(cls, {}, {"SLAPLANNER_BURST_GUARD_S": "2m"})
    assert guard(read) == 120.0
    written = knob_model.knob_environment(read)
    assert written["SLAPLANNER_BURST_GUARD_S"] == "120.0"
    assert guard(settings.settings_from(cls, {}, written)) == 120.0


def test_a_knob_declared_once_is_an_option_of_simulate_and_reaches_the_services() -> None:
    cls = extended()
    parser = argparse.ArgumentParser()
    simulate_cli.add_arguments(parser, knobs_cls=cls)
    args = parser.parse_args(["--trace", AZURE, "--burst-guard-s", "7", "--max-intervals", "2"])
    parsed = simulate_cli.parse(args, cls)
    assert guard(parsed.setup.knobs) == 7.0
    assert parsed.setup.service_env()["decider"]["SLAPLANNER_BURST_GUARD_S"] == "7.0"


def test_a_knob_declared_once_is_an_option_of_the_dry_run() -> None:
    cls = extended()
    args = dryrun.build_parser(cls).parse_args(["--trace", AZURE, "--burst-guard", "250"])
    assert guard(options.knobs_from_args(args, cls)) == 0.25


def test_a_knob_declared_once_is_a_key_of_the_per_deployment_file_and_a_row_of_the_docs() -> None:
    cls = extended()
    from_file = knob_model.from_names({"burst_guard_s": "1s"}, cls)
    assert guard(from_file) == 1.0
    row = next(line for line in knob_model.docs_table(cls).splitlines()
               if line.startswith("| `burst_guard_s`"))
    assert "`--burst-guard` (ms)" in row and "| 30 s |" in row and "| slaplanner |" in row


def test_the_docs_table_is_the_knob_models() -> None:
    text = DOCS.read_text(encoding="utf-8")
    block = re.search(r"<!-- BEGIN knobs -->\n(.*?)\n<!-- END knobs -->", text, re.S)
    assert block is not None, "docs/decider.md has no knobs block"
    assert block.group(1) == knob_model.docs_table(), (
        "docs/decider.md is out of date: put the output of `python -m services.decider.knobs` "
        "between its knobs markers"
    )


def test_every_knob_has_a_unit_a_description_and_is_a_decider_setting() -> None:
    for spec in knob_model.specs().values():
        assert spec.unit and spec.description, spec.name
        assert spec.name in DeciderSettings.model_fields
        assert set(spec.policies) <= {"dynamo", "slaplanner"}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(["--no-correction"], {"no_correction": True},
                     id="a switch needs no value"),
        pytest.param(["--no-correction", "false"], {"no_correction": False},
                     id="a switch still takes an explicit value"),
        pytest.param(["--no-fast-path"], {"fast_path": False},
                     id="a switch that is on by default has its no- form"),
        pytest.param(["--ttft", "300", "--itl", "20"], {"ttft_target_s": 0.3, "itl_target_s": 0.02},
                     id="Dynamo's --ttft and --itl are milliseconds"),
        pytest.param(["--ttft-target-s", "0.3"], {"ttft_target_s": 0.3},
                     id="a flag ending in -s takes bare seconds"),
        pytest.param(["--adjustment-interval", "90"], {"adjustment_interval_s": 90.0},
                     id="Dynamo's --adjustment-interval is seconds"),
        pytest.param(["--max-gpu-budget", "16", "--prefill-engine-num-gpu", "2"],
                     {"max_total_gpus": 16, "prefill_engine_num_gpu": 2},
                     id="Dynamo's names of the budget and the engine size"),
        pytest.param(["--prefill-engine-gpus", "2"], {"prefill_engine_num_gpu": 2},
                     id="a former flag still works"),
    ],
)
def test_the_deciders_flags(argv: list[str], expected: dict[str, Any]) -> None:
    parsed = settings.parse(DeciderSettings, argv, {}, "slaplanner decider", "")
    assert {name: getattr(parsed, name) for name in expected} == pytest.approx(expected)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--ttft=-2s"],
                     "--ttft-target-s / SLAPLANNER_TTFT_TARGET_S: must be positive",
                     id="a negative target is not positive"),
        pytest.param(["--itl-target-s", "50"],
                     "must be at most 10.0 s, got '50' (a bare number is seconds",
                     id="milliseconds without a unit are caught by the bound"),
    ],
)
def test_a_bad_flag_of_the_decider_is_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        settings.parse(DeciderSettings, argv, {}, "slaplanner decider", "")
    assert message in capsys.readouterr().err


def test_every_command_offers_every_knob() -> None:
    flags = {spec.flag for spec in knob_model.specs().values()}
    dry = dryrun.build_parser().format_help()
    simulate = argparse.ArgumentParser()
    simulate_cli.add_arguments(simulate)
    for helped in (dry, simulate.format_help()):
        assert not {f for f in flags if f not in helped}


def test_the_same_default_policy_and_predictor_everywhere_but_the_dry_run() -> None:
    parser = argparse.ArgumentParser()
    simulate_cli.add_arguments(parser)
    args = parser.parse_args(["--trace", AZURE])
    assert (args.policy, args.predictor) == ("slaplanner", simulate_cli.DEFAULT_PREDICTOR)
    assert DeploymentKnobs().policy == DeciderSettings().policy == "slaplanner"
    dry = dryrun.build_parser().parse_args(["--trace", AZURE])
    assert (dry.policy, dry.predictor, dry.enforce_gpu_budget) == ("dynamo", "constant", False)
