"""Settings of the forecaster: which predictor, how far ahead, how sure, how much memory."""

from __future__ import annotations

import math
from typing import Literal, Self, get_args

from pydantic import Field, field_validator, model_validator

from shared.partition import ReplicaIndex
from shared.service_settings import DEFAULT_HTTP_PORTS, ServiceSettings, http_port_field
from shared.settings import CommaList, DurationS

PredictorName = Literal[
    "auto", "constant", "arima", "kalman", "holt-winters", "horizon-smoothing", "prophet"
]
PREDICTOR_NAMES: tuple[str, ...] = get_args(PredictorName)

# A step of a forecast is at most about 400 bytes of JSON (eleven numbers and their names); 2,000
# of them leave room under NATS's default 1 MiB payload for the envelope and the observed snapshot.
MAX_FORECAST_STEPS = 2000


class ForecasterSettings(ServiceSettings):
    http_port: int = http_port_field(DEFAULT_HTTP_PORTS["forecaster"])
    predictor: PredictorName = Field(
        default="auto",
        description=(
            "predictor of every deployment without an override: auto, constant, arima, kalman, "
            "holt-winters, horizon-smoothing or prophet (needs pip install 'slaplanner[prophet]'); "
            "auto, the default, picks per deployment and series the best of constant, "
            "smoothing, ARIMA and a seasonal model with the period found in the history by "
            "rolling backtest, at each refit (docs/benchmarks.md, Forecaster)"
        ),
    )
    predictor_overrides: CommaList = Field(
        default_factory=list,
        description="per-deployment predictor, comma separated namespace/name=predictor entries",
    )
    horizon_s: DurationS = Field(
        default=300.0,
        gt=0.0,
        description=(
            "how far ahead to forecast, seconds; at least the worker startup time, so that a "
            "worker asked for now is planned for the load it will meet when ready (5 min)"
        ),
    )
    max_forecast_steps: int = Field(
        default=600,
        ge=1,
        le=MAX_FORECAST_STEPS,
        description=(
            "steps a forecast publishes at most; when the horizon holds more windows (a 300 s "
            "horizon at 0.1 s windows is 3,000), each step covers several windows and carries "
            "their largest values, so that every forecast fits the bus's 1 MiB payload (a step "
            "is at most about 400 bytes; at most 2,000 steps)"
        ),
    )
    confidence: float = Field(
        default=0.9,
        gt=0.5,
        lt=1.0,
        description="probability that the load stays under the upper quantile of each step",
    )
    history_points: int = Field(
        default=1440,
        ge=2,
        le=100_000,
        description=(
            "points kept per deployment and series (1440 = one day at 60 s); the seasonal "
            "predictor needs two seasons (2880 points for a daily season at 60 s)"
        ),
    )
    fit_points: int = Field(
        default=720,
        ge=8,
        le=100_000,
        description=(
            "latest points a model is refitted on; bounds the cost of a refit, while the cheap "
            "update between refits still sees every point"
        ),
    )
    refit_interval_s: DurationS = Field(
        default=6 * 3600.0,
        description=(
            "refit a model's parameters (and ARIMA's order) at most this often, seconds of "
            "window time (6 h); it also refits whenever its history has doubled since the last "
            "fit, so a young model is not stuck with what it learnt from a dozen points"
        ),
    )
    warm_start_trace: str | None = Field(
        default=None,
        description=(
            "recorded trace (Mooncake jsonl or Azure CSV) that fills the history of a deployment "
            "seen for the first time, instead of forecasting blind for its first hour"
        ),
    )
    warm_start_window_s: DurationS = Field(
        default=60.0,
        gt=0.0,
        description="window the warm-start trace is bucketed into; use the collector's interval",
    )
    rebuild_max_age_s: DurationS = Field(
        default=86_400.0,
        description="on start, rebuild histories from the stream's snapshots up to this old",
    )
    idle_forget_s: DurationS = Field(
        default=6 * 3600.0,
        ge=0.0,
        description=(
            "forget a deployment (its history and models) once its last snapshot is this far "
            "behind the newest one, seconds of window time (6 h), so that memory follows the "
            "deployments that exist rather than every name ever seen; 0 never forgets. A "
            "deployment that comes back starts afresh, from the warm-start trace if one is set"
        ),
    )

    replica_count: int = Field(
        default=1,
        ge=1,
        le=1024,
        description=(
            "forecaster replicas that share the deployments; each deployment (its history and "
            "its forecasts) belongs to exactly one, chosen by a stable hash of namespace/name. "
            "Every replica must be given the same count (docs/forecaster.md, Replicas)"
        ),
    )
    replica_index: ReplicaIndex = Field(
        default=0,
        description=(
            "this replica's index, 0 to replica_count - 1; a StatefulSet pod name such as "
            "slaplanner-forecaster-2 is read as its ordinal, so the pod's own name can be passed"
        ),
    )
    fit_threads: int = Field(
        default=4,
        ge=1,
        le=256,
        description=(
            "threads that fit and forecast side by side, each on a different deployment, so a "
            "slow refit of one deployment does not hold up the others"
        ),
    )
    max_in_flight: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description=(
            "snapshots taken from the bus and not yet forecast and acked, at most; bounds the "
            "memory and the redelivery after a crash (one deployment's are forecast in order)"
        ),
    )

    @model_validator(mode="after")
    def _index_within_count(self) -> Self:
        if self.replica_index >= self.replica_count:
            raise ValueError(
                f"replica_index {self.replica_index} is not below replica_count "
                f"{self.replica_count}"
            )
        return self

    def durable_name(self) -> str:
        """This replica's durable consumer: one per index, so a restarted replica resumes
        where it stopped; a single forecaster keeps the historic name."""
        return "forecaster" if self.replica_count == 1 else f"forecaster-{self.replica_index}"

    @field_validator("predictor_overrides")
    @classmethod
    def _overrides_well_formed(cls, entries: list[str]) -> list[str]:
        parse_overrides(entries)
        return entries

    def overrides(self) -> dict[str, str]:
        """``{"namespace/name": predictor}`` from ``predictor_overrides``."""
        return parse_overrides(self.predictor_overrides)

    def horizon_steps(self, window_s: float) -> int:
        """Windows of ``window_s`` that cover the horizon (at least one)."""
        # The small tolerance keeps 300 / 60 at 5 steps despite float rounding.
        return max(1, math.ceil(self.horizon_s / window_s - 1e-9))

    def windows_per_step(self, window_s: float) -> int:
        """Windows each published step covers, so that at most ``max_forecast_steps`` steps
        cover the horizon."""
        return math.ceil(self.horizon_steps(window_s) / self.max_forecast_steps)


def parse_overrides(entries: list[str]) -> dict[str, str]:
    overrides: dict[str, str] = {}
    for entry in entries:
        deployment, sep, predictor = (part.strip() for part in entry.partition("="))
        namespace, slash, name = deployment.partition("/")
        if not sep or not slash or not namespace or not name:
            raise ValueError(f"{entry!r} is not namespace/name=predictor")
        if predictor not in PREDICTOR_NAMES:
            raise ValueError(
                f"{entry!r}: unknown predictor {predictor!r}; one of {', '.join(PREDICTOR_NAMES)}"
            )
        overrides[deployment] = predictor
    return overrides
