"""The bus helper: connect to NATS, keep the JetStream streams and consumers, publish, reject.

Every service publishes through JetStream with a ``Nats-Msg-Id`` header derived from the message
id, so that a message re-sent after a restart is dropped by the stream's duplicate window; every
service reads through a durable pull consumer so that a restarted pod resumes where it stopped.

The header is a keyed digest of the subject and the body's id (``dedup_header``): JetStream
de-duplicates across the whole stream, so a header that another NATS user could predict would let
that user pre-publish it on its own subjects and silently suppress a decision.

The streams and the consumers follow one layout (``stream_config``, ``decisions_stream_config``,
``pipeline_consumers``). Who creates them is a setting (``bus_setup``): each service for what it
uses, or the NATS admin with ``slaplanner bus setup`` (deploy/); a service never trusts a stream as
found, and refuses one configured otherwise (``stream_differences``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import ParseResult, urlparse

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamSource,
)
from nats.js.errors import NotFoundError

from shared.messages import SUBJECT_PREFIX, Envelope, Rejected
from shared.service_settings import ServiceSettings

log = logging.getLogger("slaplanner.bus")

STREAM_SUBJECTS = [f"{SUBJECT_PREFIX}.>"]
METRICS = f"{SUBJECT_PREFIX}.metrics.>"
FORECASTS = f"{SUBJECT_PREFIX}.forecast.>"
TARGETS = f"{SUBJECT_PREFIX}.target.>"
SCALED = f"{SUBJECT_PREFIX}.scaled.>"
# What the decider reads, in stream order: forecasts, snapshots (fast path), ScaleEvents.
DECIDER_FAMILIES = (FORECASTS, METRICS, SCALED)
# The decisions an operator replays: what was asked for and what was done.
DECISION_SUBJECTS = (TARGETS, SCALED)
# What a Rejected message keeps of the raw body: enough to see what was sent, small enough to
# stay far below any server's max_payload.
REJECTED_RAW_BYTES = 4096
# How long to wait for the server when a service starts and checks JetStream, seconds.
API_TIMEOUT_S = 5.0
# The most forecaster (and actuator) replicas deploy's NATS users provide durables for
# (docs/forecaster.md).
MAX_FORECASTER_REPLICAS = 8
ACK_WAIT_S = 60.0
MAX_ACK_PENDING = 1000


class BusError(Exception):
    """The bus cannot be used as configured; the message is one line naming what and where."""


class ForeignStream(BusError):
    """A stream of the layout's name exists, configured otherwise: not trusted, not changed."""


# --------------------------------------------------------------------------- connecting


def display_url(url: str | ParseResult | None) -> str:
    """A server URL as a person reads it, without credentials."""
    if url is None:
        return "(no server)"
    parsed = urlparse(url) if isinstance(url, str) else url
    host = parsed.hostname or ""
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{host}{port}"


def _tls_context(settings: ServiceSettings) -> ssl.SSLContext | None:
    if not settings.wants_tls():
        return None
    # Verifies the server's certificate and name; without a CA file, against the system's CAs.
    context = ssl.create_default_context(cafile=settings.nats_tls_ca_file)
    if settings.nats_tls_cert_file:
        context.load_cert_chain(settings.nats_tls_cert_file, settings.nats_tls_key_file)
    return context


class PlaintextRefused(nats.errors.Error):
    """The server offered no TLS where the settings ask for TLS."""


class Client(NATS):
    """nats-py's client, refusing plaintext where TLS is wanted.

    nats-py (2.16) upgrades to TLS only when the server's INFO requires it: at a tls:// URL, a
    server (or whatever answers in its place) that does not would receive CONNECT, password
    included, in plaintext. Like nats.go's checkForSecure, refuse before CONNECT is sent; this
    runs on every connect and reconnect (tests/test_nats_tls.py holds it to that).
    """

    def __init__(self, wants_tls: bool) -> None:
        super().__init__()
        self.wants_tls = wants_tls

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        if initial_connection and self.wants_tls and not info.get("tls_required"):
            server = self._current_server.uri if self._current_server else None
            raise PlaintextRefused(
                f"NATS at {display_url(server)} does not require TLS; refusing to send "
                "credentials in plaintext (TLS is wanted: tls:// URL or a CA file)")
        await super()._process_info(info, initial_connection)


