"""Window statistics the collector and the simulator share: arrivals and shares under target."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared import window_stats
from shared.messages import ShareMethod

INF = math.inf


@pytest.mark.parametrize(
    ("counts", "bin_s", "dispersion", "peak_1s", "peak_10s", "exact"),
    [
        ([2.0] * 20, 1.0, 0.0, 2.0, 20.0, True),  # var 0 / mean 2; 10 bins of 2
        ([0, 0, 6, 0] * 5, 1.0, 4.5, 6.0, 18.0, True),  # var 6.75 / mean 1.5; 3 bursts in 10 s
        ([10.0, 0.0, 0.0, 10.0], 5.0, 5.0, 2.0, 10.0, False),  # 5 s bins: var 25 / mean 5;
        # peak_1s >= 10 / 5; peak_10s: two 5 s bins, exact span, but peaks of 1 s are bounds
        ([3.0, 1.0, 2.0], 15.0, 1 / 3, 0.2, 2.0, False),  # 15 s bins: 3 / 15 per s, 3 * 10 / 15
    ],
    ids=["steady arrivals have no dispersion", "bursts every 4 s",
         "5 s scrapes make the 1 s peak a lower bound", "15 s scrapes bound both peaks"],
)
def test_arrival_statistics_per_bin_table(counts: list[float], bin_s: float, dispersion: float,
                                          peak_1s: float, peak_10s: float, exact: bool) -> None:
    stats = window_stats.arrival_stats(counts, bin_s)
    assert stats.dispersion == pytest.approx(dispersion)
    assert stats.peak_1s == pytest.approx(peak_1s)
    assert stats.peak_10s == pytest.approx(peak_10s)
    assert stats.peaks_exact is exact
    assert stats.bin_s == bin_s


@pytest.mark.parametrize(
    ("window_s", "finest_s", "samples", "bin_s"),
    [
        (60.0, 1.0, 60, 1.0),  # a 1 s scrape: per-second counts
        (60.0, 1.0, 59, 2.0),  # one scrape short (jitter at an edge): the next bin that fits
        (60.0, 1.0, 4, 15.0),  # a 15 s scrape: 15 s bins
        (60.0, 1.0, 5, 12.0),  # a 12 s scrape
        (60.0, 1.0, 1, 60.0),  # one sample: one bin
        (60.0, 7.0, 60, None),  # no multiple of 7 s divides a minute
        (60.0, 1.0, 0, None),  # no sample: no bin
        (4.5, 1.5, 3, 1.5),  # windows need not be whole seconds
    ],
    ids=["1 s scrapes", "a scrape short", "15 s scrapes", "12 s scrapes", "one sample",
         "a bin that divides nothing", "no sample", "a fractional window"],
)
def test_the_arrival_bin_is_the_finest_the_scrapes_allow(window_s: float, finest_s: float,
                                                          samples: int,
                                                          bin_s: float | None) -> None:
    assert window_stats.arrival_bin(window_s, finest_s, samples) == bin_s


def test_an_idle_window_has_no_dispersion_and_a_short_one_no_ten_second_peak() -> None:
    idle = window_stats.arrival_stats([0.0] * 5, 1.0)
    assert idle.dispersion is None and idle.gaps["arrival_dispersion"] == "no arrivals in window"
    assert idle.peak_1s == 0.0, "an idle window's peak is a real 0"
    assert idle.peak_10s is None and idle.gaps["arrivals_peak_10s"] == "window shorter than 10 s"


def test_arrivals_are_counted_in_bins_that_close_on_the_left() -> None:
    arrivals = np.array([0.0, 0.5, 1.0, 2.999, 3.0])
    assert window_stats.counts_per_bin(arrivals, 0.0, 3.0).tolist() == [2.0, 1.0, 1.0]


# Dynamo's default TTFT buckets near 0.5 s (lib/llm/src/http/service/metrics.rs): 0.22, 0.47, 1
DYNAMO = {0.22: 10.0, 0.47: 40.0, 1.0: 80.0, INF: 100.0}
# vLLM's TTFT buckets have 0.25, 0.5 and 1 s as bounds (vllm/v1/metrics/loggers.py)
VLLM = {0.25: 10.0, 0.5: 70.0, 1.0: 90.0, INF: 100.0}


@pytest.mark.parametrize(
    ("buckets", "target", "share", "bound", "method"),
    [
        (VLLM, 0.5, 0.70, 0.5, ShareMethod.BUCKET_EDGE),  # 70 of 100 at or below 0.5
        (DYNAMO, 0.5, (40 + 40 * 0.03 / 0.53) / 100, 1.0, ShareMethod.INTERPOLATED),
        (VLLM, 0.75, (70 + 20 * 0.5) / 100, 1.0, ShareMethod.INTERPOLATED),
        (VLLM, 5.0, 0.90, 1.0, ShareMethod.BEYOND_BUCKETS),  # a lower bound
        ({0.0: 0.0, 0.01: 5.0, INF: 10.0}, 0.005, 0.25, 0.01, ShareMethod.INTERPOLATED),
    ],
    ids=["the target is a bound: exact", "Dynamo's 0.47..1 bucket holds 0.5: interpolated",
         "inside a vLLM bucket", "above the last bound: the share of the last bound",
         "Dynamo's le=0 bucket starts the first one"],
)
def test_the_share_under_target_from_bucket_increases(
    buckets: dict[float, float], target: float, share: float, bound: float,
    method: ShareMethod,
) -> None:
    result = window_stats.share_from_buckets(buckets, target)
    assert result.share == pytest.approx(share)
    assert result.bucket_s == bound
    assert result.method is method


def test_an_empty_histogram_has_no_share() -> None:
    result = window_stats.share_from_buckets({0.5: 0.0, INF: 0.0}, 0.5)
    assert result.share is None and result.reason == window_stats.NO_SAMPLES


def test_the_share_per_request_counts_each_request() -> None:
    result = window_stats.share_per_request(np.array([0.1, 0.5, 0.6, np.nan]), 0.5)
    assert result.share == pytest.approx(2 / 3) and result.method is ShareMethod.PER_REQUEST
