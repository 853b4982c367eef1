"""``slaplanner <command>``: one console entry point for the services and the tools."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

import orjson

from shared.messages import BUS_MESSAGES

# command -> (module, function, one-line help); modules are imported only when used.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "collector": ("services.collector.__main__", "main", "run the collector service"),
    "forecaster": ("services.forecaster.__main__", "main", "run the forecaster service"),
    "decider": ("services.decider.__main__", "main", "run the decider service"),
    "actuator": ("services.actuator.__main__", "main", "run the actuator service"),
    "dry-run": ("sim.dryrun", "main", "replay a trace through a planning policy"),
    "profile": ("shared.profile_cli", "main", "convert, show or plot a performance profile"),
    "demo": ("sim.demo", "main", "`replay` of a bundled real trace slice: table, SLA report, plot"),
    "simulate": ("sim.simulate_cli", "main", "closed-loop simulation of a policy on a trace"),
    "replay": ("sim.replay", "main", "the services on NATS driving the simulator in virtual time"),
    "trace": ("services.cli", "trace_main", "trace tools: `slaplanner trace synth ...`"),
    "schema": ("services.cli", "schema_main", "print the JSON Schema of the bus messages"),
    "bus": ("shared.bus_admin", "main", "as the NATS admin: create or check the streams and "
            "consumers"),
    "status": ("shared.operator_tools", "status_main",
               "each deployment's counts, last decision and conditions (like describe hpa)"),
    "watch": ("shared.operator_tools", "watch_main", "one line per decision as it happens"),
    "publish": ("shared.operator_tools", "publish_main",
                "publish one body on a subject, checked first (like nats pub)"),
}


def schema_main(argv: Sequence[str]) -> int:
    """``slaplanner schema [MESSAGE]``: what to type into ``nats pub``."""
    if argv and argv[0] in ("-h", "--help"):
        print("usage: slaplanner schema [" + "|".join(BUS_MESSAGES) + "]")
        return 0
    if argv:
        model = BUS_MESSAGES.get(argv[0])
        if model is None:
            print(f"unknown message {argv[0]!r}; one of {', '.join(BUS_MESSAGES)}",
                  file=sys.stderr)
            return 2
        schema = model.model_json_schema(by_alias=True)
    else:
        schema = {name: m.model_json_schema(by_alias=True) for name, m in BUS_MESSAGES.items()}
    sys.stdout.write(orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def trace_main(argv: Sequence[str]) -> int:
    """``slaplanner trace synth ...``: the one trace tool so far."""
    if not argv or argv[0] != "synth":
        print("usage: slaplanner trace synth --out FILE [options]  (synth --help)",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from sim import synth_cli

    return synth_cli.main(list(argv[1:]))


def usage() -> str:
    lines = ["usage: slaplanner <command> [options]   (slaplanner <command> --help)", ""]
    lines += [f"  {name:<11} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    entry = COMMANDS.get(args[0])
    if entry is None:
        print(f"unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function, _ = entry
    command: Callable[[list[str]], int | None] = getattr(importlib.import_module(module), function)
    return int(command(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
