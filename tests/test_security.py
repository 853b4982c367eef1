"""Who may do what, on real servers: deploy/'s NATS users, TLS with a generated CA, and forged
targets at an actuator that may touch only what its allowlist names.

The NATS server runs deploy/base/nats/auth.conf as shipped, with fresh passwords in its
environment as the StatefulSet gives them; the services run as real processes under their own
users, and the actuator scales DynamoGraphDeployments on the Kubernetes API test server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
import trustme
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy, SubjectTransform

from shared import bus, bus_admin, embedded_nats
from shared import stored as stored_reads
from shared.bus_admin import BusAdminSettings
from shared.messages import (
    DeploymentKey,
    LoadForecast,
    MetricSnapshot,
    Outcome,
    ReplicaTarget,
    ScaleEvent,
    derived_id,
)
from shared.service_settings import ServiceSettings
from tests import k8s_api_server as srv
from tests.conftest import REPO, ServiceProcess
from tests.conftest_k8s import dgd

AUTH_CONF = REPO / "deploy" / "base" / "nats" / "auth.conf"
SERVICES = ("collector", "forecaster", "decider", "actuator")
USERS = (*SERVICES, "admin")
STREAM = ServiceSettings().stream_name
TARGETS = "slaplanner.target.>"
LLAMA = DeploymentKey(namespace="prod", name="llama")
T0 = 1_732_345_200.0


@dataclass
class Bus:
    url: str
    passwords: dict[str, str]
    ca_file: Path | None = None

    def settings(self, user: str) -> ServiceSettings:
        return ServiceSettings(nats_url=[self.url], nats_user=user,
                               nats_password=self.passwords[user],
                               nats_tls_ca_file=str(self.ca_file) if self.ca_file else None)


def start_deploy_nats(store: Path, auth_conf: str) -> tuple[embedded_nats.NatsServer, Bus]:
    """nats-server with this authorization block, its passwords in the environment as in the
    pod (the file names them as $NATS_<USER>_PASSWORD)."""
    passwords = {user: secrets.token_hex(16) for user in USERS}
    with pytest.MonkeyPatch.context() as env:
        for user, password in passwords.items():
            env.setenv(f"NATS_{user.upper()}_PASSWORD", password)
        server = embedded_nats.start(store, extra_config=auth_conf)
    return server, Bus(server.url, passwords)


@pytest.fixture
def deploy_bus(tmp_path: Path) -> Iterator[Bus]:
    server, running = start_deploy_nats(tmp_path / "nats", AUTH_CONF.read_text())
    try:
        yield running
    finally:
        server.stop()


async def lay_out(deploy_bus: Bus, forecaster_replicas: int = 1) -> None:
    """The admin's `slaplanner bus setup`: the streams and every consumer of the services."""
    settings = BusAdminSettings(**deploy_bus.settings("admin").model_dump(),
                                forecaster_replicas=forecaster_replicas)
    async with connected(settings) as admin:
        await bus_admin.setup_once(admin.nc.jetstream(), settings)


@dataclass
class Client:
    nc: NATS
    errors: list[str] = field(default_factory=list)

    async def refused(self) -> bool:
        """Whether the server answered what was sent so far with a permissions violation."""
        await self.nc.flush(timeout=5)
        await asyncio.sleep(0.05)  # the error callback runs as its own task
        found = any("permissions violation" in e.lower() for e in self.errors)
        self.errors.clear()
        return found


@contextlib.asynccontextmanager
async def connected(settings: ServiceSettings, name: str = "test") -> AsyncIterator[Client]:
    """A client made from a service's settings by shared.bus, failing at once if refused."""
    client = Client(nc=NATS())

    async def on_error(exc: Exception) -> None:
        client.errors.append(str(exc))

    options = bus.connect_options(settings, name)
    options.update(allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3)
    await client.nc.connect(**options, error_cb=on_error)
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.nc.close()


async def stored_on(nc: NATS, subject: str) -> list[bytes]:
    """What the stream holds on a subject, read by an ephemeral pull consumer."""
    js = nc.jetstream()
    sub = await js.pull_subscribe(subject, stream=STREAM, config=ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0))
    bodies: list[bytes] = []
    pending = (await sub.consumer_info()).num_pending or 0
    while len(bodies) < pending:
        bodies.extend(m.data for m in await sub.fetch(batch=pending - len(bodies), timeout=5))
    await sub.unsubscribe()
    return bodies


def forged_target(key: DeploymentKey, replicas: int = 40, window_end: float = T0) -> ReplicaTarget:
    return ReplicaTarget(deployment=key, window_end=window_end, policy="forged",
                         prefill_replicas=replicas, decode_replicas=replicas)


# --------------------------------------------------------------------------- NATS users


