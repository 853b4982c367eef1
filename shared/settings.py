"""Typed settings with one flag and one environment variable per field.

A settings class is a pydantic model whose fields carry their unit in the name and a docstring-like
``description``. ``parse`` turns it into an ``argparse`` command line where every field is a flag
(``--http-port``) and an environment variable (``SLAPLANNER_HTTP_PORT``); the flag wins over the
variable, the variable over the default. ``--help`` lists all of them.

One rule for durations: text carries its unit (``100ms``, ``2s``, ``5m``), and a field whose name
ends in ``_s`` (hence a flag ending in ``-s``, a variable ending in ``_S``) also takes bare
seconds (``--horizon-s 300``). A field may name other spellings (``field_meta``): aliases in the
same unit, a flag spelled as another system spells it, in that system's unit (Dynamo's
``--ttft 500`` is 500 ms), and deprecated names that keep old configurations working. A boolean is
a switch: ``--fast-path`` (or ``--fast-path false``) and ``--no-fast-path``.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

ENV_PREFIX = "SLAPLANNER_"
log = logging.getLogger("slaplanner.settings")

_NUMBER = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
_DURATION = re.compile(rf"^\s*({_NUMBER})\s*(ms|s|m|min|h)\s*$")
_BARE = re.compile(rf"^\s*({_NUMBER})\s*$")
_DURATION_FACTORS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration_s(text: str) -> float:
    """``"100ms"`` -> 0.1, ``"2s"`` -> 2.0, ``"5m"`` -> 300.0; text without a unit is refused."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration with a unit; write it as e.g. '200ms', '2s' or '5m'"
        )
    return float(match.group(1)) * _DURATION_FACTORS[match.group(2)]


def parse_seconds(text: str, bare_unit: str = "s") -> float:
    """A duration in seconds from text with a unit, or a bare number in ``bare_unit``."""
    bare = _BARE.match(text)
    if bare is not None:
        return float(bare.group(1)) * _DURATION_FACTORS[bare_unit]
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration; write it with a unit ('200ms', '2s', '5m') or as bare "
            f"{'seconds' if bare_unit == 's' else bare_unit}"
        )
    return float(match.group(1)) * _DURATION_FACTORS[match.group(2)]


def _duration(value: Any) -> Any:
    # Text comes from people (flags, env, files); the field's name ends in _s, so a bare number
    # is seconds. Numbers come from code, where the name already says seconds.
    if isinstance(value, str):
        return parse_seconds(value)
    return value


DurationS = Annotated[float, BeforeValidator(_duration), Field(ge=0.0, allow_inf_nan=False)]
# Latency targets, for every service that reads them: positive, and at most a bound that catches
# milliseconds written as bare seconds ("500" meant as 500 ms); no interactive target is longer.
TtftTargetS = Annotated[
    float, BeforeValidator(_duration), Field(gt=0.0, le=120.0, allow_inf_nan=False)
]
ItlTargetS = Annotated[
    float, BeforeValidator(_duration), Field(gt=0.0, le=10.0, allow_inf_nan=False)
]


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


@dataclass(frozen=True)
class FieldMeta:
    """The other spellings of a field, from its ``json_schema_extra``.

    ``flag_aliases`` take the field's own unit; ``foreign_flag`` is another system's spelling and
    takes ``foreign_unit`` when a bare number is given (Dynamo's ``--ttft 500`` is 500 ms);
    ``deprecated`` are former field names, still read from flags, the environment and files.
    """

    flag_aliases: tuple[str, ...] = ()
    foreign_flag: str | None = None
    foreign_unit: str | None = None
    deprecated: tuple[str, ...] = ()


def field_meta(info: FieldInfo) -> FieldMeta:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}

    def strings(key: str) -> tuple[str, ...]:
        value = extra.get(key) or []
        return tuple(str(v) for v in value) if isinstance(value, list | tuple) else ()

    foreign = extra.get("foreign_flag")
    unit = extra.get("foreign_unit")
    return FieldMeta(
        flag_aliases=strings("flag_aliases"),
        foreign_flag=str(foreign) if foreign else None,
        foreign_unit=str(unit) if unit else None,
        deprecated=strings("deprecated"),
    )


def is_switch(info: FieldInfo) -> bool:
    return info.annotation is bool


def _with_unit(unit: str) -> Callable[[str], str]:
    """A converter for a foreign flag: a bare number gets the foreign system's unit."""

    def convert(text: str) -> str:
        return f"{text.strip()}{unit}" if _BARE.match(text) else text

    return convert


class _DeprecatedFlag(argparse.Action):
    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
        option_string: str | None = None,
    ) -> None:
        log.warning("%s is deprecated; use %s", option_string, flag_name(self.dest))
        setattr(namespace, self.dest, values)


