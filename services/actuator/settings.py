"""Actuator settings: which backend applies targets, and the hard limits enforced again here."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.messages import MAX_REPLICAS
from shared.service_settings import ServiceSettings


class ActuatorSettings(ServiceSettings):
    backend: Literal["dry-run"] = Field(
        default="dry-run", description="how targets are applied; dry-run only reports"
    )
    min_prefill_replicas: int = Field(default=1, ge=0, le=MAX_REPLICAS,
                                      description="hard floor for prefill workers")
    max_prefill_replicas: int = Field(default=64, ge=0, le=MAX_REPLICAS,
                                      description="hard ceiling for prefill workers")
    min_decode_replicas: int = Field(default=1, ge=0, le=MAX_REPLICAS,
                                     description="hard floor for decode workers")
    max_decode_replicas: int = Field(default=64, ge=0, le=MAX_REPLICAS,
                                     description="hard ceiling for decode workers")
    prefill_engine_num_gpu: int = Field(default=1, ge=1, le=64,
                                        description="GPUs per prefill worker")
    decode_engine_num_gpu: int = Field(default=1, ge=1, le=64,
                                       description="GPUs per decode worker")
    max_total_gpus: int = Field(default=64, ge=1, description="GPU ceiling over both roles")
