"""The planner's knobs, each declared once: type, default, unit, bounds, description, and the
spelling Dynamo's planner gives it.

``DeploymentKnobs`` is what a policy reads (frozen, validated once, in SI units), and everything
else is generated from it: the decider's flags and ``SLAPLANNER_*`` variables
(``shared/settings.py``), the keys of the per-deployment TOML file (``settings.py``), the options
of ``slaplanner simulate`` and ``slaplanner dry-run`` (``sim/options.py``), the variables the
replay hands the services (``knob_environment``), the benchmark's per-policy knobs and the
defaults table of ``docs/decider.md`` (``docs_table``, checked by a test).

Units follow the name (``_s``: seconds; text with a unit is read too, ``"300ms"``); Dynamo's
spellings take Dynamo's units (``--ttft 500`` is 500 ms, ``--adjustment-interval 60`` is
60 s). Renamed knobs keep their old name as a deprecated spelling (flags, variables, TOML keys):
``max_gpu_budget`` and ``prefill/decode_engine_gpus`` are now ``max_total_gpus`` and
``prefill/decode_engine_num_gpu``, the names the actuator reads from the same ConfigMap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from pydantic import Field, model_validator
from pydantic.fields import FieldInfo

from shared.messages import MAX_REPLICAS
from shared.perf_model import default_profile_path
from shared.settings import (
    DurationS,
    ItlTargetS,
    Settings,
    TtftTargetS,
    env_name,
    field_meta,
    flag_name,
)

ALL = ("dynamo", "slaplanner")
SLAPLANNER = ("slaplanner",)
DYNAMO = ("dynamo",)
# The policy of every deployment without one (the decider, simulate, replay, demo). The dry run
# alone defaults to Dynamo's, whose own dry run it reproduces.
DEFAULT_POLICY = "slaplanner"


def knob(
    default: Any,
    *,
    unit: str,
    description: str,
    policies: tuple[str, ...] = ALL,
    dynamo: str | None = None,
    dynamo_unit: str | None = None,
    deprecated: tuple[str, ...] = (),
    **bounds: Any,
) -> Any:
    """A field of ``DeploymentKnobs`` with what the generated flags, docs and checks need."""
    extra: dict[str, Any] = {"unit": unit, "policies": list(policies)}
    if dynamo is not None:
        extra["foreign_flag"] = dynamo
        if dynamo_unit is not None:
            extra["foreign_unit"] = dynamo_unit
    if deprecated:
        extra["deprecated"] = list(deprecated)
    return Field(default=default, description=description, json_schema_extra=extra, **bounds)


class DeploymentKnobs(Settings):
    """How one deployment is sized. Units are in the names; durations also accept ms, s, m, h."""

    # --- what and for whom -------------------------------------------------------------------
    profile_path: str = knob(
        str(default_profile_path()), unit="path", dynamo="--profile-results-dir",
        description="profile: a Dynamo profiler directory or a slaplanner JSON file "
        "(default: the bundled H200 / Llama-3.1-8B-FP8 profile)",
    )
    policy: str = knob(
        DEFAULT_POLICY, unit="name",
        description="sizing policy: slaplanner (ours) or dynamo (Dynamo's planner, exactly)",
    )
    # Dynamo's SLA-planner defaults (SLAPlannerDefaults in components/planner/src/dynamo/
    # planner/defaults.py, ai-dynamo/dynamo, Apache-2.0): TTFT 500 ms, ITL 50 ms (its flags take
    # milliseconds), GPU budget 8, min_endpoint 1, one GPU per engine. Dynamo's adjustment
    # interval default is 180 s; ours is 60 s, which reacts three times sooner.
    ttft_target_s: TtftTargetS = knob(
        0.5, unit="s", dynamo="--ttft", dynamo_unit="ms",
        description="time-to-first-token target ('500ms', or bare seconds)",
    )
    itl_target_s: ItlTargetS = knob(
        0.05, unit="s", dynamo="--itl", dynamo_unit="ms",
        description="inter-token latency target ('50ms', or bare seconds)",
    )
    adjustment_interval_s: DurationS = knob(
        60.0, unit="s", gt=0.0, le=86_400.0, dynamo="--adjustment-interval", dynamo_unit="s",
        description="how often a deployment is re-sized",
    )
    # --- bounds and what a replica costs ------------------------------------------------------
    min_endpoint: int = knob(
        1, unit="replicas", ge=0, le=MAX_REPLICAS, dynamo="--min-endpoint",
        description="fewest replicas of each role (Dynamo's min_endpoint)",
    )
    max_total_gpus: int = knob(
        8, unit="GPUs", ge=1, dynamo="--max-gpu-budget", deprecated=("max_gpu_budget",),
        description="most GPUs prefill and decode together may use (Dynamo's GPU budget; the "
        "actuator reads the same variable as its hard ceiling)",
    )
    prefill_engine_num_gpu: int = knob(
        1, unit="GPUs", ge=1, le=1024, dynamo="--prefill-engine-num-gpu",
        deprecated=("prefill_engine_gpus",),
        description="GPUs per prefill engine (replica)",
    )
    decode_engine_num_gpu: int = knob(
        1, unit="GPUs", ge=1, le=1024, dynamo="--decode-engine-num-gpu",
        deprecated=("decode_engine_gpus",),
        description="GPUs per decode engine (replica)",
    )
    min_prefill_replicas: int = knob(
        0, unit="replicas", ge=0, le=MAX_REPLICAS,
        description="fewest prefill replicas (with min_endpoint)",
    )
    max_prefill_replicas: int = knob(
        MAX_REPLICAS, unit="replicas", ge=0, le=MAX_REPLICAS, description="most prefill replicas"
    )
    min_decode_replicas: int = knob(
        0, unit="replicas", ge=0, le=MAX_REPLICAS,
        description="fewest decode replicas (with min_endpoint)",
    )
    max_decode_replicas: int = knob(
        MAX_REPLICAS, unit="replicas", ge=0, le=MAX_REPLICAS, description="most decode replicas"
    )
    no_correction: bool = knob(
        False, unit="switch", dynamo="--no-correction",
        description="do not correct the profile with observed TTFT/ITL (Dynamo's flag)",
    )
    # --- the dynamo policy's own ----------------------------------------------------------------
    enforce_gpu_budget: bool = knob(
        True, unit="switch", policies=DYNAMO,
        description="remove replicas where Dynamo's budget cut still exceeds the budget (its "
        "min_endpoint floor can); off: keep Dynamo's numbers exactly",
    )
    prefill_headroom: float = knob(
        1.0, unit="factor", ge=1.0, le=100.0, policies=DYNAMO,
        description="multiplies the prefill demand before Dynamo's ceil, as an operator tuning "
        "Dynamo's planner would (1: Dynamo's arithmetic exactly)",
    )
    # --- the slaplanner policy's own -------------------------------------------------------------
    worker_startup_s: DurationS = knob(
        180.0, unit="s", le=86_400.0, policies=SLAPLANNER,
        description="time from asking for a worker to its serving ('3m'); the lookahead is now "
        "+ this + one interval, until learnt from ScaleEvents (180 s: model load and engine "
        "warm-up of a typical vLLM worker)",
    )
    learn_startup: bool = knob(
        True, unit="switch", policies=SLAPLANNER,
        description="plan with the slowest of the last 5 measured starts (requested -> ready) "
        "once there is one, and with a start pending longer than that",
    )
    load_confidence: float = knob(
        0.75, unit="probability", ge=0.5, lt=1.0, policies=SLAPLANNER,
        description="probability that the load stays under what is planned for; the forecast's "
        "upper quantile is rescaled to it (0.5: the point forecast). 0.75: on the simulator's "
        "benchmark scenarios it kept the attainment of 0.9 with 10-25 % fewer GPU-hours, while "
        "0.5 lost the sine scenario's ramps",
    )
    forecast_confidence: float = knob(
        0.9, unit="probability", gt=0.5, lt=1.0, policies=SLAPLANNER,
        description="the confidence of the forecaster's upper quantile (its 'confidence' "
        "setting); used to rescale to load_confidence",
    )
    attainment_goal: float = knob(
        0.99, unit="share", gt=0.5, lt=1.0, policies=SLAPLANNER,
        description="share of requests planned to meet both targets; the sizing predicts each "
        "role's misses with a queueing model and keeps them within the rest",
    )
    ttft_miss_share: float = knob(
        0.5, unit="share", gt=0.0, lt=1.0, policies=SLAPLANNER,
        description="part of the goal's misses (1 - attainment_goal) given to TTFT (prefill); "
        "the rest goes to ITL (decode)",
    )
    sla_feedback: bool = knob(
        True, unit="switch", policies=SLAPLANNER,
        description="move each role's load_confidence with the attainment observed (the "
        "snapshots' share of requests under each target): up at once when a window misses more "
        "than the role's share of the goal, down slowly while well within it",
    )
    sla_feedback_window_s: DurationS = knob(
        1800.0, unit="s", gt=0.0, le=7 * 86_400.0, policies=SLAPLANNER,
        description="the observed attainment is judged over this sliding window ('30m')",
    )
    sla_feedback_min_requests: float = knob(
        200.0, unit="requests", ge=1.0, le=1e9, policies=SLAPLANNER,
        description="fewest requests in the sliding window before its attainment moves "
        "anything",
    )
    sla_feedback_step: float = knob(
        0.5, unit="sigma", gt=0.0, le=5.0, policies=SLAPLANNER,
        description="windows short of the goal raise the role's planned load quantile by this "
        "many standard normal units (0.75 -> 0.88 for 0.5), judged again a startup delay later",
    )
    sla_feedback_relax_per_hour: float = knob(
        1.0, unit="sigma", ge=0.0, le=100.0, policies=SLAPLANNER,
        description="while the window stays within half the role's miss budget, the planned "
        "load quantile comes down by this many standard normal units per hour",
    )
    load_confidence_min: float = knob(
        0.5, unit="probability", gt=0.0, lt=1.0, policies=SLAPLANNER,
        description="the SLA feedback never plans below this load quantile (0.5: the point "
        "forecast; below it, a forecast that lags a rising load is met late every time)",
    )
    load_confidence_max: float = knob(
        0.995, unit="probability", gt=0.5, lt=1.0, policies=SLAPLANNER,
        description="the SLA feedback never plans above this load quantile",
    )
    worker_warmup_s: DurationS = knob(
        60.0, unit="s", ge=0.0, le=86_400.0, policies=SLAPLANNER,
        description="windows within this long after a role gained ready workers do not update "
        "its correction factor (a first pass through a cold engine is not a slow engine)",
    )
    arrival_cv2: float | None = knob(
        None, unit="cv^2", ge=0.0, le=100.0, policies=SLAPLANNER,
        description="squared coefficient of variation of inter-arrival times for the "
        "Allen-Cunneen factor (1: Poisson; more: bursty); unset: measured as the index of "
        "dispersion of the request counts of short (fast-path) snapshots, 1 until measured",
    )
    prefill_service_cv2: float | None = knob(
        None, unit="cv^2", ge=0.0, le=100.0, policies=SLAPLANNER,
        description="squared coefficient of variation of prefill times for the Allen-Cunneen "
        "factor (0: equal prompts; 1: as an exponential); unset: measured from each window's "
        "ISL p90 / mean (gamma fit), 1 until measured",
    )
    kv_usage_max: float = knob(
        0.9, unit="share", gt=0.0, le=1.0, policies=SLAPLANNER,
        description="KV-cache share a decode engine is planned to use at most (headroom for "
        "long requests)",
    )
    scale_down_window_s: DurationS | None = knob(
        None, unit="s", le=86_400.0, policies=SLAPLANNER,
        description="scale down only to the highest recommendation of this window; unset: one "
        "startup delay plus one interval (capacity released is back no sooner than a startup "
        "delay later, so a dip shorter than that is not worth releasing)",
    )
    scale_up_step_replicas: int = knob(
        4, unit="replicas", ge=1, le=MAX_REPLICAS, policies=SLAPLANNER,
        description="a step up adds at most max(this, scale_up_step_percent) replicas per role "
        "(the HPA's default: 4 pods or 100 %)",
    )
    scale_up_step_percent: float = knob(
        100.0, unit="%", ge=0.0, le=10_000.0, policies=SLAPLANNER,
        description="a step up adds at most this % of the current replicas (or "
        "scale_up_step_replicas, whichever is more)",
    )
    scale_down_step_replicas: int = knob(
        1, unit="replicas", ge=1, le=MAX_REPLICAS, policies=SLAPLANNER,
        description="a step down removes at most max(this, scale_down_step_percent) replicas "
        "per role",
    )
    scale_down_step_percent: float = knob(
        50.0, unit="%", ge=0.0, le=100.0, policies=SLAPLANNER,
        description="a step down removes at most this % of the current replicas (or "
        "scale_down_step_replicas, whichever is more)",
    )
    min_prefill_decode_ratio: float | None = knob(
        None, unit="ratio", gt=0.0, le=1000.0, policies=SLAPLANNER,
        description="prefill replicas are at least this times the decode replicas (unset: no "
        "bound); the short role is raised",
    )
    max_prefill_decode_ratio: float | None = knob(
        None, unit="ratio", gt=0.0, le=1000.0, policies=SLAPLANNER,
        description="prefill replicas are at most this times the decode replicas (unset: no "
        "bound); decode is raised to keep it",
    )
    scale_to_zero: bool = knob(
        False, unit="switch", policies=SLAPLANNER,
        description="both roles go to 0 after scale_to_zero_idle_s without a request, and back "
        "to their minimum at the first request seen or queued (needs min_endpoint and "
        "min_*_replicas 0)",
    )
    scale_to_zero_idle_s: DurationS = knob(
        600.0, unit="s", gt=0.0, le=7 * 86_400.0, policies=SLAPLANNER,
        description="time without any request before scaling to zero (10 min)",
    )
    correction_half_life_s: DurationS = knob(
        120.0, unit="s", gt=0.0, le=86_400.0, policies=SLAPLANNER,
        description="correction factors forget old evidence with this half-life",
    )
    correction_min_weight_requests: float = knob(
        50.0, unit="requests", ge=0.0, le=1e9, policies=SLAPLANNER,
        description="a correction factor always weighs at least this many requests, so a "
        "window of a few requests moves it little",
    )
    correction_min: float = knob(
        0.5, unit="factor", gt=0.0, le=1.0, policies=SLAPLANNER,
        description="lowest correction factor (engines twice as fast as profiled)",
    )
    correction_max: float = knob(
        3.0, unit="factor", ge=1.0, le=100.0, policies=SLAPLANNER,
        description="highest correction factor (engines 3x slower than profiled)",
    )
    fast_path: bool = knob(
        True, unit="switch", policies=SLAPLANNER,
        description="scale up between planning intervals when snapshots show a growing queue, "
        "latency p99 over target or more load than the replicas serve",
    )
    fast_path_window_s: DurationS = knob(
        30.0, unit="s", gt=0.0, le=3600.0, policies=SLAPLANNER,
        description="the fast path reads the request rate over this much of recent snapshots "
        "(a load that lasts, not a burst over before a worker could start)",
    )
    fast_path_confidence: float = knob(
        0.9, unit="probability", ge=0.5, lt=1.0, policies=SLAPLANNER,
        description="the fast path sizes for the lower bound of the observed rate at this "
        "confidence, so that a noisy 5 s window does not scale the fleet",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        from services.decider import registry  # the registry imports the policies, which use us

        if self.policy not in registry.POLICIES:
            known = ", ".join(registry.policy_names())
            raise ValueError(f"policy: unknown policy {self.policy!r}; known: {known}")
        for role in ("prefill", "decode"):
            low, high = getattr(self, f"min_{role}_replicas"), getattr(self, f"max_{role}_replicas")
            if low > high:
                raise ValueError(
                    f"min_{role}_replicas ({low}) is above max_{role}_replicas ({high})"
                )
            if self.min_endpoint > high:
                raise ValueError(
                    f"min_endpoint ({self.min_endpoint}) is above max_{role}_replicas ({high})"
                )
        low, high = self.min_prefill_decode_ratio, self.max_prefill_decode_ratio
        if low is not None and high is not None and low > high:
            raise ValueError(
                f"min_prefill_decode_ratio ({low}) is above max_prefill_decode_ratio ({high})"
            )
        if self.scale_to_zero and (
            self.min_endpoint or self.min_prefill_replicas or self.min_decode_replicas
        ):
            raise ValueError(
                "scale_to_zero needs min_endpoint, min_prefill_replicas and min_decode_replicas "
                f"at 0 (they are {self.min_endpoint}, {self.min_prefill_replicas}, "
                f"{self.min_decode_replicas})"
            )
        floor_gpus = (
            self.prefill_floor * self.prefill_engine_num_gpu
            + self.decode_floor * self.decode_engine_num_gpu
        )
        if floor_gpus > self.max_total_gpus:
            raise ValueError(
                f"max_total_gpus ({self.max_total_gpus}) cannot hold the minimum replicas "
                f"({self.prefill_floor} prefill x {self.prefill_engine_num_gpu} GPU + "
                f"{self.decode_floor} decode x {self.decode_engine_num_gpu} GPU = {floor_gpus})"
            )
        return self

    # --- what policies read besides the fields --------------------------------------------------
    @property
    def prefill_floor(self) -> int:
        """The fewest prefill replicas any step may leave."""
        return max(self.min_endpoint, self.min_prefill_replicas)

    @property
    def decode_floor(self) -> int:
        return max(self.min_endpoint, self.min_decode_replicas)

    @property
    def correction_enabled(self) -> bool:
        return not self.no_correction

    def gpus(self, prefill: int, decode: int) -> int:
        return prefill * self.prefill_engine_num_gpu + decode * self.decode_engine_num_gpu

    def knobs(self) -> DeploymentKnobs:
        """Only the sizing knobs (drops service fields when called on ``DeciderSettings``)."""
        if type(self) is DeploymentKnobs:
            return self
        return DeploymentKnobs.model_validate(
            {name: getattr(self, name) for name in DeploymentKnobs.model_fields}
        )

    def explained(self, policies: tuple[str, ...] = ALL) -> dict[str, Any]:
        """The ``config`` section of an explanation: the knobs ``policies`` read, under the names
        the bus has carried since the first schema version, plus the current names."""
        shared = {
            "ttft_target_s": self.ttft_target_s,
            "itl_target_s": self.itl_target_s,
            "min_endpoint": self.min_endpoint,
            "max_gpu_budget": self.max_total_gpus,
            "prefill_engine_gpus": self.prefill_engine_num_gpu,
            "decode_engine_gpus": self.decode_engine_num_gpu,
            "min_prefill_replicas": self.min_prefill_replicas,
            "max_prefill_replicas": self.max_prefill_replicas,
            "min_decode_replicas": self.min_decode_replicas,
            "max_decode_replicas": self.max_decode_replicas,
            "correction_enabled": self.correction_enabled,
            "enforce_gpu_budget": self.enforce_gpu_budget,
            "max_total_gpus": self.max_total_gpus,
            "prefill_engine_num_gpu": self.prefill_engine_num_gpu,
            "decode_engine_num_gpu": self.decode_engine_num_gpu,
        }
        own = {
            name: getattr(self, name)
            for name, spec in KNOB_SPECS.items()
            if name not in shared and spec.policies != ALL
            and any(p in spec.policies for p in policies)
        }
        return shared | own


# ---------------------------------------------------------------------------------------------
# What the generators read


@dataclass(frozen=True)
class KnobSpec:
    """One knob as the flags, the docs and the checks see it."""

    name: str
    default: Any
    unit: str
    description: str
    policies: tuple[str, ...]
    bounds: str
    dynamo_flag: str | None
    dynamo_unit: str | None
    deprecated: tuple[str, ...]

    @property
    def flag(self) -> str:
        return flag_name(self.name)

    @property
    def env(self) -> str:
        return env_name(self.name)


def _bounds(info: FieldInfo) -> str:
    found: dict[str, Any] = {}
    for item in info.metadata:
        for attribute in ("gt", "ge", "lt", "le"):
            value = getattr(item, attribute, None)
            if value is not None:
                found[attribute] = value
    if "gt" in found and "ge" in found and found["ge"] <= found["gt"]:
        del found["ge"]  # a duration's own ">= 0" under a field's "> 0"
    if "lt" in found and "le" in found and found["le"] >= found["lt"]:
        del found["le"]
    symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    return ", ".join(
        f"{symbols[k]} {v:g}" if isinstance(v, float) else f"{symbols[k]} {v}"
        for k, v in found.items()
    )


def specs(cls: type[DeploymentKnobs] = DeploymentKnobs) -> dict[str, KnobSpec]:
    """Every knob of ``cls`` (a subclass adds its own), in declaration order."""
    result = {}
    for name, info in cls.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        meta = field_meta(info)
        policies = extra.get("policies") or list(ALL)
        result[name] = KnobSpec(
            name=name,
            default=info.get_default(call_default_factory=True),
            unit=str(extra.get("unit", "")),
            description=info.description or "",
            policies=tuple(str(p) for p in policies) if isinstance(policies, list) else ALL,
            bounds=_bounds(info),
            dynamo_flag=meta.foreign_flag,
            dynamo_unit=meta.foreign_unit,
            deprecated=meta.deprecated,
        )
    return result


KNOB_SPECS = specs()


def text_value(value: Any) -> str | None:
    """A knob's value as its environment variable carries it (``None``: unset), read back to
    the very same value."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def knob_environment(knobs: DeploymentKnobs, cls: type[DeploymentKnobs] | None = None
                     ) -> dict[str, str]:
    """``SLAPLANNER_*`` variables that give a decider exactly these knobs."""
    fields = (cls or type(knobs)).model_fields
    env = {}
    for name in fields:
        text = text_value(getattr(knobs, name))
        if text is not None:
            env[env_name(name)] = text
    return env


