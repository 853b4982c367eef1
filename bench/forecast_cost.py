"""Time per forecast of each predictor, through the forecaster core, for 60, 240 and 1,440-point
histories.

The series is a real one: the bundled Azure code trace cut into 1 s windows (3,436 windows; bursty,
with idle windows), relabelled as consecutive 60 s windows so that the refit schedule runs as it
would in production (every 6 h of window time, and whenever the history doubled). For each
history length n the forecaster keeps exactly n points (``history_points = n``); it is rebuilt
from the first n windows, the first forecast (which fits every model) is timed on its own, then
``--forecasts`` more windows arrive one at a time and each forecast is timed ("refits" counts
the fits, the first forecast's included). A forecast is one LoadForecast: request count, ISL and
OSL, three series.

With ``--series sine`` the series is Dynamo's sine scenario (``sim.synth.DYNAMO_SINE``) cut into
1 s windows instead, relabelled the same way: a series with a season of 600 points, where the
``auto`` predictor runs its seasonal model over three seasons (its costliest case).

Deployments per second is what one thread sustains at the steady-state mean time per forecast.
A second table measures one process as the shell runs it: ``--deployments`` deployments with a
1,440-point history each, forecast round after round from a thread pool (Python's default size),
after two untimed rounds (the first fits, as after a restart; in the second ``auto`` makes the
choices it deferred by up to a minute).
Each figure is the median over ``--repeats`` runs. Run on one core, from the repository root:
``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 taskset -c 0 python -m bench.forecast_cost``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from bench.forecast_accuracy import snapshots
from services.forecaster.core import Forecaster
from services.forecaster.settings import PREDICTOR_NAMES, ForecasterSettings
from shared import traces
from shared.messages import DeploymentKey, MetricSnapshot
from sim import synth

TRACE_FILE = "azure_llm_2023_code.csv"


def series_trace(name: str) -> traces.Trace:
    if name == "azure":
        return traces.load_trace(traces.bundled_trace_path(TRACE_FILE))
    return synth.generate(replace(synth.DYNAMO_SINE, duration_s=3600.0))


def relabelled(stream: Sequence[MetricSnapshot], window_s: float) -> list[MetricSnapshot]:
    start = stream[0].window_end
    return [
        snapshot.model_copy(update={"window_end": start + i * window_s, "window_s": window_s})
        for i, snapshot in enumerate(stream)
    ]


def measure(
    predictor: str, stream: Sequence[MetricSnapshot], points: int, forecasts: int
) -> tuple[float, list[float], list[float], int]:
    """(first forecast seconds, steady-state seconds per forecast, the same in CPU seconds of the
    thread, refits seen). The CPU time is what a forecast costs whatever else the machine runs;
    the wall time also counts the moments another process had the core."""
    forecaster = Forecaster(ForecasterSettings(predictor=predictor, history_points=points))
    forecaster.rebuild(stream[:points])
    started = time.perf_counter()
    forecaster.forecast(stream[points - 1])
    first_s = time.perf_counter() - started
    times: list[float] = []
    cpu_times: list[float] = []
    for snapshot in stream[points : points + forecasts]:
        started, cpu_started = time.perf_counter(), time.thread_time()
        forecaster.forecast(snapshot)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.thread_time() - cpu_started)
    return first_s, times, cpu_times, forecaster.refits_total()


def process_throughput(
    predictor: str, stream: Sequence[MetricSnapshot], deployments: int, rounds: int
) -> float:
    """Forecasts per second of one process forecasting many deployments from a thread pool."""
    points = 1440
    forecaster = Forecaster(ForecasterSettings(predictor=predictor, history_points=points))
    keys = [DeploymentKey(namespace="bench", name=f"model-{i}") for i in range(deployments)]

    def rekeyed(snapshot: MetricSnapshot, key: DeploymentKey) -> MetricSnapshot:
        return snapshot.model_copy(update={"deployment": key})

    for key in keys:
        forecaster.rebuild(rekeyed(s, key) for s in stream[:points])
    with ThreadPoolExecutor() as pool:
        # The first round fits every model, as after a restart; auto makes its deferred choices
        # in the next one (windows are 60 s apart). The timed rounds are the steady state.
        list(pool.map(forecaster.forecast, [rekeyed(stream[points - 1], k) for k in keys]))
        list(pool.map(forecaster.forecast, [rekeyed(stream[points], k) for k in keys]))
        started = time.perf_counter()
        for round_ in range(1, rounds + 1):
            batch = [rekeyed(stream[points + round_], key) for key in keys]
            list(pool.map(forecaster.forecast, batch))
        return deployments * rounds / (time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, nargs="+", default=[60, 240, 1440])
    parser.add_argument("--forecasts", type=int, default=720, help="timed forecasts per case")
    parser.add_argument("--predictors", nargs="+", default=list(PREDICTOR_NAMES))
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median kept)")
    parser.add_argument("--deployments", type=int, default=50, help="for the process table")
    parser.add_argument("--process-predictors", nargs="+", default=["auto", "horizon-smoothing"])
    parser.add_argument("--rounds", type=int, default=10, help="for the process table")
    parser.add_argument("--series", choices=["azure", "sine"], default="azure")
    args = parser.parse_args(argv)
    stream = relabelled(snapshots(series_trace(args.series), 1.0), 60.0)
    needed = max(args.points) + args.forecasts
    if len(stream) < needed:
        raise SystemExit(f"{args.series} gives {len(stream)} windows, {needed} needed")
    names = [
        name
        for name in args.predictors
        if name != "prophet" or importlib.util.find_spec("prophet") is not None
    ]
    print(
        "| predictor | history points | first forecast (fits) ms | median ms | p99 ms | max ms "
        "| median CPU ms | p99 CPU ms | max CPU ms | refits in run | deployments/s (one thread) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        for points in args.points:
            runs = [measure(name, stream, points, args.forecasts) for _ in range(args.repeats)]
            seconds = [np.asarray(run[1]) for run in runs]
            cpu = [np.asarray(run[2]) for run in runs]
            first_ms = statistics.median(run[0] for run in runs) * 1e3
            refits = statistics.median(run[3] for run in runs)
            per_second = statistics.median(1.0 / float(t.mean()) for t in seconds)
            columns = [
                statistics.median(float(statistic(t)) for t in sample) * 1e3
                for sample in (seconds, cpu)
                for statistic in (np.median, lambda t: np.quantile(t, 0.99), np.max)
            ]
            print(
                f"| {name} | {points} | {first_ms:.1f} | {columns[0]:.2f} | {columns[1]:.2f} "
                f"| {columns[2]:.1f} | {columns[3]:.2f} | {columns[4]:.2f} | {columns[5]:.1f} "
                f"| {refits:g} | {per_second:.0f} |",
                flush=True,
            )
    print("\n| predictor | deployments (1,440 points each) | forecasts/s, one process |")
    print("| --- | ---: | ---: |")
    for name in args.process_predictors:
        rates = [
            process_throughput(name, stream, args.deployments, args.rounds)
            for _ in range(args.repeats)
        ]
        print(f"| {name} | {args.deployments} | {statistics.median(rates):.0f} |", flush=True)


if __name__ == "__main__":
    main()
