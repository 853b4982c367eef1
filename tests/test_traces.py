"""Trace loading, speed-up, slicing and interval bucketing (Dynamo's dry-run semantics)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared import traces


def test_the_bundled_mooncake_trace_loads_in_seconds() -> None:
    trace = traces.load_trace(traces.bundled_trace_path("mooncake_conversation.jsonl"))
    assert len(trace) == 12_031
    assert trace.arrival_s[0] == 0.0
    assert trace.arrival_s[-1] == pytest.approx(3536.999)  # 3,536,999 ms
    assert trace.isl_tokens[0] == 6758 and trace.osl_tokens[0] == 500


def test_the_bundled_azure_trace_counts_seconds_since_its_first_row() -> None:
    trace = traces.load_trace(traces.bundled_trace_path("azure_llm_2023_code.csv"))
    assert len(trace) == 8_819
    # 18:17:03.9799600 -> 18:17:04.0319600 is 0.052 s
    assert trace.arrival_s[:2] == pytest.approx([0.0, 0.052], abs=1e-9)
    # 18:17:03.9799600 -> 19:14:19.9280160 is 3435.948056 s (seven fractional digits kept)
    assert trace.arrival_s[-1] == pytest.approx(3435.948056, abs=1e-9)
    assert trace.isl_tokens[0] == 4808 and trace.osl_tokens[0] == 10


def test_speedup_divides_every_arrival_time() -> None:
    trace = traces.load_trace(traces.bundled_trace_path("azure_llm_2023_code.csv"))
    fast = trace.sped_up(10)
    assert np.array_equal(fast.arrival_s, trace.arrival_s / 10)
    assert np.array_equal(fast.isl_tokens, trace.isl_tokens)
    with pytest.raises(ValueError, match="positive"):
        trace.sped_up(0)


def test_a_slice_keeps_the_requests_of_its_window() -> None:
    trace = traces.Trace(
        np.array([0.0, 1.0, 2.0, 3.0]), np.array([10, 20, 30, 40]), np.array([1, 2, 3, 4])
    )
    part = trace.between(1.0, 3.0)
    assert part.arrival_s.tolist() == [1.0, 2.0]
    assert part.isl_tokens.tolist() == [20, 30]
    assert trace.between(1.0, 3.0, rebase=True).arrival_s.tolist() == [0.0, 1.0]
    assert len(trace.head(3)) == 3


def test_bucketing_skips_empty_intervals_and_averages_lengths() -> None:
    # arrivals 0.5 and 1.5 in interval 0 (of 10 s), 25 in interval 2; interval 1 is empty
    trace = traces.Trace(
        np.array([0.5, 1.5, 25.0]), np.array([100, 300, 50]), np.array([10, 20, 7])
    )
    load = traces.bucket_by_interval(trace, 10.0)
    assert load.index.tolist() == [0, 2]
    assert load.num_requests.tolist() == [2, 1]
    assert load.isl_avg_tokens.tolist() == [200.0, 50.0]  # (100 + 300) / 2
    assert load.osl_avg_tokens.tolist() == [15.0, 7.0]
    assert load.start_s.tolist() == [0.0, 20.0]


def test_bucketing_uses_python_floor_division_as_dynamo_does() -> None:
    # 1.0 // 0.1 is 9.0 in floating point (floor(1.0 / 0.1) would say 10)
    trace = traces.Trace(np.array([1.0]), np.array([1]), np.array([1]))
    assert traces.bucket_by_interval(trace, 0.1).index.tolist() == [1.0 // 0.1]


def test_a_bad_trace_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": 1}\n')
    with pytest.raises(traces.TraceError, match=r"bad.jsonl:2: field 'input_length' is missing"):
        traces.load_trace(path)
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("when,in,out\n")
    with pytest.raises(traces.TraceError, match="expected the header"):
        traces.load_trace(csv_path)
    text_path = tmp_path / "trace.txt"
    text_path.write_text("0 1 1\n")
    with pytest.raises(traces.TraceError, match="unknown trace format"):
        traces.load_trace(text_path)


def test_window_loads_count_every_window_with_the_bucketing_means_and_the_p90s() -> None:
    trace = traces.Trace(
        np.array([0.5, 1.5, 2.5, 25.0]), np.array([100, 300, 200, 50]), np.array([10, 20, 30, 7])
    )
    windows = traces.window_loads(trace, 10.0)
    assert [(w.index, w.num_requests) for w in windows] == [(0, 3), (1, 0), (2, 1)]
    first, idle, last = windows
    assert (first.isl_avg, first.osl_avg) == (200.0, 20.0)  # (100 + 300 + 200) / 3
    assert (first.isl_p90, first.osl_p90) == (280.0, 28.0)  # numpy's linear p90 of 3 values
    assert (idle.isl_avg, idle.isl_p90, idle.end_s(10.0)) == (None, None, 20.0)
    assert (last.isl_avg, last.isl_p90) == (50.0, 50.0)
    load = traces.bucket_by_interval(trace, 10.0)
    assert [w.isl_avg for w in windows if w.num_requests] == load.isl_avg_tokens.tolist()
    assert traces.window_loads(traces.Trace(np.array([]), np.array([]), np.array([])), 1.0) == []
