"""What a decider restart and the bus cost per deployment, in process: the inputs of the paper
estimate for many deployments (docs/benchmarks.md, "100,000 deployments, on paper").

Feeds ``--deployments`` deployments of ``bench.load``'s traffic through the real forecaster and
decider cores for as many intervals as the decider's replay horizon at ``--interval-s`` (the
knobs' defaults), and reports:

- the bytes of each message a deployment puts on the bus per interval (snapshot, forecast,
  target, ScaleEvent), the medians over every deployment and interval;
- the decider core's CPU per replayed input: what a restarted replica spends restoring each of
  its deployments (one snapshot for the fast path, one forecast, per interval of the horizon).

Usage: ``python -m bench.restore_cost [--deployments 100] [--interval-s 10]``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Sequence

from bench.load import deployment_loads, snapshot
from services.decider import restore
from services.decider.core import Decider
from services.decider.settings import DeciderSettings
from services.forecaster.core import Forecaster
from services.forecaster.settings import ForecasterSettings
from shared.messages import (
    Envelope,
    LoadForecast,
    MetricSnapshot,
    Outcome,
    RoleChange,
    ScaleEvent,
    derived_id,
)


def run(deployments: int, interval_s: float) -> dict[str, float]:
    settings = DeciderSettings(adjustment_interval_s=interval_s)
    horizon_s = restore.replay_horizon_s(settings.knobs())
    intervals = int(horizon_s // interval_s)
    forecaster = Forecaster(ForecasterSettings())
    loads = deployment_loads(deployments)
    rng = random.Random(3)
    inputs: list[MetricSnapshot | LoadForecast | ScaleEvent] = []
    sizes: dict[str, list[int]] = {"snapshot": [], "forecast": [], "target": [],
                                   "scale_event": []}
    live = Decider(settings)
    for step in range(intervals):
        for load in loads:
            observed = snapshot(load, 1_700_000_000.0 + step * interval_s, interval_s, step, rng)
            planned = forecaster.forecast(observed)
            inputs += [observed, planned]
            live.on_snapshot(observed)
            target = live.decide(planned)
            event = ScaleEvent(
                id=derived_id("scaled", target.id), deployment=target.deployment,
                target_id=target.id, window_end=target.window_end, window_s=interval_s,
                outcome=Outcome.APPLIED, backend="virtual", reason="applied",
                prefill=RoleChange(from_=target.prefill_replicas, to=target.prefill_replicas,
                                   ready=target.prefill_replicas),
                decode=RoleChange(from_=target.decode_replicas, to=target.decode_replicas,
                                  ready=target.decode_replicas))
            made: tuple[tuple[str, Envelope], ...] = (
                ("snapshot", observed), ("forecast", planned), ("target", target),
                ("scale_event", event))
            for name, body in made:
                sizes[name].append(len(body.to_json()))
    # The replay of a restarted replica, timed on the CPU.
    restarted = Decider(settings)
    started = time.process_time()
    answers: list[Envelope] = []
    for message in inputs:
        answers += restore.feed(restarted, message)
    cpu_s = time.process_time() - started
    return {
        "horizon_s": horizon_s, "intervals": intervals, "inputs": len(inputs),
        "replay_cpu_ms_per_deployment_interval": 1000.0 * cpu_s / (deployments * intervals),
        **{f"{name}_bytes_median": statistics.median(values) for name, values in sizes.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.restore_cost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--deployments", type=int, default=100)
    parser.add_argument("--interval-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    result = run(args.deployments, args.interval_s)
    for name, value in result.items():
        print(f"{name}: {value:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
