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
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from shared import bus
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
ACK_WAIT_S = 60.0
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
    """What a running service holds: its settings, the NATS connection and its stop signal."""

    name: str
    settings: ServiceSettings
    nc: NATS
    js: JetStreamContext
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    consuming: int = 0
    # Readiness beyond NATS: each check returns None when ready, else why not (``/readyz``).
    readiness_checks: list[Callable[[], str | None]] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.nc.is_connected

    def not_ready(self) -> str | None:
        """Why this service cannot make progress now, or None (``/readyz``)."""
        if not self.ready:
            return "not connected to NATS"
        for check in self.readiness_checks:
            reason = check()
            if reason is not None:
                return reason
        return None

    async def publish(self, message: Envelope) -> None:
        await bus.publish(self.js, message)
        MESSAGES_PUBLISHED.labels(self.name, _family(message.subject())).inc()

    async def reject(self, subject: str, raw: bytes, kind: str, reason: str) -> None:
        MESSAGES_REJECTED.labels(self.name, kind).inc()
        log.warning("rejected a body on %s (%d bytes): %s", subject, len(raw), reason)
        await bus.publish_rejected(self.js, bus.rejected(self.name, subject, raw, reason))

    def parse(self, model: type[E], msg: Msg) -> tuple[E | None, str, str]:
        """The validated message, or None with the kind of fault and its reason."""
        size = len(msg.data)
        if size > self.settings.max_body_bytes:
            return None, "too_large", (
                f"body of {size} bytes exceeds the limit of {self.settings.max_body_bytes} bytes"
            )
        try:
            message = model.from_json(msg.data, default_id=_stream_position(msg))
        except ValidationError as exc:
            return None, "invalid", f"{model.__name__} invalid: {validation_reason(exc)}"
        except (ValueError, RecursionError) as exc:
            return None, "invalid_json", str(exc)[:500]
        if deployment_from_subject(msg.subject) != message.deployment:
            return None, "subject_mismatch", (
                f"subject {msg.subject} does not match the body's deployment {message.deployment}"
            )
        return message, "", ""

    async def read_stream(
        self, subject_filter: str, deliver: DeliverPolicy, start_time: datetime | None = None,
        batch: int = 512,
    ) -> AsyncIterator[Msg]:
        """What the stream holds on a subject now (from ``start_time`` with ``BY_START_TIME``),
        read once with a throwaway consumer; no acks, no durable state."""
        config = ConsumerConfig(deliver_policy=deliver, opt_start_time=start_time,
                                ack_policy=AckPolicy.NONE, inactive_threshold=30.0)
        sub = await self.js.pull_subscribe(subject_filter, stream=self.settings.stream_name,
                                           config=config)
        try:
            pending = (await sub.consumer_info()).num_pending or 0
            while pending > 0:
                try:
                    msgs = await sub.fetch(batch=min(batch, pending), timeout=2.0)
                except TimeoutError:
                    return
                for msg in msgs:
                    pending -= 1
                    yield msg
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

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
        messages of one key are handled in stream order whatever their family."""
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if not routes:
            raise ValueError("consume_routes needs at least one route")
        durable = durable or self.name
        filters = [route.subject_filter for route in routes]
        sub = await self._durable_subscription(durable, filters)
        in_flight = _PerKeyOrder(max_in_flight, keep_alive_s=ACK_WAIT_S / 3)
        self.consuming += 1
        log.info("consuming %s as durable %s", ", ".join(filters), durable)
        try:
            while not self.stop.is_set():
                if gate is not None and not await gate():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), timeout=0.2)
                    continue
                try:
                    msgs = await sub.fetch(batch=batch, timeout=1.0)
                except TimeoutError:
                    # nats-py raises its own subclass or plain asyncio.TimeoutError (the
                    # builtin on 3.11) when a poll finds nothing: both just mean "poll again".
                    continue
                except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
                        nats.js.errors.APIError, nats.errors.NoServersError) as exc:
                    log.warning("fetch failed (%s); retrying", exc)
                    await asyncio.sleep(1.0)
                    continue
                for msg in msgs:
                    route = route_of(routes, msg.subject)
                    if route is None or (owns is not None and not owns(msg.subject)):
                        # no route: the durable was widened by hand; not this service's to read
                        await self._skip(msg)
                    elif ordered_by is None:
                        await self._handle_one(msg, route.model, route.handler)
                    else:
                        await in_flight.submit(
                            ordered_by(msg), msg, functools.partial(
                                self._handle_one, model=route.model, handler=route.handler)
                        )
            # Stopped: finish (publish and ack) what was taken rather than leave it to redelivery.
            await in_flight.drain()
        finally:
            in_flight.cancel()  # only when cancelled: their messages are redelivered, unacked
            self.consuming -= 1
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _durable_subscription(
        self, durable: str, filters: Sequence[str]
    ) -> JetStreamContext.PullSubscription:
        """A pull subscription on ``durable``, created if missing; a durable left by an earlier
        version with other filter subjects is updated to ``filters`` (NATS >= 2.10 edits a
        consumer's filters in place; what it had not delivered yet on the new subjects since its
        position is delivered now)."""
        stream = self.settings.stream_name
        single = len(filters) == 1
        config = ConsumerConfig(
            name=durable,
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW,
            ack_wait=ACK_WAIT_S,
            max_ack_pending=1000,
            filter_subject=filters[0] if single else None,
            filter_subjects=None if single else list(filters),
        )
        try:
            info = await self.js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError:
            await self.js.add_consumer(stream, config=config)
        else:
            had = info.config.filter_subjects or (
                [info.config.filter_subject] if info.config.filter_subject else []
            )
            if sorted(had) != sorted(filters):
                log.info("durable %s read %s; now %s", durable, ", ".join(had) or "everything",
                         ", ".join(filters))
                await self.js.add_consumer(stream, config=config)
        return await self.js.pull_subscribe_bind(durable=durable, stream=stream)

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


def _http_app(runtime_ref: list[Runtime]) -> Callable[..., Iterable[bytes]]:
    metrics_app = prometheus_client.make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok = bool(runtime_ref) and runtime_ref[0].ready
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"not connected to NATS\n"]
        if environ.get("PATH_INFO") == "/readyz":
            reason = runtime_ref[0].not_ready() if runtime_ref else "starting"
            start_response("200 OK" if reason is None else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])
            return [b"ok\n" if reason is None else reason.encode() + b"\n"]
        return metrics_app(environ, start_response)

    return app


def start_http(settings: ServiceSettings, runtime_ref: list[Runtime]) -> WSGIServer:
    try:
        server = make_server(settings.http_host, settings.http_port, _http_app(runtime_ref),
                             handler_class=_QuietHandler)
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


async def serve(name: str, settings: ServiceSettings,
                main: Callable[[Runtime], Coroutine[Any, Any, None]]) -> int:
    """Run ``main`` as service ``name`` until it returns or SIGTERM/SIGINT; then drain."""
    runtime_ref: list[Runtime] = []
    http = start_http(settings, runtime_ref)
    log.info("%s: /metrics and /healthz on %s:%d", name, settings.http_host, http.server_port)
    nc = await bus.connect(settings, name)
    js = nc.jetstream()
    await bus.ensure_stream(js, settings)
    runtime = Runtime(name=name, settings=settings, nc=nc, js=js)
    runtime_ref.append(runtime)
    NATS_CONNECTED.labels(name).set_function(lambda: float(nc.is_connected))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runtime.stop.set)
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
        log.error("%s: stopped on an error", name, exc_info=task.exception())
        code = 1
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.drain(), timeout=5.0)
    http.shutdown()
    log.info("%s: stopped", name)
    return code
