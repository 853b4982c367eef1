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
# The shortest window: the forecaster predicts every window up to the horizon, so a window of
# microseconds would ask for millions of them (minutes of CPU, gigabytes); at 0.1 s the default
# 300 s horizon is 3,000 windows, published as at most max_forecast_steps (600) steps, 0.2 MB.
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

    # the contract versions of this message that this build reads
    schema_versions: ClassVar[tuple[int, ...]] = (SCHEMA_VERSION,)

    @field_validator("schema_version", mode="before")
    @classmethod
    def _known_version(cls, value: Any) -> Any:
        if value not in cls.schema_versions:
            known = " and ".join(str(v) for v in cls.schema_versions)
            raise ValueError(f"unknown schema_version {value!r}; this build understands {known}")
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


class ShareMethod(StrEnum):
    """How a share of requests under a latency target was worked out."""

    BUCKET_EDGE = "bucket_edge"  # the target is a bucket bound of the histogram: exact
    INTERPOLATED = "interpolated"  # linear inside the bucket that holds the target
    BEYOND_BUCKETS = "beyond_buckets"  # target above the last finite bound: a lower bound
    PER_REQUEST = "per_request"  # every request's latency known (simulator, replay): exact


class ArrivalSignal(StrEnum):
    """When the counter the arrival statistics were read from counts a request."""

    REQUEST_START = "request_start"  # when the frontend accepts it: the arrivals themselves
    FIRST_TOKEN = "first_token"  # at its first token: arrivals delayed by their TTFT
    REQUEST_END = "request_end"  # when it ends: completions, smoothed by the durations' spread


Share = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]

# The fields a MetricSnapshot gained in schema version 2 (planning v2): a body of version 1 may
# not carry them, so that a v1 body means exactly what it meant.
SNAPSHOT_V2_FIELDS = (
    "arrival_bin_s", "arrival_dispersion", "arrivals_peak_1s", "arrivals_peak_10s",
    "arrival_peaks_exact", "arrival_signal", "isl_p50", "isl_p99", "queue_time_avg_s",
    "queue_time_p90_s",
    "prefill_time_avg_s", "prefill_time_p90_s", "decode_time_avg_s",
    "ttft_target_s", "ttft_under_target_share", "ttft_target_bucket_s", "ttft_share_method",
    "itl_target_s", "itl_under_target_share", "itl_target_bucket_s", "itl_share_method",
    "prefill_tokens_pending", "requests_before_first_token", "requests_failed",
)


