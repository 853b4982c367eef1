"""``slaplanner trace synth``: write a synthetic Mooncake JSONL trace.

Shapes: ``sine`` (Poisson arrivals whose rate follows a sine, Dynamo's ``sin_synth``), and the
planning benchmark's ``day``, ``flash-crowd`` and ``ramp`` (``sim.synth.SHAPES``: bursts as
dispersed per second as the bundled traces', request lengths drawn from both of them). The
defaults of a shape write exactly the benchmark's trace.

``trace_main`` is the ``slaplanner trace`` command (``synth`` is its one sub-command so far);
``main`` is ``synth`` itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from shared import traces
from shared.settings import parse_duration_s
from sim.synth import (
    DEFAULT_RATES,
    DYNAMO_SINE,
    SHAPES,
    SineLoad,
    bundled_traces,
    generate,
    generate_shaped,
    shaped,
    write_mooncake,
)


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        try:
            return parse_duration_s(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    d = DYNAMO_SINE
    parser = argparse.ArgumentParser(
        prog="slaplanner trace synth",
        description="Write a synthetic trace as Mooncake JSONL. --shape sine (the default): "
        "Poisson arrivals whose rate follows a sine between two rates (starting at the "
        "minimum, as Dynamo's sin_synth); its defaults are Dynamo's planner test scenario, 12 "
        "to 36 requests/s, period 600 s, 1,800 s, ISL 3000 / OSL 300. --shape day: 24 hours "
        "of a working day (night trough at 15 %% of the peak, morning ramp, midday plateau with "
        "a dip at lunch, evening peak); flash-crowd: a steady load that triples within 60 s, "
        "holds 20 minutes and falls back; ramp: x4 over two hours. These three draw request "
        "lengths from both bundled traces and make arrivals as bursty within each minute as "
        "theirs (the same per-second index of dispersion); their defaults write the planning "
        "benchmark's traces.",
    )
    parser.add_argument("--out", required=True, help="the .jsonl file to write")
    parser.add_argument("--shape", choices=["sine", *SHAPES], default="sine",
                        help="the load's shape (default %(default)s)")
    parser.add_argument(
        "--rate", type=float, default=None,
        help="day: its peak, flash-crowd and ramp: their base rate, requests/s (defaults: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_RATES.items()) + ")",
    )
    parser.add_argument(
        "--dispersion", type=float, default=None,
        help="day, flash-crowd, ramp: per-second index of dispersion of arrivals within a "
        "minute (1: Poisson; default: the bundled traces')",
    )
    parser.add_argument("--duration", type=_seconds, default=d.duration_s,
                        help="sine: trace length, '30m' or seconds (default %(default)g)")
    parser.add_argument("--rate-min", type=float, default=d.rate_min_per_s,
                        help="sine: lowest arrival rate, requests/s (default %(default)g)")
    parser.add_argument("--rate-max", type=float, default=d.rate_max_per_s,
                        help="sine: highest arrival rate, requests/s (default %(default)g)")
    parser.add_argument("--period", type=_seconds, default=d.period_s,
                        help="sine: period, '10m' or seconds (default %(default)g)")
    parser.add_argument("--isl", type=int, default=d.isl_tokens,
                        help="sine: input tokens per request, or their mean (default %(default)d)")
    parser.add_argument("--osl", type=int, default=d.osl_tokens,
                        help="sine: output tokens per request, or their mean "
                        "(default %(default)d)")
    parser.add_argument("--isl-cv", type=float, default=0.0,
                        help="sine: coefficient of variation of lognormal input lengths")
    parser.add_argument("--osl-cv", type=float, default=0.0,
                        help="sine: coefficient of variation of lognormal output lengths")
    parser.add_argument("--lengths-from", action="append", default=[],
                        help="draw (input, output) pairs from this trace instead (repeatable; "
                        "shapes other than sine default to both bundled traces)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "slaplanner trace synth"
    try:
        lengths = [traces.load_trace(path) for path in args.lengths_from]
        if args.shape == "sine":
            load = SineLoad(
                duration_s=args.duration,
                rate_min_per_s=args.rate_min,
                rate_max_per_s=args.rate_max,
                period_s=args.period,
                isl_tokens=args.isl,
                osl_tokens=args.osl,
                isl_cv=args.isl_cv,
                osl_cv=args.osl_cv,
                seed=args.seed,
            )
            trace = generate(load, lengths[0] if lengths else None, name=Path(args.out).name)
            duration = load.duration_s
        else:
            if args.rate is not None and not args.rate > 0:
                raise ValueError(f"--rate: must be positive, got {args.rate}")
            shape = shaped(args.shape, args.rate, args.dispersion, args.seed)
            trace = generate_shaped(shape, lengths or bundled_traces(), name=Path(args.out).name)
            duration = shape.duration_s
        count = write_mooncake(trace, args.out)
    except (ValueError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {count} requests over {duration:g} s to {args.out}")
    return 0


def trace_main(argv: Sequence[str] | None = None) -> int:
    """``slaplanner trace <sub-command>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: slaplanner trace synth [options]   (slaplanner trace synth --help)\n\n"
              "  synth   write a synthetic trace (sine, day, flash-crowd or ramp) as Mooncake "
              "JSONL")
        return 0 if args else 2
    if args[0] != "synth":
        print(f"slaplanner trace: unknown sub-command {args[0]!r}; known: synth", file=sys.stderr)
        return 2
    return main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
