"""Settings: flags over environment over defaults, durations carry their unit."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.actuator.settings import ActuatorSettings
from services.collector.settings import CollectorSettings
from shared import settings
from shared.service_settings import ServiceSettings


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("100ms", 0.1), ("2s", 2.0), ("2000ms", 2.0), ("1.5s", 1.5), ("5m", 300.0), ("1h", 3600.0)],
)
def test_a_duration_with_a_unit_is_read_in_seconds(text: str, seconds: float) -> None:
    assert settings.parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["100", "0.1", "fast", "10 parsecs", ""])
def test_a_duration_without_a_known_unit_is_refused_as_ambiguous(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration with a unit"):
        settings.parse_duration_s(text)


def test_a_flag_beats_the_environment_which_beats_the_default() -> None:
    env = {"SLAPLANNER_INTERVAL_S": "30s", "SLAPLANNER_NATS_URL": "nats://a:1,nats://b:2"}
    parsed = settings.settings_from(CollectorSettings, {"interval_s": "15s"}, env)
    assert parsed.interval_s == 15.0
    assert parsed.nats_url == ["nats://a:1", "nats://b:2"]
    assert settings.settings_from(CollectorSettings, {}, env).interval_s == 30.0
    assert settings.settings_from(CollectorSettings, {}, {}).interval_s == 60.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60", 60.0), ("0.5", 0.5), ("2s", 2.0), ("100ms", 0.1), ("5m", 300.0)],
)
def test_a_flag_whose_name_ends_in_s_takes_bare_seconds_or_a_unit(
    text: str, seconds: float
) -> None:
    parsed = settings.parse(CollectorSettings, ["--interval-s", text], {}, "collector", "")
    assert parsed.interval_s == pytest.approx(seconds)


def test_a_bad_value_names_the_flag_and_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        settings.parse(CollectorSettings, ["--interval-s", "soon"], {}, "collector", "")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--interval-s / SLAPLANNER_INTERVAL_S" in err
    assert "'soon' is not a duration" in err


def test_dynamo_flag_names_are_accepted_as_aliases() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, CollectorSettings)
    args = parser.parse_args(["--adjustment-interval", "90s"])
    assert settings.settings_from(CollectorSettings, args, {}).interval_s == 90.0


def test_every_field_is_documented_in_help() -> None:
    for cls in (ServiceSettings, CollectorSettings, ActuatorSettings):
        for name, info in cls.model_fields.items():
            assert info.description, f"{cls.__name__}.{name} has no description"


def test_an_unknown_setting_is_refused() -> None:
    with pytest.raises(ValidationError):
        ServiceSettings.model_validate({"nats_ur": "nats://x:1"})
