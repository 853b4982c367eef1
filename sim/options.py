"""The options every trace tool shares (``dry-run``, ``simulate``, ``replay``, ``demo``).

The planner knobs come from the knob model (``services/decider/knobs.py``), one flag each with
its Dynamo spelling, so that a knob declared there is an option of every tool; the tools add the
trace, the load predictor, the start counts and the outputs. Durations follow the one rule: text
carries its unit (``--startup-delay 90s``), and a flag whose name ends in ``-s`` takes bare
seconds (``--startup-delay-s 90``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from services.decider import knobs as knob_model
from services.decider.knobs import DeploymentKnobs
from shared import settings
from shared.settings import parse_duration_s, parse_seconds

# Spellings the tools have always taken, besides the knobs' own and Dynamo's.
TOOL_ALIASES = {"profile_path": ("--profile",), "adjustment_interval_s": ("--interval",)}


def add_knob_arguments(
    parser: argparse.ArgumentParser,
    knobs_cls: type[DeploymentKnobs] = DeploymentKnobs,
    defaults: Mapping[str, Any] | None = None,
    exclude: Sequence[str] = (),
) -> None:
    """A flag for every knob of ``knobs_cls``; ``defaults`` are the tool's own where they differ
    from the knob model's."""
    group = parser.add_argument_group(
        "planner knobs", "the decider's knobs (slaplanner decider --help; docs/decider.md)"
    )
    settings.add_arguments(group, knobs_cls, exclude=exclude, tool_defaults=defaults or {},
                           aliases=TOOL_ALIASES)


def knobs_from_args(
    args: argparse.Namespace,
    knobs_cls: type[DeploymentKnobs] = DeploymentKnobs,
    **overrides: Any,
) -> DeploymentKnobs:
    """The knobs the flags give (``overrides`` over them); raises ``ValueError`` naming each flag
    that is wrong."""
    values = {
        name: getattr(args, name)
        for name in knobs_cls.model_fields
        if getattr(args, name, None) is not None
    }
    values.update(overrides)
    try:
        return knobs_cls.model_validate(values)
    except ValidationError as exc:
        problems = []
        for item in exc.errors():
            name = str(item["loc"][0]) if item["loc"] else ""
            where = settings.flag_name(name) if name in knobs_cls.model_fields else "knobs"
            problems.append(f"{where}: {settings.explain(item)}")
        raise ValueError("; ".join(problems)) from None


def knob_assignments(items: Sequence[str]) -> dict[str, str]:
    """``SLAPLANNER_KNOB=VALUE`` entries (``--decider-env``) as knob names; unknown ones are
    refused rather than ignored."""
    renamed = {
        old: spec.name for spec in knob_model.specs().values() for old in spec.deprecated
    }
    values = {}
    for item in items:
        name, sep, value = item.partition("=")
        key = name.removeprefix(settings.ENV_PREFIX).lower()
        key = renamed.get(key, key)
        if not sep or not name.startswith(settings.ENV_PREFIX):
            raise ValueError(f"--decider-env: expected SLAPLANNER_KNOB=VALUE, got {item!r}")
        if key not in DeploymentKnobs.model_fields:
            raise ValueError(f"--decider-env: {name} is not a decider knob")
        values[key] = value
    return values


def add_duration(
    parser: argparse.ArgumentParser, name: str, default: str | None, help_text: str
) -> None:
    """``--name`` (text with a unit) and ``--name-s`` (bare seconds, or text with a unit); read
    them with ``seconds``."""
    key = name.replace("-", "_")
    parser.add_argument(
        f"--{name}-s", dest=f"{key}_s_text", default=None,
        help=f"{help_text}: seconds, or text with a unit (default {default or 'none'})",
    )
    parser.add_argument(
        f"--{name}", dest=f"{key}_text", default=None,
        help=f"the same as text with a unit ('90s', '3m'); bare seconds go to --{name}-s",
    )
    parser.set_defaults(**{f"{key}_default": default})


def seconds(args: argparse.Namespace, name: str) -> float | None:
    """The duration ``add_duration`` added, in seconds (``None``: not given and no default);
    raises ``ValueError`` naming the flag."""
    key = name.replace("-", "_")
    with_unit, bare = getattr(args, f"{key}_text"), getattr(args, f"{key}_s_text")
    if with_unit is not None:
        flag, text = f"--{name}", with_unit
        try:
            value = parse_duration_s(text)
        except ValueError:
            raise ValueError(
                f"{flag}: {text!r} has no unit; write e.g. '90s' or '3m' (bare seconds: "
                f"{flag}-s {text})"
            ) from None
    elif bare is not None:
        flag, text = f"--{name}-s", bare
        try:
            value = parse_seconds(text)
        except ValueError as exc:
            raise ValueError(f"{flag}: {exc}") from None
    else:
        default = getattr(args, f"{key}_default")
        return None if default is None else parse_duration_s(default)
    if value < 0:
        raise ValueError(f"{flag}: must not be negative, got {text!r}")
    return value


def add_trace_arguments(
    parser: argparse.ArgumentParser,
    *,
    predictors: Sequence[str],
    default_predictor: str,
    trace_default: str | None = None,
) -> None:
    """The trace, the load predictor, the start counts and the outputs."""
    parser.add_argument(
        "--trace", required=trace_default is None, default=trace_default,
        help="Mooncake .jsonl or Azure .csv trace"
        + ("" if trace_default is None else " (default: %(default)s)"),
    )
    parser.add_argument(
        "--speedup", type=float, default=1.0,
        help="divide every arrival time by this (default %(default)s)",
    )
    parser.add_argument(
        "--predictor", "--load-predictor", dest="predictor", default=default_predictor,
        choices=list(predictors), help="load predictor (default %(default)s)",
    )
    parser.add_argument(
        "--start-prefill", "--start-num-p", dest="start_prefill", type=int, default=1,
        help="prefill replicas at the start (default %(default)s)",
    )
    parser.add_argument(
        "--start-decode", "--start-num-d", dest="start_decode", type=int, default=1,
        help="decode replicas at the start (default %(default)s)",
    )
    parser.add_argument("--json", dest="json_out", help="write the result (JSON) here")
    parser.add_argument("--plot", dest="plot_out", help="write a PNG of the run here")
    parser.add_argument("--quiet", action="store_true", help="do not print the interval table")
