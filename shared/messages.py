"""The bus contract: one pydantic model per subject family, its subject pattern beside it.

Operators type these bodies with ``nats pub`` and read them with ``nats sub``; fields may be added,
but names, meanings and units hold. Units are SI and in the field name; times are seconds since
the epoch (UTC); a value that was not observed is ``null``, never 0.
"""

from __future__ import annotations

import math
import uuid
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Self

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION: Literal[1] = 1
SUBJECT_PREFIX = "slaplanner"

METRICS_SUBJECT = "slaplanner.metrics.{namespace}.{name}"
FORECAST_SUBJECT = "slaplanner.forecast.{namespace}.{name}"
TARGET_SUBJECT = "slaplanner.target.{namespace}.{name}"
SCALED_SUBJECT = "slaplanner.scaled.{namespace}.{name}"
REJECTED_SUBJECT = "slaplanner.rejected.{stage}"

# Replica counts are bounded so that a forged or buggy message can never ask for a fleet.
MAX_REPLICAS = 10_000
# DNS-1123 label: what Kubernetes allows for namespaces and most object names, and safe as a
# single NATS subject token (no dots, spaces or wildcards).
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"

# What one window can hold at most: a trillion requests, tokens or seconds is beyond any
# deployment and far below where the forecasters' arithmetic overflows (squares of 1e308 are
# infinite, and one such snapshot would spoil every later forecast of its deployment).
MAX_OBSERVED = 1e12
# The shortest window: the forecast has one step per window up to the horizon, so a window of
# microseconds would ask for millions of steps (minutes of CPU, gigabytes); at 0.1 s the default
# 300 s horizon is 3,000 steps, a forecast of about 0.6 MB.
MIN_WINDOW_S = 0.1

NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Observed = Annotated[float, Field(ge=0.0, le=MAX_OBSERVED, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
EpochSeconds = Annotated[float, Field(ge=0.0, le=1.0e11, allow_inf_nan=False)]
ReplicaCount = Annotated[int, Field(ge=0, le=MAX_REPLICAS)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, populate_by_name=True)


class DeploymentKey(_Frozen):
    """Which deployment a message is about; also the last two tokens of its subject."""

    namespace: str = Field(pattern=DNS_LABEL, description="Kubernetes namespace")
    name: str = Field(pattern=DNS_LABEL, description="deployment name")

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class Envelope(_Frozen):
    """Fields every bus body carries."""

    subject_pattern: ClassVar[str]
    schema_version: Literal[1] = Field(
        default=SCHEMA_VERSION, description="contract version; unknown versions are refused"
    )
    id: str = Field(
        default_factory=lambda: uuid.uuid4().hex,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="unique id, also sent as the Nats-Msg-Id header so JetStream drops duplicates",
    )
    deployment: DeploymentKey
    window_end: EpochSeconds = Field(description="end of the interval described, epoch seconds UTC")
    window_s: Positive = Field(default=60.0, le=86_400.0, description="interval length, seconds")

    @field_validator("window_s")
    @classmethod
    def _window_long_enough(cls, value: float) -> float:
        if value < MIN_WINDOW_S:
            raise ValueError(f"window_s {value:g} is shorter than {MIN_WINDOW_S:g} s")
        return value

    @field_validator("schema_version", mode="before")
    @classmethod
    def _known_version(cls, value: Any) -> Any:
        if value != SCHEMA_VERSION:
            raise ValueError(
                f"unknown schema_version {value!r}; this build understands {SCHEMA_VERSION}"
            )
        return value

    def subject(self) -> str:
        return self.subject_pattern.format(
            namespace=self.deployment.namespace, name=self.deployment.name
        )

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", by_alias=True))

    @classmethod
    def from_json(cls, body: bytes, default_id: str | None = None) -> Self:
        """Parse and validate a body; raises ``ValueError`` (or pydantic's subclass) if invalid.

        ``default_id`` names a body typed without an ``id`` (with ``nats pub``, say) by where it
        sits in the stream, so that a redelivery gets the same id and deduplicates downstream.
        """
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        if default_id is not None and "id" not in data:
            data["id"] = default_id
        return cls.model_validate(data)


class MetricSnapshot(Envelope):
    """What the collector saw of one deployment over one window."""

    subject_pattern: ClassVar[str] = METRICS_SUBJECT
    source: str = Field(default="nats", max_length=64, description="prometheus, scrape, trace, ...")
    stale: bool = Field(default=False, description="true when the source could not be read")
    num_requests: Observed | None = Field(
        default=None, description="requests in the window (increase of the counter), not a rate"
    )
    isl_avg: Observed | None = Field(default=None, description="mean input tokens per request")
    osl_avg: Observed | None = Field(default=None, description="mean output tokens per request")
    isl_p90: Observed | None = Field(default=None, description="90th pct input tokens")
    osl_p90: Observed | None = Field(default=None, description="90th pct output tokens")
    ttft_avg_s: Observed | None = None
    itl_avg_s: Observed | None = None
    request_duration_avg_s: Observed | None = None
    ttft_p90_s: Observed | None = None
    itl_p90_s: Observed | None = None
    ttft_p99_s: Observed | None = None
    itl_p99_s: Observed | None = None
    requests_running: Observed | None = Field(default=None, description="requests in flight")
    requests_waiting: Observed | None = Field(default=None, description="requests queued")
    kv_cache_usage: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    prefill_workers: ReplicaCount | None = None
    decode_workers: ReplicaCount | None = None
    gaps: dict[str, Annotated[str, Field(max_length=512)]] = Field(
        default_factory=dict, description="field -> why it is null"
    )

    @field_validator("gaps")
    @classmethod
    def _bounded_gaps(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 64:
            raise ValueError("gaps has more than 64 entries")
        return value


class ForecastStep(_Frozen):
    window_end: EpochSeconds
    num_requests: NonNegative
    num_requests_upper: NonNegative
    isl_avg: NonNegative
    isl_avg_upper: NonNegative
    osl_avg: NonNegative
    osl_avg_upper: NonNegative
    # The spread within a window, when the collector reports it: a burst of long prompts
    # breaks TTFT while the mean looks calm.
    isl_p90: NonNegative | None = None
    isl_p90_upper: NonNegative | None = None
    osl_p90: NonNegative | None = None
    osl_p90_upper: NonNegative | None = None

    @model_validator(mode="after")
    def _upper_not_below_point(self) -> Self:
        for point in ("num_requests", "isl_avg", "osl_avg", "isl_p90", "osl_p90"):
            value, upper = getattr(self, point), getattr(self, f"{point}_upper")
            if (value is None) != (upper is None):
                raise ValueError(f"{point} and {point}_upper come together or not at all")
            if value is not None and upper < value:
                raise ValueError(f"{point}_upper is below {point}")
        return self


class LoadForecast(Envelope):
    """Predicted load for the next steps, up to the horizon, of one deployment."""

    subject_pattern: ClassVar[str] = FORECAST_SUBJECT
    model: str = Field(max_length=64, description="predictor that produced the steps")
    fallback: str | None = Field(
        default=None, max_length=512, description="why the configured model was not used"
    )
    fit_s: NonNegative = Field(default=0.0, description="time spent fitting, seconds")
    steps: list[ForecastStep] = Field(min_length=1, max_length=10_000)
    observed: MetricSnapshot | None = Field(
        default=None, description="the snapshot this forecast was made from (for corrections)"
    )


class ReplicaTarget(Envelope):
    """How many prefill and decode replicas a deployment should have, and why."""

    subject_pattern: ClassVar[str] = TARGET_SUBJECT
    policy: str = Field(max_length=64)
    prefill_replicas: ReplicaCount
    decode_replicas: ReplicaCount
    forecast_id: str | None = Field(default=None, max_length=128)
    explanation: dict[str, Any] = Field(default_factory=dict)


class Outcome(StrEnum):
    APPLIED = "applied"
    UNCHANGED = "unchanged"
    DRY_RUN = "dry-run"
    REFUSED = "refused"
    FAILED = "failed"


class RoleChange(_Frozen):
    from_: ReplicaCount | None = Field(alias="from", description="replicas before")
    to: ReplicaCount = Field(description="replicas asked for")
    ready: ReplicaCount | None = Field(default=None, description="replicas ready when reported")
    via: str | None = Field(
        default=None, max_length=512,
        description="what was written for this role: the object and subresource (e.g. "
        "DynamoGraphDeploymentScalingAdapter prod/llama-decode/scale), or the subject")


class ScaleEvent(Envelope):
    """What the actuator did with one target."""

    subject_pattern: ClassVar[str] = SCALED_SUBJECT
    target_id: str = Field(max_length=128)
    outcome: Outcome
    backend: str = Field(max_length=64)
    reason: str | None = Field(default=None, max_length=4096)
    prefill: RoleChange
    decode: RoleChange

    @field_validator("outcome", mode="before")
    @classmethod
    def _outcome_from_text(cls, value: Any) -> Any:
        # strict mode refuses plain strings for enums; the wire carries strings
        return Outcome(value) if isinstance(value, str) else value


class Rejected(_Frozen):
    """A body that a service refused, with the reason and (the start of) the raw bytes."""

    subject_pattern: ClassVar[str] = REJECTED_SUBJECT
    schema_version: Literal[1] = SCHEMA_VERSION
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    stage: str = Field(description="the service that refused it")
    subject: str = Field(description="where the body was received")
    reason: str
    raw: str = Field(description="the body as text (invalid UTF-8 escaped), truncated")
    raw_size_bytes: int = Field(ge=0)
    truncated: bool
    received_at: float

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


BUS_MESSAGES: dict[str, type[BaseModel]] = {
    "MetricSnapshot": MetricSnapshot,
    "LoadForecast": LoadForecast,
    "ReplicaTarget": ReplicaTarget,
    "ScaleEvent": ScaleEvent,
    "Rejected": Rejected,
}


def deployment_from_subject(subject: str) -> DeploymentKey | None:
    """The deployment key in the last two tokens of a stage subject, if well formed."""
    tokens = subject.split(".")
    if len(tokens) != 4 or tokens[0] != SUBJECT_PREFIX:
        return None
    try:
        return DeploymentKey(namespace=tokens[2], name=tokens[3])
    except ValueError:
        return None


def derived_id(stage: str, source_id: str) -> str:
    """A deterministic id for a message derived from another, so redelivery deduplicates."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"slaplanner:{stage}:{source_id}").hex


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