@pytest.mark.parametrize("user", ["collector", "forecaster", "actuator"])
async def test_another_services_user_cannot_put_a_replica_target_in_the_stream(
    deploy_bus: Bus, user: str
) -> None:
    async with connected(deploy_bus.settings("admin")) as admin:
        await bus.ensure_stream(admin.nc.jetstream(), ServiceSettings())
    target = forged_target(LLAMA)
    async with connected(deploy_bus.settings(user), user) as client:
        await client.nc.publish(target.subject(), target.to_json())
        assert await client.refused(), f"{user} may publish {target.subject()}"
        # Through JetStream the publication is dropped the same way; no ack ever comes.
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await client.nc.jetstream(timeout=1.0).publish(
                target.subject(), target.to_json(), headers={"Nats-Msg-Id": target.id})
        assert await client.refused()
        # Nor may it read the targets as they pass.
        await client.nc.subscribe(TARGETS)
        assert await client.refused() == (user != "actuator")
    async with connected(deploy_bus.settings("decider"), "decider") as decider:
        await bus.publish(decider.nc.jetstream(), forged_target(LLAMA, 2, T0 + 60))
        assert not await decider.refused(), "the decider publishes targets"
    async with connected(deploy_bus.settings("admin")) as admin:
        stored = [ReplicaTarget.from_json(b) for b in await stored_on(admin.nc, TARGETS)]
    assert [t.window_end for t in stored] == [T0 + 60], "only the decider's target is stored"


async def reroute_forecasts_into_targets(client: Client) -> None:
    """What a service's user could try with JetStream's API: store forecasts as targets."""
    js = client.nc.jetstream(timeout=1.0)
    config = (await js.stream_info(STREAM)).config
    config.subject_transform = SubjectTransform(src="slaplanner.forecast.>",
                                                dest="slaplanner.target.>")
    with contextlib.suppress(nats.errors.TimeoutError, nats.js.errors.Error):
        await js.update_stream(config)
    target = forged_target(LLAMA)
    with contextlib.suppress(nats.errors.TimeoutError, nats.js.errors.Error):
        await js.publish("slaplanner.forecast.prod.llama", target.to_json())


async def test_the_forecasters_user_cannot_reroute_its_subject_into_the_targets(
    deploy_bus: Bus,
) -> None:
    async with connected(deploy_bus.settings("admin")) as admin:
        await bus.ensure_stream(admin.nc.jetstream(), ServiceSettings())
    async with connected(deploy_bus.settings("forecaster"), "forecaster") as forecaster:
        await reroute_forecasts_into_targets(forecaster)
    async with connected(deploy_bus.settings("admin")) as admin:
        assert await stored_on(admin.nc, TARGETS) == []


async def test_the_collectors_user_cannot_read_the_targets_through_a_consumer(
    deploy_bus: Bus,
) -> None:
    await lay_out(deploy_bus)
    async with connected(deploy_bus.settings("decider"), "decider") as decider:
        await bus.publish(decider.nc.jetstream(), forged_target(LLAMA))
    async with connected(deploy_bus.settings("collector"), "collector") as collector:
        try:
            read = await stored_on(collector.nc, TARGETS)
        except (nats.errors.TimeoutError, nats.js.errors.Error):
            read = []  # refused, or never answered
    assert read == []


async def test_the_collectors_user_cannot_delete_the_actuators_consumer(deploy_bus: Bus) -> None:
    await lay_out(deploy_bus)
    async with connected(deploy_bus.settings("collector"), "collector") as collector:
        with contextlib.suppress(nats.errors.TimeoutError, nats.js.errors.Error):
            await collector.nc.jetstream(timeout=1.0).delete_consumer(STREAM, "actuator")
    async with connected(deploy_bus.settings("admin")) as admin:
        info = await admin.nc.jetstream().consumer_info(STREAM, "actuator")
        assert info.name == "actuator"


# What each service reads back from the stream by direct get, and the durables it owns
# (deploy/base/nats/auth.conf).
FAMILIES = ("metrics", "forecast", "target", "scaled", "virtual", "rejected")
READ_FAMILIES = {"collector": ("metrics",), "forecaster": (), "decider": (),
                 "actuator": ("target", "scaled")}
MAX_FORECASTER_REPLICAS = 8
FORECASTER_DURABLES = tuple(f"forecaster-{i}" for i in range(MAX_FORECASTER_REPLICAS))
OWN_DURABLES = {"forecaster": ("forecaster-3", "slaplanner.metrics.>"),
                "decider": ("decider", "slaplanner.forecast.>"),
                "actuator": ("actuator", TARGETS)}


def family_subject(family: str) -> str:
    return f"slaplanner.{family}.prod.llama"


async def fill_every_family(settings: ServiceSettings) -> None:
    """One message on every subject family of the stream, as the admin."""
    async with connected(settings) as admin:
        js = admin.nc.jetstream()
        await bus.ensure_stream(js, ServiceSettings())
        for family in FAMILIES:
            await js.publish(family_subject(family), b"{}")


