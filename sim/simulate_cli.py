"""``slaplanner simulate``: a trace through the simulated cluster and the planning loop, in process.

The options are the trace tools' (``sim/options.py``: every planner knob, with the service's
defaults: the slaplanner policy, the forecaster's default predictor, corrections and the GPU
budget guard on), plus what a simulated cluster needs (startup delay, engine speed, context
limit). The dry run differs only where it reproduces Dynamo's reference (Dynamo's policy and
predictor, no correction, no budget guard).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.decider import registry
from services.decider.knobs import DeploymentKnobs
from services.forecaster import predictors
from services.forecaster.settings import PREDICTOR_NAMES, ForecasterSettings
from shared import cli_checks, conditions, perf_model, traces
from sim import options, references
from sim.cluster import ClusterConfig, DecodeModel
from sim.loop import BASELINES, IntervalRecord, LoopResult, PlanningSetup, prepare, simulate
from sim.progress import Progress

DEFAULT_PREDICTOR = str(ForecasterSettings.model_fields["predictor"].default)


def policy_names() -> list[str]:
    return [*registry.policy_names(), *BASELINES, *references.NAMES]


def references_epilog() -> str:
    """One line per reference policy, for ``--help``."""
    width = max(len(name) for name in references.NAMES)
    lines = ["reference policies (to compare a policy with; the same report):"]
    for name, text in references.HELP.items():
        lines += textwrap.wrap(text, 79, initial_indent=f"  {name:<{width}}  ",
                               subsequent_indent=" " * (width + 4))
    return "\n".join(lines)


def add_arguments(
    parser: argparse.ArgumentParser,
    trace_default: str | None = None,
    knobs_cls: type[DeploymentKnobs] = DeploymentKnobs,
) -> None:
    """The options ``simulate``, ``replay`` and ``demo`` share: the trace, every planner knob
    (with the service's defaults: the slaplanner policy, the budget guard on), the forecaster's
    default predictor, and the simulated cluster."""
    options.add_trace_arguments(
        parser, predictors=PREDICTOR_NAMES, default_predictor=DEFAULT_PREDICTOR,
        trace_default=trace_default,
    )
    parser.add_argument(
        "--policy", default=registry.DEFAULT_POLICY, choices=policy_names(),
        help="a decider policy, a baseline: static (the trace's peak, all the time), "
        "reactive (a plain HPA on queue length, prefill busy time and KV usage), or a "
        "reference (below); default %(default)s",
    )
    options.add_duration(
        parser, "start", "0s", "replay from this time of the (sped-up) trace on ('20m')"
    )
    options.add_duration(
        parser, "duration", None, "replay this much of the (sped-up) trace ('1h'; default: all)"
    )
    parser.add_argument(
        "--warm-start", action=argparse.BooleanOptionalAction, default=False,
        help="start with what an oracle would run at time 0 (overrides --start-*)",
    )
    options.add_duration(
        parser, "startup-delay", "180s",
        "a new worker serves this long after it is requested (and is billed meanwhile); the "
        "policy's worker_startup_s too, unless given",
    )
    parser.add_argument(
        "--decider-env", action="append", default=[], metavar="SLAPLANNER_KNOB=VALUE",
        help="a planner knob as its environment variable (repeatable); the knob's flag does "
        "the same",
    )
    parser.add_argument(
        "--perf-skew", type=float, default=1.0,
        help="engines are this many times slower than profiled (1.2: 20%% slower; default 1)",
    )
    parser.add_argument(
        "--noise", type=float, default=0.0,
        help="coefficient of variation of random engine speed, per request and slice (default 0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    parser.add_argument(
        "--max-context", type=int, default=None,
        help="input + output limit; longer requests have their input cut (default: profile's)",
    )
    parser.add_argument(
        "--decode-model", choices=[m.value for m in DecodeModel], default="sliced",
        help="sliced (default, fast) or token (one event per engine iteration, slow)",
    )
    options.add_duration(
        parser, "decode-slice", "250ms",
        "longest decode time slice of the sliced model, at most 1 s",
    )
    parser.add_argument(
        "--max-intervals", type=int, default=0, help="stop after N intervals (0: all)"
    )
    parser.add_argument(
        "--goal", default="0.99",
        help="attainment goal of the references that search (clairvoyant, best-fixed, "
        "dynamo-tuned): the share of requests meeting both targets, a fraction in (0, 1] "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--instant-startup", action="store_true",
        help="clairvoyant: engines serve the moment they are asked for (the pure bound)",
    )
    parser.add_argument("--prefill", type=int, default=None, help="fixed: prefill engines")
    parser.add_argument("--decode", type=int, default=None, help="fixed: decode engines")
    parser.add_argument(
        "--requests", dest="requests_out",
        help="write one CSV row per request here: arrival, lengths (after clipping), TTFT, "
        "mean ITL, finish (seconds; empty where not reached)",
    )
    # worker_startup_s defaults to the startup delay, not to the knob's own default
    options.add_knob_arguments(
        parser, knobs_cls, defaults={"worker_startup_s": None}, exclude=("policy",)
    )


@dataclass(frozen=True)
class Parsed:
    setup: PlanningSetup
    config: ClusterConfig
    trace: traces.Trace
    profile: perf_model.Profile


def goal(text: str) -> float:
    """``--goal``: a fraction of requests in (0, 1]; a one-line error otherwise."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise ValueError(
            f"--goal: a fraction of requests in (0, 1], such as 0.99 for 99 %, got {text!r}"
        )
    return value


