"""Forecast accuracy of each predictor on the bundled real traces, through the forecaster core.

Each trace is cut into windows (a window without requests is a 0 count, as the collector reports
it); the windows are fed one by one, as MetricSnapshots, to a ``Forecaster`` with default settings
but for the predictor, and every forecast from the ``--warmup``-th window on is scored against what
came next. All predictors are scored on the same forecast origins; a predictor that falls back to
constant early on is scored as it behaves.

Scores, for the request count, one step and ``horizon`` steps ahead:

- MASE: mean absolute error over the mean absolute one-step change of the series (Hyndman &
  Koehler, "Another look at measures of forecast accuracy", 2006); MAPE is undefined with idle
  windows of 0 requests, which the Azure trace has;
- vs constant: the predictor's mean absolute error over constant's on the same origins (< 1 beats
  constant), at the horizon with a 90 % moving-block bootstrap interval (blocks as long as the
  horizon, since forecasts from neighbouring origins share their targets);
- coverage: the share of forecasts where the real count stayed at or under the upper quantile.

Usage, from the repository root: ``python -m bench.forecast_accuracy [--window-s 60 30 15 10]
[--horizon-s 300]``
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.forecaster.core import Forecaster, trace_windows
from services.forecaster.settings import PREDICTOR_NAMES, ForecasterSettings
from shared import traces
from shared.messages import DeploymentKey, MetricSnapshot

TRACE_FILES = ("azure_llm_2023_code.csv", "mooncake_conversation.jsonl")
EPOCH_S = 1_700_000_000.0  # trace windows are placed at an arbitrary real date


@dataclass(frozen=True)
class Score:
    errors_1: np.ndarray
    errors_h: np.ndarray
    coverage_1: float
    coverage_h: float
    fallbacks: int


def ratio_interval(
    errors: np.ndarray, reference: np.ndarray, block: int, resamples: int = 2000
) -> tuple[float, float]:
    """90 % moving-block bootstrap interval of sum(errors) / sum(reference)."""
    rng = np.random.default_rng(0)
    count = errors.size
    block = max(1, min(block, count))
    starts = rng.integers(0, count - block + 1, size=(resamples, math.ceil(count / block)))
    picks = (starts[:, :, None] + np.arange(block)[None, None, :]).reshape(resamples, -1)[:, :count]
    ratios = errors[picks].sum(axis=1) / np.maximum(reference[picks].sum(axis=1), 1e-12)
    low, high = np.quantile(ratios, [0.05, 0.95])
    return float(low), float(high)


def snapshots(trace: traces.Trace, window_s: float) -> list[MetricSnapshot]:
    windows = trace_windows(trace, window_s)
    key = DeploymentKey(namespace="bench", name="trace")
    return [
        MetricSnapshot.model_validate(
            {
                "id": f"w{position}",
                "deployment": key,
                "window_end": EPOCH_S + float(end_s),
                "window_s": window_s,
                "source": "trace",
            }
            | {series.value: value for series, value in values.items()}
        )
        for position, (end_s, values) in enumerate(
            zip(windows.window_end_s, windows.values, strict=True)
        )
    ]


def score(predictor: str, stream: Sequence[MetricSnapshot], horizon_s: float, warmup: int) -> Score:
    forecaster = Forecaster(ForecasterSettings(predictor=predictor, horizon_s=horizon_s))
    actual = np.array([s.num_requests or 0.0 for s in stream])
    steps = forecaster.settings.horizon_steps(stream[0].window_s)
    errors_1, errors_h, covered_1, covered_h = [], [], [], []
    fallbacks = 0
    for t, snapshot in enumerate(stream[: len(stream) - steps]):
        forecast = forecaster.forecast(snapshot)
        if t + 1 < warmup:
            continue
        fallbacks += forecast.fallback is not None and "num_requests" in forecast.fallback
        first, last = forecast.steps[0], forecast.steps[steps - 1]
        errors_1.append(abs(first.num_requests - actual[t + 1]))
        errors_h.append(abs(last.num_requests - actual[t + steps]))
        covered_1.append(actual[t + 1] <= first.num_requests_upper)
        covered_h.append(actual[t + steps] <= last.num_requests_upper)
    return Score(
        np.asarray(errors_1),
        np.asarray(errors_h),
        float(np.mean(covered_1)),
        float(np.mean(covered_h)),
        fallbacks,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window-s", type=float, nargs="+", default=[60.0, 30.0, 15.0, 10.0])
    parser.add_argument("--horizon-s", type=float, default=300.0)
    parser.add_argument("--warmup", type=int, default=12, help="windows seen before scoring")
    parser.add_argument("--predictors", nargs="+", default=list(PREDICTOR_NAMES))
    args = parser.parse_args(argv)
    names = [
        name
        for name in args.predictors
        if name != "prophet" or importlib.util.find_spec("prophet") is not None
    ]
    for file_name in TRACE_FILES:
        trace = traces.load_trace(traces.bundled_trace_path(file_name))
        for window_s in args.window_s:
            stream = snapshots(trace, window_s)
            steps = max(1, math.ceil(args.horizon_s / window_s - 1e-9))
            counts = np.array([s.num_requests or 0.0 for s in stream])
            scale = float(np.mean(np.abs(np.diff(counts))))
            origins = len(stream) - steps - args.warmup + 1
            print(
                f"\n{file_name}, {window_s:g} s windows: {len(stream)} windows, horizon {steps} "
                f"steps, {origins} forecast origins"
            )
            print(
                "| predictor | MASE 1 step | MASE horizon | vs constant 1 step "
                "| vs constant horizon (90 % interval) | coverage 1 step | coverage horizon "
                "| fell back |"
            )
            print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            results = {name: score(name, stream, args.horizon_s, args.warmup) for name in names}
            reference = results.get("constant") or score(
                "constant", stream, args.horizon_s, args.warmup
            )
            for name, result in results.items():
                mae_1, mae_h = result.errors_1.mean(), result.errors_h.mean()
                low, high = ratio_interval(result.errors_h, reference.errors_h, steps)
                print(
                    f"| {name} | {mae_1 / scale:.2f} | {mae_h / scale:.2f} "
                    f"| {mae_1 / reference.errors_1.mean():.2f} "
                    f"| {mae_h / reference.errors_h.mean():.2f} ({low:.2f}-{high:.2f}) "
                    f"| {result.coverage_1:.2f} | {result.coverage_h:.2f} | {result.fallbacks} |"
                )


if __name__ == "__main__":
    main()
