"""How many prefill engines the planning model asks for, against an exact replay, per interval.

For every interval of a benchmark scenario: the fewest engines with which an exact FCFS replay
of that interval's requests (``sim.fcfs.interval_misses``, from an empty queue) keeps TTFT
misses within the budget the planning gives TTFT, and the fewest the planning model
(``attainment.fewest_prefill``) asks for when fed the interval's own rate, prompt mix (ISL
p50/p90/p99) and index of dispersion of per-second arrivals: what the model does when it knows
the load, without the forecast's error.

    python -m bench.prefill_calibration [--scenario NAME ...]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench import planning_benchmark as pb
from services.decider.knobs import DeploymentKnobs
from services.decider.policies.slaplanner import attainment, sizing
from sim.cluster import Cluster
from sim.fcfs import interval_misses

MOST_ENGINES = 64
# Intervals with fewer requests than this say little about a 0.5 % share.
MIN_REQUESTS = 20


def calibrate(scenario: pb.Scenario, bench: pb.Bench) -> dict[str, float]:
    trace = pb._trace(scenario)
    profile = pb._profile()
    cluster = Cluster(trace, profile, pb._config(bench, scenario, 1.0))
    knobs = DeploymentKnobs(ttft_target_s=scenario.ttft_s, itl_target_s=scenario.itl_s)
    budget = sizing.ttft_miss_budget(knobs)
    window = scenario.interval_s
    intervals = math.ceil(float(trace.arrival_s[-1]) / window)
    misses = interval_misses(cluster.arrival, cluster.prefill_service_s, window, intervals,
                             scenario.ttft_s, MOST_ENGINES)
    index = (cluster.arrival // window).astype(int)
    exact, model = [], []
    for k in range(intervals):
        chosen = index == k
        count = int(chosen.sum())
        if count < MIN_REQUESTS:
            continue
        fits = [c for c in range(1, MOST_ENGINES + 1) if misses[k, c] <= budget * count]
        if not fits:
            continue
        isl = cluster.isl[chosen]
        seconds = np.bincount((cluster.arrival[chosen] - k * window).astype(int),
                              minlength=int(window))
        dispersion = float(seconds.var() / seconds.mean())
        p50, p90, p99 = np.percentile(isl, [50, 90, 99])
        spread = sizing.Variability(
            arrival_cv2=dispersion, mix=attainment.measured_mix(float(isl.mean()), p50, p90, p99)
        )
        queue = sizing.prefill_queue(count / window, float(isl.mean()), profile, knobs, 1.0,
                                     spread)
        exact.append(fits[0])
        model.append(attainment.fewest_prefill(queue, scenario.ttft_s, budget,
                                               MOST_ENGINES).engines)
    diff = np.asarray(model) - np.asarray(exact)
    return {
        "intervals": float(len(exact)),
        "exact_mean": float(np.mean(exact)),
        "model_mean": float(np.mean(model)),
        "model_over_exact": float(np.sum(model) / np.sum(exact)),
        "below": float(np.mean(diff < 0)),
        "equal": float(np.mean(diff == 0)),
        "above_by_1": float(np.mean(diff == 1)),
        "above_by_more": float(np.mean(diff > 1)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prefill_calibration",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(pb.CONFIG))
    parser.add_argument("--scenario", action="append", default=[],
                        help="scenario name (repeatable; default: every bundled-trace scenario)")
    args = parser.parse_args(argv)
    bench = pb.load_config(Path(args.config))
    chosen = [
        s for s in bench.scenarios
        if (s.name in args.scenario if args.scenario else not s.synthetic and s.repeat == 1)
    ]
    print("| scenario | intervals | exact replay, mean | model, mean | model / exact | model below "
          "| equal | +1 | more |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for scenario in chosen:
        row = calibrate(scenario, bench)
        print(f"| {scenario.name} | {row['intervals']:.0f} | {row['exact_mean']:.2f} | "
              f"{row['model_mean']:.2f} | {row['model_over_exact']:.2f} | {row['below']:.0%} | "
              f"{row['equal']:.0%} | {row['above_by_1']:.0%} | {row['above_by_more']:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
