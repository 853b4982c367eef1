"""Actuator shell: targets in, scale events out; backend calls run off the event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from services.actuator.core import Actuator
from shared.messages import Envelope, ReplicaTarget
from shared.service import Runtime

log = logging.getLogger("slaplanner.actuator")
CONSUMES = "slaplanner.target.>"


async def run(runtime: Runtime, actuator: Actuator) -> None:
    loop = asyncio.get_running_loop()

    async def on_target(target: ReplicaTarget) -> Iterable[Envelope]:
        event = await loop.run_in_executor(None, actuator.apply, target)
        log.info("%s %s: %s", target.deployment, event.outcome, event.reason)
        return [event]

    await runtime.consume(CONSUMES, ReplicaTarget, on_target)
