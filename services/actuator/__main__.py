"""``python -m services.actuator``: apply replica targets to the worker sets."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from kubernetes.config.config_exception import ConfigException

from services.actuator import service
from services.actuator.config import ConfigError
from services.actuator.settings import ActuatorSettings
from services.actuator.wiring import assemble
from shared import settings as settings_mod
from shared.service import configure_logging, serve


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_mod.parse(
        ActuatorSettings, argv, os.environ, prog="slaplanner actuator",
        description="Apply replica targets to prefill and decode worker sets, safely.",
    )
    configure_logging(settings.log_level)
    publisher = service.NatsPublisher()
    try:
        assembly = assemble(settings, publisher)
    except (ConfigError, ValueError, ConfigException) as exc:
        print(f"slaplanner actuator: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(serve(
        "actuator", settings, lambda rt: service.run(rt, settings, assembly, publisher)))


if __name__ == "__main__":
    sys.exit(main())
