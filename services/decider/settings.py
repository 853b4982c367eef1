"""The decider's settings: service settings plus the sizing knobs of a deployment.

Every knob is a flag (``--ttft-target-s``), an environment variable (``SLAPLANNER_TTFT_TARGET_S``)
and a key of the optional per-deployment TOML file. Dynamo's planner flag names are accepted as
aliases (``--ttft``, ``--itl``, ``--adjustment-interval``, ``--max-gpu-budget``,
``--min-endpoint``, ``--prefill-engine-num-gpu``, ``--decode-engine-num-gpu``,
``--profile-results-dir``, ``--no-correction``). Latency targets must carry a unit (``500ms``,
``0.5s``): Dynamo itself has taken them in seconds in one release and milliseconds in another, so
a bare number is ambiguous and refused.

The per-deployment file (``--deployment-config-file``)::

    [defaults]                      # over the flags/environment, for every deployment
    ttft_target_s = "300ms"
    max_gpu_budget = 16

    [deployments."prod/llama"]      # namespace/name; over [defaults]
    itl_target_s = "20ms"
    min_prefill_replicas = 2
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import BeforeValidator, Field, ValidationError, model_validator

from services.decider import registry
from services.decider.policy import PolicyConfig
from shared.messages import DNS_LABEL, MAX_REPLICAS
from shared.perf_model import default_profile_path
from shared.service_settings import ServiceSettings
from shared.settings import DurationS, Settings, parse_duration_s

# Dynamo's SLA-planner defaults (SLAPlannerDefaults in components/planner/src/dynamo/planner/
# defaults.py, ai-dynamo/dynamo, Apache-2.0): TTFT 0.5 s, ITL 0.05 s, GPU budget 8,
# min_endpoint 1, one GPU per engine. Dynamo's own adjustment interval default is 180 s; ours is
# 60 s, which reacts three times sooner.
DEFAULT_TTFT_TARGET_S = 0.5
DEFAULT_ITL_TARGET_S = 0.05
DEFAULT_ADJUSTMENT_INTERVAL_S = 60.0
DEFAULT_MAX_GPU_BUDGET = 8
DEFAULT_MIN_ENDPOINT = 1

# Fields whose text people write must name a unit; the interval may also be bare seconds, as
# Dynamo's --adjustment-interval takes it.
LATENCY_TARGET_FIELDS = ("ttft_target_s", "itl_target_s")


def _seconds_or_duration(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return parse_duration_s(value)
    return value


IntervalS = Annotated[
    float, BeforeValidator(_seconds_or_duration), Field(gt=0.0, le=86_400.0, allow_inf_nan=False)
]


def _aliases(*flags: str) -> dict[str, Any]:
    return {"flag_aliases": list(flags)}


class DeploymentKnobs(Settings):
    """How one deployment is sized. Units are in the names; durations accept ms, s, m, h."""

    profile_path: str = Field(
        default=str(default_profile_path()),
        description="profile: a Dynamo profiler directory or a slaplanner JSON file "
        "(default: the bundled H200 / Llama-3.1-8B-FP8 profile)",
        json_schema_extra=_aliases("--profile-results-dir"),
    )
    policy: str = Field(
        default="dynamo",
        description="sizing policy: " + ", ".join(registry.policy_names()),
    )
    ttft_target_s: DurationS = Field(
        default=DEFAULT_TTFT_TARGET_S,
        gt=0.0,
        description="time-to-first-token target, with a unit ('500ms'); Dynamo's default 0.5 s",
        json_schema_extra=_aliases("--ttft"),
    )
    itl_target_s: DurationS = Field(
        default=DEFAULT_ITL_TARGET_S,
        gt=0.0,
        description="inter-token latency target, with a unit ('50ms'); Dynamo's default 0.05 s",
        json_schema_extra=_aliases("--itl"),
    )
    adjustment_interval_s: IntervalS = Field(
        default=DEFAULT_ADJUSTMENT_INTERVAL_S,
        description="how often a deployment is re-sized, seconds ('60s', or bare seconds)",
        json_schema_extra=_aliases("--adjustment-interval"),
    )
    min_endpoint: int = Field(
        default=DEFAULT_MIN_ENDPOINT,
        ge=0,
        le=MAX_REPLICAS,
        description="fewest replicas of each role (Dynamo's min_endpoint)",
    )
    max_gpu_budget: int = Field(
        default=DEFAULT_MAX_GPU_BUDGET,
        ge=1,
        description="most GPUs prefill and decode together may use",
    )
    prefill_engine_gpus: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="GPUs per prefill engine (replica)",
        json_schema_extra=_aliases("--prefill-engine-num-gpu"),
    )
    decode_engine_gpus: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="GPUs per decode engine (replica)",
        json_schema_extra=_aliases("--decode-engine-num-gpu"),
    )
    min_prefill_replicas: int = Field(
        default=0, ge=0, le=MAX_REPLICAS, description="fewest prefill replicas (with min_endpoint)"
    )
    max_prefill_replicas: int = Field(
        default=MAX_REPLICAS, ge=0, le=MAX_REPLICAS, description="most prefill replicas"
    )
    min_decode_replicas: int = Field(
        default=0, ge=0, le=MAX_REPLICAS, description="fewest decode replicas (with min_endpoint)"
    )
    max_decode_replicas: int = Field(
        default=MAX_REPLICAS, ge=0, le=MAX_REPLICAS, description="most decode replicas"
    )
    no_correction: bool = Field(
        default=False,
        description="true: do not correct the profile with observed TTFT/ITL (Dynamo's flag)",
    )
    enforce_gpu_budget: bool = Field(
        default=True,
        description="true: remove replicas where Dynamo's budget cut still exceeds the budget "
        "(its min_endpoint floor can); false: keep Dynamo's numbers exactly",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
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
        config = self.policy_config()
        floor_gpus = (
            config.prefill_floor * self.prefill_engine_gpus
            + config.decode_floor * self.decode_engine_gpus
        )
        if floor_gpus > self.max_gpu_budget:
            raise ValueError(
                f"max_gpu_budget ({self.max_gpu_budget}) cannot hold the minimum replicas "
                f"({config.prefill_floor} prefill x {self.prefill_engine_gpus} GPU + "
                f"{config.decode_floor} decode x {self.decode_engine_gpus} GPU = {floor_gpus})"
            )
        return self

    def policy_config(self) -> PolicyConfig:
        return PolicyConfig(
            ttft_target_s=self.ttft_target_s,
            itl_target_s=self.itl_target_s,
            min_endpoint=self.min_endpoint,
            max_gpu_budget=self.max_gpu_budget,
            prefill_engine_gpus=self.prefill_engine_gpus,
            decode_engine_gpus=self.decode_engine_gpus,
            min_prefill_replicas=self.min_prefill_replicas,
            max_prefill_replicas=self.max_prefill_replicas,
            min_decode_replicas=self.min_decode_replicas,
            max_decode_replicas=self.max_decode_replicas,
            correction_enabled=not self.no_correction,
            enforce_gpu_budget=self.enforce_gpu_budget,
        )

    def knobs(self) -> DeploymentKnobs:
        """Only the sizing knobs (drops service fields when called on DeciderSettings)."""
        return DeploymentKnobs.model_validate(
            {name: getattr(self, name) for name in DeploymentKnobs.model_fields}
        )


class DeploymentConfigError(ValueError):
    """A per-deployment file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class DeploymentConfig:
    """The knobs of every deployment: the base, ``[defaults]`` over it, then each override."""

    defaults: DeploymentKnobs
    overrides: dict[str, DeploymentKnobs] = field(default_factory=dict)
    source: str | None = None

    def for_deployment(self, key: str) -> DeploymentKnobs:
        """Knobs for ``"namespace/name"``."""
        return self.overrides.get(key, self.defaults)

    def all_knobs(self) -> list[DeploymentKnobs]:
        return [self.defaults, *self.overrides.values()]