class MetricSnapshot(Envelope):
    """What the collector saw of one deployment over one window.

    Version 2 adds what one mean per window hides (docs/collector.md): how bursty arrivals were
    inside the window, how much of TTFT was queueing and how much compute, what share of
    requests met each target, and the prefill work still ahead. A version 1 body is read as it
    always was (its new fields are null).
    """

    subject_pattern: ClassVar[str] = METRICS_SUBJECT
    schema_versions: ClassVar[tuple[int, ...]] = (1, 2)
    schema_version: Literal[1, 2] = Field(  # type: ignore[assignment]
        default=2, description="contract version: 2 (1 is still read; its new fields are null)"
    )
    source: str = Field(default="nats", max_length=64, description="prometheus, scrape, trace, ...")
    stale: bool = Field(default=False, description="true when the source could not be read")
    num_requests: Observed | None = Field(
        default=None, description="requests in the window (increase of the counter), not a rate; "
        "from version 2 without the failed ones (requests_failed)"
    )
    requests_failed: Observed | None = Field(
        default=None, description="requests that failed in the window (Dynamo status=\"error\"), "
        "counted apart from num_requests"
    )
    isl_avg: Observed | None = Field(default=None, description="mean input tokens per request")
    osl_avg: Observed | None = Field(default=None, description="mean output tokens per request")
    isl_p50: Observed | None = Field(default=None, description="median input tokens")
    isl_p90: Observed | None = Field(default=None, description="90th pct input tokens")
    isl_p99: Observed | None = Field(default=None, description="99th pct input tokens")
    osl_p90: Observed | None = Field(default=None, description="90th pct output tokens")
    ttft_avg_s: Observed | None = None
    itl_avg_s: Observed | None = None
    request_duration_avg_s: Observed | None = None
    ttft_p90_s: Observed | None = None
    itl_p90_s: Observed | None = None
    ttft_p99_s: Observed | None = None
    itl_p99_s: Observed | None = None

    # --- arrivals inside the window ---
    arrival_bin_s: Positive | None = Field(
        default=None, le=86_400.0,
        description="width of the bins the arrival statistics were counted in, seconds (1: "
        "per-second counts; more when the source is scraped less often)",
    )
    arrival_dispersion: Observed | None = Field(
        default=None, description="index of dispersion (variance / mean) of the arrival counts "
        "per bin in the window: 1 for Poisson arrivals, above 1 when bursty",
    )
    arrivals_peak_1s: Observed | None = Field(
        default=None, description="most arrivals in one second of the window",
    )
    arrivals_peak_10s: Observed | None = Field(
        default=None, description="most arrivals in ten consecutive seconds of the window "
        "(in steps of arrival_bin_s)",
    )
    arrival_peaks_exact: bool | None = Field(
        default=None, description="false when the bins are coarser than the peaks' spans: the "
        "peaks are then lower bounds (the busiest bin's count scaled to the span)",
    )
    arrival_signal: ArrivalSignal | None = Field(
        default=None, description="what the arrival statistics count: request_start (requests "
        "as they arrive), first_token (first tokens: arrivals delayed by their TTFT) or "
        "request_end (completions: arrivals smoothed by the spread of request durations)",
    )

    # --- where TTFT went (engine view) ---
    queue_time_avg_s: Observed | None = Field(
        default=None, description="mean time a request waited in a prefill engine's queue")
    queue_time_p90_s: Observed | None = None
    prefill_time_avg_s: Observed | None = Field(
        default=None, description="mean prefill compute time of a request (engine busy on it)")
    prefill_time_p90_s: Observed | None = None
    decode_time_avg_s: Observed | None = Field(
        default=None, description="mean decode time of a request on its decode engine")

    # --- the SLA as observed ---
    ttft_target_s: Positive | None = Field(
        default=None, description="the TTFT target the share below was measured against")
    ttft_under_target_share: Share | None = Field(
        default=None, description="share of the window's first tokens with TTFT <= target")
    ttft_target_bucket_s: Positive | None = Field(
        default=None, description="the histogram bucket bound that stood for the target "
        "(equal to it when the share is exact)")
    ttft_share_method: ShareMethod | None = None
    itl_target_s: Positive | None = Field(
        default=None, description="the ITL target the share below was measured against")
    itl_under_target_share: Share | None = Field(
        default=None, description="share of the requests finished in the window whose mean "
        "ITL <= target")
    itl_target_bucket_s: Positive | None = None
    itl_share_method: ShareMethod | None = None

    # --- state at the window's end ---
    requests_running: Observed | None = Field(default=None, description="requests in flight")
    requests_waiting: Observed | None = Field(
        default=None, description="requests in the engines' queues at the window's end (vLLM "
        "num_requests_waiting summed over the workers); version 1 bodies from a Dynamo frontend "
        "carried requests_before_first_token here"
    )
    requests_before_first_token: Observed | None = Field(
        default=None, description="requests the frontend holds that have not had their first "
        "token (queued or in prefill: Dynamo's queued_requests gauge); not an engine queue"
    )
    prefill_tokens_pending: Observed | None = Field(
        default=None, description="input tokens of requests whose prefill has not finished "
        "(queued or being computed) at the window's end"
    )
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

    @field_validator("ttft_share_method", "itl_share_method", mode="before")
    @classmethod
    def _method_from_text(cls, value: Any) -> Any:
        # strict mode refuses plain strings for enums; the wire carries strings
        return ShareMethod(value) if isinstance(value, str) else value

    @field_validator("arrival_signal", mode="before")
    @classmethod
    def _signal_from_text(cls, value: Any) -> Any:
        return ArrivalSignal(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _v1_means_v1(self) -> Self:
        if self.schema_version == 1:
            extra = [f for f in SNAPSHOT_V2_FIELDS if getattr(self, f) is not None]
            if extra:
                raise ValueError(f"{', '.join(extra)} need schema_version 2")
        return self


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


class ModelSelection(_Frozen):
    """Which model a selecting predictor (``auto``) chose for one series, and how it did in the
    backtest that chose it."""

    model: str = Field(
        max_length=64,
        description=(
            "the candidate chosen: constant, smoothing, arima(p,d,q), damped-trend or seasonal"
        ),
    )
    period_s: Positive | None = Field(
        default=None, description="the season the chosen model follows, seconds; null if none"
    )
    backtest_mae: NonNegative = Field(
        description=(
            "its mean absolute error in the backtest over every step up to the horizon, in the "
            "series' unit (requests per window, tokens)"
        )
    )
    backtest_mae_constant: NonNegative | None = Field(
        default=None, description="the same for constant (next = last), the reference"
    )
    backtest_origins: int = Field(ge=0, le=1_000_000, description="forecast origins scored")


class LoadForecast(Envelope):
    """Predicted load for the next steps, up to the horizon, of one deployment."""

    subject_pattern: ClassVar[str] = FORECAST_SUBJECT
    model: str = Field(max_length=64, description="predictor that produced the steps")
    fallback: str | None = Field(
        default=None, max_length=512, description="why the configured model was not used"
    )
    fit_s: NonNegative = Field(default=0.0, description="time spent fitting, seconds")
    steps: list[ForecastStep] = Field(min_length=1, max_length=10_000)
    step_s: Positive | None = Field(
        default=None,
        description=(
            "seconds each step covers: window_s, or a whole multiple of it when the horizon "
            "holds more windows than the forecaster publishes steps; such a step carries the "
            "largest value of its windows, still per window_s (null: window_s)"
        ),
    )
    selection: dict[str, ModelSelection] | None = Field(
        default=None,
        description=(
            "per series (num_requests, isl_avg, ...), the model a selecting predictor chose and "
            "its backtest error; null for a predictor that does not select"
        ),
    )
    observed: MetricSnapshot | None = Field(
        default=None, description="the snapshot this forecast was made from (for corrections)"
    )

    @field_validator("selection")
    @classmethod
    def _bounded_selection(
        cls, value: dict[str, ModelSelection] | None
    ) -> dict[str, ModelSelection] | None:
        if value is not None and (len(value) > 16 or any(len(key) > 64 for key in value)):
            raise ValueError("selection has more than 16 series or a series name over 64 chars")
        return value


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