def parse(
    args: argparse.Namespace, knobs_cls: type[DeploymentKnobs] = DeploymentKnobs
) -> Parsed:
    """Validate the options; raises ``ValueError`` naming the flag."""
    goal(args.goal)
    cli_checks.output_paths({"--json": args.json_out, "--plot": args.plot_out,
                             "--requests": args.requests_out})
    simulated = args.policy in BASELINES or args.policy in references.NAMES
    if not simulated:
        try:
            predictors.ensure_available(args.predictor)
        except predictors.PredictorUnavailable as exc:
            raise ValueError(f"--predictor {args.predictor}: {exc}") from None
    if not args.speedup > 0:
        raise ValueError(f"--speedup: must be positive, got {args.speedup}")
    startup_delay_s = options.seconds(args, "startup-delay")
    assert startup_delay_s is not None  # it has a default
    overrides: dict[str, Any] = options.knob_assignments(args.decider_env)
    if args.worker_startup_s is None and "worker_startup_s" not in overrides:
        # the operator tells the policy how long a start takes: the simulated cluster's delay
        overrides["worker_startup_s"] = startup_delay_s
    knobs = options.knobs_from_args(
        args, knobs_cls, policy="dynamo" if simulated else args.policy,
        **overrides,
    )
    setup = PlanningSetup(knobs=knobs, predictor=args.predictor, planner=args.policy)
    try:
        config = ClusterConfig(
            startup_delay_s=startup_delay_s,
            perf_skew=args.perf_skew,
            noise_cv=args.noise,
            seed=args.seed,
            max_context_tokens=args.max_context,
            prefill_engine_gpus=knobs.prefill_engine_num_gpu,
            decode_engine_gpus=knobs.decode_engine_num_gpu,
            start_prefill=args.start_prefill,
            start_decode=args.start_decode,
            decode_model=DecodeModel(args.decode_model),
            decode_slice_s=options.seconds(args, "decode-slice") or 0.0,
        )
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    profile = perf_model.load_profile(knobs.profile_path)
    trace = traces.load_trace(args.trace).sped_up(args.speedup)
    start = options.seconds(args, "start") or 0.0
    duration = options.seconds(args, "duration")
    end = math.inf if duration is None else start + duration
    if start > 0 or math.isfinite(end):
        trace = trace.between(start, end, rebase=True)
    if len(trace) == 0:
        raise ValueError(f"{args.trace}: no requests in the part asked for")
    return Parsed(setup, config, trace, profile)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


