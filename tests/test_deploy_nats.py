"""The NATS users of deploy/, enforced by a real nats-server started from the same config.

The server runs deploy/base/nats/auth.conf as it is, with the passwords in its environment as
the StatefulSet gives them. What each service publishes and reads is taken from the code (the
message models' subjects and the services' consumer filters), so a service that starts to read
or write a new subject fails here until auth.conf allows it. Then three services run as real
processes with their own users and the ConfigMap's settings (streams and consumers made by the
admin's `slaplanner bus setup`, as the NATS pod's bus-admin container runs it), and a snapshot
typed as the collector becomes a ScaleEvent; and two forecaster replicas run as the StatefulSet
runs them, each on its own durable under the one user.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import orjson
import pytest
import trustme
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.actuator import service as actuator_service
from services.actuator.settings import ActuatorSettings
from services.decider import service as decider_service
from services.forecaster import service as forecaster_service
from shared import bus, embedded_nats
from shared.messages import (
    FORECAST_SUBJECT,
    METRICS_SUBJECT,
    REJECTED_SUBJECT,
    SCALED_SUBJECT,
    TARGET_SUBJECT,
    DeploymentKey,
    MetricSnapshot,
    Rejected,
    ScaleEvent,
)
from shared.partition import owner_of_subject
from shared.service_settings import ServiceSettings
from tests import test_deploy_manifests as deploy
from tests.conftest import ServiceProcess

NATS_DIR = deploy.BASE / "nats"
USERS = (*deploy.SERVICES, "admin")


def one(pattern: str) -> str:
    return pattern.format(namespace="prod", name="llama")


# What each service publishes: its messages and its rejections (shared.service.Runtime).
PUBLISHES: dict[str, list[str]] = {
    "collector": [one(METRICS_SUBJECT)],
    "forecaster": [one(FORECAST_SUBJECT)],
    "decider": [one(TARGET_SUBJECT)],
    "actuator": [one(SCALED_SUBJECT), one(ActuatorSettings().virtual_subject)],
}
for _service in deploy.SERVICES:
    PUBLISHES[_service].append(REJECTED_SUBJECT.format(stage=_service))

# What each service reads, as its consumers filter it.
READS: dict[str, list[str]] = {
    "collector": [],
    "forecaster": [forecaster_service.CONSUMES],
    "decider": [decider_service.CONSUMES, decider_service.FAST_PATH_CONSUMES,
                decider_service.SCALED_CONSUMES],
    "actuator": [actuator_service.CONSUMES, actuator_service.SCALED],
}
ALL_READS = sorted({subject for subjects in READS.values() for subject in subjects})


def password_variables() -> dict[str, str]:
    return {user: f"NATS_{user.upper()}_PASSWORD" for user in USERS}


@dataclass
class Bus:
    url: str
    passwords: dict[str, str]


def bus_setup(bus_: Bus, forecaster_replicas: int = 1) -> None:
    """What the NATS pod's bus-admin container runs: the streams and every consumer."""
    env = {**os.environ, **deploy.local_env("base"), "SLAPLANNER_NATS_URL": bus_.url,
           "SLAPLANNER_NATS_USER": "admin", "SLAPLANNER_NATS_PASSWORD": bus_.passwords["admin"],
           "SLAPLANNER_FORECASTER_REPLICAS": str(forecaster_replicas)}
    done = subprocess.run([sys.executable, "-m", "services.cli", "bus", "setup"], env=env,
                          cwd=deploy.REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def server() -> Iterator[Bus]:
    """nats-server with deploy's auth.conf, its passwords in the environment as in the pod, and
    the bus laid out by the admin."""
    passwords = {user: secrets.token_hex(16) for user in USERS}
    with tempfile.TemporaryDirectory(prefix="slaplanner-deploy-nats-") as tmp, \
            pytest.MonkeyPatch.context() as env:
        for user, variable in password_variables().items():
            env.setenv(variable, passwords[user])
        running = embedded_nats.start(Path(tmp),
                                      extra_config=(NATS_DIR / "auth.conf").read_text())
        try:
            found = Bus(running.url, passwords)
            bus_setup(found)
            yield found
        finally:
            running.stop()


@dataclass
class Client:
    nc: NATS
    errors: list[str] = field(default_factory=list)

    async def settle(self) -> list[str]:
        """Errors the server sent for what was done so far."""
        await self.nc.flush(timeout=5)
        await asyncio.sleep(0.05)  # the error callback runs as its own task
        return [e.lower() for e in self.errors]

    async def refused(self) -> bool:
        found = any("permissions violation" in e for e in await self.settle())
        self.errors.clear()
        return found


@contextlib.asynccontextmanager
async def connect(bus_: Bus, user: str) -> AsyncIterator[Client]:
    client = Client(nc=NATS())

    async def on_error(exc: Exception) -> None:
        client.errors.append(str(exc))

    # as the services connect (shared.bus), with the reply prefix their user may read
    options = bus.connect_options(ServiceSettings(nats_url=[bus_.url], nats_user=user,
                                                  nats_password=bus_.passwords[user]), user)
    options.update(allow_reconnect=False, max_reconnect_attempts=0)
    await client.nc.connect(**options, error_cb=on_error)
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.nc.close()


def test_the_whole_server_config_is_valid_with_the_pods_environment(tmp_path: Path) -> None:
    # the Secret slaplanner-nats-tls as the pod mounts it, from a throwaway CA
    tls = tmp_path / "tls"
    tls.mkdir()
    certificate = trustme.CA().issue_cert("slaplanner-nats")
    certificate.cert_chain_pems[0].write_to_path(str(tls / "tls.crt"))
    certificate.private_key_pem.write_to_path(str(tls / "tls.key"))
    for name in ("nats.conf", "auth.conf"):
        text = (NATS_DIR / name).read_text()
        (tmp_path / name).write_text(text.replace("/data/jetstream", str(tmp_path / "js"))
                                     .replace("/etc/nats-tls/", f"{tls}/"))
    env = {**os.environ, "POD_NAME": "slaplanner-nats-0",
           **{v: "x" for v in password_variables().values()}}
    checked = subprocess.run([embedded_nats.nats_server_binary(), "-c",
                              str(tmp_path / "nats.conf"), "-t"],
                             env=env, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr + checked.stdout
    # without the Secret's variables the server does not start at all
    env.pop("NATS_DECIDER_PASSWORD")
    checked = subprocess.run([embedded_nats.nats_server_binary(), "-c",
                              str(tmp_path / "nats.conf"), "-t"],
                             env=env, capture_output=True, text=True, timeout=30)
    assert checked.returncode != 0
    assert "NATS_DECIDER_PASSWORD" in checked.stderr + checked.stdout


@pytest.mark.parametrize("service", deploy.SERVICES)
async def test_a_service_keeps_the_stream_and_publishes_only_its_own_subjects(
    server: Bus, service: str
) -> None:
    async with connect(server, service) as client:
        js = client.nc.jetstream()
        for config in (bus.stream_config(ServiceSettings()),  # what every service checks
                       bus.decisions_stream_config(ServiceSettings())):
            assert await bus.check_stream(js, ServiceSettings(), config, create=False) is None
        for subject in PUBLISHES[service]:
            ack = await js.publish(subject, b"{}", headers={"Nats-Msg-Id": uuid.uuid4().hex})
            assert ack.seq > 0, subject
        assert not await client.refused()
        for other in deploy.SERVICES:
            if other == service:
                continue
            for subject in PUBLISHES[other]:
                await client.nc.publish(subject, b"{}")
                assert await client.refused(), f"{service} may publish {subject}"


@pytest.mark.parametrize("service", deploy.SERVICES)
async def test_a_service_subscribes_only_to_what_it_reads(server: Bus, service: str) -> None:
    async with connect(server, service) as client:
        for subject in ALL_READS:
            await client.nc.subscribe(subject)
            assert await client.refused() == (subject not in READS[service]), subject
        # replies (JetStream's acknowledgements, API answers and fetched messages) come back on
        # the user's own inbox prefix, and on no one else's
        own_inbox = client.nc.new_inbox()
        assert own_inbox.startswith(f"_INBOX_{service}."), own_inbox
        await client.nc.subscribe(own_inbox)
        assert not await client.refused()
        others = [f"_INBOX_{user}.>" for user in USERS if user != service]
        for subject in (">", "*.>", "_INBOX.>", *others):
            await client.nc.subscribe(subject)
            assert await client.refused(), f"{service} may subscribe to {subject}"


@pytest.mark.parametrize("service", deploy.SERVICES)
async def test_no_service_may_create_change_delete_or_purge_a_stream_or_a_consumer(
    server: Bus, service: str
) -> None:
    settings = ServiceSettings()
    async with connect(server, service) as client:
        js = client.nc.jetstream(timeout=0.5)  # a refused request is never answered
        attempts = [
            js.delete_stream(settings.stream_name), js.purge_stream(settings.stream_name),
            js.update_stream(bus.stream_config(settings)),
            js.add_stream(bus.stream_config(settings.model_copy(update={"stream_name": "OTHER"}))),
            js.delete_stream(settings.decisions_stream_name),
            js.add_consumer(settings.stream_name, durable_name=f"{service}-read",
                            filter_subject="slaplanner.metrics.>"),
            js.delete_consumer(settings.stream_name, "forecaster-0"),
        ]
        for attempt in attempts:
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError,
                                nats.js.errors.Error)):
                await attempt
            assert await client.refused()
    async with connect(server, "admin") as admin:
        js = admin.nc.jetstream()
        info = await js.stream_info(settings.stream_name)
        assert bus.stream_matches(info.config, bus.stream_config(settings))
        assert "OTHER" not in await js.streams_info() and f"{service}-read" not in {
            c.name for c in await js.consumers_info(settings.stream_name)}


