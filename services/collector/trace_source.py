"""Placeholder until the trace loaders land."""
from __future__ import annotations

from services.collector.settings import CollectorSettings
from shared.service import Runtime


async def run(runtime: Runtime, settings: CollectorSettings) -> None:
    raise NotImplementedError