async def read_through_a_consumer(nc: NATS, subject: str) -> list[bytes] | None:
    """What a throwaway consumer on ``subject`` delivers, or None if it cannot be made or read."""
    try:
        return await asyncio.wait_for(stored_on(nc, subject), timeout=2.0)
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
        return None


async def read_by_direct_get(nc: NATS, subject: str) -> bytes | None:
    found = None
    with contextlib.suppress(TimeoutError, nats.errors.Error):
        found = await asyncio.wait_for(stored_reads.last_message(nc, STREAM, subject), 2.0)
    return None if found is None else found.data


@pytest.mark.parametrize("user", SERVICES)
async def test_a_service_user_reads_back_only_the_families_it_reads_and_makes_no_consumer(
    deploy_bus: Bus, user: str
) -> None:
    await fill_every_family(deploy_bus.settings("admin"))
    async with connected(deploy_bus.settings(user), user) as client:
        through_consumers = await asyncio.gather(*(
            read_through_a_consumer(client.nc, f"slaplanner.{f}.>") for f in FAMILIES))
        assert through_consumers == [None] * len(FAMILIES), "no service user makes a consumer"
        for family in FAMILIES:
            got = await read_by_direct_get(client.nc, family_subject(family))
            expected = b"{}" if family in READ_FAMILIES[user] else None
            assert got == expected, (user, family)
        if user == "collector":
            # the request subject binds the read: no body can widen it to another family
            reply = await client.nc.request(
                f"$JS.API.DIRECT.GET.{STREAM}.slaplanner.metrics.prod.llama",
                json.dumps({"last_by_subj": family_subject("target")}).encode(), timeout=2)
            assert reply.data == b"" and (reply.headers or {}).get("Status") == "408"
    async with connected(deploy_bus.settings("admin")) as admin:
        assert await admin.nc.jetstream().consumers_info(STREAM) == []


async def test_no_service_user_can_make_a_push_consumer_deliver_into_another_users_inbox(
    deploy_bus: Bus,
) -> None:
    """On main the collector's user could create a consumer of any name on the metrics and make
    it push what it had published to any subject outside the stream: another user's inbox, or
    the subject an outside orchestrator takes scaling commands on."""
    await fill_every_family(deploy_bus.settings("admin"))
    delivered: list[bytes] = []

    async def on_message(msg: Msg) -> None:
        delivered.append(msg.data)

    async with connected(deploy_bus.settings("actuator"), "actuator") as actuator, \
            connected(deploy_bus.settings("collector"), "collector") as collector:
        await actuator.nc.subscribe("_INBOX_actuator.victim", cb=on_message)
        for name in ("pusher", "collector-history"):
            body = {"stream_name": STREAM, "config": {
                "name": name, "filter_subject": "slaplanner.metrics.>",
                "deliver_subject": "_INBOX_actuator.victim", "deliver_policy": "all",
                "ack_policy": "none"}}
            with contextlib.suppress(nats.errors.TimeoutError):
                await collector.nc.request(
                    f"$JS.API.CONSUMER.CREATE.{STREAM}.{name}.slaplanner.metrics.>",
                    json.dumps(body).encode(), timeout=1.0)
            assert await collector.refused(), name
        await asyncio.sleep(0.5)
        await actuator.nc.flush()
    assert delivered == []


async def test_the_server_refuses_a_consumer_whose_filter_differs_from_its_api_subject(
    deploy_bus: Bus,
) -> None:
    """What a grant of consumer creation would rest on (the admin's, and any future one): the
    filter in the API subject binds."""
    await fill_every_family(deploy_bus.settings("admin"))
    create = f"$JS.API.CONSUMER.CREATE.{STREAM}.forged.slaplanner.metrics.>"
    async with connected(deploy_bus.settings("admin")) as admin:
        for filters, code in (({"filter_subject": TARGETS}, 10131),
                              ({"filter_subjects": [TARGETS]}, 10137),
                              ({"filter_subjects": ["slaplanner.metrics.>", TARGETS]}, 10137),
                              ({}, 10131)):
            body = {"stream_name": STREAM, "config": {"name": "forged", **filters}}
            answer = json.loads((await admin.nc.request(
                create, json.dumps(body).encode(), timeout=5)).data)
            assert answer.get("error", {}).get("err_code") == code, (filters, answer)
        names = {c.name for c in await admin.nc.jetstream().consumers_info(STREAM)}
        assert "forged" not in names


async def attack_a_durable(client: Client, durable: str) -> None:
    """Delete it, drain it, and point it at another filter, each refused or unanswered."""
    js = client.nc.jetstream(timeout=1.0)

    async def delete() -> None:
        await js.delete_consumer(STREAM, durable)

    async def drain() -> None:
        sub = await js.pull_subscribe_bind(durable=durable, stream=STREAM)
        for msg in await sub.fetch(batch=10, timeout=1.0):
            await msg.ack()

    async def refilter() -> None:
        await js.add_consumer(STREAM, ConsumerConfig(
            name=durable, durable_name=durable, filter_subject="slaplanner.rejected.>"))

    results = await asyncio.gather(delete(), drain(), refilter(), return_exceptions=True)
    for result in results:
        assert isinstance(result, (TimeoutError, nats.errors.Error, nats.js.errors.Error)), result