async def test_the_admin_may_do_anything(server: Bus) -> None:
    async with connect(server, "admin") as admin:
        for subject in [s for subjects in PUBLISHES.values() for s in subjects]:
            await admin.nc.publish(subject, b"{}")
        await admin.nc.subscribe("slaplanner.>")
        assert not await admin.refused()


async def test_a_client_without_the_right_password_is_refused(server: Bus) -> None:
    for options in ({}, {"user": "forecaster", "password": "guess"},
                    {"user": "nobody", "password": server.passwords["admin"]}):
        with pytest.raises((nats.errors.NoServersError, nats.errors.Error, OSError)):
            await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0,
                               connect_timeout=2, **options)


# --- the services themselves, with their users ---------------------------------------------------

def snapshot_body(window_end: float) -> bytes:
    """What an operator types after `nats pub slaplanner.metrics.prod.llama`."""
    return orjson.dumps({
        "schema_version": 1, "deployment": {"namespace": "prod", "name": "llama"},
        "window_end": window_end, "window_s": 60.0, "num_requests": 600.0,
        "isl_avg": 3000.0, "osl_avg": 300.0,
    })


async def test_the_services_run_under_their_users_and_the_configmap(
    server: Bus, tmp_path: Path
) -> None:
    base_env = {
        **os.environ,
        **deploy.local_env("base"),
        "SLAPLANNER_NATS_URL": server.url,
        "SLAPLANNER_HTTP_HOST": "127.0.0.1",
        "SLAPLANNER_HTTP_PORT": "0",
        "SLAPLANNER_NATS_RECONNECT_WAIT_S": "200ms",
        # no Kubernetes here to hold a Lease; one actuator runs
        "SLAPLANNER_LEADER_ELECTION": "off",
        "PYTHONUNBUFFERED": "1",
    }
    procs = [
        ServiceProcess(name, {**base_env, "SLAPLANNER_NATS_USER": name,
                              "SLAPLANNER_NATS_PASSWORD": server.passwords[name]}, tmp_path)
        for name in ("forecaster", "decider", "actuator")
    ]
    seen: dict[str, list[bytes]] = {}
    arrived = asyncio.Event()

    async def on_message(msg: Msg) -> None:
        seen.setdefault(msg.subject, []).append(msg.data)
        arrived.set()

    async def wait_for(prefix: str) -> bytes:
        while True:
            for subject, bodies in seen.items():
                if subject.startswith(prefix):
                    return bodies[0]
            arrived.clear()
            await arrived.wait()

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.log()[-3000:]}" for p in procs)

    try:
        for proc in procs:
            proc.start()
        async with connect(server, "admin") as admin, connect(server, "collector") as collector:
            await admin.nc.subscribe("slaplanner.>", cb=on_message)
            js = admin.nc.jetstream()
            for _ in range(600):
                with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                    names = {c.name for c in await js.consumers_info("SLAPLANNER")}
                    if {"forecaster", "decider", "actuator"} <= names:
                        break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"services not ready:\n{logs()}")

            # a body that fails validation is rejected, on the reader's own rejected subject
            await collector.nc.publish(one(METRICS_SUBJECT), b'{"schema_version": 1}')
            rejected = Rejected.model_validate_json(
                await asyncio.wait_for(wait_for(REJECTED_SUBJECT.format(stage="forecaster")), 30))
            assert rejected.stage == "forecaster"

            # a snapshot published as the collector does it ends in a dry-run ScaleEvent
            snapshot = MetricSnapshot.from_json(snapshot_body(1_732_345_200.0))
            await bus.publish(collector.nc.jetstream(), snapshot)
            try:
                body = await asyncio.wait_for(wait_for("slaplanner.scaled."), 60)
            except TimeoutError:
                raise AssertionError(f"no ScaleEvent:\n{logs()}") from None
            event = ScaleEvent.from_json(body)
            assert event.outcome == "dry-run"
            assert event.window_end == snapshot.window_end
            assert not await collector.refused()
        for proc in procs:
            assert proc.stop() == 0, logs()
        assert "permissions violation" not in logs().lower(), logs()
    finally:
        for proc in procs:
            proc.kill()


