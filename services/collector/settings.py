"""Collector settings: where metrics come from, for which deployment, how often."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.messages import DNS_LABEL
from shared.service_settings import ServiceSettings
from shared.settings import CommaList, DurationS


class CollectorSettings(ServiceSettings):
    source: Literal["scrape", "trace"] = Field(
        default="scrape",
        description="scrape: read /metrics endpoints directly; trace: replay a recorded trace "
        "in virtual time (the demo)",
    )
    namespace: str = Field(default="default", pattern=DNS_LABEL,
                           description="namespace of the deployment the metrics describe")
    deployment: str = Field(default="llm", pattern=DNS_LABEL,
                            description="name of the deployment the metrics describe")
    interval_s: DurationS = Field(
        default=60.0, gt=0.0, description="window length; ticks align to its multiples",
        json_schema_extra={"flag_aliases": ["--adjustment-interval"]},
    )
    scrape_urls: CommaList = Field(
        default_factory=lambda: ["http://127.0.0.1:8000/metrics"],
        description="frontend /metrics URLs, comma separated; samples are summed over them",
    )
    scrape_labels: CommaList = Field(
        default_factory=list,
        description="only samples with these labels, e.g. model=llama (comma separated k=v)",
    )
    scrape_timeout_s: DurationS = Field(default=5.0, gt=0.0, description="per-URL timeout")
    trace_file: str | None = Field(
        default=None, description="trace to replay with --source trace (Mooncake jsonl, Azure CSV)"
    )
    trace_speedup: float = Field(default=1.0, gt=0.0, description="divide arrival times by this")
    trace_max_intervals: int = Field(default=0, ge=0, description="stop after N windows (0: all)")
    trace_start_epoch_s: float = Field(
        default=1_700_000_000.0, ge=0.0, description="virtual epoch time of the trace's start"
    )
    trace_pace_timeout_s: DurationS = Field(
        default=30.0, description="how long to wait for a window's ScaleEvent before going on"
    )
    profile: str | None = Field(
        default=None, description="profile for the replayed latencies (default: bundled H200)"
    )

    def label_filter(self) -> dict[str, str]:
        pairs = (item.split("=", 1) for item in self.scrape_labels)
        return {k.strip(): v.strip() for k, v in pairs}
