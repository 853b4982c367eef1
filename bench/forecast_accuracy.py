"""Forecast accuracy of each predictor on the bundled real traces and on synthetic ones with a
period, through the forecaster core.

Each trace is cut into windows (a window without requests is a 0 count, as the collector reports
it); the windows are fed one by one, as MetricSnapshots, to a ``Forecaster`` with default settings
but for the predictor (and, where a case says so, the history length), and every forecast from the
``--warmup``-th window on is scored against what came next. All predictors are scored on the same
forecast origins; a predictor that falls back to constant early on is scored as it behaves.

The bundled traces are an hour long, too short for any period. The synthetic cases have one:

- ``sine``: Dynamo's sine scenario (``sim.synth.DYNAMO_SINE``: Poisson arrivals from 12 to 36
  requests/s, period 600 s) over four hours instead of 30 minutes;
- ``daily``: five days of a daily shape (a night trough at 4 requests/s, an afternoon peak near
  34 and an evening shoulder; Poisson counts per window, ISL and OSL around 3,000 and 300), with
  the default history (one day at 60 s, too short to hold a day twice) and with three days
  (``history_points`` 4320).

Scores, for the request count, one step and ``horizon`` steps ahead:

- MASE: mean absolute error over the mean absolute one-step change of the series (Hyndman &
  Koehler, "Another look at measures of forecast accuracy", 2006); MAPE is undefined with idle
  windows of 0 requests, which the Azure trace has;
- vs constant: the predictor's mean absolute error over constant's on the same origins (< 1 beats
  constant), at the horizon with a 90 % moving-block bootstrap interval (blocks as long as the
  horizon, since forecasts from neighbouring origins share their targets);
- coverage: the share of forecasts where the real count stayed at or under the upper quantile;
- band / load: the mean upper quantile at the horizon over the mean real count there, what the
  band asks a planner to provision for (lower is tighter; read it with the coverage).

Usage, from the repository root: ``python -m bench.forecast_accuracy [--window-s 60 30 15 10]
[--horizon-s 300] [--cases azure mooncake sine daily]``
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from services.forecaster.core import Forecaster, trace_windows
from services.forecaster.settings import PREDICTOR_NAMES, ForecasterSettings
from shared import traces
from shared.messages import DeploymentKey, MetricSnapshot
from sim import synth

TRACE_FILES = {"azure": "azure_llm_2023_code.csv", "mooncake": "mooncake_conversation.jsonl"}
EPOCH_S = 1_700_000_000.0  # trace windows are placed at an arbitrary real date
KEY = DeploymentKey(namespace="bench", name="trace")
SINE_DURATION_S = 4 * 3600.0
DAILY_DAYS = 5


@dataclass(frozen=True)
class Score:
    errors_1: np.ndarray
    errors_h: np.ndarray
    coverage_1: float
    coverage_h: float
    fallbacks: int
    band_ratio: float  # mean upper quantile at the horizon / mean real count there


@dataclass(frozen=True)
class Case:
    """A series of snapshots to score, and the settings it is scored with besides the
    predictor."""

    title: str
    stream: Callable[[float], list[MetricSnapshot]]  # by window length
    window_s: Sequence[float]
    settings: Mapping[str, object] = field(default_factory=dict)


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
    return [
        MetricSnapshot.model_validate(
            {
                "id": f"w{position}",
                "deployment": KEY,
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


def daily_snapshots(window_s: float, days: int = DAILY_DAYS, seed: int = 0) -> list[MetricSnapshot]:
    """A daily shape: rate 20 (1 + 0.6 sin(day - pi/2 - 1) + 0.2 sin(2 day)) requests/s, from
    about 4 at night to 34 in the afternoon, Poisson counts per window."""
    rng = np.random.default_rng(seed)
    ends = window_s * np.arange(1, int(days * 86_400 / window_s) + 1)
    day = 2 * np.pi * (ends - window_s / 2) / 86_400.0
    rate = np.maximum(20.0 * (1 + 0.6 * np.sin(day - np.pi / 2 - 1.0) + 0.2 * np.sin(2 * day)), 0.5)
    counts = rng.poisson(rate * window_s)
    return [
        MetricSnapshot.model_validate({
            "id": f"d{position}", "deployment": KEY, "window_end": EPOCH_S + float(end),
            "window_s": window_s, "source": "synthetic", "num_requests": float(count),
            "isl_avg": float(3000 + rng.normal(0, 30)) if count else None,
            "osl_avg": float(300 + rng.normal(0, 5)) if count else None,
        })
        for position, (end, count) in enumerate(zip(ends, counts, strict=True))
    ]


def cases(names: Sequence[str], trace_window_s: Sequence[float]) -> list[Case]:
    chosen: list[Case] = []
    for name in names:
        if name in TRACE_FILES:
            file_name = TRACE_FILES[name]
            trace = traces.load_trace(traces.bundled_trace_path(file_name))
            chosen.append(Case(file_name, functools.partial(snapshots, trace), trace_window_s))
        elif name == "sine":
            sine = synth.generate(replace(synth.DYNAMO_SINE, duration_s=SINE_DURATION_S))
            chosen.append(Case("Dynamo's sine (12-36 requests/s, period 600 s), 4 h",
                               functools.partial(snapshots, sine), (60.0, 10.0)))
        elif name == "daily":
            title = f"daily shape, {DAILY_DAYS} days"
            chosen.append(Case(f"{title}, default history (1 day)", daily_snapshots, (60.0,)))
            chosen.append(Case(f"{title}, history_points 4320 (3 days)", daily_snapshots, (60.0,),
                               {"history_points": 4320}))
        else:
            raise SystemExit(f"unknown case {name!r}")
    return chosen


def score(
    predictor: str, stream: Sequence[MetricSnapshot], horizon_s: float, warmup: int,
    settings: Mapping[str, object] | None = None,
) -> Score:
    forecaster = Forecaster(ForecasterSettings.model_validate(
        {"predictor": predictor, "horizon_s": horizon_s} | dict(settings or {})
    ))
    actual = np.array([s.num_requests or 0.0 for s in stream])
    steps = forecaster.settings.horizon_steps(stream[0].window_s)
    errors_1, errors_h, covered_1, covered_h, upper_h, actual_h = [], [], [], [], [], []
    fallbacks = 0
    for t, snapshot in enumerate(stream[: len(stream) - steps]):
        forecast = forecaster.forecast(snapshot)
        if t + 1 < warmup:
            continue
        fallbacks += forecast.fallback is not None and "num_requests" in forecast.fallback
        first, last = forecast.steps[0], forecast.steps[-1]
        errors_1.append(abs(first.num_requests - actual[t + 1]))
        errors_h.append(abs(last.num_requests - actual[t + steps]))
        covered_1.append(actual[t + 1] <= first.num_requests_upper)
        covered_h.append(actual[t + steps] <= last.num_requests_upper)
        upper_h.append(last.num_requests_upper)
        actual_h.append(actual[t + steps])
    return Score(
        np.asarray(errors_1),
        np.asarray(errors_h),
        float(np.mean(covered_1)),
        float(np.mean(covered_h)),
        fallbacks,
        float(np.mean(upper_h) / max(np.mean(actual_h), 1e-12)),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window-s", type=float, nargs="+", default=[60.0, 30.0, 15.0, 10.0],
                        help="window lengths of the bundled traces")
    parser.add_argument("--horizon-s", type=float, default=300.0)
    parser.add_argument("--warmup", type=int, default=12, help="windows seen before scoring")
    parser.add_argument("--predictors", nargs="+", default=list(PREDICTOR_NAMES))
    parser.add_argument("--cases", nargs="+", default=["azure", "mooncake", "sine", "daily"])
    args = parser.parse_args(argv)
    names = [
        name
        for name in args.predictors
        if name != "prophet" or importlib.util.find_spec("prophet") is not None
    ]
    for case in cases(args.cases, args.window_s):
        for window_s in case.window_s:
            stream = case.stream(window_s)
            steps = max(1, math.ceil(args.horizon_s / window_s - 1e-9))
            counts = np.array([s.num_requests or 0.0 for s in stream])
            scale = float(np.mean(np.abs(np.diff(counts))))
            origins = len(stream) - steps - args.warmup + 1
            print(
                f"\n{case.title}, {window_s:g} s windows: {len(stream)} windows, horizon {steps} "
                f"steps, {origins} forecast origins"
            )
            print(
                "| predictor | MASE 1 step | MASE horizon | vs constant 1 step "
                "| vs constant horizon (90 % interval) | coverage 1 step | coverage horizon "
                "| band / load at the horizon | fell back |"
            )
            print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            results = {
                name: score(name, stream, args.horizon_s, args.warmup, case.settings)
                for name in names
            }
            reference = results.get("constant") or score(
                "constant", stream, args.horizon_s, args.warmup, case.settings
            )
            for name, result in results.items():
                mae_1, mae_h = result.errors_1.mean(), result.errors_h.mean()
                low, high = ratio_interval(result.errors_h, reference.errors_h, steps)
                print(
                    f"| {name} | {mae_1 / scale:.2f} | {mae_h / scale:.2f} "
                    f"| {mae_1 / reference.errors_1.mean():.2f} "
                    f"| {mae_h / reference.errors_h.mean():.2f} ({low:.2f}-{high:.2f}) "
                    f"| {result.coverage_1:.2f} | {result.coverage_h:.2f} "
                    f"| {result.band_ratio:.2f} | {result.fallbacks} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
