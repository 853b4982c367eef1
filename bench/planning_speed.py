"""How long the simulator takes on a day of trace at 60 s intervals, on one core.

The trace is Dynamo's sine scenario stretched to 24 hours (12 to 36 requests/s, period 1 h, ISL
3000 / OSL 300): about 2.07 million requests, far more than either bundled trace brings in a day.
Three measurements, each repeated (median reported):

- the simulator alone, its replicas changed every window by a fixed schedule;
- the closed loop with the ``dynamo`` policy and the ``constant`` predictor (the forecaster,
  decider and actuator cores in process, every message through its JSON form);
- the closed loop with the decider's default policy and the forecaster's default predictor.

The process is pinned to one CPU. Usage: ``python -m bench.planning_speed [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from bench import planning_docs
from services.decider import registry
from services.forecaster.settings import ForecasterSettings
from shared import traces
from shared.perf_model import default_profile_path, load_profile
from shared.traces import Trace
from sim.cluster import Cluster, ClusterConfig
from sim.loop import PlanningSetup, simulate
from sim.synth import SineLoad, generate

DAY = SineLoad(86_400.0, 12.0, 36.0, 3600.0, 3000, 300, seed=1)
# A day at the bundled traces' own rates (2.6 and 3.4 requests/s on average), with the Mooncake
# trace's input and output lengths.
REAL_RATE_DAY = SineLoad(86_400.0, 2.0, 5.0, 3600.0, 3000, 300, seed=2)
INTERVAL_S = 60.0


Timing = tuple[float, float]  # wall seconds, CPU seconds of this process


def _since(wall: float, cpu: float) -> Timing:
    return time.perf_counter() - wall, time.process_time() - cpu


def simulator_alone(trace: Trace, slice_s: float) -> Timing:
    profile = load_profile(default_profile_path())
    started = time.perf_counter(), time.process_time()
    cluster = Cluster(trace, profile, ClusterConfig(decode_slice_s=slice_s, start_prefill=3,
                                                    start_decode=3))
    windows = int(DAY.duration_s // INTERVAL_S)
    for k in range(1, windows + 1):
        cluster.advance(k * INTERVAL_S)
        cluster.scale(2 + k % 3, 2 + (k // 2) % 3)  # something changes every window
    cluster.finish_run(windows * INTERVAL_S)
    return _since(*started)


def closed_loop(trace: Trace, slice_s: float, policy: str, predictor: str) -> Timing:
    profile = load_profile(default_profile_path())
    setup = PlanningSetup.build(policy=policy, predictor=predictor, ttft_target_s=0.3,
                                itl_target_s=0.02, adjustment_interval_s=INTERVAL_S,
                                max_total_gpus=32)
    started = time.perf_counter(), time.process_time()
    simulate(trace, profile, setup, ClusterConfig(decode_slice_s=slice_s), warm_start=True)
    return _since(*started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.planning_speed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    trace = generate(DAY, name="sine-24h")
    mooncake = traces.load_trace(traces.bundled_trace_path("mooncake_conversation.jsonl"))
    real_rate = generate(REAL_RATE_DAY, lengths_from=mooncake, name="mooncake-lengths-24h")
    default_policy = str(getattr(registry, "DEFAULT_POLICY", "dynamo"))
    default_predictor = str(ForecasterSettings.model_fields["predictor"].default)
    cases: list[tuple[str, Callable[[], Timing]]] = [
        ("simulator alone, 0.25 s decode slices (the default)",
         lambda: simulator_alone(trace, 0.25)),
        ("simulator alone, 0.5 s decode slices", lambda: simulator_alone(trace, 0.5)),
        ("closed loop, dynamo policy, constant predictor",
         lambda: closed_loop(trace, 0.25, "dynamo", "constant")),
        (f"closed loop, {default_policy} policy, {default_predictor} predictor (the defaults)",
         lambda: closed_loop(trace, 0.25, default_policy, default_predictor)),
        (f"the same, on a day at the real traces' rate ({len(real_rate):,} requests, 2 to 5 "
         "requests/s, Mooncake lengths)",
         lambda: closed_loop(real_rate, 0.25, default_policy, default_predictor)),
    ]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    rows = []
    for name, run in cases:
        timings = [run() for _ in range(args.repeat)]
        walls = [wall for wall, _ in timings]
        cpus = [cpu for _, cpu in timings]
        rows.append(
            f"| {name} | {statistics.median(cpus):.1f} s | {statistics.median(walls):.1f} s | "
            + ", ".join(f"{c:.1f}" for c in cpus) + " s |"
        )
        print(rows[-1], flush=True)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    lines = [
        f"24-hour trace: {len(trace):,} requests (Dynamo's sine rates, 12 to 36 requests/s, "
        f"period 1 h, ISL 3000 / OSL 300), {int(DAY.duration_s // INTERVAL_S)} windows of "
        f"{INTERVAL_S:g} s; the process pinned to one CPU ({platform.machine()}, Python "
        f"{platform.python_version()}); medians of {args.repeat} runs. The machine was shared "
        f"(load average {load_before:.1f} before, {load_after:.1f} after, on "
        f"{os.cpu_count()} CPUs), so CPU time is the measure; wall time is longer by what "
        "other processes took.",
        "",
        "| what | CPU time | wall time | CPU time of each run |",
        "|---|---:|---:|---|",
        *rows,
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_docs:
        planning_docs.replace_block("planning-speed", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