@pytest.mark.parametrize("owner", sorted(OWN_DURABLES))
async def test_no_other_service_user_may_delete_drain_or_refilter_a_services_durable(
    deploy_bus: Bus, owner: str
) -> None:
    durable, subject_filter = OWN_DURABLES[owner]
    await lay_out(deploy_bus, forecaster_replicas=MAX_FORECASTER_REPLICAS)
    await fill_every_family(deploy_bus.settings("admin"))
    others = [user for user in SERVICES if user != owner]
    async with contextlib.AsyncExitStack() as stack:
        attackers = [await stack.enter_async_context(connected(deploy_bus.settings(u), u))
                     for u in others]
        await asyncio.gather(*(attack_a_durable(a, durable) for a in attackers))
        for user, attacker in zip(others, attackers, strict=True):
            assert await attacker.refused(), user
    async with connected(deploy_bus.settings("admin")) as admin:
        info = await admin.nc.jetstream().consumer_info(STREAM, durable)
        assert subject_filter in bus.consumer_filters(info.config)
        assert info.delivered.stream_seq == 0 and info.num_ack_pending == 0, info


async def test_each_forecaster_replica_up_to_the_eighth_may_use_its_durable_and_history(
    deploy_bus: Bus,
) -> None:
    await lay_out(deploy_bus, forecaster_replicas=MAX_FORECASTER_REPLICAS)
    async with connected(deploy_bus.settings("admin")) as admin:
        await admin.nc.jetstream().publish(family_subject("target"), b"{}")
    await fill_every_family(deploy_bus.settings("admin"))
    async with connected(deploy_bus.settings("forecaster"), "forecaster") as forecaster:
        js = forecaster.nc.jetstream()
        for durable in FORECASTER_DURABLES:
            sub = await js.pull_subscribe_bind(durable=durable, stream=STREAM)
            [msg] = await sub.fetch(batch=1, timeout=5)
            await msg.ack()
            assert msg.subject == family_subject("metrics")
            # its history reader, rewound to the start, reads the snapshots only
            history = await js.pull_subscribe_bind(durable=f"{durable}-history", stream=STREAM)
            await bus.reset_consumer(forecaster.nc, STREAM, f"{durable}-history", 1)
            [old] = await history.fetch(batch=1, timeout=5)
            assert old.subject == family_subject("metrics")
            assert not await forecaster.refused(), durable
        # a ninth has no durable, and may not make one
        with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
            await forecaster.nc.jetstream(timeout=1.0).pull_subscribe(
                "slaplanner.metrics.>", durable="forecaster-8", stream=STREAM)
        assert await forecaster.refused()


async def test_the_decider_keeps_one_durable_on_its_families_and_may_retire_the_old_ones(
    deploy_bus: Bus,
) -> None:
    await lay_out(deploy_bus)
    async with connected(deploy_bus.settings("admin")) as admin:
        js = admin.nc.jetstream()
        for old, family in (("decider-fast-path", "metrics"), ("decider-scaled", "scaled")):
            await js.add_consumer(STREAM, ConsumerConfig(durable_name=old,
                                                         filter_subject=f"slaplanner.{family}.>"))
    await fill_every_family(deploy_bus.settings("admin"))
    async with connected(deploy_bus.settings("decider"), "decider") as decider:
        js = decider.nc.jetstream()
        sub = await js.pull_subscribe_bind(durable="decider", stream=STREAM)
        msgs = await sub.fetch(batch=10, timeout=5)
        for msg in msgs:
            await msg.ack()
        assert sorted(m.subject for m in msgs) == sorted(
            family_subject(f) for f in ("forecast", "metrics", "scaled"))
        for old in ("decider-fast-path", "decider-scaled"):
            assert (await js.consumer_info(STREAM, old)).name == old
            assert await js.delete_consumer(STREAM, old)
        assert not await decider.refused()
        # ... but may not make them again
        with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
            await decider.nc.jetstream(timeout=1.0).pull_subscribe(
                "slaplanner.metrics.>", durable="decider-fast-path", stream=STREAM)
        assert await decider.refused()


async def test_the_deciders_user_cannot_widen_its_durable_to_the_rejected_bodies(
    deploy_bus: Bus,
) -> None:
    """Was a strict xfail: the decider created its multi-filter durable itself, through a
    creation subject that cannot carry its filters. The admin makes it now."""
    await lay_out(deploy_bus)
    await fill_every_family(deploy_bus.settings("admin"))
    async with connected(deploy_bus.settings("decider"), "decider") as decider:
        js = decider.nc.jetstream(timeout=1.0)
        with contextlib.suppress(nats.errors.TimeoutError, nats.js.errors.Error):
            await js.add_consumer(STREAM, ConsumerConfig(
                name="decider", durable_name="decider", deliver_policy=DeliverPolicy.ALL,
                filter_subjects=["slaplanner.forecast.>", "slaplanner.rejected.>"]))
        read: list[str] = []
        with contextlib.suppress(nats.errors.TimeoutError, nats.js.errors.Error):
            sub = await js.pull_subscribe_bind(durable="decider", stream=STREAM)
            read = [m.subject for m in await sub.fetch(batch=10, timeout=1.0)]
        assert await decider.refused()
    assert family_subject("rejected") not in read


