"""``python -m services.decider``: turn load forecasts into prefill and decode replica targets."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from services.decider import service
from services.decider.core import Decider
from services.decider.settings import DeciderSettings
from shared import settings as settings_mod
from shared.perf_model import ProfileError
from shared.service import configure_logging, serve


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_mod.parse(
        DeciderSettings, argv, os.environ, prog="slaplanner decider",
        description="Size prefill and decode worker sets from forecasts and a measured profile.",
    )
    configure_logging(settings.log_level)
    try:
        decider = Decider(settings)
    except ProfileError as exc:
        print(f"slaplanner decider: {exc}", file=sys.stderr)
        return 2
    for line in decider.describe():
        logging.getLogger("slaplanner.decider").info("sizing %s", line)
    return asyncio.run(serve("decider", settings, lambda rt: service.run(rt, decider)))


if __name__ == "__main__":
    sys.exit(main())
