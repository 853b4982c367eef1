"""``python -m services.collector``: publish one metric snapshot per deployment per interval."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from services.collector import prometheus_source, query_config, scrape, trace_source
from services.collector.settings import CollectorSettings
from shared import settings as settings_mod
from shared.service import Runtime, configure_logging, serve


def load_queries(settings: CollectorSettings) -> query_config.QueryConfig:
    """The queries file, checked before anything starts; exits 2 naming the file and field."""
    try:
        config = (query_config.load(settings.queries_file) if settings.queries_file
                  else query_config.QueryConfig())
    except query_config.QueryConfigError as exc:
        print(f"invalid queries file: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if config.deployments and settings.discover_labels:
        print(f"{settings.queries_file}: [[deployments]] and --discover-labels exclude each "
              "other: list deployments, or discover them, not both", file=sys.stderr)
        raise SystemExit(2)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_mod.parse(
        CollectorSettings, argv, os.environ, prog="slaplanner collector",
        description="Read serving metrics and publish one MetricSnapshot per interval.",
    )
    configure_logging(settings.log_level)
    config = load_queries(settings) if settings.source == "prometheus" else None

    async def run(runtime: Runtime) -> None:
        if settings.source == "trace":
            await trace_source.run(runtime, settings)
        elif config is not None:
            await prometheus_source.run(runtime, settings, config)
        else:
            await scrape.run(runtime, settings)

    return asyncio.run(serve("collector", settings, run))


if __name__ == "__main__":
    sys.exit(main())
