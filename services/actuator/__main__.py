"""``python -m services.actuator``: apply replica targets to the worker sets."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from services.actuator import service
from services.actuator.core import Actuator, DryRunWorkerSets
from services.actuator.settings import ActuatorSettings
from shared import settings as settings_mod
from shared.service import configure_logging, serve


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_mod.parse(
        ActuatorSettings, argv, os.environ, prog="slaplanner actuator",
        description="Apply replica targets to prefill and decode worker sets, safely.",
    )
    configure_logging(settings.log_level)
    actuator = Actuator(settings, DryRunWorkerSets())
    return asyncio.run(serve("actuator", settings, lambda rt: service.run(rt, actuator)))


if __name__ == "__main__":
    sys.exit(main())
