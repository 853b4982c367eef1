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
from services.decider.policy import PlannerKnobs, PolicyConfig
from shared.messages import DNS_LABEL, MAX_REPLICAS
from shared.perf_model import default_profile_path
from shared.service_settings import DEFAULT_HTTP_PORTS, ServiceSettings, http_port_field
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
        description="sizing policy: " + ", ".join(registry.policy_names())
        + f" (the decider service defaults to {registry.DEFAULT_POLICY}; knobs built in code, "
        "to dynamo)",
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
    # --- the slaplanner policy's knobs (dynamo ignores them) -----------------------------------
    worker_startup_s: DurationS = Field(
        default=180.0,
        le=86_400.0,
        description="slaplanner: seconds from asking for a worker to its serving ('3m'); the "
        "lookahead is now + this + one interval, until learnt from ScaleEvents (180 s: model "
        "load and engine warm-up of a typical vLLM worker)",
    )
    learn_startup: bool = Field(
        default=True,
        description="slaplanner: true: plan with the slowest of the last 5 measured starts "
        "(requested -> ready) once there is one, and with a start pending longer than that",
    )
    load_confidence: float = Field(
        default=0.75,
        ge=0.5,
        lt=1.0,
        description="slaplanner: probability that the load stays under what is planned for; the "
        "forecast's upper quantile is rescaled to it (0.5: the point forecast). 0.75: on the "
        "simulator's benchmark scenarios it kept the attainment of 0.9 with 10-25 % fewer "
        "GPU-hours, while 0.5 lost the sine scenario's ramps",
    )
    forecast_confidence: float = Field(
        default=0.9,
        gt=0.5,
        lt=1.0,
        description="slaplanner: the confidence of the forecaster's upper quantile (its "
        "'confidence' setting, 0.9 by default); used to rescale to load_confidence",
    )
    ttft_quantile: float = Field(
        default=0.99,
        gt=0.5,
        lt=1.0,
        description="slaplanner: share of requests whose queueing delay + prefill time the "
        "prefill sizing keeps under the TTFT target (M/G/c wait tail)",
    )
    decode_concurrency_quantile: float = Field(
        default=0.9,
        ge=0.5,
        lt=1.0,
        description="slaplanner: quantile of requests in flight (Poisson, M/G/infinity) that "
        "decode is sized to hold at the ITL target",
    )
    arrival_cv2: float | None = Field(
        default=None,
        ge=0.0,
        le=100.0,
        description="slaplanner: squared coefficient of variation of inter-arrival times for the "
        "Allen-Cunneen factor (1: Poisson; more: bursty); unset: measured as the index of "
        "dispersion of the request counts of short (fast-path) snapshots, 1 until measured",
    )
    prefill_service_cv2: float | None = Field(
        default=None,
        ge=0.0,
        le=100.0,
        description="slaplanner: squared coefficient of variation of prefill times for the "
        "Allen-Cunneen factor (0: equal prompts; 1: as an exponential); unset: measured from each "
        "window's ISL p90 / mean (lognormal fit), 1 until measured",
    )
    kv_usage_max: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        description="slaplanner: KV-cache share a decode engine is planned to use at most "
        "(headroom for long requests)",
    )
    scale_down_window_s: DurationS = Field(
        default=300.0,
        le=86_400.0,
        description="slaplanner: scale down only to the highest recommendation of this many "
        "seconds (the Kubernetes HPA's default scale-down stabilisation, 300 s)",
    )
    scale_up_step_replicas: int = Field(
        default=4, ge=1, le=MAX_REPLICAS,
        description="slaplanner: a step up adds at most max(this, scale_up_step_percent) "
        "replicas per role (the HPA's default: 4 pods or 100 %)",
    )
    scale_up_step_percent: float = Field(
        default=100.0, ge=0.0, le=10_000.0,
        description="slaplanner: a step up adds at most this % of the current replicas (or "
        "scale_up_step_replicas, whichever is more)",
    )
    scale_down_step_replicas: int = Field(
        default=1, ge=1, le=MAX_REPLICAS,
        description="slaplanner: a step down removes at most max(this, scale_down_step_percent) "
        "replicas per role",
    )
    scale_down_step_percent: float = Field(
        default=50.0, ge=0.0, le=100.0,
        description="slaplanner: a step down removes at most this % of the current replicas (or "
        "scale_down_step_replicas, whichever is more)",
    )
    min_prefill_decode_ratio: float | None = Field(
        default=None, gt=0.0, le=1000.0,
        description="slaplanner: prefill replicas are at least this times the decode replicas "
        "(unset: no bound); the short role is raised",
    )
    max_prefill_decode_ratio: float | None = Field(
        default=None, gt=0.0, le=1000.0,
        description="slaplanner: prefill replicas are at most this times the decode replicas "
        "(unset: no bound); decode is raised to keep it",
    )
    scale_to_zero: bool = Field(
        default=False,
        description="slaplanner: true: both roles go to 0 after scale_to_zero_idle_s without a "
        "request, and back to their minimum at the first request seen or queued (needs "
        "min_endpoint and min_*_replicas 0)",
    )
    scale_to_zero_idle_s: DurationS = Field(
        default=600.0, gt=0.0, le=7 * 86_400.0,
        description="slaplanner: seconds without any request before scaling to zero (10 min)",
    )
    correction_half_life_s: DurationS = Field(
        default=120.0, gt=0.0, le=86_400.0,
        description="slaplanner: correction factors forget old evidence with this half-life, s",
    )
    correction_min_weight_requests: float = Field(
        default=50.0, ge=0.0, le=1e9,
        description="slaplanner: a correction factor always weighs at least this many requests, "
        "so a window of a few requests moves it little",
    )
    correction_min: float = Field(
        default=0.5, gt=0.0, le=1.0,
        description="slaplanner: lowest correction factor (engines twice as fast as profiled)",
    )
    correction_max: float = Field(
        default=3.0, ge=1.0, le=100.0,
        description="slaplanner: highest correction factor (engines 3x slower than profiled)",
    )
    fast_path: bool = Field(
        default=True,
        description="slaplanner: true: scale up between planning intervals when snapshots show "
        "a growing queue, latency p99 over target or more load than the replicas serve",
    )
    fast_path_window_s: DurationS = Field(
        default=30.0, gt=0.0, le=3600.0,
        description="slaplanner: the fast path reads the request rate over this many seconds of "
        "recent snapshots (a load that lasts, not a burst over before a worker could start)",
    )
    fast_path_confidence: float = Field(
        default=0.9, ge=0.5, lt=1.0,
        description="slaplanner: the fast path sizes for the lower bound of the observed rate at "
        "this confidence, so that a noisy 5 s window does not scale the fleet",
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
            planner=PlannerKnobs(
                **{name: getattr(self, name) for name in PlannerKnobs.__dataclass_fields__}
            ),
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
    """The decider: where the bus is, and how deployments are sized (``policy`` defaults to
    ``dynamo`` here, as in ``DeploymentKnobs``; the service's own default is in
    ``DeciderServiceSettings``)."""

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


class DeciderServiceSettings(DeciderSettings):
    """What ``python -m services.decider`` reads: ``DeciderSettings`` with the service's default
    policy, ``slaplanner``. Code that builds settings by hand (tests, the reference dry run) keeps
    ``dynamo`` unless it asks, so Dynamo's hand-computed numbers stay where they are checked."""

    http_port: int = http_port_field(DEFAULT_HTTP_PORTS["decider"])
    policy: str = Field(
        default=registry.DEFAULT_POLICY,
        description="sizing policy: " + ", ".join(registry.policy_names())
        + f" (default {registry.DEFAULT_POLICY})",
    )