def new_client(settings: ServiceSettings) -> Client:
    """A client to ``connect`` with ``connect_options(settings, ...)``."""
    return Client(wants_tls=settings.wants_tls())


def _tls_failure(exc: BaseException, settings: ServiceSettings) -> str | None:
    """One line for a TLS failure that no retry mends, None for any other error."""
    if isinstance(exc, PlaintextRefused):
        return str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        trusted = (f"the CA in {settings.nats_tls_ca_file}" if settings.nats_tls_ca_file
                   else "the system's CAs (no SLAPLANNER_NATS_TLS_CA_FILE given)")
        return (f"NATS at {_servers(settings)}: the server's TLS certificate is not trusted by "
                f"{trusted}: {exc.verify_message}")
    return None


def connect_options(settings: ServiceSettings, name: str) -> dict[str, Any]:
    """nats.connect keyword arguments for the settings' URL list and auth form."""
    options: dict[str, Any] = {
        "servers": list(settings.nats_url),
        "name": f"slaplanner-{name}",
        # Never give up once connected: a planner that stops reconnecting silently stops
        # planning. (The first connection has a deadline of its own, see ``connect``.)
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": settings.nats_reconnect_wait_s,
        "allow_reconnect": True,
        "connect_timeout": 5,
        # A reply prefix per user, which auth.conf lets that user alone subscribe to: on the
        # shared _INBOX every user could read what JetStream delivers to the others' fetches.
        "inbox_prefix": settings.inbox_prefix(),
    }
    if settings.nats_user is not None:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password or ""
    if settings.nats_token is not None:
        options["token"] = settings.nats_token
    if settings.nats_nkey_seed_file is not None:
        options["nkeys_seed"] = settings.nats_nkey_seed_file
    if settings.nats_creds_file is not None:
        options["user_credentials"] = settings.nats_creds_file
    tls = _tls_context(settings)
    if tls is not None:
        options["tls"] = tls
    return options


def _who(settings: ServiceSettings) -> str:
    if settings.nats_user is not None:
        return f"user {settings.nats_user!r}"
    if settings.nats_creds_file is not None:
        return f"credentials {settings.nats_creds_file}"
    if settings.nats_nkey_seed_file is not None:
        return f"NKey seed {settings.nats_nkey_seed_file}"
    return "a token" if settings.nats_token is not None else "no credentials"


def _servers(settings: ServiceSettings) -> str:
    return ", ".join(display_url(url) for url in settings.nats_url)


def _is_auth_error(exc: BaseException) -> bool:
    return isinstance(exc, nats.errors.AuthorizationError) or (
        "authorization violation" in str(exc).lower())


class _Events:
    """The client's callbacks: silent while the first connection is tried (``connect`` reports
    the outcome in one line), then logged, with refused credentials reported to ``on_fatal``."""

    def __init__(self, settings: ServiceSettings,
                 on_fatal: Callable[[str], None] | None) -> None:
        self.settings, self.on_fatal = settings, on_fatal
        self.client: NATS | None = None

    async def error(self, exc: Exception) -> None:
        if self.client is None:
            return
        if _is_auth_error(exc) and self.on_fatal is not None:
            self.on_fatal(f"NATS at {display_url(self.client.connected_url)} refused "
                          f"{_who(self.settings)} on reconnect: authorization violation")
            return
        log.warning("nats error: %s", str(exc) or type(exc).__name__)

    async def disconnected(self) -> None:
        if self.client is None or self.client.is_closed:  # our own drain or close
            return
        log.warning("disconnected from NATS; reconnecting")

    async def reconnected(self) -> None:
        if self.client is not None:
            log.info("reconnected to NATS at %s", display_url(self.client.connected_url))