def _describe(error: ValidationError) -> tuple[str, str]:
    item = error.errors()[0]
    field_name = ".".join(str(part) for part in item["loc"]) or "?"
    message = item["msg"].removeprefix("Value error, ")
    return field_name, message


def _merge(base: DeploymentKnobs, table: Any, path: Path, section: str) -> DeploymentKnobs:
    if not isinstance(table, dict):
        raise DeploymentConfigError(f"{path}: {section} must be a table")
    known = DeploymentKnobs.model_fields
    for key, value in table.items():
        if key not in known:
            raise DeploymentConfigError(
                f"{path}: {section} field '{key}': unknown (known: {', '.join(known)})"
            )
        if key in LATENCY_TARGET_FIELDS and not isinstance(value, str):
            raise DeploymentConfigError(
                f"{path}: {section} field '{key}': {value!r} has no unit; write it as text "
                f'with one, e.g. "500ms" or "0.5s" (a bare number is ambiguous)'
            )
    values = {name: getattr(base, name) for name in known}
    values.update(table)
    try:
        return DeploymentKnobs.model_validate(values)
    except ValidationError as exc:
        field_name, message = _describe(exc)
        raise DeploymentConfigError(f"{path}: {section} field '{field_name}': {message}") from None


def load_deployment_config(path: str | Path, base: DeploymentKnobs) -> DeploymentConfig:
    """Read the TOML file; every error names the file, the section and the field."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeploymentConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DeploymentConfigError(f"{path}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise DeploymentConfigError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(document) - {"defaults", "deployments"})
    if unknown:
        raise DeploymentConfigError(
            f"{path}: field '{unknown[0]}': unknown (expected [defaults] and [deployments])"
        )
    defaults = _merge(base, document.get("defaults", {}), path, "[defaults]")
    deployments = document.get("deployments", {})
    if not isinstance(deployments, dict):
        raise DeploymentConfigError(f"{path}: field 'deployments': must be a table")
    overrides: dict[str, DeploymentKnobs] = {}
    label = re.compile(DNS_LABEL)
    for key, table in deployments.items():
        section = f'[deployments."{key}"]'
        parts = key.split("/")
        if len(parts) != 2 or not all(label.match(part) for part in parts):
            raise DeploymentConfigError(
                f'{path}: {section}: the key must be "namespace/name" (DNS labels)'
            )
        overrides[key] = _merge(defaults, table, path, section)
    return DeploymentConfig(defaults, overrides, str(path))


class DeciderSettings(ServiceSettings, DeploymentKnobs):
    """The decider service: where the bus is, and how deployments are sized."""

    deployment_config_file: str | None = Field(
        default=None,
        description='TOML file with [defaults] and [deployments."namespace/name"] knob overrides',
    )

    @model_validator(mode="after")
    def _config_file_readable(self) -> Self:
        # Read once here so that a bad file is refused with the other settings, at start.
        self.deployment_config()
        return self

    def deployment_config(self) -> DeploymentConfig:
        base = self.knobs()
        if self.deployment_config_file is None:
            return DeploymentConfig(base)
        try:
            return load_deployment_config(self.deployment_config_file, base)
        except DeploymentConfigError as exc:
            raise ValueError(str(exc)) from None