class UnknownKnobError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(f"unknown knob {key!r}")
        self.key = key


def from_names(values: Mapping[str, Any], cls: type[DeploymentKnobs] = DeploymentKnobs,
               base: DeploymentKnobs | None = None) -> DeploymentKnobs:
    """Knobs from a mapping of knob names (or their deprecated names) over ``base``; raises
    ``UnknownKnobError`` naming an unknown key, ``ValidationError`` for a bad value."""
    renamed = {old: spec.name for spec in specs(cls).values() for old in spec.deprecated}
    merged: dict[str, Any] = {} if base is None else base.model_dump()
    for key, value in values.items():
        name = renamed.get(key, key)
        if name not in cls.model_fields:
            raise UnknownKnobError(key)
        merged[name] = value
    return cls.model_validate(merged)


def _default_text(spec: KnobSpec) -> str:
    value = spec.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if spec.name == "profile_path":
        return "bundled H200 profile"
    if isinstance(value, float) and spec.unit == "s":
        return f"{value:g} s"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def docs_table(cls: type[DeploymentKnobs] = DeploymentKnobs) -> str:
    """The knobs table of ``docs/decider.md``."""
    lines = [
        "| knob (`--flag`, `SLAPLANNER_*`) | Dynamo's flag | default | unit | bounds | policy | "
        "what |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in specs(cls).values():
        dynamo = "" if spec.dynamo_flag is None else f"`{spec.dynamo_flag}`" + (
            f" ({spec.dynamo_unit})" if spec.dynamo_unit and spec.dynamo_unit != spec.unit
            else "")
        policies = "both" if set(spec.policies) >= set(ALL) else ", ".join(spec.policies)
        renamed = "".join(f"; was `{old}`" for old in spec.deprecated)
        lines.append(
            f"| `{spec.name}`{renamed} | {dynamo} | {_default_text(spec)} | {spec.unit} | "
            f"{spec.bounds} | {policies} | {spec.description.replace('|', '/')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(docs_table())