def metrics_subject_of(key: DeploymentKey) -> str:
    return METRICS_SUBJECT.format(namespace=key.namespace, name=key.name)


async def test_forecaster_replicas_run_under_the_forecaster_user(
    server: Bus, tmp_path: Path
) -> None:
    """Two replicas as the StatefulSet runs them (the count, and the index from the pod name):
    each keeps its own durable, forecaster-<i>, under the one user, and acks what it reads."""
    count = 2
    env = {
        **os.environ,
        **deploy.local_env("base"),
        "SLAPLANNER_NATS_URL": server.url,
        "SLAPLANNER_HTTP_HOST": "127.0.0.1",
        "SLAPLANNER_HTTP_PORT": "0",
        "SLAPLANNER_NATS_RECONNECT_WAIT_S": "200ms",
        "PYTHONUNBUFFERED": "1",
        "SLAPLANNER_NATS_USER": "forecaster",
        "SLAPLANNER_NATS_PASSWORD": server.passwords["forecaster"],
        "SLAPLANNER_REPLICA_COUNT": str(count),
    }
    bus_setup(server, forecaster_replicas=count)  # the durables of two replicas too
    procs = []
    for index in range(count):
        log_dir = tmp_path / f"replica-{index}"
        log_dir.mkdir()
        procs.append(ServiceProcess("forecaster", {
            **env, "SLAPLANNER_REPLICA_INDEX": f"slaplanner-forecaster-{index}"}, log_dir))
    durables = {f"forecaster-{index}" for index in range(count)}
    # deployments so that each replica owns at least one
    keys = [DeploymentKey(namespace="replicas", name=f"model-{n}") for n in range(8)]
    owners = {owner_of_subject(metrics_subject_of(key), count) for key in keys}
    assert owners == set(range(count))
    forecast: set[str] = set()
    arrived = asyncio.Event()

    async def on_forecast(msg: Msg) -> None:
        forecast.add(msg.subject)
        arrived.set()

    def logs() -> str:
        return "\n".join(f"--- replica {i}\n{p.log()[-3000:]}" for i, p in enumerate(procs))

    try:
        for proc in procs:
            proc.start()
        async with connect(server, "admin") as admin, connect(server, "collector") as collector:
            await admin.nc.subscribe("slaplanner.forecast.replicas.>", cb=on_forecast)
            js = admin.nc.jetstream()
            for _ in range(600):
                with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                    if durables <= {c.name for c in await js.consumers_info("SLAPLANNER")}:
                        break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"replicas not ready:\n{logs()}")
            for key in keys:
                await bus.publish(collector.nc.jetstream(), MetricSnapshot(
                    deployment=key, window_end=1_732_345_200.0, num_requests=600.0,
                    isl_avg=3000.0, osl_avg=300.0))
            wanted = {FORECAST_SUBJECT.format(namespace=k.namespace, name=k.name) for k in keys}
            try:
                while not wanted <= forecast:
                    arrived.clear()
                    await asyncio.wait_for(arrived.wait(), 60)
            except TimeoutError:
                raise AssertionError(f"forecasts of {wanted - forecast} missing:\n{logs()}") \
                    from None
            for proc in procs:
                assert proc.stop() == 0, logs()
            for durable in durables:
                info = await js.consumer_info("SLAPLANNER", durable)
                # every replica saw every snapshot, and acked it: its own forecast, others unread
                assert info.delivered.stream_seq > 0 and info.num_ack_pending == 0, (durable, info)
        assert "permissions violation" not in logs().lower(), logs()
    finally:
        for proc in procs:
            proc.kill()

