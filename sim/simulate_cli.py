"""``slaplanner simulate``: a trace through the simulated cluster and the planning loop, in process.

The options and defaults are the dry run's (``slaplanner dry-run``), plus what a simulated cluster
needs (startup delay, engine speed, context limit). Unlike the dry run, latencies are simulated,
so the decider's correction factors are on (as in the service) and the GPU budget guard is on (as
in the service; the dry run turns it off only to reproduce Dynamo's reference numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.decider import dryrun, registry
from services.forecaster import predictors
from services.forecaster.settings import PREDICTOR_NAMES
from shared import cli_checks, conditions, perf_model, traces
from shared.settings import parse_duration_s
from sim.cluster import ClusterConfig, DecodeModel
from sim.loop import BASELINES, IntervalRecord, LoopResult, PlanningSetup, simulate
from sim.progress import Progress


def policy_names() -> list[str]:
    return [*registry.policy_names(), *BASELINES]


def add_arguments(parser: argparse.ArgumentParser, trace_default: str | None = None) -> None:
    """The options ``simulate``, ``replay`` and ``demo`` share: the dry run's, and the cluster's.

    Unlike the dry run, the GPU budget guard is on by default, as the service runs."""
    dryrun.add_planning_arguments(
        parser, policies=policy_names(), default_policy=dryrun.knob_default("policy"),
        predictors=PREDICTOR_NAMES, enforce_gpu_budget=True, trace_default=trace_default,
        policy_help="a decider policy, or a baseline: static (the trace's peak, all the time), "
        "reactive (a plain HPA on queue length, prefill busy time and KV usage); default "
        "%(default)s",
    )
    parser.add_argument(
        "--start", default="0s",
        help="replay from this time of the (sped-up) trace on: '20m' or seconds (default 0)",
    )
    parser.add_argument(
        "--duration", default=None,
        help="replay this much of the (sped-up) trace: '1h' or seconds (default: all)",
    )
    parser.add_argument(
        "--warm-start", action=argparse.BooleanOptionalAction, default=False,
        help="start with what an oracle would run at time 0 (overrides --start-*)",
    )
    parser.add_argument(
        "--no-correction", action="store_true",
        help="do not correct the profile with observed TTFT/ITL (Dynamo's flag)",
    )
    parser.add_argument(
        "--startup-delay", default="180s",
        help="a new worker serves this long after it is requested (and is billed meanwhile); "
        "'90s', '3m' or bare seconds (default %(default)s)",
    )
    parser.add_argument(
        "--worker-startup", default=None,
        help="the startup time the policy is told (its worker_startup_s; learnt from the "
        "ScaleEvents afterwards); default: the --startup-delay",
    )
    parser.add_argument(
        "--decider-env", action="append", default=[], metavar="SLAPLANNER_KNOB=VALUE",
        help="another decider knob as its environment variable (repeatable), e.g. "
        "SLAPLANNER_LOAD_CONFIDENCE=0.95",
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
    parser.add_argument(
        "--decode-slice", default="0.25s",
        help="longest decode time slice of the sliced model, at most 1 s (default %(default)s)",
    )
    parser.add_argument(
        "--max-intervals", type=int, default=0, help="stop after N intervals (0: all)"
    )
    parser.add_argument(
        "--requests", dest="requests_out",
        help="write one CSV row per request here: arrival, lengths (after clipping), TTFT, "
        "mean ITL, finish (seconds; empty where not reached)",
    )


@dataclass(frozen=True)
class Parsed:
    setup: PlanningSetup
    config: ClusterConfig
    trace: traces.Trace
    profile: perf_model.Profile


def _duration(value: str, flag: str) -> float:
    """Seconds from '90s', '3m' or bare seconds (as the dry run's --interval takes them)."""
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parse_duration_s(value)
        except ValueError as exc:
            raise ValueError(f"{flag}: {exc}") from None
    if not seconds >= 0:
        raise ValueError(f"{flag}: must be >= 0, got {value!r}")
    return seconds


def parse(args: argparse.Namespace) -> Parsed:
    """Validate the options; raises ``ValueError`` naming the flag."""
    cli_checks.output_paths({"--json": args.json_out, "--plot": args.plot_out,
                             "--requests": args.requests_out})
    if args.policy not in BASELINES:
        try:
            predictors.ensure_available(args.predictor)
        except predictors.PredictorUnavailable as exc:
            raise ValueError(f"--predictor {args.predictor}: {exc}") from None
    if not args.speedup > 0:
        raise ValueError(f"--speedup: must be positive, got {args.speedup}")
    knobs = dryrun.planning_knobs(
        args, policy="dynamo" if args.policy in BASELINES else args.policy,
        no_correction=args.no_correction,
    )
    decider_env: dict[str, str] = {}
    for item in args.decider_env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("SLAPLANNER_"):
            raise ValueError(f"--decider-env: expected SLAPLANNER_KNOB=VALUE, got {item!r}")
        decider_env[name] = value
    startup_delay_s = _duration(args.startup_delay, "--startup-delay")
    worker_startup_s = (
        startup_delay_s if args.worker_startup is None
        else _duration(args.worker_startup, "--worker-startup")
    )
    setup = PlanningSetup(
        policy=args.policy,
        predictor=args.predictor,
        profile_path=knobs.profile_path,
        ttft_target_s=knobs.ttft_target_s,
        itl_target_s=knobs.itl_target_s,
        interval_s=knobs.adjustment_interval_s,
        max_gpu_budget=knobs.max_gpu_budget,
        min_endpoint=knobs.min_endpoint,
        prefill_engine_gpus=knobs.prefill_engine_gpus,
        decode_engine_gpus=knobs.decode_engine_gpus,
        no_correction=knobs.no_correction,
        enforce_gpu_budget=knobs.enforce_gpu_budget,
        worker_startup_s=worker_startup_s,
        decider_env=decider_env,
    )
    try:
        config = ClusterConfig(
            startup_delay_s=startup_delay_s,
            perf_skew=args.perf_skew,
            noise_cv=args.noise,
            seed=args.seed,
            max_context_tokens=args.max_context,
            prefill_engine_gpus=knobs.prefill_engine_gpus,
            decode_engine_gpus=knobs.decode_engine_gpus,
            start_prefill=args.start_prefill,
            start_decode=args.start_decode,
            decode_model=DecodeModel(args.decode_model),
            decode_slice_s=_duration(args.decode_slice, "--decode-slice"),
        )
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    profile = perf_model.load_profile(knobs.profile_path)
    trace = traces.load_trace(args.trace).sped_up(args.speedup)
    start = _duration(args.start, "--start")
    end = math.inf if args.duration is None else start + _duration(args.duration, "--duration")
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
        "start_s": _duration(args.start, "--start"),
        "duration_s": None if args.duration is None else _duration(args.duration, "--duration"),
        "policy": setup.policy,
        "predictor": setup.predictor,
        "profile": setup.profile_path,
        "adjustment_interval_s": setup.interval_s,
        "ttft_target_s": setup.ttft_target_s,
        "itl_target_s": setup.itl_target_s,
        "max_gpu_budget": setup.max_gpu_budget,
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
        f"{Path(args.trace).name} x{args.speedup:g}, policy {setup.policy}, predictor "
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


def write_outputs(args: argparse.Namespace, parsed: Parsed, run: LoopResult) -> None:
    report = document(args, parsed, run)
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


if __name__ == "__main__":
    sys.exit(main())