async def test_the_forecasters_user_cannot_drain_a_consumer_an_operator_added(
    deploy_bus: Bus,
) -> None:
    """Was a strict xfail: the history reads went through consumers of random names, so the
    users that read history could fetch from any consumer not denied by name."""
    async with connected(deploy_bus.settings("admin")) as admin:
        js = admin.nc.jetstream()
        await bus.ensure_stream(js, ServiceSettings())
        await js.add_consumer(STREAM, ConsumerConfig(durable_name="audit", filter_subject=TARGETS,
                                                     deliver_policy=DeliverPolicy.ALL))
    await fill_every_family(deploy_bus.settings("admin"))
    for user in ("collector", "forecaster", "actuator"):
        async with connected(deploy_bus.settings(user), user) as client:
            read: list[bytes] = []
            with contextlib.suppress(nats.errors.TimeoutError, nats.js.errors.Error):
                sub = await client.nc.jetstream(timeout=1.0).pull_subscribe_bind(
                    durable="audit", stream=STREAM)
                read = [m.data for m in await sub.fetch(batch=10, timeout=1.0)]
            assert read == [], user


async def test_the_collectors_user_cannot_overhear_the_targets_the_actuator_fetches(
    deploy_bus: Bus,
) -> None:
    """JetStream delivers what a pull consumer fetches to the fetching client's inbox: each
    service's user has a reply prefix of its own (shared.bus), which no other user may read."""
    await fill_every_family(deploy_bus.settings("admin"))
    overheard: list[str] = []

    async def on_message(msg: Msg) -> None:
        overheard.append(msg.subject)

    async with connected(deploy_bus.settings("collector"), "collector") as collector, \
            connected(deploy_bus.settings("actuator"), "actuator") as actuator:
        for subject in (">", "*.>", "_INBOX.>", "_INBOX_actuator.>"):
            await collector.nc.subscribe(subject, cb=on_message)
            assert await collector.refused(), f"the collector's user may read {subject}"
        async with connected(deploy_bus.settings("admin")) as admin:
            await admin.nc.jetstream().add_consumer(STREAM, ConsumerConfig(
                durable_name="actuator", filter_subject=TARGETS,
                deliver_policy=DeliverPolicy.ALL))
        sub = await actuator.nc.jetstream().pull_subscribe_bind(durable="actuator",
                                                                stream=STREAM)
        [target] = await sub.fetch(batch=1, timeout=5)
        await target.ack()
        assert target.subject == family_subject("target")
        assert not await actuator.refused()
        # the delivery went out to every matching subscriber before the collector's PONG
        await collector.refused()
    assert overheard == []


async def test_with_stream_updates_denied_the_reroute_fails_and_services_still_start(
    deploy_bus: Bus,
) -> None:
    await lay_out(deploy_bus)
    async with connected(deploy_bus.settings("forecaster"), "forecaster") as forecaster:
        for user in SERVICES:
            async with connected(deploy_bus.settings(user), user) as client:
                # what a service checks at start: both streams, as the layout wants them
                for config in (bus.stream_config(ServiceSettings()),
                               bus.decisions_stream_config(ServiceSettings())):
                    assert await bus.check_stream(client.nc.jetstream(), ServiceSettings(),
                                                  config, create=False) is None
                assert not await client.refused(), user
        await reroute_forecasts_into_targets(forecaster)
        assert await forecaster.refused()
    async with connected(deploy_bus.settings("admin")) as admin:
        assert await stored_on(admin.nc, TARGETS) == []
        info = await admin.nc.jetstream().stream_info(STREAM)
        assert info.config.subject_transform is None


async def test_a_rerouted_stream_is_refused_by_the_services_and_put_back_by_the_admin(
    deploy_bus: Bus,
) -> None:
    await lay_out(deploy_bus)
    async with connected(deploy_bus.settings("admin")) as admin:
        js = admin.nc.jetstream()
        config = (await js.stream_info(STREAM)).config
        config.subject_transform = SubjectTransform(src="slaplanner.forecast.>",
                                                    dest="slaplanner.target.>")
        await js.update_stream(config)
    async with connected(deploy_bus.settings("decider"), "decider") as decider:
        with pytest.raises(bus.ForeignStream, match="subject_transform is set"):
            await bus.check_stream(decider.nc.jetstream(), ServiceSettings(),
                                   bus.stream_config(ServiceSettings()), create=False)
    await lay_out(deploy_bus)
    async with connected(deploy_bus.settings("admin")) as admin:
        assert (await admin.nc.jetstream().stream_info(STREAM)).config.subject_transform is None


