"""``python -m services.forecaster``: predict each deployment's load for the coming intervals."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from services.forecaster import predictors, service
from services.forecaster.core import Forecaster
from services.forecaster.settings import ForecasterSettings
from shared import settings as settings_mod
from shared.service import configure_logging, serve


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_mod.parse(
        ForecasterSettings, argv, os.environ, prog="slaplanner forecaster",
        description="Forecast request count, ISL and OSL per deployment from metric snapshots.",
    )
    configure_logging(settings.log_level)
    try:
        forecaster = Forecaster(settings)
    except (predictors.PredictorUnavailable, KeyError) as exc:
        print(f"slaplanner forecaster: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(
        serve("forecaster", settings, lambda rt: service.run(rt, forecaster, settings))
    )


if __name__ == "__main__":
    sys.exit(main())
