"""Window values from two scrapes: increases, resets, averages, quantiles, honest gaps."""

from __future__ import annotations

import math

import pytest

from services.collector import window
from services.collector.scrape import next_boundary

SCRAPE_1 = """
# TYPE dynamo_frontend_requests counter
dynamo_frontend_requests_total{model="llama"} 100
dynamo_frontend_requests_total{model="other"} 7
# TYPE dynamo_frontend_input_sequence_tokens histogram
dynamo_frontend_input_sequence_tokens_bucket{model="llama",le="1000"} 10
dynamo_frontend_input_sequence_tokens_bucket{model="llama",le="4000"} 90
dynamo_frontend_input_sequence_tokens_bucket{model="llama",le="+Inf"} 100
dynamo_frontend_input_sequence_tokens_sum{model="llama"} 250000
dynamo_frontend_input_sequence_tokens_count{model="llama"} 100
"""
SCRAPE_2 = """
# TYPE dynamo_frontend_requests counter
dynamo_frontend_requests_total{model="llama"} 160
dynamo_frontend_requests_total{model="other"} 9
# TYPE dynamo_frontend_input_sequence_tokens histogram
dynamo_frontend_input_sequence_tokens_bucket{model="llama",le="1000"} 10
dynamo_frontend_input_sequence_tokens_bucket{model="llama",le="4000"} 130
dynamo_frontend_input_sequence_tokens_bucket{model="llama",le="+Inf"} 160
dynamo_frontend_input_sequence_tokens_sum{model="llama"} 430000
dynamo_frontend_input_sequence_tokens_count{model="llama"} 160
# TYPE dynamo_frontend_inflight_requests gauge
dynamo_frontend_inflight_requests{model="llama"} 12
"""


def test_the_window_is_the_increase_between_scrapes_for_the_chosen_labels() -> None:
    before = window.parse_exposition(SCRAPE_1, {"model": "llama"})
    after = window.parse_exposition(SCRAPE_2, {"model": "llama"})
    values = window.window_values(before, after)
    assert values.values["num_requests"] == 60.0  # 160 - 100, "other" excluded
    assert values.values["isl_avg"] == pytest.approx(3000.0)  # (430000 - 250000) / 60
    # 60 new requests: 0 below 1000, 40 in (1000, 4000], 20 above 4000.
    # p90 rank 54 lies past 40, in +Inf: the highest finite edge is the best estimate.
    assert values.values["isl_p90"] == 4000.0
    assert values.values["requests_running"] == 12.0
    assert values.values["ttft_avg_s"] is None
    assert "absent" in values.gaps["ttft_avg_s"]


def test_a_counter_reset_counts_the_whole_new_value() -> None:
    assert window.counter_increase(500.0, 20.0) == 20.0  # restarted frontend
    assert window.counter_increase(500.0, 520.0) == 20.0


def test_an_empty_window_gives_undefined_averages_not_zeros() -> None:
    scrape = window.parse_exposition(SCRAPE_1, {"model": "llama"})
    values = window.window_values(scrape, scrape)
    assert values.values["num_requests"] == 0.0  # a real zero: idle
    assert values.values["isl_avg"] is None  # undefined: no requests
    assert values.gaps["isl_avg"] == "no samples in window"


@pytest.mark.parametrize(
    ("quantile", "buckets", "expected"),
    [
        pytest.param(0.5, {0.1: 50.0, 0.2: 100.0, math.inf: 100.0}, 0.1,
                     id="the median at the top of the first bucket"),
        pytest.param(0.75, {0.1: 50.0, 0.2: 100.0, math.inf: 100.0}, 0.15,
                     id="linear inside the second bucket"),  # 0.1 + 0.1 * (75 - 50) / 50
        pytest.param(0.9, {0.1: 0.0, math.inf: 0.0}, None, id="no samples, no quantile"),
        pytest.param(0.5, {0.1: 5.0, 0.2: 5.0}, None, id="no +Inf bucket, not a histogram"),
    ],
)
def test_histogram_quantile_matches_prometheus(
    quantile: float, buckets: dict[float, float], expected: float | None
) -> None:
    result = window.histogram_quantile(quantile, buckets)
    assert result == (pytest.approx(expected) if expected is not None else None)


def test_missing_series_are_named() -> None:
    scrape = window.parse_exposition(SCRAPE_2)
    missing = window.missing_series(scrape)
    assert "dynamo_frontend_time_to_first_token_seconds" in missing
    assert "dynamo_frontend_requests_total" not in missing


@pytest.mark.parametrize(
    ("now", "interval", "expected"),
    [(100.0, 60.0, 120.0), (120.0, 60.0, 180.0), (119.999, 5.0, 120.0)],
    ids=["the next minute", "exactly on a boundary goes to the next", "short intervals"],
)
def test_ticks_align_to_interval_boundaries(now: float, interval: float, expected: float) -> None:
    assert next_boundary(now, interval) == pytest.approx(expected)


def test_a_series_that_appears_between_scrapes_started_at_zero() -> None:
    empty = window.parse_exposition("")
    after = window.parse_exposition(SCRAPE_2, {"model": "llama"})
    values = window.window_values(empty, after)
    assert values.values["num_requests"] == 160.0
    assert values.values["isl_avg"] == pytest.approx(430000 / 160)
