"""``python -m services.collector``: publish one metric snapshot per deployment per interval."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from services.collector import scrape, trace_source
from services.collector.settings import CollectorSettings
from shared import settings as settings_mod
from shared.service import Runtime, configure_logging, serve


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_mod.parse(
        CollectorSettings, argv, os.environ, prog="slaplanner collector",
        description="Read serving metrics and publish one MetricSnapshot per interval.",
    )
    configure_logging(settings.log_level)

    async def run(runtime: Runtime) -> None:
        if settings.source == "trace":
            await trace_source.run(runtime, settings)
        else:
            await scrape.run(runtime, settings)

    return asyncio.run(serve("collector", settings, run))


if __name__ == "__main__":
    sys.exit(main())
