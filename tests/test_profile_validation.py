"""Bad profiles and bad settings are refused, each with a message naming the file and the field."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from services.decider.core import Decider
from services.decider.knobs import DeploymentKnobs
from services.decider.settings import DeciderSettings
from shared import perf_model, settings
from shared.perf_model import ProfileError, default_profile_path, load_profile

Arrays = dict[str, Any]


def bundled_arrays() -> tuple[Arrays, Arrays]:
    with np.load(default_profile_path() / perf_model.PREFILL_NPZ) as pre:
        prefill = {key: pre[key].copy() for key in pre.files}
    with np.load(default_profile_path() / perf_model.DECODE_NPZ) as dec:
        decode = {key: dec[key].copy() for key in dec.files}
    return prefill, decode


def write_dynamo_dir(
    root: Path, change: Callable[[Arrays, Arrays], None] = lambda p, d: None
) -> Path:
    prefill, decode = bundled_arrays()
    change(prefill, decode)
    (root / perf_model.PREFILL_NPZ).parent.mkdir(parents=True)
    (root / perf_model.DECODE_NPZ).parent.mkdir(parents=True)
    np.savez(root / perf_model.PREFILL_NPZ, **prefill)
    np.savez(root / perf_model.DECODE_NPZ, **decode)
    return root


def drop(table: Arrays, key: str) -> None:
    del table[key]


def set_at(table: Arrays, key: str, index: int, value: float) -> None:
    array = table[key].astype(np.float64)
    array[index] = value
    table[key] = array


def only_context(decode: Arrays, context: float) -> None:
    keep = decode["y_context_length"] == context
    for key in ("x_kv_usage", "y_context_length", "z_itl", "z_thpt_per_gpu"):
        decode[key] = decode[key][keep]


def on_one_line(decode: Arrays) -> None:
    # four points, two contexts and four loads, but all on one straight line
    decode["x_kv_usage"] = np.array([0.1, 0.2, 0.3, 0.4])
    decode["y_context_length"] = np.array([1000.0, 2000.0, 3000.0, 4000.0])
    decode["z_itl"] = np.array([5.0, 6.0, 7.0, 8.0])
    decode["z_thpt_per_gpu"] = np.array([100.0, 200.0, 300.0, 400.0])


def swap_isl(prefill: Arrays) -> None:
    prefill["prefill_isl"][[2, 3]] = prefill["prefill_isl"][[3, 2]]


NPZ_CASES = [
    pytest.param(
        lambda p, d: drop(p, "prefill_ttft"),
        r"selected_prefill_interpolation/raw_data.npz: field 'prefill_ttft': missing",
        id="a missing prefill key is named",
    ),
    pytest.param(
        lambda p, d: drop(d, "max_kv_tokens"),
        r"selected_decode_interpolation/raw_data.npz: field 'max_kv_tokens': missing",
        id="a missing kv capacity is named",
    ),
    pytest.param(
        lambda p, d: p.update(prefill_ttft=p["prefill_ttft"][:16]),
        r"prefill_interpolation/raw_data.npz: field 'prefill_ttft': has 16 values but "
        r"'prefill_isl' has 17",
        id="prefill arrays of different lengths are refused",
    ),
    pytest.param(
        lambda p, d: d.update(z_thpt_per_gpu=d["z_thpt_per_gpu"][:40]),
        r"decode_interpolation/raw_data.npz: field 'z_thpt_per_gpu': has 40 values",
        id="decode arrays of different lengths are refused",
    ),
    pytest.param(
        lambda p, d: set_at(d, "z_itl", 5, np.nan),
        r"decode_interpolation/raw_data.npz: field 'z_itl': contains NaN at index 5",
        id="a NaN latency is refused",
    ),
    pytest.param(
        lambda p, d: set_at(p, "prefill_thpt_per_gpu", 2, 0.0),
        r"prefill_interpolation/raw_data.npz: field 'prefill_thpt_per_gpu': non-positive value "
        r"0.0 at index 2",
        id="a zero throughput is refused",
    ),
    pytest.param(
        lambda p, d: set_at(d, "y_context_length", 0, -350.0),
        r"field 'y_context_length': non-positive value -350.0 at index 0",
        id="a negative context length is refused",
    ),
    pytest.param(
        lambda p, d: swap_isl(p),
        r"prefill_interpolation/raw_data.npz: field 'prefill_isl': not strictly increasing: "
        r"3151.0 at index 2 then 2134.0",
        id="a non monotonic isl is refused",
    ),
    pytest.param(
        lambda p, d: set_at(d, "x_kv_usage", 3, 1.5),
        r"field 'x_kv_usage': value 1.5 at index 3 is outside 0..1",
        id="a kv usage above one is refused",
    ),
    pytest.param(
        lambda p, d: only_context(d, 350.0),
        r"decode_interpolation/raw_data.npz: field 'x_kv_usage/y_context_length': decode points "
        r"too sparse for cubic scattered interpolation: 7 points, 1 distinct context lengths",
        id="a decode profile of one context length is too sparse",
    ),
    pytest.param(
        lambda p, d: on_one_line(d),
        r"field 'x_kv_usage/y_context_length': decode points too sparse for cubic scattered "
        r"interpolation \(QH",
        id="decode points on one line cannot be triangulated",
    ),
    pytest.param(
        lambda p, d: d.update(max_kv_tokens=np.array([0])),
        r"field 'max_kv_tokens': expected a positive integer, got 0",
        id="a zero kv capacity is refused",
    ),
    pytest.param(
        lambda p, d: p.update(
            prefill_isl=p["prefill_isl"][:3],
            prefill_ttft=p["prefill_ttft"][:3],
            prefill_thpt_per_gpu=p["prefill_thpt_per_gpu"][:3],
        ),
        r"field 'prefill_isl': 3 points; cubic interpolation needs at least 4",
        id="three prefill points are too few for a cubic",
    ),
]


@pytest.mark.parametrize(("change", "message"), NPZ_CASES)
def test_a_bad_dynamo_profile_is_refused_naming_file_and_field(
    tmp_path: Path, change: Callable[[Arrays, Arrays], None], message: str
) -> None:
    directory = write_dynamo_dir(tmp_path / "bad", change)
    with pytest.raises(ProfileError, match=message) as refused:
        load_profile(directory)
    assert str(tmp_path) in str(refused.value)


def test_a_missing_npz_file_is_named(tmp_path: Path) -> None:
    directory = write_dynamo_dir(tmp_path / "p")
    (directory / perf_model.DECODE_NPZ).unlink()
    with pytest.raises(ProfileError, match=r"decode_interpolation/raw_data.npz: file not found"):
        load_profile(directory)


def test_an_unreadable_npz_file_is_named(tmp_path: Path) -> None:
    directory = write_dynamo_dir(tmp_path / "p")
    (directory / perf_model.PREFILL_NPZ).write_bytes(b"not a zip")
    with pytest.raises(ProfileError, match=r"prefill_interpolation/raw_data.npz: not a readable"):
        load_profile(directory)


def test_a_path_that_is_no_profile_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"nowhere: no such profile"):
        load_profile(tmp_path / "nowhere")


# --- our JSON form ----------------------------------------------------------------------------


@functools.cache
def _bundled_json() -> str:
    return json.dumps(perf_model.profile_to_json_dict(load_profile(default_profile_path()).data))


def good_json() -> dict[str, Any]:
    """A fresh copy of the bundled profile in our JSON form (interpolated only once)."""
    document: dict[str, Any] = json.loads(_bundled_json())
    return document


def without(document: dict[str, Any], section: str, key: str) -> None:
    del document[section][key]


JSON_CASES = [
    pytest.param(
        lambda doc: without(doc, "provenance", "gpu"),
        r"profile.json: field 'provenance.gpu': missing",
        id="a profile that does not say its gpu is refused",
    ),
    pytest.param(
        lambda doc: doc["decode"]["itl_s"].__setitem__(7, float("nan")),
        r"profile.json: field 'decode.itl_s': contains NaN at index 7",
        id="a NaN in the json is named with its section",
    ),
    pytest.param(
        lambda doc: doc["prefill"].__setitem__("ttft_ms", [1.0]),
        r"profile.json: field 'prefill.ttft_ms': unknown",
        id="a field in milliseconds is not ours and is refused",
    ),
    pytest.param(
        lambda doc: without(doc, "decode", "max_kv_tokens"),
        r"profile.json: field 'decode.max_kv_tokens': missing",
        id="a json profile without its kv capacity is refused",
    ),
    pytest.param(
        lambda doc: doc["prefill"]["isl_tokens"].__setitem__(0, "100"),
        r"profile.json: field 'prefill.isl_tokens': expected numbers, found '100'",
        id="text in a number array is refused",
    ),
    pytest.param(
        lambda doc: doc.__setitem__("max_context_tokens", 8000),
        r"profile.json: field 'max_context_tokens': 8000 is shorter than the longest profiled",
        id="a maximum context shorter than the profile is refused",
    ),
    pytest.param(
        lambda doc: doc.__setitem__("format", "dynamo"),
        r"profile.json: field 'format': expected 'slaplanner-profile'",
        id="another format is refused",
    ),
    pytest.param(
        lambda doc: doc["provenance"].__setitem__("synthetic", "no"),
        r"profile.json: field 'provenance.synthetic': expected true or false",
        id="synthetic must be a boolean",
    ),
]


@pytest.mark.parametrize(("change", "message"), JSON_CASES)
def test_a_bad_json_profile_is_refused_naming_file_and_field(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    document = good_json()
    change(document)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ProfileError, match=message):
        load_profile(path)


def test_invalid_json_is_named(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text("{not json")
    with pytest.raises(ProfileError, match=r"profile.json: not readable JSON"):
        load_profile(path)


def test_the_decider_refuses_a_bad_profile_at_start(tmp_path: Path) -> None:
    directory = write_dynamo_dir(tmp_path / "bad", lambda p, d: drop(p, "prefill_isl"))
    with pytest.raises(ProfileError, match=r"field 'prefill_isl': missing"):
        Decider(DeciderSettings(profile_path=str(directory)))


# --- targets and configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("0.1", 0.1, id="a bare number is seconds, as the name says"),
        pytest.param("2", 2.0, id="a bare integer is seconds"),
        pytest.param("300ms", 0.3, id="text with a unit is read in its unit"),
        pytest.param("1m", 60.0, id="minutes"),
    ],
)
def test_a_target_whose_name_ends_in_s_takes_seconds_or_a_unit(text: str, seconds: float) -> None:
    assert DeciderSettings(ttft_target_s=text).ttft_target_s == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("100 apples", "is not a duration", id="an unknown unit is refused"),
        pytest.param("-2s", "must be positive, got '-2s'", id="a negative target"),
        pytest.param("0", "must be positive, got '0'", id="a zero target"),
    ],
)
def test_a_bad_target_is_refused_with_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        DeciderSettings(ttft_target_s=text)
    assert message in settings.describe_error(DeciderSettings, refused.value)


def test_targets_with_units_are_read_in_seconds() -> None:
    knobs = DeciderSettings(ttft_target_s="2000ms", itl_target_s="0.02s")
    assert (knobs.ttft_target_s, knobs.itl_target_s) == (2.0, 0.02)


def test_a_bad_value_in_the_environment_is_refused_with_its_variable() -> None:
    assert settings.settings_from(
        DeciderSettings, {}, {"SLAPLANNER_ITL_TARGET_S": "0.01"}
    ).itl_target_s == 0.01
    with pytest.raises(ValidationError) as refused:
        settings.settings_from(DeciderSettings, {}, {"SLAPLANNER_ITL_TARGET_S": "soon"})
    described = settings.describe_error(DeciderSettings, refused.value)
    assert "--itl-target-s / SLAPLANNER_ITL_TARGET_S" in described
    assert "'soon' is not a duration" in described


def test_dynamos_flag_names_are_accepted_as_aliases() -> None:
    parsed = settings.parse(
        DeciderSettings,
        [
            "--ttft", "200", "--itl", "20", "--adjustment-interval", "30",
            "--max-gpu-budget", "16", "--min-endpoint", "2",
            "--prefill-engine-num-gpu", "2", "--decode-engine-num-gpu", "1",
            "--profile-results-dir", str(default_profile_path()),
        ],
        {},
        prog="slaplanner decider",
        description="",
    )  # fmt: skip
    # Dynamo's spellings take Dynamo's units: milliseconds for the targets
    assert parsed.ttft_target_s == 0.2 and parsed.itl_target_s == 0.02
    assert parsed.adjustment_interval_s == 30.0  # bare seconds, as Dynamo's flag takes it
    assert (parsed.max_total_gpus, parsed.min_endpoint, parsed.prefill_engine_num_gpu) == (16, 2, 2)


def test_the_defaults_are_dynamos_targets_and_a_60_second_interval() -> None:
    knobs = DeploymentKnobs()
    assert (knobs.ttft_target_s, knobs.itl_target_s) == (0.5, 0.05)
    assert (knobs.max_total_gpus, knobs.min_endpoint) == (8, 1)
    assert knobs.adjustment_interval_s == 60.0
    assert knobs.policy == "slaplanner"
    assert Path(knobs.profile_path) == default_profile_path()


def test_a_budget_that_cannot_hold_the_minimum_replicas_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"max_total_gpus \(3\) cannot hold the minimum"):
        DeploymentKnobs(max_total_gpus=3, min_endpoint=2)


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"unknown policy 'magic'; known: dynamo"):
        DeploymentKnobs(policy="magic")


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deployments.toml"
    path.write_text(text)
    return path


def test_the_deployment_file_overrides_defaults_then_each_deployment(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        [defaults]
        ttft_target_s = "300ms"
        max_total_gpus = 16

        [deployments."prod/llama"]
        itl_target_s = "20ms"
        min_prefill_replicas = 2
        """,
    )
    config = DeciderSettings(deployment_config_file=str(path)).deployment_config()
    llama = config.for_deployment("prod/llama")
    other = config.for_deployment("prod/other")
    assert (llama.ttft_target_s, llama.itl_target_s, llama.min_prefill_replicas) == (0.3, 0.02, 2)
    assert (other.ttft_target_s, other.itl_target_s, other.max_total_gpus) == (0.3, 0.05, 16)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "[defaults]\nttft_target_s = -0.1\n",
            r"deployments.toml: \[defaults\] field 'ttft_target_s': must be positive",
            id="a negative target in the file is refused",
        ),
        pytest.param(
            '[deployments."prod/llama"]\nitl_target_s = "fast"\n',
            r"deployments.toml: \[deployments.\"prod/llama\"\] field 'itl_target_s': "
            r"'fast' is not a duration",
            id="a target that is no duration is named with its deployment",
        ),
        pytest.param(
            "[defaults]\nmax_replicas = 3\n",
            r"deployments.toml: \[defaults\] field 'max_replicas': unknown",
            id="an unknown knob is named",
        ),
        pytest.param(
            '[deployments."llama"]\nmin_endpoint = 1\n',
            r"deployments.toml: \[deployments.\"llama\"\]: the key must be \"namespace/name\"",
            id="a deployment key without its namespace is refused",
        ),
        pytest.param(
            '[deployments."prod/llama"]\nmin_decode_replicas = 9\nmax_decode_replicas = 3\n',
            r"field '.*': min_decode_replicas \(9\) is above max_decode_replicas \(3\)",
            id="inconsistent bounds are refused",
        ),
        pytest.param(
            "[defaults\n",
            r"deployments.toml: not valid TOML",
            id="broken toml is refused",
        ),
    ],
)
def test_a_bad_deployment_file_is_refused_naming_file_and_field(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write_toml(tmp_path, text)
    with pytest.raises(ValidationError, match=message):
        DeciderSettings(deployment_config_file=str(path))