# The interval table of simulate, replay and the demo. Latencies in milliseconds, time as the
# run's clock (minutes:seconds, hours once past one).
HEADER = (
    f"{'time':>8} {'req':>6} {'fcast':>6} {'ISL':>6} {'OSL':>5} {'TTFT_p99_ms':>11} "
    f"{'ITL_p99_ms':>10} {'queued':>6} {'P':>3} {'D':>3} {'P_up':>4} {'D_up':>4}"
)
LEGEND = (
    "time: end of the window; req: requests in it; fcast: requests forecast for the next window;\n"
    "ISL, OSL: mean input, output tokens; TTFT_p99_ms, ITL_p99_ms: 99th percentiles of the "
    "window;\nqueued: requests waiting at its end; P, D: prefill, decode replicas asked for; "
    "P_up, D_up: serving"
)


def run_clock(seconds: float) -> str:
    """``mm:ss`` of a run's clock, ``h:mm:ss`` past an hour."""
    hours, rest = divmod(round(seconds), 3600)
    minutes_seconds = f"{rest // 60:02d}:{rest % 60:02d}"
    return f"{hours}:{minutes_seconds}" if hours else minutes_seconds


def ms(seconds: float | None) -> str:
    """Milliseconds with three figures or more: ``1482``, ``149``, ``10.4``, ``6.26``."""
    if seconds is None:
        return "-"
    value = seconds * 1000.0
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def format_row(record: IntervalRecord) -> str:
    s = record.stats
    return (
        f"{run_clock(s.end_s):>8} {s.num_requests:>6d} {_num(record.forecast_requests, '.0f'):>6} "
        f"{_num(s.isl_avg, '.0f'):>6} {_num(s.osl_avg, '.0f'):>5} "
        f"{ms(s.ttft_p99_s):>11} {ms(s.itl_p99_s):>10} "
        f"{s.prefill_waiting + s.decode_waiting:>6d} {record.prefill:>3d} {record.decode:>3d} "
        f"{s.prefill_serving:>4d} {s.decode_serving:>4d}"
    )


def format_table(run: LoopResult) -> str:
    return "\n".join([HEADER, *(format_row(r) for r in run.records), LEGEND])


