"""Collector settings: where metrics come from, for which deployment, how often."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from services.collector import promql
from shared.messages import DNS_LABEL
from shared.service_settings import DEFAULT_HTTP_PORTS, ServiceSettings, http_port_field
from shared.settings import CommaList, DurationS, ItlTargetS, TtftTargetS


class CollectorSettings(ServiceSettings):
    http_port: int = http_port_field(DEFAULT_HTTP_PORTS["collector"])
    source: Literal["scrape", "prometheus", "trace"] = Field(
        default="scrape",
        description="scrape: read /metrics endpoints directly; prometheus: query a Prometheus "
        "server (many deployments); trace: replay a recorded trace in virtual time (the demo)",
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
        description="frontend /metrics URLs, comma separated ('' for none); samples are summed "
        "over them",
    )
    scrape_prefill_urls: CommaList = Field(
        default_factory=list,
        description="prefill workers' /metrics URLs, comma separated; a dns+http://name:port/path "
        "URL is one per address the name resolves to (a headless Service: one per pod)",
    )
    scrape_decode_urls: CommaList = Field(
        default_factory=list,
        description="decode workers' (or an aggregated deployment's workers') /metrics URLs, as "
        "--scrape-prefill-urls",
    )
    scrape_labels: CommaList = Field(
        default_factory=list,
        description="only the frontends' samples with these labels, e.g. model=llama (comma "
        "separated k=v; the model's case is ignored)",
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

    # --- what every source measures against ---
    ttft_target_s: TtftTargetS = Field(
        default=0.5,
        description="TTFT target: the snapshot reports the share of first tokens within it "
        "(exact where it is a bucket bound of the TTFT histogram, e.g. vLLM's 0.25/0.5/1 s)",
        json_schema_extra={"flag_aliases": ["--ttft-target"]},
    )
    itl_target_s: ItlTargetS = Field(
        default=0.05,
        description="ITL target: the snapshot reports the share of requests whose mean ITL is "
        "within it (exact where it is a bucket bound, e.g. vLLM's 25/50 ms)",
        json_schema_extra={"flag_aliases": ["--itl-target"]},
    )
    arrival_bin_s: DurationS = Field(
        default=1.0, gt=0.0,
        description="the finest bin arrivals are counted in for the burstiness fields; where "
        "the arrival counter is scraped less often, the smallest multiple of it that divides "
        "the window and holds a scrape per bin (the snapshot's arrival_bin_s; its peaks are "
        "lower bounds above 1 s); the scrape source scrapes the arrival counter this often",
    )

    # --- source "prometheus" ---
    prometheus_url: str = Field(
        default="http://127.0.0.1:9090", description="Prometheus HTTP API base URL",
        json_schema_extra={"flag_aliases": ["--prometheus-endpoint"]},
    )
    prometheus_timeout_s: DurationS = Field(
        default=10.0, gt=0.0,
        description="per query; a query slower than this makes the window stale",
    )
    prometheus_query_delay_s: DurationS = Field(
        default=5.0,
        description="read a window this long after its end (still evaluated at its end), so "
        "the last scrape before the end has been ingested; at least the scrape duration",
    )
    prometheus_bearer_token_file: str | None = Field(
        default=None, description="file with a bearer token for Prometheus (re-read each window)"
    )
    prometheus_ca_file: str | None = Field(
        default=None, description="CA bundle to verify Prometheus' TLS certificate"
    )
    prometheus_concurrency: int = Field(
        default=4, ge=1, le=64, description="queries in flight at once"
    )
    dialect: Literal["auto", "dynamo", "dynamo-legacy", "vllm"] = Field(
        default="auto",
        description="metric names: dynamo (dynamo_frontend_*), dynamo-legacy "
        "(nv_llm_http_service_*), vllm (vllm:* per worker), or auto (the first one present)",
    )
    window_method: Literal["exact", "increase"] = Field(
        default="exact",
        description="exact: counter at the window's end minus its last sample before the "
        "window (windows tile); increase: PromQL increase(), extrapolated, as Dynamo's planner",
    )
    selector: str = Field(
        default="",
        description="PromQL label matchers of the deployment (or of every discovered one), "
        'without braces, e.g. model="llama",dynamo_namespace="prod"',
    )
    prefill_selector: str = Field(
        default='dynamo_component="prefill"',
        description="label matcher of prefill worker series (Dynamo's vLLM prefill component)",
    )
    decode_selector: str = Field(
        default='dynamo_component=~"backend|decode"',
        description="label matcher of decode worker series (Dynamo's vLLM decode component)",
    )
    prefill_fallback_selector: str = Field(
        default='role="prefill"',
        description="label matcher of prefill worker series that lack --prefill-selector's "
        "labels (Dynamo before 1.0 does not label engine metrics with dynamo_component; deploy's "
        "scrape config sets role from the pod label nvidia.com/dynamo-sub-component-type or "
        "slaplanner.io/role); '' for none",
    )
    decode_fallback_selector: str = Field(
        default='role="decode"',
        description="label matcher of decode worker series that lack --decode-selector's "
        "labels, as --prefill-fallback-selector; '' for none",
    )
    discover_labels: CommaList = Field(
        default_factory=list,
        description="discover deployments from these label values: one label (the name; "
        "namespace from --namespace) or two (namespace,name), e.g. model or namespace,deployment",
    )
    forget_after_s: DurationS = Field(
        default=600.0,
        description="a discovered deployment unseen this long is no longer published",
    )
    queries_file: str | None = Field(
        default=None,
        description="TOML file overriding metric names and queries, and listing static "
        "deployments (see docs/collector.md)",
    )
    max_backlog_windows: int = Field(
        default=10, ge=1,
        description="if the collector falls further behind than this many windows, the oldest "
        "are published stale instead of read; after a restart, at most this many windows missed "
        "while it was down are read (back-filled), older ones are given up",
    )

    @field_validator("selector", "prefill_selector", "decode_selector",
                     "prefill_fallback_selector", "decode_fallback_selector")
    @classmethod
    def _matchers(cls, value: str) -> str:
        return promql.check_matchers(value)

    @field_validator("discover_labels")
    @classmethod
    def _labels(cls, value: list[str]) -> list[str]:
        if len(value) > 2:
            raise ValueError("one label (the name) or two (namespace,name)")
        for label in value:
            if not promql.LABEL_NAME.match(label):
                raise ValueError(f"{label!r} is not a Prometheus label name")
        return value

    @field_validator("scrape_labels")
    @classmethod
    def _pairs(cls, value: list[str]) -> list[str]:
        for item in value:
            label, sep, _ = item.partition("=")
            if not sep or not promql.LABEL_NAME.match(label.strip()):
                raise ValueError(f"{item!r} is not label=value, e.g. model=llama")
        return value

    def scrape_selector(self) -> str:
        """--scrape-labels as label matchers."""
        pairs = (item.split("=", 1) for item in self.scrape_labels)
        return ",".join(f"{k.strip()}={promql.quote(v.strip())}" for k, v in pairs)