async def connect(
    settings: ServiceSettings, name: str, on_fatal: Callable[[str], None] | None = None,
) -> NATS:
    """A connected client, or ``BusError`` (one line naming the URL) within
    ``connect_deadline_s``.

    The first connection is tried until the deadline while the server cannot be reached (it may
    be starting), and given up at once when it refuses the credentials. Once connected the client
    reconnects for ever, except that credentials refused on a reconnect (a rotated password) are
    reported to ``on_fatal``: a supervisor restarting the service with its new Secret does better
    than a client that knocks for ever.
    """
    deadline = time.monotonic() + settings.connect_deadline_s
    events = _Events(settings, on_fatal)
    last_error: BaseException | None = None
    while True:
        client = new_client(settings)
        remaining = deadline - time.monotonic()
        try:
            # A try or two per call (nats-py counts attempts per server and gives up after
            # the count only when it is positive): left alone it retries the first
            # connection for ever.
            await asyncio.wait_for(client.connect(
                **{**connect_options(settings, name), "allow_reconnect": False,
                   "max_reconnect_attempts": 1, "reconnect_time_wait": 0.2,
                   "connect_timeout": max(min(remaining, 5.0), 0.5)},
                error_cb=events.error, disconnected_cb=events.disconnected,
                reconnected_cb=events.reconnected,
            ), timeout=max(remaining, 1.0))
            break
        except (OSError, TimeoutError, nats.errors.Error, ssl.SSLError) as exc:
            last_error = exc
            # Bounded: after a failed TLS handshake nats-py's close waits for ever on a stream
            # that never closes.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), timeout=2.0)
            if _is_auth_error(exc):
                raise BusError(
                    f"NATS at {_servers(settings)} refused {_who(settings)}: authorization "
                    "violation (check the NATS user and password the service is given)"
                ) from None
            if (tls_failure := _tls_failure(exc, settings)) is not None:
                raise BusError(tls_failure) from None
            if time.monotonic() + 0.5 >= deadline:
                reason = str(last_error) or type(last_error).__name__
                raise BusError(f"cannot reach NATS at {_servers(settings)} within "
                               f"{settings.connect_deadline_s:g} s ({reason})") from None
            await asyncio.sleep(0.5)
    client.options["allow_reconnect"] = True
    client.options["max_reconnect_attempts"] = -1
    client.options["reconnect_time_wait"] = settings.nats_reconnect_wait_s
    events.client = client
    log.info("connected to NATS at %s (%s)", display_url(client.connected_url), _who(settings))
    return client


# --------------------------------------------------------------------------- message ids


def message_id_key(settings: ServiceSettings) -> bytes:
    """The secret that keys this service's ``Nats-Msg-Id`` headers.

    The replicas of a service, and the same service after a restart, derive the same key, so a
    republish is still a duplicate; another NATS user, which knows neither this file nor this
    service's credential, cannot compute the headers. A server without credentials has no
    secret to protect and gets the empty key (every user may publish everything there anyway).
    """
    if settings.msg_id_key_file is not None:
        secret = Path(settings.msg_id_key_file).read_bytes().strip()
    else:
        parts = [settings.nats_password, settings.nats_token]
        for path in (settings.nats_nkey_seed_file, settings.nats_creds_file):
            if path is not None:
                parts.append(Path(path).read_text().strip())
        secret = "\0".join(p for p in parts if p).encode()
    if not secret:
        return b""
    return hashlib.sha256(b"slaplanner Nats-Msg-Id key\0" + secret).digest()