def format_summary(report: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else conditions.percent(value)

    def latencies(name: str) -> str:
        values = [ms(report[f"{name}_p{q}_s"]) for q in (50, 90, 99)]
        return f"{name.upper()} p50/p90/p99 {' / '.join(values)} ms"

    ratio = report["gpu_hours_over_lower_bound"]
    return (
        f"{report['planner']}: {report['requests']} requests "
        f"({report['clipped_requests']} clipped to the context limit, "
        f"{report['requests'] - report['finished_requests']} never finished)\n"
        f"SLA attainment {pct(report['sla_attainment'])} "
        f"(TTFT {pct(report['ttft_attainment'])}, ITL {pct(report['itl_attainment'])})\n"
        f"{latencies('ttft')}; {latencies('itl')}\n"
        f"{report['gpu_hours']:.3f} GPU-hours, lower bound {report['lower_bound_gpu_hours']:.3f} "
        f"({_num(ratio, '.2f')} x), {report['scaling_actions']} scaling actions"
    )


def document(args: argparse.Namespace, parsed: Parsed, run: LoopResult) -> dict[str, Any]:
    setup, config = parsed.setup, parsed.config
    return {
        "trace": Path(args.trace).name,
        "speedup": args.speedup,
        "start_s": options.seconds(args, "start"),
        "duration_s": options.seconds(args, "duration"),
        "policy": setup.planner,
        "predictor": setup.predictor,
        "profile": setup.knobs.profile_path,
        "adjustment_interval_s": setup.interval_s,
        "ttft_target_s": setup.ttft_target_s,
        "itl_target_s": setup.itl_target_s,
        "max_gpu_budget": setup.knobs.max_total_gpus,
        "startup_delay_s": config.startup_delay_s,
        "perf_skew": config.perf_skew,
        "noise_cv": config.noise_cv,
        "seed": config.seed,
        "max_context_tokens": config.max_context_tokens or parsed.profile.max_context_tokens,
        "decode_model": str(config.decode_model),
        "decode_slice_s": config.decode_slice_s,
        **run.report(),
    }


def title(args: argparse.Namespace, setup: PlanningSetup, config: ClusterConfig) -> str:
    """Two lines: the trace and the planner, then the interval, the cluster and the targets."""
    return (
        f"{Path(args.trace).name} x{args.speedup:g}, policy {setup.planner}, predictor "
        f"{setup.predictor}\ninterval {setup.interval_s:g} s, startup "
        f"{config.startup_delay_s:g} s, skew {config.perf_skew:g}, targets TTFT "
        f"{setup.ttft_target_s:g} s and ITL {setup.itl_target_s * 1000:g} ms"
    )


def write_requests(run: LoopResult, path: Path) -> None:
    """Per request: what it asked for and what it got."""
    r = run.result
    with path.open("w", encoding="utf-8") as out:
        out.write("arrival_s,isl_tokens,osl_tokens,clipped,ttft_s,itl_s,finish_s\n")
        for row in zip(
            r.arrival_s.tolist(), r.isl_tokens.tolist(), r.osl_tokens.tolist(),
            r.clipped.tolist(), r.ttft_s.tolist(), r.itl_s.tolist(), r.finish_s.tolist(),
            strict=True,
        ):
            arrival, isl, osl, clipped, ttft, itl, finish = row
            out.write(
                f"{arrival:.6f},{isl},{osl},{int(clipped)},{_cell(ttft)},{_cell(itl)},"
                f"{_cell(finish)}\n"
            )


def _cell(value: float) -> str:
    return "" if value != value else f"{value:.6f}"  # NaN: not reached


def write_outputs(
    args: argparse.Namespace, parsed: Parsed, run: LoopResult,
    reference: dict[str, Any] | None = None,
) -> None:
    report = document(args, parsed, run)
    if reference is not None:
        report["reference"] = reference
    if not args.quiet:
        print(format_table(run))
    print(format_summary(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report) + "\n", encoding="utf-8")
    if args.requests_out:
        write_requests(run, Path(args.requests_out))
    if args.plot_out:
        from sim.plot import write_plot

        write_plot(
            run, args.plot_out, title(args, parsed.setup, parsed.config),
            parsed.setup.ttft_target_s, parsed.setup.itl_target_s,
        )
        print(f"plot of load, forecast, replicas and latencies: {Path(args.plot_out).resolve()}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="slaplanner simulate",
        description="Replay a request trace through a simulated prefill/decode cluster and the "
        "planning loop (forecaster, decider, actuator cores), and score SLA attainment and "
        "GPU-hours.",
        epilog=references_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    prog = "slaplanner simulate"
    try:
        parsed = parse(args)
    except (ValueError, OSError) as exc:  # TraceError and ProfileError are ValueErrors
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    progress = Progress(prog)
    if args.policy in references.NAMES:
        try:
            found = run_reference(args, parsed, progress)
        except ValueError as exc:
            progress.close()
            print(f"{prog}: {exc}", file=sys.stderr)
            return 2
        progress.close()
        write_outputs(args, parsed, found.run, found.detail)
        return 0
    try:
        run = simulate(
            parsed.trace,
            parsed.profile,
            parsed.setup,
            parsed.config,
            warm_start=args.warm_start,
            max_intervals=args.max_intervals or None,
            progress=progress,
        )
    finally:
        progress.close()
    write_outputs(args, parsed, run)
    return 0


def run_reference(
    args: argparse.Namespace, parsed: Parsed, progress: Callable[[int, int], None] | None = None,
) -> references.Reference:
    """A reference policy, starting (where it adapts) from the clairvoyant's fleet unless
    ``--warm-start`` or ``--start-*`` say otherwise."""
    counts = None
    if args.prefill is not None or args.decode is not None:
        counts = (args.prefill or 0, args.decode or 0)
    start = None
    if args.warm_start or (args.start_prefill, args.start_decode) != (1, 1):
        config, _ = prepare(parsed.trace, parsed.profile, parsed.setup, parsed.config,
                            args.policy, warm_start=args.warm_start)
        start = (config.start_prefill, config.start_decode)
    return references.run(
        args.policy, parsed.trace, parsed.profile, parsed.setup, parsed.config,
        goal=goal(args.goal), instant_startup=args.instant_startup, counts=counts, start=start,
        max_intervals=args.max_intervals or None, progress=progress,
    )


if __name__ == "__main__":
    sys.exit(main())