async def test_a_client_without_valid_credentials_can_do_nothing(deploy_bus: Bus) -> None:
    for user, password in ((None, None), ("forecaster", "guess"),
                           ("nobody", deploy_bus.passwords["admin"])):
        settings = ServiceSettings(nats_url=[deploy_bus.url], nats_user=user,
                                   nats_password=password)
        with pytest.raises((nats.errors.Error, OSError)) as refused:
            async with connected(settings):
                pass
        assert "authorization violation" in str(refused.value).lower() or isinstance(
            refused.value, nats.errors.NoServersError), refused.value
        # The services' own connection gives up at once, with one line naming user and URL
        # (it used to knock for ever, and one test hung past 300 s on a loaded machine).
        with pytest.raises(bus.BusError) as refused_line:
            await asyncio.wait_for(bus.connect(settings, "anonymous"), timeout=10.0)
        line = str(refused_line.value)
        assert "\n" not in line and "authorization violation" in line and deploy_bus.url in line
        assert (user or "no credentials") in line


# ------------------------------------------------- the services under their users, over TLS


@dataclass
class Certificates:
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("slaplanner-forecaster")
    found = Certificates(*(folder / n for n in ("ca.pem", "server.pem", "server.key",
                                                 "client.pem", "client.key")))
    ca.cert_pem.write_to_path(str(found.ca_file))
    server.private_key_pem.write_to_path(str(found.server_key))
    client.private_key_pem.write_to_path(str(found.client_key))
    for leaf, path in ((server, found.server_cert), (client, found.client_cert)):
        path.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    return found


def tls_block(certs: Certificates, verify_clients: bool) -> str:
    verify = f'  ca_file: "{certs.ca_file}"\n  verify: true\n' if verify_clients else ""
    return (f'tls {{\n  cert_file: "{certs.server_cert}"\n  key_file: "{certs.server_key}"\n'
            f"{verify}  timeout: 5\n}}\n")




