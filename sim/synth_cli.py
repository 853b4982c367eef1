"""``slaplanner trace synth``: write a synthetic Mooncake JSONL trace (sine-shaped Poisson load).

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
from sim.synth import DYNAMO_SINE, SineLoad, generate, write_mooncake


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
        description="Write a trace of Poisson arrivals whose rate follows a sine between two "
        "rates (starting at the minimum, as Dynamo's sin_synth), as Mooncake JSONL. The "
        "defaults are Dynamo's planner test scenario: 12 to 36 requests/s, period 600 s, "
        "1,800 s, ISL 3000 / OSL 300.",
    )
    parser.add_argument("--out", required=True, help="the .jsonl file to write")
    parser.add_argument("--duration", type=_seconds, default=d.duration_s,
                        help="trace length: '30m' or seconds (default %(default)g)")
    parser.add_argument("--rate-min", type=float, default=d.rate_min_per_s,
                        help="lowest arrival rate, requests/s (default %(default)g)")
    parser.add_argument("--rate-max", type=float, default=d.rate_max_per_s,
                        help="highest arrival rate, requests/s (default %(default)g)")
    parser.add_argument("--period", type=_seconds, default=d.period_s,
                        help="period of the sine: '10m' or seconds (default %(default)g)")
    parser.add_argument("--isl", type=int, default=d.isl_tokens,
                        help="input tokens per request, or their mean (default %(default)d)")
    parser.add_argument("--osl", type=int, default=d.osl_tokens,
                        help="output tokens per request, or their mean (default %(default)d)")
    parser.add_argument("--isl-cv", type=float, default=0.0,
                        help="coefficient of variation of lognormal input lengths (0: fixed)")
    parser.add_argument("--osl-cv", type=float, default=0.0,
                        help="coefficient of variation of lognormal output lengths (0: fixed)")
    parser.add_argument("--lengths-from", default=None,
                        help="draw (input, output) pairs from this trace instead")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "slaplanner trace synth"
    try:
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
        lengths = traces.load_trace(args.lengths_from) if args.lengths_from else None
        trace = generate(load, lengths, name=Path(args.out).name)
        count = write_mooncake(trace, args.out)
    except (ValueError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {count} requests over {args.duration:g} s to {args.out}")
    return 0


def trace_main(argv: Sequence[str] | None = None) -> int:
    """``slaplanner trace <sub-command>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: slaplanner trace synth [options]   (slaplanner trace synth --help)\n\n"
              "  synth   write a synthetic trace (sine-shaped Poisson load) as Mooncake JSONL")
        return 0 if args else 2
    if args[0] != "synth":
        print(f"slaplanner trace: unknown sub-command {args[0]!r}; known: synth", file=sys.stderr)
        return 2
    return main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
