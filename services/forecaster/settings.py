"""Forecaster settings (minimal; the predictor work extends it)."""

from __future__ import annotations

from pydantic import Field

from shared.service_settings import ServiceSettings


class ForecasterSettings(ServiceSettings):
    predictor: str = Field(default="constant", description="load predictor")
    horizon_steps: int = Field(default=3, ge=1, le=1000, description="steps forecast ahead")
