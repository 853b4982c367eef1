"""``slaplanner bus setup|check``: the NATS admin's side of the bus layout.

``setup`` creates the streams and every consumer the services use (``shared.bus`` has the
layout), or puts back what differs; with ``--keep-interval-s`` it stays and does so again at that
period, so a nats-server that comes back with an empty store has its streams and consumers again
within that time, while the services (``bus_setup=admin``) wait for them with /readyz failing.
deploy/ runs it beside nats-server, in the NATS pod, as the admin user: the services' users may
create nothing. ``check`` only reports, and exits 1 when something differs or is missing.

With ``--served-cert-file`` and ``--server-pid-file`` the keep loop also compares the certificate
the server serves with the one mounted from its Secret, and tells nats-server to reload (SIGHUP)
while they differ: cert-manager renews the certificate in the Secret, the kubelet updates the
files, but nats-server reads them only when it starts or reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import Field, model_validator

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
    served_cert_file: str = Field(
        default="",
        description=("the server's certificate as mounted from its Secret (tls.crt): while the "
                     "server serves another one, it is told to reload (with --keep-interval-s "
                     "and --server-pid-file)"),
    )
    server_pid_file: str = Field(
        default="",
        description=("nats-server's pid_file; the reload is a SIGHUP to that process (in a pod, "
                     "shareProcessNamespace lets the bus-admin signal it)"),
    )

    @model_validator(mode="after")
    def _certificate_reload_is_whole(self) -> Self:
        if bool(self.served_cert_file) != bool(self.server_pid_file):
            raise ValueError("SLAPLANNER_SERVED_CERT_FILE and SLAPLANNER_SERVER_PID_FILE go "
                             "together: the certificate to compare and the process to reload")
        if self.served_cert_file and self.keep_interval_s <= 0:
            raise ValueError("the certificate reload runs in the keep loop: set "
                             "SLAPLANNER_KEEP_INTERVAL_S too")
        return self


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


def leaf_certificate(pem_file: Path) -> bytes:
    """The first certificate of a PEM file (the leaf of a chain), DER-encoded."""
    text = pem_file.read_text()
    end_marker = "-----END CERTIFICATE-----"
    if end_marker not in text:
        raise ValueError(f"{pem_file}: no PEM certificate in it")
    return ssl.PEM_cert_to_DER_cert(text[: text.index(end_marker) + len(end_marker)])


async def served_certificate(url: str, timeout_s: float = 5.0) -> bytes:
    """The certificate a nats-server serves at ``url``, DER-encoded. NATS speaks first in plain
    text (its INFO line) and the client then starts TLS; nothing is verified here, since only
    which certificate is served matters, and nothing is sent after the handshake."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 4222
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    async def handshake() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            await reader.readline()
            await writer.start_tls(context)
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            if not der:
                raise ConnectionError(f"{url} served no certificate")
            return bytes(der)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    return await asyncio.wait_for(handshake(), timeout_s)


async def reload_if_renewed(settings: BusAdminSettings) -> bool:
    """Tell nats-server to reload when it serves another certificate than the mounted one;
    whether it was told. Each failure is logged with what to check, and the next round tries
    again: the kubelet updates the server's volume and this one each on its own schedule."""
    url = settings.nats_url[0]
    try:
        mounted = leaf_certificate(Path(settings.served_cert_file))
        served = await served_certificate(url)
    except (OSError, ValueError, ssl.SSLError, TimeoutError) as exc:
        log.error("certificate check of %s against %s: %s", url, settings.served_cert_file,
                  str(exc) or type(exc).__name__)
        return False
    if mounted == served:
        return False
    try:
        pid = int(Path(settings.server_pid_file).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        log.error("nats-server serves another certificate than %s but cannot be told to reload "
                  "(pid file %s: %s); in a pod the StatefulSet needs shareProcessNamespace",
                  settings.served_cert_file, settings.server_pid_file,
                  str(exc) or type(exc).__name__)
        return False
    log.info("nats-server (pid %d) serves another certificate than %s: told it to reload",
             pid, settings.served_cert_file)
    return True


async def keep(nc: NATS, settings: BusAdminSettings, stop: asyncio.Event) -> None:
    js = nc.jetstream(timeout=bus.API_TIMEOUT_S)
    while not stop.is_set():
        try:
            await setup_once(js, settings)
        except (bus.BusError, TimeoutError, nats.errors.Error) as exc:
            log.error("bus setup: %s", str(exc) or type(exc).__name__)
        if settings.served_cert_file:  # with the pid file: the settings hold both or neither
            await reload_if_renewed(settings)
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
