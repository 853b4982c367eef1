"""``slaplanner bus setup|check``: the NATS admin's side of the bus layout.

``setup`` creates the streams and every consumer the services use (``shared.bus`` has the
layout), or puts back what differs; with ``--keep-interval-s`` it stays and does so again at that
period, so a nats-server that comes back with an empty store has its streams and consumers again
within that time, while the services (``bus_setup=admin``) wait for them with /readyz failing.
deploy/ runs it beside nats-server, in the NATS pod, as the admin user: the services' users may
create nothing. ``check`` only reports, and exits 1 when something differs or is missing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import Field

from shared import bus
from shared import settings as settings_mod
from shared.service import configure_logging
from shared.service_settings import ServiceSettings
from shared.settings import DurationS

log = logging.getLogger("slaplanner.bus")
USAGE = "usage: slaplanner bus {setup|check} [options]   (slaplanner bus setup --help)"


class BusAdminSettings(ServiceSettings):
    forecaster_replicas: int = Field(
        default=1, ge=1, le=bus.MAX_FORECASTER_REPLICAS,
        description=("forecaster replicas to make durables for: `forecaster` for one, "
                     "`forecaster-0` ... for several (the forecaster's SLAPLANNER_REPLICA_COUNT)"),
    )
    actuator_replicas: int = Field(
        default=1, ge=1, le=bus.MAX_FORECASTER_REPLICAS,
        description=("actuator replicas to make durables for: `actuator` for one, `actuator-0` "
                     "... for several (the actuator's SLAPLANNER_REPLICA_COUNT)"),
    )
    decider_replicas: int = Field(
        default=1, ge=1, le=bus.MAX_FORECASTER_REPLICAS,
        description=("decider replicas to make durables (and history readers) for: `decider` "
                     "for one, `decider-0` ... for several (the decider's "
                     "SLAPLANNER_REPLICA_COUNT)"),
    )
    keep_interval_s: DurationS = Field(
        default=0.0,
        description=("0: set up once and exit; else stay and set up again at this period, "
                     "seconds (a store lost meanwhile is rebuilt within it)"),
    )


async def setup_once(js: JetStreamContext, settings: BusAdminSettings) -> list[str]:
    """Create or put back the streams and the consumers; what was done."""
    done = await bus.update_streams(js, settings)
    done += await bus.update_consumers(js, settings,
                                       bus.pipeline_consumers(settings.forecaster_replicas,
                                                settings.actuator_replicas,
                                                settings.decider_replicas))
    for line in done:
        log.info("%s", line)
    return done


async def check(js: JetStreamContext, settings: BusAdminSettings) -> list[str]:
    """What is missing or differs, one line each (empty: as the layout wants)."""
    found = []
    for config in (bus.stream_config(settings), bus.decisions_stream_config(settings)):
        try:
            info = await js.stream_info(str(config.name))
        except NotFoundError:
            found.append(f"stream {config.name} is missing")
            continue
        found += [f"stream {config.name}: {d}"
                  for d in bus.stream_differences(info.config, config)]
    for spec in bus.pipeline_consumers(settings.forecaster_replicas,
                                                settings.actuator_replicas,
                                                settings.decider_replicas):
        try:
            consumer = await js.consumer_info(settings.stream_name, spec.name)
        except NotFoundError:
            found.append(f"consumer {spec.name} is missing")
            continue
        found += [f"consumer {spec.name}: {d}"
                  for d in bus.consumer_differences(consumer.config, spec)]
    return found


async def keep(nc: NATS, settings: BusAdminSettings, stop: asyncio.Event) -> None:
    js = nc.jetstream(timeout=bus.API_TIMEOUT_S)
    while not stop.is_set():
        try:
            await setup_once(js, settings)
        except (bus.BusError, TimeoutError, nats.errors.Error) as exc:
            log.error("bus setup: %s", str(exc) or type(exc).__name__)
        try:
            await asyncio.wait_for(stop.wait(), timeout=settings.keep_interval_s)
        except TimeoutError:
            continue


async def run(command: str, settings: BusAdminSettings) -> int:
    try:
        nc = await bus.connect(settings, "bus-admin")
    except bus.BusError as exc:
        log.error("%s", exc)
        return 1
    js = nc.jetstream(timeout=bus.API_TIMEOUT_S)
    try:
        if command == "check":
            found = await check(js, settings)
            for line in found:
                print(line)
            print("bus layout as configured" if not found else f"{len(found)} difference(s)")
            return 1 if found else 0
        if settings.keep_interval_s > 0:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await keep(nc, settings, stop)
            return 0
        done = await setup_once(js, settings)
        print("\n".join(done) if done else "bus layout already as configured")
        return 0
    except (bus.BusError, TimeoutError, nats.errors.Error) as exc:
        log.error("bus %s: %s", command, str(exc) or type(exc).__name__)
        return 1
    finally:
        await nc.drain()


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] not in ("setup", "check"):
        print(USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    settings = settings_mod.parse(
        BusAdminSettings, list(argv[1:]), os.environ, prog=f"slaplanner bus {argv[0]}",
        description=("Create (setup) or verify (check) slaplanner's JetStream streams and "
                     "consumers, as the NATS admin."),
    )
    configure_logging(settings.log_level)
    return asyncio.run(run(argv[0], settings))
