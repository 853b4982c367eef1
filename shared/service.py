"""The thin shell every service shares: connect, consume durably, validate, publish, drain.

A service is a coroutine ``main(runtime)``; it calls ``runtime.consume(...)`` with a handler that
turns one valid input message into the messages to publish (or ``runtime.consume_routes(...)``
to read several subject families, each with its own model and handler, through one durable
consumer, in the order the stream holds them). Everything about a bad body (too big,
not JSON, failing validation, a subject that disagrees with its deployment key) is handled here:
the body is acked, published on ``slaplanner.rejected.<service>`` with its reason, counted, and the
loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import nats.errors
import nats.js.errors
import prometheus_client
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from pydantic import ValidationError

from shared import bus
from shared import stored as stored_reads
from shared.clock_guard import window_ahead
from shared.messages import Envelope, deployment_from_subject
from shared.service_settings import ServiceSettings

log = logging.getLogger("slaplanner.service")

E = TypeVar("E", bound=Envelope)
# A handler returns the messages to publish, or None to hand the message back unhandled (it is
# redelivered later, to this instance or another).
Handler = Callable[[E], Awaitable[Iterable[Envelope] | None]]
# A gate says whether this instance should take work now (a follower of a leader election
# should not); it is asked before every fetch.
Gate = Callable[[], Awaitable[bool]]
# Messages with the same ordering key are handled one at a time in delivery order; messages with
# different keys are handled side by side (e.g. the key is the deployment of the subject).
OrderingKey = Callable[[Msg], str]
# Whether this instance owns a subject; a message it does not own is acked unread, because
# another instance (with its own durable consumer) handles it.
Owns = Callable[[str], bool]

# How long the server waits for an ack before it redelivers, seconds.
ACK_WAIT_S = bus.ACK_WAIT_S
# /healthz fails when the event loop has not run for this long, seconds: a loop blocked that
# long is a bug that a restart clears, while a bus outage is /readyz's (a restart cannot help).
LIVENESS_S = 30.0
# Subjects whose newest handled window is remembered (to drop stale redeliveries); beyond it
# the least recently handled is forgotten.
NEWEST_KEPT = 100_000
# How long to wait for the server when retiring an old durable consumer: a user whose permissions
# do not cover the old name gets no answer at all, only a timeout.
RETIRE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Route(Generic[E]):
    """One subject family of a consumer: the bodies on ``subject_filter`` are ``model``s, handled
    by ``handler``."""

    subject_filter: str
    model: type[E]
    handler: Handler[E]


def subject_matches(subject_filter: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    wanted, tokens = subject_filter.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or (token != "*" and token != tokens[index]):
            return False
    return len(tokens) == len(wanted)


def route_of(routes: Sequence[Route[Any]], subject: str) -> Route[Any] | None:
    """The first route whose filter matches ``subject``."""
    return next((r for r in routes if subject_matches(r.subject_filter, subject)), None)


MESSAGES_RECEIVED = prometheus_client.Counter(
    "slaplanner_messages_received", "Bodies received from the bus", ["service", "subject_family"]
)
MESSAGES_PUBLISHED = prometheus_client.Counter(
    "slaplanner_messages_published", "Messages published to the bus", ["service", "subject_family"]
)
MESSAGES_SKIPPED = prometheus_client.Counter(
    "slaplanner_messages_skipped", "Bodies acked unread because another replica owns them",
    ["service", "subject_family"],
)
MESSAGES_REJECTED = prometheus_client.Counter(
    "slaplanner_messages_rejected", "Bodies refused, by kind of fault", ["service", "kind"]
)
HANDLER_SECONDS = prometheus_client.Histogram(
    "slaplanner_handler_seconds",
    "Time to handle one valid message, seconds",
    ["service"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
NATS_CONNECTED = prometheus_client.Gauge(
    "slaplanner_nats_connected", "1 while connected to NATS", ["service"]
)


def _family(subject: str) -> str:
    parts = subject.split(".")
    return parts[1] if len(parts) > 1 else subject


def _stream_position(msg: Msg) -> str | None:
    try:
        meta = msg.metadata
    except Exception:  # not a JetStream message
        return None
    return f"{meta.stream}-{meta.sequence.stream}"


def validation_reason(exc: ValidationError) -> str:
    parts = []
    for item in exc.errors()[:10]:
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


@dataclass
class Runtime:
    """What a running service holds: its settings, the NATS connection and its stop signal.

    ``problems`` says why the service cannot make progress now (no NATS, a stream missing or
    configured otherwise, a consumer missing): /readyz answers 503 with them while any is set.
    ``clock`` is the one place the shell reads the time (tests and replays give their own).
    """

    name: str
    settings: ServiceSettings
    nc: NATS
    js: JetStreamContext
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    consuming: int = 0
    clock: Callable[[], float] = time.time
    msg_id_key: bytes = b""
    problems: dict[str, str] = field(default_factory=dict)
    # Readiness beyond the bus (the actuator's Kubernetes API): each check returns None when
    # ready, else why not.
    readiness_checks: list[Callable[[], str | None]] = field(default_factory=list)
    # the newest window handled per subject, to drop a redelivery that comes behind newer ones
    _newest: dict[str, float] = field(default_factory=dict)
    _history_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def ready(self) -> bool:
        return not self.not_ready()

    def not_ready(self) -> list[str]:
        """Why the service cannot make progress now; empty when it can."""
        found = [] if self.nc.is_connected else ["not connected to NATS"]
        found += self.problems.values()
        return found + [reason for check in self.readiness_checks
                        if (reason := check()) is not None]

    def set_problem(self, what: str, problem: str | None) -> None:
        """Record (or clear, with None) why ``what`` stops progress; logged once per change."""
        before = self.problems.get(what)
        if problem == before:
            return
        if problem is None:
            del self.problems[what]
            log.info("%s: %s is fine again", self.name, what)
        else:
            self.problems[what] = problem
            log.error("%s: %s", self.name, problem)

    async def publish(self, message: Envelope) -> None:
        await bus.publish(self.js, message, self.msg_id_key)
        MESSAGES_PUBLISHED.labels(self.name, _family(message.subject())).inc()

    async def publish_body(self, subject: str, body: bytes, message_id: str) -> None:
        """A body that is no bus message (e.g. the virtual backend's commands), de-duplicated
        by the same keyed header as the messages."""
        await bus.publish_body(self.js, subject, body, message_id, self.msg_id_key)

    async def reject(self, subject: str, raw: bytes, kind: str, reason: str) -> None:
        MESSAGES_REJECTED.labels(self.name, kind).inc()
        log.warning("rejected a body on %s (%d bytes): %s", subject, len(raw), reason)
        await bus.publish_rejected(self.js, bus.rejected(self.name, subject, raw, reason))

    def parse(self, model: type[E], msg: Msg) -> tuple[E | None, str, str]:
        """The validated message, or None with the kind of fault and its reason."""
        return self._validate(model, msg.subject, msg.data, _stream_position(msg))

    def stored(self, model: type[E], subject: str, data: bytes) -> E | None:
        """A body read back from the stream (a rebuild, a restore) if a live one like it would
        be accepted; None otherwise, so a forged or far-future body never enters a history."""
        message, kind, reason = self._validate(model, subject, data, None)
        if message is None:
            MESSAGES_SKIPPED.labels(self.name, f"stored_{kind}").inc()
            log.info("skipped a stored body on %s: %s", subject, reason)
        return message

    def _validate(self, model: type[E], subject: str, data: bytes,
                  default_id: str | None) -> tuple[E | None, str, str]:
        size = len(data)
        if size > self.settings.max_body_bytes:
            return None, "too_large", (
                f"body of {size} bytes exceeds the limit of {self.settings.max_body_bytes} bytes"
            )
        try:
            message = model.from_json(data, default_id=default_id)
        except ValidationError as exc:
            return None, "invalid", f"{model.__name__} invalid: {validation_reason(exc)}"
        except (ValueError, RecursionError) as exc:
            return None, "invalid_json", str(exc)[:500]
        if deployment_from_subject(subject) != message.deployment:
            return None, "subject_mismatch", (
                f"subject {subject} does not match the body's deployment {message.deployment}"
            )
        ahead = window_ahead(message.window_end, self.clock(),
                             self.settings.max_window_ahead_s)
        if ahead is not None:
            return None, "future_window", ahead
        return message, "", ""

    async def read_stream(
        self, subject_filter: str | Sequence[str], deliver: DeliverPolicy,
        start_time: datetime | None = None, batch: int = 512, until_seq: int | None = None,
    ) -> AsyncIterator[Msg]:
        """What the stream holds on a family now: the last message of each subject
        (``LAST_PER_SUBJECT``, one family), or every message from ``start_time``
        (``BY_START_TIME``; from the start with ``ALL``) on one or more families in stream
        order, up to ``until_seq`` if given, read under names this service owns: no consumer
        is created by the read itself (docs/operations.md, Security)."""
        stream = self.settings.stream_name
        filters = (subject_filter,) if isinstance(subject_filter, str) else tuple(subject_filter)
        if deliver == DeliverPolicy.LAST_PER_SUBJECT:
            [only] = filters
            async for item in stored_reads.last_per_subject(self.nc, self.js, stream, only):
                yield item
            return
        reader = bus.history_reader(self.settings.durable_name() or self.name, *filters)
        async with self._history_lock:
            if not await self._await_consumer(reader):
                return  # stopped first
            since = start_time if deliver == DeliverPolicy.BY_START_TIME else None
            async for item in stored_reads.since(self.nc, self.js, stream, reader, since, batch,
                                                 until_seq):
                yield item

    async def consume(
        self,
        subject_filter: str,
        model: type[E],
        handler: Handler[E],
        durable: str | None = None,
        batch: int = 32,
        gate: Gate | None = None,
        ordered_by: OrderingKey | None = None,
        max_in_flight: int = 1,
        owns: Owns | None = None,
    ) -> None:
        """Feed each valid body on ``subject_filter`` to ``handler`` until stopped.

        By default one message at a time. With ``ordered_by``, up to ``max_in_flight`` messages
        are handled at once: those of one key strictly in delivery order, those of different keys
        side by side, each acked only after its outputs are published. With ``owns``, a message
        on a subject this instance does not own is acked unread.
        """
        await self.consume_routes(
            [Route(subject_filter, model, handler)], durable=durable, batch=batch, gate=gate,
            ordered_by=ordered_by, max_in_flight=max_in_flight, owns=owns,
        )

    async def consume_routes(
        self,
        routes: Sequence[Route[Any]],
        durable: str | None = None,
        batch: int = 32,
        gate: Gate | None = None,
        ordered_by: OrderingKey | None = None,
        max_in_flight: int = 1,
        owns: Owns | None = None,
    ) -> None:
        """``consume`` for several subject families through one durable consumer: each body goes
        to the handler of the first route its subject matches, and, with ``ordered_by``, the
        messages of one key are handled in stream order whatever their family.

        The durable is found (or made, see ``bus_setup``) before the first fetch and again
        whenever the server loses it, e.g. a nats-server that came back with an empty store:
        meanwhile /readyz says why nothing moves."""
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if not routes:
            raise ValueError("consume_routes needs at least one route")
        spec = bus.ConsumerSpec(durable or self.name,
                                tuple(route.subject_filter for route in routes))
        in_flight = _PerKeyOrder(max_in_flight, keep_alive_s=ACK_WAIT_S / 3)
        self.consuming += 1
        log.info("consuming %s as durable %s", ", ".join(spec.filters), spec.name)
        try:
            while not self.stop.is_set():
                sub = await self._bind(spec)
                if sub is None:
                    break
                try:
                    await self._fetch_until_lost(sub, routes, batch, gate, ordered_by,
                                                 in_flight, owns)
                finally:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
            # Stopped: finish (publish and ack) what was taken rather than leave it to redelivery.
            await in_flight.drain()
        finally:
            in_flight.cancel()  # only when cancelled: their messages are redelivered, unacked
            self.consuming -= 1

    async def _fetch_until_lost(
        self, sub: JetStreamContext.PullSubscription, routes: Sequence[Route[Any]], batch: int,
        gate: Gate | None, ordered_by: OrderingKey | None, in_flight: _PerKeyOrder,
        owns: Owns | None,
    ) -> None:
        """Fetch and hand out until stopped, or until the server no longer has the consumer."""
        while not self.stop.is_set():
            if gate is not None and not await gate():
                await self._pause(0.2)
                continue
            try:
                msgs = await sub.fetch(batch=batch, timeout=1.0)
            except TimeoutError:
                # nats-py raises its own subclass or plain asyncio.TimeoutError (the
                # builtin on 3.11) when a poll finds nothing: both just mean "poll again".
                continue
            except (nats.js.errors.ServiceUnavailableError, nats.js.errors.NotFoundError):
                return  # no consumer answers: the stream or the consumer is gone; bind again
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
                    nats.js.errors.APIError, nats.errors.NoServersError) as exc:
                log.warning("fetch failed (%s); retrying", exc)
                await self._pause(1.0)
                continue
            for msg in msgs:
                route = route_of(routes, msg.subject)
                if route is None or (owns is not None and not owns(msg.subject)):
                    # no route: a family this service's policy does not read (the admin's
                    # durable reads them all); not this instance's: another replica's
                    await self._skip(msg)
                elif ordered_by is None:
                    await self._handle_one(msg, route.model, route.handler)
                else:
                    await in_flight.submit(
                        ordered_by(msg), msg, functools.partial(
                            self._handle_one, model=route.model, handler=route.handler)
                    )

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)

    async def _await_consumer(self, spec: bus.ConsumerSpec) -> bool:
        """Wait until ``spec``'s consumer is there as needed (False: stopped first); meanwhile
        /readyz says what is missing."""
        what = f"consumer {spec.name}"
        while not self.stop.is_set():
            problem = await self._ensure_consumer(spec)
            self.set_problem(what, problem)
            if problem is None:
                return True
            await self._pause(self.settings.bus_check_interval_s)
        return False

    async def _bind(self, spec: bus.ConsumerSpec) -> JetStreamContext.PullSubscription | None:
        """A pull subscription on ``spec``'s durable once it is there as needed (None if the
        service stops first)."""
        while await self._await_consumer(spec):
            try:
                return await self.js.pull_subscribe_bind(durable=spec.name,
                                                         stream=self.settings.stream_name)
            except (TimeoutError, nats.errors.Error) as exc:
                self.set_problem(f"consumer {spec.name}",
                                 f"cannot bind to consumer {spec.name}: {exc}")
                await self._pause(self.settings.bus_check_interval_s)
        return None

    async def _ensure_consumer(self, spec: bus.ConsumerSpec) -> str | None:
        """None once ``spec``'s consumer exists with (at least) its filters, made if missing
        when this service makes its own (``bus_setup``); else why it is not usable."""
        stream = self.settings.stream_name
        create = self.settings.bus_setup == "service"
        try:
            info = await self.js.consumer_info(stream, spec.name, timeout=bus.API_TIMEOUT_S)
        except nats.js.errors.NotFoundError:
            if not create:
                return (f"consumer {spec.name} of stream {stream} is missing; waiting for the "
                        "NATS admin to create it (`slaplanner bus setup`)")
            try:
                await bus.ensure_streams(self.js, self.settings)
                await self.js.add_consumer(stream, config=spec.config(),
                                           timeout=bus.API_TIMEOUT_S)
            except bus.BusError as exc:
                return str(exc)
            except (TimeoutError, nats.errors.Error) as exc:
                return f"cannot create consumer {spec.name}: {exc}"
            log.info("created consumer %s on %s", spec.name, ", ".join(spec.filters))
            return None
        except (TimeoutError, nats.errors.Error) as exc:
            return f"cannot look up consumer {spec.name}: {str(exc) or type(exc).__name__}"
        have = bus.consumer_filters(info.config)
        if set(spec.filters) <= set(have) and not info.config.deliver_subject:
            return None
        if not create:
            return (f"consumer {spec.name} reads {', '.join(have) or 'everything'}, not "
                    f"{', '.join(spec.filters)}; have the NATS admin run `slaplanner bus setup`")
        # NATS >= 2.10 edits a consumer's filters in place; what it had not delivered yet on
        # the new subjects since its position is delivered now.
        log.info("durable %s read %s; now %s", spec.name, ", ".join(have) or "everything",
                 ", ".join(spec.filters))
        try:
            await self.js.add_consumer(stream, config=spec.config(), timeout=bus.API_TIMEOUT_S)
        except (TimeoutError, nats.errors.Error) as exc:
            return f"cannot update consumer {spec.name}: {exc}"
        return None

    async def check_streams(self) -> bus.BusError | None:
        """Look the streams up (re-created if lost, when this service makes its own) and record
        what is wrong with them; the error if one cannot be used at all (no JetStream, or a
        stream configured otherwise)."""
        create = self.settings.bus_setup == "service"
        for config in (bus.stream_config(self.settings),
                       bus.decisions_stream_config(self.settings)):
            try:
                problem = await bus.check_stream(self.js, self.settings, config, create)
            except (TimeoutError, nats.errors.Error) as exc:
                problem = (None if not self.nc.is_connected  # told as "not connected"
                           else f"cannot look up stream {config.name}: {exc}")
            except bus.BusError as exc:
                self.set_problem(f"stream {config.name}", str(exc))
                return exc  # one line is enough: nothing moves until this is mended
            self.set_problem(f"stream {config.name}", problem)
        return None

    async def watch_streams(self) -> None:
        """``check_streams`` every ``bus_check_interval_s``, so that /readyz tells a lost or
        foreign stream within that time, and a lost one comes back as soon as it may."""
        while not self.stop.is_set():
            await self._pause(self.settings.bus_check_interval_s)
            await self.check_streams()

    async def retire_durables(self, names: Iterable[str]) -> list[str]:
        """Delete durable consumers an earlier version of this service used, if they exist;
        the names deleted. Best effort: a server that does not answer (or a user not allowed to
        touch those names) leaves them, with a warning saying how to remove them by hand."""
        stream = self.settings.stream_name

        async def retire(name: str) -> str | None:
            try:
                await self.js.consumer_info(stream, name, timeout=RETIRE_TIMEOUT_S)
                await asyncio.wait_for(self.js.delete_consumer(stream, name), RETIRE_TIMEOUT_S)
            except nats.js.errors.NotFoundError:
                return None
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("could not remove the old durable %s (%s); remove it with "
                            "`nats consumer rm %s %s`", name, str(exc) or type(exc).__name__,
                            stream, name)
                return None
            log.info("removed the old durable %s", name)
            return name

        retired = await asyncio.gather(*(retire(name) for name in names))
        return [name for name in retired if name is not None]

    def _stale_redelivery(self, msg: Msg, message: Envelope) -> bool:
        newest = self._newest.get(msg.subject)
        if newest is None or message.window_end >= newest:
            return False
        try:
            return msg.metadata.num_delivered > 1
        except Exception:  # not a JetStream message
            return False

    def _handled(self, subject: str, window_end: float) -> None:
        newest = self._newest.pop(subject, None)
        self._newest[subject] = window_end if newest is None else max(newest, window_end)
        if len(self._newest) > NEWEST_KEPT:  # forget the subject least recently handled
            del self._newest[next(iter(self._newest))]

    async def _publish_or_say_why_never(self, message: Envelope) -> str | None:
        """Publish; if the bus refuses the message for its size, the reason instead (any
        other failure propagates, to be retried)."""
        try:
            await self.publish(message)
        except (nats.errors.MaxPayloadError, nats.js.errors.APIError) as exc:
            size = len(message.to_json())
            why = _never_publishable(exc, self.nc.max_payload)
            if why is None:
                raise
            return f"its {type(message).__name__} of {size} bytes {why}"
        return None

    async def _skip(self, msg: Msg) -> None:
        MESSAGES_SKIPPED.labels(self.name, _family(msg.subject)).inc()
        try:
            await msg.ack()
        except (TimeoutError, nats.errors.Error) as exc:
            log.warning("could not ack a message owned elsewhere (%s)", exc)

    async def _handle_one(self, msg: Msg, model: type[E], handler: Handler[E]) -> None:
        MESSAGES_RECEIVED.labels(self.name, _family(msg.subject)).inc()
        message, kind, reason = self.parse(model, msg)
        try:
            if message is None:
                await self.reject(msg.subject, msg.data, kind, reason)
            elif self._stale_redelivery(msg, message):
                # Handed out before a crash, back only now (after the ack wait) behind newer
                # windows of its subject: what it would decide is outdated, and handling it
                # now would put an old window after newer ones. It stays in the stream.
                MESSAGES_SKIPPED.labels(self.name, "stale_redelivery").inc()
                log.info("dropped a redelivered %s for window %.0f on %s: window %.0f was "
                         "handled since", model.__name__, message.window_end, msg.subject,
                         self._newest[msg.subject])
            else:
                started = time.perf_counter()
                try:
                    result = await handler(message)
                except Exception as exc:
                    # A handler that raises has a bug; the message is kept on the rejected
                    # subject (not lost, not retried forever) and the loop goes on.
                    log.exception("handler failed on %s", msg.subject)
                    await self.reject(msg.subject, msg.data, "handler_error", f"internal: {exc!r}")
                    result = []
                HANDLER_SECONDS.labels(self.name).observe(time.perf_counter() - started)
                if result is None:
                    await msg.nak(delay=1.0)
                    return
                for output in result:
                    never = await self._publish_or_say_why_never(output)
                    if never is not None:
                        # No redelivery could ever publish it: the input is rejected with the
                        # reason and acked, instead of coming back forever and holding up
                        # every later message of its key.
                        await self.reject(msg.subject, msg.data, "unpublishable", never)
                self._handled(msg.subject, message.window_end)
            await msg.ack()
        except (TimeoutError, nats.errors.Error) as exc:
            # The bus failed under us: leave the message unacked so it is redelivered; the
            # outputs' deterministic ids make the second publication a duplicate JetStream drops.
            log.warning("could not publish or ack (%s); the message will be redelivered", exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=1.0)


# JetStream's answer to a message over the stream's own max_msg_size.
_STREAM_MESSAGE_TOO_LARGE = 10054


def _never_publishable(exc: Exception, max_payload: int) -> str | None:
    """Why the bus refuses a message for its size (no retry can help), or None."""
    if isinstance(exc, nats.errors.MaxPayloadError):
        return f"exceeds the server's max_payload of {max_payload} bytes"
    if isinstance(exc, nats.js.errors.APIError) and exc.err_code == _STREAM_MESSAGE_TOO_LARGE:
        return f"exceeds the stream's max_msg_size ({exc.description})"
    return None


class _PerKeyOrder:
    """Handles messages side by side across keys and one at a time, in order, within a key.

    At most ``limit`` messages are taken and not yet done: ``submit`` waits for a free slot,
    which holds the fetch loop back (and with it the consumer) instead of queueing without end.
    A message waiting for an earlier one of its key tells the server it is in progress, so its
    ack deadline does not pass while a slow predecessor runs.
    """

    def __init__(self, limit: int, keep_alive_s: float) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._keep_alive_s = keep_alive_s
        self._last_of_key: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, key: str, msg: Msg, handle: Callable[[Msg], Awaitable[None]]) -> None:
        await self._slots.acquire()
        previous = self._last_of_key.get(key)
        task = asyncio.create_task(self._run(key, msg, previous, handle))
        self._last_of_key[key] = task
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def drain(self) -> None:
        while pending := {task for task in self._tasks if not task.done()}:
            await asyncio.wait(pending)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def _run(self, key: str, msg: Msg, previous: asyncio.Task[None] | None,
                   handle: Callable[[Msg], Awaitable[None]]) -> None:
        try:
            while previous is not None and not previous.done():
                await asyncio.wait({previous}, timeout=self._keep_alive_s)
                if not previous.done():
                    with contextlib.suppress(TimeoutError, nats.errors.Error):
                        await msg.in_progress()
            await handle(msg)
        finally:
            self._slots.release()
            if self._last_of_key.get(key) is asyncio.current_task():
                del self._last_of_key[key]

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("message handling failed", exc_info=task.exception())


def _http_app(runtime_ref: list[Runtime], beat: list[float]) -> Callable[..., Iterable[bytes]]:
    """/healthz: the process is alive (its event loop runs); /readyz: it can make progress
    (NATS, streams and consumers as needed), else 503 with the reasons, one per line."""
    metrics_app = prometheus_client.make_wsgi_app()

    def answer(start_response: Callable[..., Any], ok: bool, text: str) -> Iterable[bytes]:
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "text/plain; charset=utf-8")])
        return [text.encode() + b"\n"]

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path == "/healthz":
            silent_s = time.monotonic() - beat[0]
            return answer(start_response, silent_s < LIVENESS_S,
                          "ok" if silent_s < LIVENESS_S else
                          f"event loop silent for {silent_s:.0f} s")
        if path == "/readyz":
            problems = runtime_ref[0].not_ready() if runtime_ref else ["starting"]
            return answer(start_response, not problems, "\n".join(problems) or "ready")
        return metrics_app(environ, start_response)

    return app


def start_http(settings: ServiceSettings, runtime_ref: list[Runtime],
               beat: list[float]) -> WSGIServer:
    try:
        server = make_server(settings.http_host, settings.http_port,
                             _http_app(runtime_ref, beat), handler_class=_QuietHandler)
    except OSError as exc:
        raise SystemExit(
            f"cannot serve /metrics and /healthz on {settings.http_host}:{settings.http_port} "
            f"({exc.strerror or exc}): set --http-port / SLAPLANNER_HTTP_PORT (0 picks a free "
            "port)"
        ) from None
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def _beat(beat: list[float]) -> None:
    while True:
        beat[0] = time.monotonic()
        await asyncio.sleep(1.0)


async def serve(name: str, settings: ServiceSettings,
                main: Callable[[Runtime], Coroutine[Any, Any, None]]) -> int:
    """Run ``main`` as service ``name`` until it returns or SIGTERM/SIGINT; then drain.

    What stops it before it starts (NATS unreachable, credentials refused, no JetStream, a
    stream configured otherwise) is one ERROR line and exit code 1, within
    ``connect_deadline_s``; its supervisor restarts it.
    """
    beat = [time.monotonic()]
    runtime_ref: list[Runtime] = []
    http = start_http(settings, runtime_ref, beat)
    log.info("%s: /metrics and /healthz on %s:%d (and /readyz)", name, settings.http_host,
             http.server_port)
    fatal: list[str] = []

    def on_fatal(message: str) -> None:
        fatal.append(message)
        if runtime_ref:
            runtime_ref[0].stop.set()

    # From the start: a SIGTERM while connecting or checking the streams (a pod stopped as it
    # starts) is a clean stop, not a death by the signal. The event becomes the runtime's stop.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    connecting = asyncio.create_task(bus.connect(settings, name, on_fatal))
    stop_asked = asyncio.create_task(stopping.wait())
    await asyncio.wait({connecting, stop_asked}, return_when=asyncio.FIRST_COMPLETED)
    stop_asked.cancel()
    if not connecting.done():
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError, bus.BusError):
            await connecting
        log.info("%s: stopped while connecting to NATS", name)
        http.shutdown()
        return 0
    try:
        nc = connecting.result()
    except bus.BusError as exc:
        log.error("%s: %s", name, exc)
        http.shutdown()
        return 1
    runtime = Runtime(name=name, settings=settings, nc=nc, js=nc.jetstream(),
                      msg_id_key=bus.message_id_key(settings), stop=stopping)
    if await runtime.check_streams() is not None:  # logged as it was found
        await nc.close()
        http.shutdown()
        return 1
    runtime_ref.append(runtime)
    NATS_CONNECTED.labels(name).set_function(lambda: float(nc.is_connected))
    helpers = [asyncio.create_task(_beat(beat)), asyncio.create_task(runtime.watch_streams())]
    task = asyncio.create_task(main(runtime))
    stopper = asyncio.create_task(runtime.stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    runtime.stop.set()
    stopper.cancel()
    code = 0
    done, _ = await asyncio.wait({task}, timeout=5.0)
    if not done:
        log.warning("%s: main loop did not stop within 5 s; cancelling it", name)
        task.cancel()
    elif task.exception() is not None:
        error = task.exception()
        if isinstance(error, bus.BusError):
            log.error("%s: %s", name, error)
        else:
            log.error("%s: stopped on an error", name, exc_info=error)
        code = 1
    for helper in helpers:
        helper.cancel()
    if fatal:
        log.error("%s: %s", name, fatal[0])
        code = 1
        with contextlib.suppress(Exception):
            await nc.close()
    else:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.drain(), timeout=5.0)
    http.shutdown()
    log.info("%s: stopped", name)
    return code


async def forget_idle_periodically(
    stop: asyncio.Event,
    idle_forget_s: float,
    newest_seen_s: Callable[[], float | None],
    forget: Callable[[float], None],
    clock: Callable[[], float] = time.time,
) -> None:
    """Every tenth of ``idle_forget_s`` (at least 0.5 s, at most a minute) until ``stop``, call
    ``forget(now_s)`` with ``now_s`` in window time: the newest window the service has seen
    (a replay runs in virtual time), capped by the wall clock so that one window stamped far
    ahead cannot make every other deployment look idle. Nothing when ``idle_forget_s`` is 0."""
    if idle_forget_s <= 0.0:
        return
    interval_s = min(60.0, max(0.5, idle_forget_s / 10.0))
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        newest_s = newest_seen_s()
        if newest_s is not None:
            forget(min(newest_s, clock()))