def dedup_header(key: bytes, subject: str, message_id: str) -> str:
    """The ``Nats-Msg-Id`` of a body: a keyed digest of where it goes and its id, so that two
    deployments whose bodies share an id never collide, and no one without the key can
    pre-publish the header of a message not yet sent."""
    digest = hmac.new(key, f"{subject}\0{message_id}".encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


async def publish(js: JetStreamContext, message: Envelope, key: bytes = b"") -> None:
    subject = message.subject()
    await publish_body(js, subject, message.to_json(), message.id, key)


async def publish_body(js: JetStreamContext, subject: str, body: bytes, message_id: str,
                       key: bytes = b"") -> None:
    await js.publish(subject, body, headers={"Nats-Msg-Id": dedup_header(key, subject, message_id)})


def rejected(stage: str, subject: str, raw: bytes, reason: str) -> Rejected:
    head = raw[:REJECTED_RAW_BYTES]
    return Rejected(
        stage=stage,
        subject=subject,
        reason=reason[:2000],
        raw=head.decode("utf-8", errors="backslashreplace"),
        raw_size_bytes=len(raw),
        truncated=len(raw) > len(head),
        received_at=time.time(),
    )


async def publish_rejected(js: JetStreamContext, message: Rejected) -> None:
    subject = message.subject_pattern.format(stage=message.stage)
    await js.publish(subject, message.to_json(), headers={"Nats-Msg-Id": message.id})


# --------------------------------------------------------------------------- the streams


def _bounded_stream(settings: ServiceSettings, name: str, max_age_s: float, max_bytes: int,
                    **where: Any) -> StreamConfig:
    """A stream of the layout: limits retention on file, the oldest messages dropped past its
    age and size; messages can be neither deleted nor purged through the API (an admin deletes
    the whole stream if need be), no header can roll a subject up (one message would purge
    it), and no body may exceed ``stream_max_msg_bytes``."""
    return StreamConfig(
        name=name, retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
        discard=DiscardPolicy.OLD, max_age=max_age_s, max_bytes=max_bytes, max_msgs=-1,
        max_msg_size=settings.stream_max_msg_bytes, max_consumers=-1, max_msgs_per_subject=-1,
        duplicate_window=settings.stream_duplicate_window_s,
        num_replicas=settings.stream_replicas, deny_delete=True, deny_purge=True,
        allow_rollup_hdrs=False, **where,
    )


def stream_config(settings: ServiceSettings) -> StreamConfig:
    """The pipeline's stream: every stage's subjects. Direct gets give the last message of a
    subject to a request whose subject names it, which auth.conf can limit to the families a
    user reads (shared.service.Runtime.read_stream)."""
    return _bounded_stream(settings, settings.stream_name, settings.stream_max_age_s,
                           settings.stream_max_bytes, subjects=STREAM_SUBJECTS,
                           allow_direct=True)


def decisions_stream_config(settings: ServiceSettings) -> StreamConfig:
    """A copy of the targets and ScaleEvents with limits of its own: a flood of bodies on other
    subjects evicts old messages of the pipeline's stream, never a decision from this one."""
    return _bounded_stream(
        settings, settings.decisions_stream_name, settings.decisions_max_age_s,
        settings.decisions_max_bytes,
        sources=[StreamSource(name=settings.stream_name, filter_subject=subject)
                 for subject in DECISION_SUBJECTS])


# Fields whose value must be exactly what the layout sets; the server fills some of the others
# with defaults of its own (e.g. compression, consumer_limits), which are left alone.
_PINNED_FIELDS = (
    "subjects", "retention", "storage", "discard", "max_age", "max_bytes", "max_msgs",
    "max_msg_size", "max_consumers", "max_msgs_per_subject", "duplicate_window", "num_replicas",
    "deny_delete", "deny_purge", "allow_rollup_hdrs", "allow_direct", "sources",
)
# What the layout never wants: each would change what is stored, where, or for how long
# (a transform stores forecasts as targets, a republish copies them elsewhere, a mirror is read
# only, a TTL header would let a publisher expire its own messages, a counter or a batch changes
# what a publication means, a sealed stream takes nothing, no_ack publishes blindly).
_UNWANTED_FIELDS = (
    "subject_transform", "republish", "mirror", "mirror_direct", "sealed", "no_ack",
    "allow_msg_ttl", "allow_msg_schedules", "allow_atomic", "allow_batched", "allow_msg_counter",
    "discard_new_per_subject",
)


def _normal(field: str, value: Any) -> Any:
    if field == "sources":
        return sorted((s.name, s.filter_subject or "") for s in value or [])
    if field == "subjects":
        return sorted(value or [])
    if field in ("max_msgs", "max_consumers", "max_msgs_per_subject", "max_bytes",
                 "max_msg_size") and value in (None, 0):
        return -1
    if field in ("deny_delete", "deny_purge", "allow_rollup_hdrs", "allow_direct"):
        return bool(value)
    if field == "num_replicas":
        return value or 1
    return value


def stream_differences(current: StreamConfig, wanted: StreamConfig) -> list[str]:
    """What in ``current`` differs from the layout, one phrase per field (empty: it matches)."""
    found = []
    for name in _PINNED_FIELDS:
        have, want = _normal(name, getattr(current, name)), _normal(name, getattr(wanted, name))
        if have != want:
            found.append(f"{name} is {have!r} (want {want!r})")
    for name in _UNWANTED_FIELDS:
        if getattr(current, name, None):
            found.append(f"{name} is set")
    return found


def stream_matches(current: StreamConfig, wanted: StreamConfig) -> bool:
    return not stream_differences(current, wanted)


def foreign_stream_error(settings: ServiceSettings, name: str, differences: Sequence[str]) -> str:
    return (f"stream {name} on {_servers(settings)} is not configured as slaplanner's: "
            f"{'; '.join(differences)}; have the NATS admin run `slaplanner bus setup` "
            "(or delete the stream)")


def _no_jetstream(settings: ServiceSettings) -> BusError:
    return BusError(f"NATS at {_servers(settings)} has no JetStream (start nats-server with -js, "
                    "or a jetstream {} block in its config)")


async def check_stream(js: JetStreamContext, settings: ServiceSettings, config: StreamConfig,
                       create: bool) -> str | None:
    """None if the stream is there as configured (created first if missing and ``create``);
    else why not, in one line. ``ForeignStream`` if it is configured otherwise, ``BusError`` if
    the server has no JetStream at all."""
    try:
        info = await js.stream_info(str(config.name))
    except NotFoundError:
        if not create:
            return (f"stream {config.name} is missing; waiting for the NATS admin to create it "
                    "(`slaplanner bus setup`)")
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            # created by another service meanwhile, or refused by the server
            if "already in use" not in (exc.description or ""):
                return f"cannot create stream {config.name}: {exc.description}"
            return await check_stream(js, settings, config, create=False)
        log.info("created stream %s", config.name)
        return None
    except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
        raise _no_jetstream(settings) from None
    differences = stream_differences(info.config, config)
    if differences:
        raise ForeignStream(foreign_stream_error(settings, str(config.name), differences))
    return None


async def ensure_streams(js: JetStreamContext, settings: ServiceSettings) -> None:
    """Both streams as the layout wants them, created if missing (when this service creates
    them); ``BusError`` otherwise, naming what differs."""
    create = settings.bus_setup == "service"
    for config in (stream_config(settings), decisions_stream_config(settings)):
        problem = await check_stream(js, settings, config, create)
        if problem is not None:
            raise BusError(problem)


async def ensure_stream(js: JetStreamContext, settings: ServiceSettings) -> None:
    """``ensure_streams`` for callers that create what they use (tests, tools, the demo)."""
    await ensure_streams(js, settings.model_copy(update={"bus_setup": "service"}))


async def update_streams(js: JetStreamContext, settings: ServiceSettings) -> list[str]:
    """The admin's side: create the streams, or bring them back to the layout; what it did."""
    done = []
    for config in (stream_config(settings), decisions_stream_config(settings)):
        try:
            info = await js.stream_info(str(config.name))
        except NotFoundError:
            await js.add_stream(config)
            done.append(f"created stream {config.name}")
            continue
        differences = stream_differences(info.config, config)
        if differences:
            try:
                await js.update_stream(config)
            except nats.js.errors.APIError as exc:
                raise BusError(
                    f"stream {config.name} differs ({'; '.join(differences)}) and cannot be "
                    f"updated in place ({exc.description}); delete it with `nats stream rm "
                    f"{config.name}` and run `slaplanner bus setup` again") from None
            done.append(f"updated stream {config.name}: {'; '.join(differences)}")
    return done


# --------------------------------------------------------------------------- the consumers


@dataclass(frozen=True)
class ConsumerSpec:
    """One consumer of the layout: a durable that a service works through (explicit acks, new
    messages only), or a history reader that a service rewinds to read what is stored."""

    name: str
    filters: tuple[str, ...]
    history: bool = False

    def config(self) -> ConsumerConfig:
        single = len(self.filters) == 1
        return ConsumerConfig(
            name=self.name,
            durable_name=self.name,
            ack_policy=AckPolicy.NONE if self.history else AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL if self.history else DeliverPolicy.NEW,
            ack_wait=None if self.history else ACK_WAIT_S,
            max_ack_pending=None if self.history else MAX_ACK_PENDING,
            filter_subject=self.filters[0] if single else None,
            filter_subjects=None if single else list(self.filters),
        )


def works_through(config: ConsumerConfig) -> bool:
    """Whether a consumer is one a service works through (acks what it handled), not a
    history reader, whose pending count only says how much history there is."""
    return bool(config.durable_name) and config.ack_policy != AckPolicy.NONE


def history_reader(durable: str, *subject_filters: str) -> ConsumerSpec:
    """The consumer under which the service of ``durable`` reads stored history (one or more
    families, in stream order)."""
    return ConsumerSpec(f"{durable}-history", subject_filters, history=True)


def replica_durables(service: str, replicas: int) -> list[str]:
    """A service's durables: its name alone, or ``<service>-<i>`` for each of several
    replicas (as the forecaster's and the actuator's settings name them)."""
    return [service] if replicas == 1 else [f"{service}-{i}" for i in range(replicas)]


def pipeline_consumers(forecaster_replicas: int = 1, actuator_replicas: int = 1,
                       decider_replicas: int = 1) -> list[ConsumerSpec]:
    """Every consumer the services use, as the admin creates them: a durable per service (one
    per replica) and the forecasters' and deciders' history readers. The decider's durable
    reads all three of its families; a policy that needs fewer acks the others unread."""
    specs = []
    for durable in replica_durables("forecaster", forecaster_replicas):
        specs += [ConsumerSpec(durable, (METRICS,)), history_reader(durable, METRICS)]
    for durable in replica_durables("decider", decider_replicas):
        specs += [ConsumerSpec(durable, DECIDER_FAMILIES),
                  history_reader(durable, *DECIDER_FAMILIES)]
    specs += [ConsumerSpec(durable, (TARGETS,))
              for durable in replica_durables("actuator", actuator_replicas)]
    return specs


def consumer_filters(config: ConsumerConfig) -> list[str]:
    return list(config.filter_subjects or ([config.filter_subject] if config.filter_subject
                                           else []))


def consumer_differences(current: ConsumerConfig, spec: ConsumerSpec) -> list[str]:
    wanted = spec.config()
    found = []
    if sorted(consumer_filters(current)) != sorted(spec.filters):
        found.append(f"filters are {consumer_filters(current)} (want {list(spec.filters)})")
    if current.ack_policy != wanted.ack_policy:
        found.append(f"ack_policy is {current.ack_policy} (want {wanted.ack_policy})")
    if current.deliver_subject:
        found.append("it is a push consumer")
    return found


async def update_consumers(js: JetStreamContext, settings: ServiceSettings,
                           specs: Sequence[ConsumerSpec]) -> list[str]:
    """The admin's side: create every consumer of the layout, or put a changed one back."""
    done = []
    for spec in specs:
        try:
            info = await js.consumer_info(settings.stream_name, spec.name)
        except NotFoundError:
            await js.add_consumer(settings.stream_name, config=spec.config())
            done.append(f"created consumer {spec.name} on {', '.join(spec.filters)}")
            continue
        differences = consumer_differences(info.config, spec)
        if differences:
            await js.delete_consumer(settings.stream_name, spec.name)
            await js.add_consumer(settings.stream_name, config=spec.config())
            done.append(f"recreated consumer {spec.name}: {'; '.join(differences)}")
    return done


async def reset_consumer(nc: NATS, stream: str, consumer: str, sequence: int) -> int:
    """Rewind a consumer so that the next message it delivers is at or after ``sequence``
    (nats-server >= 2.14, ADR-60); how many messages it has to deliver from there."""
    reply = await nc.request(f"$JS.API.CONSUMER.RESET.{stream}.{consumer}",
                             f'{{"seq": {sequence}}}'.encode(), timeout=API_TIMEOUT_S)
    answer = json.loads(reply.data)
    if "error" in answer:
        raise BusError(f"cannot rewind consumer {consumer}: {answer['error']}")
    return int(answer.get("num_pending") or 0)

