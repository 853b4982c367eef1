"""``slaplanner demo`` (``make demo``): the services replaying a real trace slice over NATS.

This is ``slaplanner replay`` with the options below as its defaults: the forecaster, decider
and actuator run as separate processes on a real nats-server (an embedded one of its own unless
``--nats-url`` names another; ``SLAPLANNER_NATS_URL`` is not read), and the simulator stands in
for the cluster and for Prometheus, in virtual time. It prints one row per interval as each
interval's ScaleEvent comes back over the bus (and a line per fast-path scale-up), then the SLA
report, then one line each for the same slice under Dynamo's policy, the best fixed fleet and
the clairvoyant reference (in the simulator, in under a second), and writes a PNG of load,
forecast, replicas and latencies against their targets (``demo.png`` in the working directory
unless ``--plot`` names another file). Every option of ``replay`` can be given; the list below
shows the demo's defaults.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from services.forecaster.settings import ForecasterSettings
from shared import traces
from sim import comparison, replay, simulate_cli
from sim.loop import LoopResult

# The bundled Azure code trace: a real production hour with bursts of 40x between minutes, the
# load a planner has to chase. Ten times faster it is 23 intervals of 15 s (5.7 minutes of
# virtual time), which the services replay in 10 to 30 s on 2 cores.
DEMO_TRACE = str(traces.bundled_trace_path("azure_llm_2023_code.csv"))
DEMO_DEFAULTS: dict[str, Any] = {
    "speedup": 10.0,  # 26 requests/s on average, from 0.2 to 59 in a 15 s window
    "adjustment_interval_s": 15.0,  # short enough that the slice has 23 decisions
    # Four intervals: slow enough that the planner has to scale ahead of the load, fast enough
    # that a scale-up still lands inside the slice.
    "startup_delay_default": "60s",
    # The code trace's prompts are ~2k tokens and its answers ~30: a TTFT target that a burst
    # queued for a few seconds breaks, and an ITL target the decode workers meet with headroom.
    "ttft_target_s": 2.0,
    "itl_target_s": 0.03,
    "max_total_gpus": 32,  # well above what the slice needs, so the budget never decides
    "policy": "slaplanner",
    # The forecaster service's default predictor. Its warm start from a recorded trace is not
    # used: warming it with the trace being replayed would show it the future.
    "predictor": ForecasterSettings.model_fields["predictor"].default,
    # Start as a deployment that has been serving would: with the fleet that keeps the SLA
    # through the first startup delay, the start the planning benchmark gives every policy on
    # this trace (the clairvoyant's fleet at time 0, sim/clairvoyant.py; docs/benchmarks.md). From
    # 1 + 1 workers, or from the lower bound's start (--warm-start), the first minute would
    # measure a cold start, not the planner.
    "warm_start": False,
    "start_prefill": 6,
    "start_decode": 1,
    "plot_out": "demo.png",  # in the working directory; --plot elsewhere
}


def build_parser() -> argparse.ArgumentParser:
    # A server of its own, even where SLAPLANNER_NATS_URL names one for hand-started services:
    # joined to them, the demo's decisions would be shared out and its numbers would differ.
    parser = argparse.ArgumentParser(
        prog="slaplanner demo", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_arguments(parser, trace_default=DEMO_TRACE, nats_url_from_env=False)
    parser.set_defaults(**DEMO_DEFAULTS)
    return parser


def print_comparison(
    args: argparse.Namespace, parsed: simulate_cli.Parsed, run: LoopResult
) -> None:
    """What the product buys on the slice just replayed: Dynamo's policy from the same fleet,
    the best fixed fleet and the clairvoyant, on the same trace, profile and targets."""
    goal = simulate_cli.goal(args.goal)
    lines = comparison.compare(
        parsed.trace, parsed.profile, parsed.setup, parsed.config, run.start, goal,
        max_intervals=args.max_intervals or None,
    )
    print(comparison.format_lines(parsed.setup.policy, float(run.scores["gpu_hours"]), lines,
                                  goal))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return replay.run_command(parser.parse_args(argv), parser.prog, epilogue=print_comparison)


if __name__ == "__main__":
    sys.exit(main())