def default_text(info: FieldInfo) -> str:
    default = info.get_default(call_default_factory=True)
    if isinstance(default, bool):
        return str(default).lower()
    return repr(default)


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type[Settings],
    exclude: Collection[str] = (),
    tool_defaults: Mapping[str, Any] | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """One flag per field of ``cls`` (but ``exclude``), each with its other spellings.

    For a service (``tool_defaults`` None) values stay ``None`` unless given, so that
    ``settings_from`` falls back to the environment. A tool that reads no environment passes
    ``tool_defaults``: each flag then defaults to the field's default, or to the tool's own
    where it has one (the help shows it, also after ``parser.set_defaults``). ``aliases`` adds
    spellings a tool keeps for a field (in the field's unit)."""
    for name, info in cls.model_fields.items():
        if name in exclude:
            continue
        meta = field_meta(info)
        spellings = (*meta.flag_aliases, *(aliases or {}).get(name, ()))
        help_text = (info.description or "").replace("%", "%%")
        if tool_defaults is None:
            default = None
            help_text += f" [env {env_name(name)}; default {default_text(info)}]"
        else:
            default = tool_defaults.get(name, info.get_default(call_default_factory=True))
            help_text += " [default %(default)s]"
        if is_switch(info):
            parser.add_argument(
                flag_name(name), *spellings, dest=name, default=default, nargs="?",
                const="true", metavar="true|false", help=help_text,
            )
            if not name.startswith("no_"):
                parser.add_argument(
                    "--no-" + name.replace("_", "-"), dest=name, action="store_const",
                    const="false", default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                )
        else:
            parser.add_argument(flag_name(name), *spellings, dest=name, default=default,
                                help=help_text)
        if meta.foreign_flag is not None and meta.foreign_flag not in (flag_name(name), *spellings):
            unit = meta.foreign_unit
            parser.add_argument(
                meta.foreign_flag, dest=name, default=argparse.SUPPRESS,
                type=_with_unit(unit) if unit else str,
                nargs="?" if is_switch(info) else None,
                const="true" if is_switch(info) else None,
                help=f"Dynamo's spelling of {flag_name(name)}"
                + (f", bare numbers in {unit}" if unit else ""),
            )
        for old in meta.deprecated:
            if flag_name(old) == meta.foreign_flag:
                continue
            parser.add_argument(
                flag_name(old), dest=name, default=argparse.SUPPRESS, action=_DeprecatedFlag,
                help=argparse.SUPPRESS,
            )


def environment_value(
    cls: type[Settings], name: str, env: Mapping[str, str]
) -> str | None:
    """The field's value from the environment: its own variable, else a deprecated one.

    A deprecated variable wins over the new one when both are set: it was set for this service
    alone, while the new name may be shared with another service (a ConfigMap every service
    reads), so an old configuration keeps exactly what it meant."""
    meta = field_meta(cls.model_fields[name])
    for old in meta.deprecated:
        if env_name(old) in env:
            log.warning(
                "%s is deprecated; use %s%s", env_name(old), env_name(name),
                f" (its value {env[env_name(name)]!r} is ignored while {env_name(old)} is set)"
                if env_name(name) in env else "",
            )
            return env[env_name(old)]
    return env.get(env_name(name))


def settings_from(
    cls: type[S], args: argparse.Namespace | Mapping[str, Any], env: Mapping[str, str]
) -> S:
    """Flags over environment over defaults; raises ``ValidationError``."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    values: dict[str, Any] = {}
    for name in cls.model_fields:
        if given.get(name) is not None:
            values[name] = given[name]
            continue
        from_env = environment_value(cls, name, env)
        if from_env is not None:
            values[name] = from_env
    return cls.model_validate(values)


def explain(item: Mapping[str, Any]) -> str:
    """One validation error as a person would say it."""
    ctx = item.get("ctx") or {}
    kind = item.get("type")
    if kind == "greater_than" and ctx.get("gt") == 0:
        return f"must be positive, got {item.get('input')!r}"
    if kind == "greater_than_equal" and ctx.get("ge") == 0:
        return f"must not be negative, got {item.get('input')!r}"
    field = str(item["loc"][-1]) if item.get("loc") else ""
    if kind == "less_than_equal" and field.endswith("_s"):
        return (f"must be at most {ctx.get('le')} s, got {item.get('input')!r} (a bare number is "
                "seconds; write '500ms' for milliseconds)")
    return str(item["msg"]).removeprefix("Value error, ")


def describe_error(cls: type[Settings], error: ValidationError) -> str:
    lines = [f"invalid {cls.__name__}:"]
    for item in error.errors():
        if not item["loc"]:  # a check across fields, or of a file named in the message
            lines.append(f"  {explain(item)}")
            continue
        field = str(item["loc"][0])
        where = f"{flag_name(field)} / {env_name(field)}" if field in cls.model_fields else field
        lines.append(f"  {where}: {explain(item)}")
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