@dataclass
class Seen:
    """Messages on slaplanner.> as the admin sees them."""

    bodies: dict[str, list[bytes]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_message(self, msg: Msg) -> None:
        self.bodies.setdefault(msg.subject, []).append(msg.data)
        self.arrived.set()

    def events(self) -> list[ScaleEvent]:
        return [ScaleEvent.from_json(b) for s, bodies in self.bodies.items()
                if s.startswith("slaplanner.scaled.") for b in bodies]

    async def event_for(self, target_id: str, timeout_s: float = 60.0) -> ScaleEvent:
        async def found() -> ScaleEvent:
            while True:
                for event in self.events():
                    if event.target_id == target_id:
                        return event
                self.arrived.clear()
                await self.arrived.wait()

        return await asyncio.wait_for(found(), timeout_s)


ALLOWLIST_MAPPING = {
    "allow": [{"namespace": "prod", "kind": "DynamoGraphDeployment", "name": "llama"}],
    "deployment": [
        {"namespace": "prod", "name": "llama", "backend": "dynamo"},
        # The allowed name, but as a Deployment: another kind than the allowlist names.
        {"namespace": "prod", "name": "llama-as-deployment", "backend": "scale",
         "scale": {"prefill": {"kind": "Deployment", "name": "llama"},
                   "decode": {"kind": "Deployment", "name": "llama-decode"}}},
    ],
}


async def test_services_work_under_their_own_users_over_tls_and_forged_targets_patch_nothing(
    certificates: Certificates, tmp_path: Path
) -> None:
    # deploy's users and permissions, and TLS with the generated CA on the same server
    server, deploy_bus = start_deploy_nats(
        tmp_path / "nats", AUTH_CONF.read_text() + tls_block(certificates, verify_clients=False))
    deploy_bus.ca_file = certificates.ca_file
    try:
        await run_services_and_forge_targets(deploy_bus, tmp_path)
    finally:
        server.stop()


async def run_services_and_forge_targets(deploy_bus: Bus, tmp_path: Path) -> None:
    await lay_out(deploy_bus)
    mapping = tmp_path / "actuator.json"
    mapping.write_text(json.dumps(ALLOWLIST_MAPPING))
    with srv.KubeApiServer() as k8s:
        k8s.add(srv.DGDS, dgd("llama", 1, 1))
        k8s.add(srv.DGDS, dgd("evil", 1, 1))
        k8s.add(srv.DGDS, dgd("llama", 1, 1, namespace="staging"))
        k8s.add(srv.DEPLOYMENTS, {"metadata": {"name": "llama", "namespace": "prod"},
                                  "spec": {"replicas": 1}})
        base_env = {
            **os.environ, "SLAPLANNER_NATS_URL": deploy_bus.url,
            "SLAPLANNER_HTTP_HOST": "127.0.0.1", "SLAPLANNER_HTTP_PORT": "0",
            "SLAPLANNER_NATS_RECONNECT_WAIT_S": "200ms", "PYTHONUNBUFFERED": "1",
            "SLAPLANNER_NATS_TLS_CA_FILE": str(deploy_bus.ca_file),
            "SLAPLANNER_BUS_SETUP": "admin",
        }
        actuator_env = {
            "SLAPLANNER_BACKEND": "dynamo", "SLAPLANNER_CONFIG_FILE": str(mapping),
            "SLAPLANNER_KUBE_API_URL": k8s.url, "SLAPLANNER_LEADER_ELECTION": "off",
            "SLAPLANNER_KUBE_RETRY_ATTEMPTS": "1",
        }
        procs = [
            ServiceProcess(name, {**base_env, "SLAPLANNER_NATS_USER": name,
                                  "SLAPLANNER_NATS_PASSWORD": deploy_bus.passwords[name],
                                  **(actuator_env if name == "actuator" else {})}, tmp_path)
            for name in ("forecaster", "decider", "actuator")
        ]

        def logs() -> str:
            return "\n".join(f"--- {p.name}\n{p.log()[-3000:]}" for p in procs)

        seen = Seen()
        try:
            for proc in procs:
                proc.start()
            async with connected(deploy_bus.settings("admin")) as admin, \
                    connected(deploy_bus.settings("collector"), "collector") as collector, \
                    connected(deploy_bus.settings("decider"), "decider") as decider:
                await admin.nc.subscribe("slaplanner.>", cb=seen.on_message)
                js = admin.nc.jetstream()
                for _ in range(600):
                    with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                        names = {c.name for c in await js.consumers_info(STREAM)}
                        if {"forecaster", "decider", "actuator"} <= names:
                            break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"services not ready:\n{logs()}")

                # Each service under its own user: a snapshot from the collector's user becomes
                # a forecast, a target and a PATCH of the allowed DGD.
                snapshot = MetricSnapshot(deployment=LLAMA, window_end=T0, num_requests=12_000.0,
                                          isl_avg=3000.0, osl_avg=300.0)
                await bus.publish(collector.nc.jetstream(), snapshot)
                target_id = derived_id("target", derived_id("forecast", snapshot.id))
                try:
                    applied = await seen.event_for(target_id)
                except TimeoutError:
                    raise AssertionError(f"no ScaleEvent:\n{logs()}") from None
                assert applied.outcome is Outcome.APPLIED, applied
                patched = {r.path for r in k8s.requests if r.method == "PATCH"}
                assert patched == {
                    "/apis/nvidia.com/v1beta1/namespaces/prod/dynamographdeployments/llama"}
                assert LoadForecast.from_json(seen.bodies["slaplanner.forecast.prod.llama"][0])

                # Forged targets, with the credentials that may publish targets.
                forged = {
                    "a deployment outside the allowlist": forged_target(
                        DeploymentKey(namespace="prod", name="evil")),
                    "the allowed name in another namespace": forged_target(
                        DeploymentKey(namespace="staging", name="llama")),
                    "the allowed name as another kind": forged_target(
                        DeploymentKey(namespace="prod", name="llama-as-deployment")),
                }
                for target in forged.values():
                    await bus.publish(decider.nc.jetstream(), target)
                for case, target in forged.items():
                    event = await seen.event_for(target.id)
                    assert event.outcome is Outcome.REFUSED, (case, event)
                    assert event.reason is not None and "not in the allowlist" in event.reason, (
                        case, event.reason)
                assert {r.path for r in k8s.requests if r.method == "PATCH"} == patched
                assert not await collector.refused() and not await decider.refused()
            for proc in procs:
                assert proc.stop() == 0, logs()
            assert "permissions violation" not in logs().lower(), logs()
        finally:
            for proc in procs:
                proc.kill()


# ------------------------------------------------------------ decoys with chosen message ids


def pipeline_ids(snapshot_id: str) -> list[str]:
    """The body ids the pipeline derives from a snapshot: forecast, target and ScaleEvent, and
    the fast path's target and ScaleEvent."""
    forecast = derived_id("forecast", snapshot_id)
    target = derived_id("target", forecast)
    fast = derived_id("fast-path", snapshot_id)
    return [forecast, target, derived_id("scaled", target), fast, derived_id("scaled", fast)]


