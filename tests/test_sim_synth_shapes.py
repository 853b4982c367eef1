"""The benchmark's shaped loads: a working day, a flash crowd and a slow ramp, as bursty as the
bundled traces, and ``slaplanner trace synth --shape`` writing exactly them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared import traces
from sim import synth_cli
from sim.synth import (
    ShapedLoad,
    bundled_traces,
    day_load,
    flash_crowd_load,
    generate_shaped,
    per_second_dispersion,
    ramp_load,
    shaped_trace,
)


@pytest.fixture(scope="module")
def bundled() -> list[traces.Trace]:
    return bundled_traces()


def per_hour(trace: traces.Trace) -> np.ndarray:
    return np.bincount((trace.arrival_s // 3600).astype(int), minlength=24) / 3600.0


def test_the_day_has_a_night_trough_a_morning_ramp_a_midday_dip_and_an_evening_peak(
    bundled: list[traces.Trace],
) -> None:
    day = generate_shaped(day_load(20.0, seed=1), bundled)
    rate = per_hour(day)  # requests/s in each hour of the day
    assert rate.argmax() in (19, 20)  # the evening peak
    assert rate[3:6].max() < 0.2 * rate.max()  # the night trough near 15 % of it
    assert rate[6] < rate[7] < rate[8] < rate[9]  # the morning ramp
    assert rate[12] < 0.85 * rate[11] and rate[12] < 0.85 * rate[15]  # the dip at lunch
    assert abs(day.span_s - 86_400) < 60


def test_a_shaped_load_is_as_bursty_per_second_as_asked(bundled: list[traces.Trace]) -> None:
    target = per_second_dispersion(*(t.arrival_s for t in bundled))
    assert 8.0 < target < 10.0  # the bundled traces': 10.5 (Azure code), 7.8 (Mooncake)
    for load in (flash_crowd_load(10.0, dispersion=target, seed=2),
                 ramp_load(8.0, dispersion=target, seed=3)):
        trace = generate_shaped(load, bundled)
        assert per_second_dispersion(trace.arrival_s) == pytest.approx(target, rel=0.1)
    poisson = generate_shaped(ShapedLoad((0.0, 3600.0), (10.0, 10.0), seed=4), bundled)
    assert per_second_dispersion(poisson.arrival_s) == pytest.approx(1.0, abs=0.05)


def test_the_flash_crowd_triples_within_a_minute_holds_twenty_and_falls_back(
    bundled: list[traces.Trace],
) -> None:
    trace = generate_shaped(flash_crowd_load(10.0, seed=5), bundled)
    minute = np.bincount((trace.arrival_s // 60).astype(int)) / 60.0
    assert minute[:15].mean() == pytest.approx(10.0, rel=0.05)
    assert minute[16:36].mean() == pytest.approx(30.0, rel=0.05)  # minute 15 is the rise
    assert minute[37:].mean() == pytest.approx(10.0, rel=0.05)


def test_the_slow_ramp_rises_four_times_over_two_hours(bundled: list[traces.Trace]) -> None:
    trace = generate_shaped(ramp_load(8.0, seed=6), bundled)
    minute = np.bincount((trace.arrival_s // 60).astype(int)) / 60.0
    assert minute[:10].mean() == pytest.approx(8.0, rel=0.05)
    assert minute[-10:].mean() == pytest.approx(32.0, rel=0.05)
    assert minute[70] == pytest.approx(20.0, rel=0.15)  # half way up


def test_request_lengths_are_drawn_from_both_bundled_traces(
    bundled: list[traces.Trace],
) -> None:
    trace = generate_shaped(ramp_load(2.0, seed=7), bundled)
    pairs = {(int(i), int(o)) for t in bundled
             for i, o in zip(t.isl_tokens, t.osl_tokens, strict=True)}
    drawn = set(zip(trace.isl_tokens.tolist(), trace.osl_tokens.tolist(), strict=True))
    assert drawn <= pairs
    azure = {(int(i), int(o)) for i, o in zip(bundled[0].isl_tokens, bundled[0].osl_tokens,
                                               strict=True)}
    assert drawn & azure and drawn - azure  # some from each


@pytest.mark.parametrize(
    ("knots", "rates", "dispersion", "message"),
    [
        ((0.0,), (1.0,), 1.0, "at least two knots"),
        ((5.0, 10.0), (1.0, 1.0), 1.0, "start at 0"),
        ((0.0, 10.0), (1.0, -1.0), 1.0, "finite and >= 0"),
        ((0.0, 10.0), (0.0, 0.0), 1.0, "must be positive"),
        ((0.0, 10.0), (1.0, 1.0), 0.5, "dispersion must be >= 1"),
    ],
    ids=["one-knot", "late-start", "negative-rate", "no-load", "under-dispersed"],
)
def test_a_shape_that_cannot_be_generated_is_refused(
    knots: tuple[float, ...], rates: tuple[float, ...], dispersion: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ShapedLoad(knots, rates, dispersion)


def test_trace_synth_writes_the_benchmarks_flash_crowd_exactly(tmp_path: Path) -> None:
    out = tmp_path / "flash.jsonl"
    assert synth_cli.trace_main(["synth", "--shape", "flash-crowd", "--out", str(out)]) == 0
    written, benchmark = traces.load_trace(out), shaped_trace("flash-crowd")
    np.testing.assert_array_equal(written.arrival_s, benchmark.arrival_s)
    np.testing.assert_array_equal(written.isl_tokens, benchmark.isl_tokens)
    np.testing.assert_array_equal(written.osl_tokens, benchmark.osl_tokens)


def test_trace_synth_refuses_a_rate_that_is_not_positive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = synth_cli.main(["--shape", "day", "--rate", "0", "--out", str(tmp_path / "d.jsonl")])
    assert code == 2 and "--rate: must be positive" in capsys.readouterr().err
