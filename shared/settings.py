"""Typed settings with one flag and one environment variable per field.

A settings class is a pydantic model whose fields carry their unit in the name and a docstring-like
``description``. ``parse`` turns it into an ``argparse`` command line where every field is a flag
(``--http-port``) and an environment variable (``SLAPLANNER_HTTP_PORT``); the flag wins over the
variable, the variable over the default. ``--help`` lists all of them.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

ENV_PREFIX = "SLAPLANNER_"

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|min|h)\s*$")
_DURATION_FACTORS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration_s(text: str) -> float:
    """``"100ms"`` -> 0.1, ``"2s"`` -> 2.0, ``"5m"`` -> 300.0; a bare number is ambiguous."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration with a unit; write it as e.g. '200ms', '2s' or '5m'"
        )
    return float(match.group(1)) * _DURATION_FACTORS[match.group(2)]


def _duration(value: Any) -> Any:
    # Text comes from people (flags, env, files) and must carry a unit; numbers come from code,
    # where the field name already says seconds.
    if isinstance(value, str):
        return parse_duration_s(value)
    return value


DurationS = Annotated[float, BeforeValidator(_duration), Field(ge=0.0, allow_inf_nan=False)]


def _csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CommaList = Annotated[list[str], BeforeValidator(_csv)]


class Settings(BaseModel):
    """Base of every settings class: frozen, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


S = TypeVar("S", bound=Settings)


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type[Settings]) -> None:
    for name, info in cls.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        aliases = [str(a) for a in extra.get("flag_aliases", [])]  # type: ignore[union-attr]
        default = info.get_default(call_default_factory=True)
        help_text = (info.description or "").replace("%", "%%")
        help_text += f" [env {env_name(name)}; default {default!r}]"
        parser.add_argument(flag_name(name), *aliases, dest=name, default=None, help=help_text)


def settings_from(
    cls: type[S], args: argparse.Namespace | Mapping[str, Any], env: Mapping[str, str]
) -> S:
    """Flags over environment over defaults; raises ``ValidationError``."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    values: dict[str, Any] = {}
    for name in cls.model_fields:
        if given.get(name) is not None:
            values[name] = given[name]
        elif env_name(name) in env:
            values[name] = env[env_name(name)]
    return cls.model_validate(values)


def describe_error(cls: type[Settings], error: ValidationError) -> str:
    lines = [f"invalid {cls.__name__}:"]
    for item in error.errors():
        if not item["loc"]:  # a check across fields, or of a file named in the message
            lines.append(f"  {item['msg']}")
            continue
        field = str(item["loc"][0])
        where = f"{flag_name(field)} / {env_name(field)}" if field in cls.model_fields else field
        lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def parse(
    cls: type[S],
    argv: Sequence[str] | None,
    env: Mapping[str, str],
    prog: str,
    description: str,
) -> S:
    """Parse a service's command line; on a bad value print which flag/variable and exit 2."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser, cls)
    args = parser.parse_args(argv)
    try:
        return settings_from(cls, args, env)
    except ValidationError as exc:
        print(describe_error(cls, exc), file=sys.stderr)
        raise SystemExit(2) from None
