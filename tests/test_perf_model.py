"""The performance model on the real H200 profile: Dynamo's published worked example, the ISL
clamp, the decode grid and its look-ups, and the JSON form."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from shared import perf_model
from shared.perf_model import IslClamp, Profile, default_profile_path, load_profile


@pytest.fixture(scope="module")
def profile() -> Profile:
    return load_profile(default_profile_path())


def significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits - 1}e}")


def test_the_published_worked_example_prefill_matches_to_four_digits(profile: Profile) -> None:
    # Dynamo's documentation, ISL 3000: 49,481.09 tokens/s/GPU, TTFT 0.060 s.
    estimate = profile.prefill.estimate(3000)
    assert significant(estimate.thpt_tokens_per_s_per_gpu) == significant(49_481.09)
    assert round(estimate.ttft_s, 3) == 0.060
    assert estimate.clamp is IslClamp.WITHIN_RANGE
    # 16.49 requests/s of ISL 3000 saturate one GPU
    assert round(estimate.thpt_tokens_per_s_per_gpu / 3000, 2) == 16.49


def test_the_published_worked_example_decode_matches_to_four_digits(profile: Profile) -> None:
    # ISL 3000, OSL 300: context 3000 + 300/2 = 3150; ITL target 0.01 s.
    point = profile.decode.best_thpt_per_gpu(0.01, 3000 + 300 / 2)
    assert significant(point.thpt_tokens_per_s_per_gpu) == significant(4_555.68)
    assert round(point.itl_s, 4) == 0.0097
    assert round(point.grid_kv_usage_fraction * 100, 2) == 16.16
    assert point.meets_itl_target is True
    # 15.19 requests/s of OSL 300 saturate one GPU
    assert round(point.thpt_tokens_per_s_per_gpu / 300, 2) == 15.19


def test_latencies_are_in_seconds_after_loading_dynamo_milliseconds(profile: Profile) -> None:
    # the npz holds 19.525209 ms at ISL 100 and 4.379871 ms at the first decode point
    assert profile.data.prefill.ttft_s[0] == pytest.approx(0.019525209, rel=1e-12)
    assert profile.data.decode.itl_s[0] == pytest.approx(0.004379871, rel=1e-12)
    assert profile.decode.itl_grid_s.max() < 0.1


def test_the_bundled_profile_carries_its_provenance_and_maximum_context(profile: Profile) -> None:
    assert profile.max_context_tokens == 16_384
    assert profile.provenance.model == "nvidia/Llama-3.1-8B-Instruct-FP8"
    assert profile.provenance.synthetic is False
    assert profile.data.decode.max_kv_tokens == 945_029
    assert default_profile_path().is_dir()


def test_the_bundled_npz_files_are_the_published_ones_unchanged() -> None:
    expected = {
        perf_model.PREFILL_NPZ: "fdc4d959c79fa6b0a1baf4997cf72ccd2b7a45d1de669828f387022b49c374d2",
        perf_model.DECODE_NPZ: "7c7bdfe9bcf57c755c617383b012989d970344aff13ed02a2b889b8b5eb1f341",
    }
    for relative, digest in expected.items():
        data = (default_profile_path() / relative).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest


@pytest.mark.parametrize(
    ("isl", "used", "clamp"),
    [
        pytest.param(50, 100.0, IslClamp.BELOW_RANGE, id="an ISL below 100 is read at 100"),
        pytest.param(20_000, 16_372.0, IslClamp.ABOVE_RANGE, id="an ISL above 16372 is read there"),
        pytest.param(16_372, 16_372.0, IslClamp.WITHIN_RANGE, id="the last profiled ISL is in"),
    ],
)
def test_prefill_look_ups_clamp_the_isl_to_the_profiled_range_and_say_so(
    profile: Profile, isl: float, used: float, clamp: IslClamp
) -> None:
    estimate = profile.prefill.estimate(isl)
    assert estimate.isl_used_tokens == used
    assert estimate.clamp is clamp
    at_edge = profile.prefill.estimate(used)
    assert estimate.thpt_tokens_per_s_per_gpu == at_edge.thpt_tokens_per_s_per_gpu
    assert estimate.ttft_s == at_edge.ttft_s


def test_prefill_interpolation_passes_through_every_profiled_point(profile: Profile) -> None:
    points = profile.data.prefill
    for isl, ttft, thpt in zip(
        points.isl_tokens, points.ttft_s, points.thpt_tokens_per_s_per_gpu, strict=True
    ):
        assert profile.prefill.ttft_s(isl) == pytest.approx(ttft, rel=1e-9)
        assert profile.prefill.thpt_per_gpu(isl) == pytest.approx(thpt, rel=1e-9)


def test_the_decode_grid_is_100_by_100_with_its_holes_filled(profile: Profile) -> None:
    decode = profile.decode
    assert decode.itl_grid_s.shape == decode.thpt_grid.shape == (100, 100)
    assert not np.isnan(decode.itl_grid_s).any()
    assert not np.isnan(decode.thpt_grid).any()
    assert decode.kv_axis[0] == 0.0 and decode.kv_axis[-1] == 1.0
    assert decode.context_axis[0] == 0.0 and decode.context_axis[-1] == 13_585.0
    assert decode.itl_holes_filled > 0  # KV usage 0 lies outside the profiled points


def test_kv_usage_is_concurrency_times_context_over_the_kv_capacity(profile: Profile) -> None:
    # 45 requests x 3150 tokens / 945,029 tokens = 0.149995
    assert profile.decode.kv_usage(45, 3150) == pytest.approx(45 * 3150 / 945_029)
    # column round(0.149995 / (1/99)) = round(14.85) = 15; row round(3150 / 137.22) = 23
    assert profile.decode.grid_index(45, 3150) == (15, 23)
    point = profile.decode.at(45, 3150)
    assert point.itl_s == profile.decode.itl_grid_s[23, 15]
    assert point.thpt_tokens_per_s_per_gpu == profile.decode.thpt_grid[23, 15]


def test_look_ups_beyond_the_grid_land_on_its_edge(profile: Profile) -> None:
    assert profile.decode.grid_index(10_000, 50_000) == (99, 99)
    assert profile.decode.grid_index(0, 0) == (0, 0)
    assert profile.decode.best_thpt_per_gpu(0.01, 50_000).context_clamped is True


def test_the_inverse_query_takes_the_most_loaded_point_meeting_the_target(
    profile: Profile,
) -> None:
    row = profile.decode.context_row(3150)
    point = profile.decode.best_thpt_per_gpu(0.01, 3150)
    column = round(point.grid_kv_usage_fraction * 99)
    assert profile.decode.itl_grid_s[row, column] <= 0.01
    assert (profile.decode.itl_grid_s[row, column + 1 :] > 0.01).all()


def test_an_unreachable_itl_target_returns_the_lowest_load_point(profile: Profile) -> None:
    point = profile.decode.best_thpt_per_gpu(0.001, 3150)
    assert point.meets_itl_target is False
    assert point.grid_kv_usage_fraction == 0.0
    assert point.thpt_tokens_per_s_per_gpu == profile.decode.thpt_grid[23, 0]


def test_a_looser_itl_target_never_gives_less_throughput_in_this_row(profile: Profile) -> None:
    # not a property of the grid in general (it is noisy), but of the best-point scan:
    # a looser target can only stop the scan at a higher or equal column.
    columns = [
        round(profile.decode.best_thpt_per_gpu(t, 3150).grid_kv_usage_fraction * 99)
        for t in (0.005, 0.01, 0.02, 0.05)
    ]
    assert columns == sorted(columns)


def test_the_json_form_round_trips_exactly(profile: Profile, tmp_path: Path) -> None:
    json_path = tmp_path / "h200.json"
    perf_model.write_profile_json(profile.data, json_path)
    document = json.loads(json_path.read_text())
    assert document["format"] == "slaplanner-profile"
    assert document["max_context_tokens"] == 16_384
    assert document["provenance"]["gpu"] == "NVIDIA H200"
    assert set(document["prefill"]) == {"isl_tokens", "ttft_s", "thpt_tokens_per_s_per_gpu"}
    again = load_profile(json_path)
    assert np.array_equal(again.data.prefill.ttft_s, profile.data.prefill.ttft_s)
    assert np.array_equal(again.data.decode.itl_s, profile.data.decode.itl_s)
    assert np.array_equal(again.decode.thpt_grid, profile.decode.thpt_grid)
    # seconds -> milliseconds for the interpolation is exact only to the last bit
    assert np.allclose(again.decode.itl_grid_s, profile.decode.itl_grid_s, rtol=1e-12, atol=0)

    back = tmp_path / "dynamo-dir"
    perf_model.write_profile_dir(again.data, back)
    with np.load(back / perf_model.PREFILL_NPZ) as npz:
        assert npz["prefill_isl"].dtype == np.int64
        assert npz["prefill_ttft"][0] == pytest.approx(19.525209)  # milliseconds, as Dynamo's
    assert np.allclose(load_profile(back).decode.itl_grid_s, profile.decode.itl_grid_s, rtol=1e-12)


def test_a_dynamo_directory_written_back_keeps_its_numbers_bit_for_bit(
    profile: Profile, tmp_path: Path
) -> None:
    perf_model.write_profile_dir(profile.data, tmp_path)
    for relative in (perf_model.PREFILL_NPZ, perf_model.DECODE_NPZ):
        with np.load(default_profile_path() / relative) as a, np.load(tmp_path / relative) as b:
            assert a.files == b.files
            for key in a.files:
                assert np.array_equal(a[key], b[key]), key


def test_the_decode_grids_are_dynamos_bit_for_bit(profile: Profile) -> None:
    # Dynamo's recipe, re-derived one series at a time: cubic griddata (ITL in milliseconds),
    # holes from the nearest point, ITL then / 1000. Interpolating seconds instead differs by
    # ~1e-6 relative (the Clough-Tocher gradient iteration has a tolerance that is not
    # scale-free).
    from scipy import interpolate

    with np.load(default_profile_path() / perf_model.DECODE_NPZ) as raw:
        x, y = raw["x_kv_usage"], raw["y_context_length"]
        series = {"itl": raw["z_itl"], "thpt": raw["z_thpt_per_gpu"]}
    grid = np.meshgrid(np.linspace(0, 1, 100), np.linspace(0, y.max(), 100))
    expected = {}
    for name, z in series.items():
        cubic = interpolate.griddata((x, y), z, (grid[0], grid[1]), method="cubic")
        holes = np.isnan(cubic)
        nearest = interpolate.griddata((x, y), z, (grid[0], grid[1]), method="nearest")
        cubic[holes] = nearest[holes]
        expected[name] = cubic
    assert np.array_equal(expected["itl"] / 1000, profile.decode.itl_grid_s)
    assert np.array_equal(expected["thpt"], profile.decode.thpt_grid)


def test_converting_without_provenance_names_the_missing_field(
    profile: Profile, tmp_path: Path
) -> None:
    bare = perf_model.ProfileData(
        profile.data.prefill, profile.data.decode, perf_model.Provenance(), None, "somewhere"
    )
    with pytest.raises(perf_model.ProfileError, match=r"somewhere: field 'provenance.model'"):
        perf_model.write_profile_json(bare, tmp_path / "x.json")


def test_the_summary_reports_ranges_and_filled_grid_points(profile: Profile) -> None:
    summary = profile.summary()
    assert summary["prefill"]["isl_tokens_range"] == [100.0, 16_372.0]
    assert summary["decode"]["context_tokens_profiled"][0] == 350.0
    assert summary["decode"]["grid_points_filled_from_nearest"]["itl"] > 0
    json.dumps(summary)