async def test_decoys_of_the_collectors_user_suppress_neither_a_scale_event_nor_a_later_target(
    tmp_path: Path,
) -> None:
    """JetStream drops a repeated Nats-Msg-Id across the whole stream. On main every id was
    derived from the snapshot's, and was the header: the collector's user published the ids to
    come on its own subjects first, and the actuator's ScaleEvent, then the next target, were
    dropped as duplicates, without an error anywhere."""
    server, deploy_bus = start_deploy_nats(tmp_path / "nats", AUTH_CONF.read_text())
    try:
        await lay_out(deploy_bus)
        env = {**os.environ, "SLAPLANNER_NATS_URL": deploy_bus.url,
               "SLAPLANNER_HTTP_HOST": "127.0.0.1", "SLAPLANNER_HTTP_PORT": "0",
               "PYTHONUNBUFFERED": "1", "SLAPLANNER_BUS_SETUP": "admin",
               "SLAPLANNER_LEADER_ELECTION": "off"}
        procs = [ServiceProcess(name, {**env, "SLAPLANNER_NATS_USER": name,
                                       "SLAPLANNER_NATS_PASSWORD": deploy_bus.passwords[name]},
                                tmp_path) for name in ("forecaster", "decider", "actuator")]
        snapshots = [MetricSnapshot(id=f"window-{i}", deployment=LLAMA, window_end=T0 + 60 * i,
                                    num_requests=load, isl_avg=3000.0, osl_avg=300.0)
                     for i, load in ((1, 12_000.0), (2, 600.0))]
        try:
            for proc in procs:
                proc.start()
            async with connected(deploy_bus.settings("collector"), "collector") as collector:
                js = collector.nc.jetstream()
                decoys = 0
                for snapshot in snapshots:
                    for family_id in pipeline_ids(snapshot.id):
                        for family in ("forecast", "target", "scaled"):
                            subject = family_subject(family)
                            # the body id itself (main's header), and the unkeyed digest
                            for header in (family_id, bus.dedup_header(b"", subject, family_id)):
                                await js.publish(f"slaplanner.metrics.decoy.d{decoys}", b"{}",
                                                 headers={"Nats-Msg-Id": header})
                                decoys += 1
                assert not await collector.refused()
                for snapshot in snapshots:
                    await bus.publish(js, snapshot, bus.message_id_key(
                        deploy_bus.settings("collector")))
                    async with connected(deploy_bus.settings("admin")) as admin:
                        for _ in range(600):
                            events = [ScaleEvent.from_json(b)
                                      for b in await stored_on(admin.nc, "slaplanner.scaled.>")]
                            if any(e.window_end == snapshot.window_end for e in events):
                                break
                            await asyncio.sleep(0.1)
                        else:
                            raise AssertionError("no ScaleEvent stored for window "
                                                 f"{snapshot.window_end}:\n" + "\n".join(
                                                     p.log()[-3000:] for p in procs))
            async with connected(deploy_bus.settings("admin")) as admin:
                targets = [ReplicaTarget.from_json(b) for b in await stored_on(admin.nc, TARGETS)]
            assert {t.window_end for t in targets} >= {s.window_end for s in snapshots}
            for proc in procs:
                assert proc.stop() == 0, proc.log()
        finally:
            for proc in procs:
                proc.kill()
    finally:
        server.stop()


# --------------------------------------------------------------------------- TLS refusals


@contextlib.contextmanager
def tls_nats(tmp_path: Path, certs: Certificates,
             verify_clients: bool = False) -> Iterator[embedded_nats.NatsServer]:
    server = embedded_nats.start(tmp_path / "tls-nats",
                                 extra_config=tls_block(certs, verify_clients))
    try:
        yield server
    finally:
        server.stop()


async def test_a_client_that_does_not_trust_the_ca_is_refused(
    certificates: Certificates, tmp_path: Path
) -> None:
    with tls_nats(tmp_path, certificates) as server:
        # No CA given: shared.bus leaves verification to the system's CAs, which do not know ours.
        with pytest.raises((ssl.SSLError, nats.errors.Error, OSError)):
            async with connected(ServiceSettings(nats_url=[server.url])):
                pass
        other_ca = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other_ca))
        with pytest.raises((ssl.SSLError, nats.errors.Error, OSError)):
            async with connected(ServiceSettings(nats_url=[server.url],
                                                 nats_tls_ca_file=str(other_ca))):
                pass


async def test_mutual_tls_lets_in_a_client_certificate_of_the_ca_and_no_other_client(
    certificates: Certificates, tmp_path: Path
) -> None:
    with tls_nats(tmp_path, certificates, verify_clients=True) as server:
        with_certificate = ServiceSettings(
            nats_url=[server.url], nats_tls_ca_file=str(certificates.ca_file),
            nats_tls_cert_file=str(certificates.client_cert),
            nats_tls_key_file=str(certificates.client_key))
        async with connected(with_certificate) as client:
            sub = await client.nc.subscribe("mtls.check")
            await client.nc.publish("mtls.check", b"ok")
            assert (await sub.next_msg(timeout=5)).data == b"ok"
        without = ServiceSettings(nats_url=[server.url],
                                  nats_tls_ca_file=str(certificates.ca_file))
        with pytest.raises((ssl.SSLError, nats.errors.Error, OSError)):
            async with connected(without) as client:
                # Some TLS stacks report a missing client certificate only on the first read.
                await client.nc.flush(timeout=3)
