"""``slaplanner status``, ``watch`` and ``publish``: the bus from a terminal, without the nats CLI.

- ``status [NAMESPACE/NAME]``: like ``kubectl describe hpa``, per deployment the running, desired
  and applied counts, the last decision and its binding rules, predicted and observed attainment,
  and the conditions of ``shared.conditions``, read from the JetStream stream; with no deployment,
  also which services read the bus. ``--wait`` waits until the forecaster, decider and actuator
  read it (what a script needs before it publishes).
- ``watch [NAMESPACE/NAME]``: one line per decision as it happens (``shared.describe.Watch``),
  starting with the latest ones in the stream, and the bodies a service rejected.
- ``publish SUBJECT BODY``: one body into the stream, checked first as the services check it.

The formatting is pure (``shared.describe``, ``shared.conditions``); this module only connects,
reads and writes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from shared import bus, describe, stored
from shared import settings as settings_mod
from shared.messages import (
    DNS_LABEL,
    METRICS_SUBJECT,
    SUBJECT_PREFIX,
    DeploymentKey,
    Envelope,
    LoadForecast,
    MetricSnapshot,
    Rejected,
    ReplicaTarget,
    ScaleEvent,
    deployment_from_subject,
)
from shared.service import Runtime, validation_reason
from shared.service_settings import ServiceSettings

# The subject family (second token) -> the message it carries.
FAMILIES: dict[str, type[Envelope]] = {
    "metrics": MetricSnapshot,
    "forecast": LoadForecast,
    "target": ReplicaTarget,
    "scaled": ScaleEvent,
}
# The services that read the bus through durable consumers (the collector only publishes).
READERS = ("forecaster", "decider", "actuator")
CONNECT_TIMEOUT_S = 3.0
# After this long without a message, ``watch`` shows the decisions still waiting for their
# ScaleEvent.
QUIET_S = 2.0


class ToolError(Exception):
    """A one-line answer for the person at the terminal."""


# --- connecting --------------------------------------------------------------------------------

def _bus_fields() -> list[str]:
    return [name for name in ServiceSettings.model_fields
            if name.startswith("nats_") or name == "stream_name"]


def add_bus_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the bus is, as the services take it (flags and ``SLAPLANNER_*`` variables)."""
    group = parser.add_argument_group("NATS (as the services take it)")
    for name in _bus_fields():
        info = ServiceSettings.model_fields[name]
        default = info.get_default(call_default_factory=True)
        group.add_argument(settings_mod.flag_name(name), dest=name, default=None,
                           help=f"{info.description} [env {settings_mod.env_name(name)}; "
                           f"default {default!r}]".replace("%", "%%"))


def bus_settings(args: argparse.Namespace, env: Mapping[str, str]) -> ServiceSettings:
    given = {name: getattr(args, name) for name in _bus_fields()}
    values: dict[str, Any] = {}
    for name, value in given.items():
        if value is not None:
            values[name] = value
        elif settings_mod.env_name(name) in env:
            values[name] = env[settings_mod.env_name(name)]
    try:
        return ServiceSettings.model_validate(values)
    except ValidationError as exc:
        message = settings_mod.describe_error(ServiceSettings, exc)
        raise ToolError(message.replace("\n", " ")) from None


async def connect(settings: ServiceSettings, tool: str) -> NATS:
    """A connection that fails at once, in one line, when NATS cannot be reached."""
    options = bus.connect_options(settings, tool)
    options.update(connect_timeout=CONNECT_TIMEOUT_S, max_reconnect_attempts=0,
                   allow_reconnect=False)

    async def quiet(exc: Exception) -> None:
        return  # the failure is reported once, below

    urls = ", ".join(settings.nats_url)
    try:
        client = bus.new_client(settings)
        # one attempt per server, each bounded by the connect timeout: a refused port is not
        # always reported at once by the client, which tries the pool until this runs out
        await asyncio.wait_for(
            client.connect(**options, error_cb=quiet),
            timeout=CONNECT_TIMEOUT_S * len(settings.nats_url) + 1.0,
        )
        return client
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        raise ToolError(
            f"cannot reach NATS at {urls} ({str(exc) or type(exc).__name__}): start a server "
            "with JetStream (nats-server -js) or point --nats-url / SLAPLANNER_NATS_URL at one"
        ) from None


async def stream_or_error(js: JetStreamContext, settings: ServiceSettings) -> None:
    try:
        await js.stream_info(settings.stream_name)
    except nats.js.errors.NotFoundError:
        raise ToolError(
            f"no stream {settings.stream_name} on {', '.join(settings.nats_url)}: no service "
            "has started there yet (each creates it on start)"
        ) from None
    except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
        raise ToolError(
            f"NATS at {', '.join(settings.nats_url)} has no JetStream: start the server with "
            "-js (nats-server -js)"
        ) from None
    except (TimeoutError, nats.errors.Error) as exc:
        raise ToolError(f"cannot read the stream {settings.stream_name}: {exc}") from None


@contextlib.asynccontextmanager
async def session(args: argparse.Namespace,
                  tool: str) -> AsyncIterator[tuple[NATS, JetStreamContext, ServiceSettings]]:
    """The connection a tool's flags and ``SLAPLANNER_*`` variables name, closed afterwards."""
    settings = bus_settings(args, os.environ)
    nc = await connect(settings, tool)
    try:
        yield nc, nc.jetstream(), settings
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def run(tool: str, main: Callable[[], Any]) -> int:
    """Run a tool's coroutine; a ``ToolError`` is one line on stderr and exit code 1."""
    try:
        return int(asyncio.run(main()) or 0)
    except ToolError as exc:
        print(f"slaplanner {tool}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def deployment_key(text: str | None) -> DeploymentKey | None:
    if text is None:
        return None
    namespace, sep, name = text.partition("/")
    try:
        if not sep:
            raise ValueError(text)
        return DeploymentKey(namespace=namespace, name=name)
    except ValueError:
        raise ToolError(
            f"{text!r} is not a deployment: write NAMESPACE/NAME, each a DNS label "
            f"({DNS_LABEL}), e.g. prod/llama"
        ) from None


def parse_message(msg: Msg) -> Envelope | Rejected | None:
    """A stage message or a rejection, by its subject; ``None`` for anything else or a body
    that does not validate (the services have rejected it already)."""
    family = msg.subject.split(".")[1] if msg.subject.count(".") >= 1 else ""
    try:
        if family == "rejected":
            return Rejected.model_validate_json(msg.data)
        model = FAMILIES.get(family)
        if model is None:
            return None
        # A body typed without an id is named by its place in the stream, as the services do.
        meta = msg.metadata
        return model.from_json(msg.data, default_id=f"{meta.stream}-{meta.sequence.stream}")
    except ValueError:
        return None


# --- status ------------------------------------------------------------------------------------

def status_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="slaplanner status",
        description="What the planner decided for each deployment and why, with its conditions "
        "(like kubectl describe hpa), read from the JetStream stream.",
    )
    parser.add_argument("deployment", nargs="?", help="NAMESPACE/NAME (default: all of them)")
    parser.add_argument(
        "--wait", type=settings_mod.parse_duration_s, default=None, metavar="DURATION",
        help="first wait up to DURATION (e.g. 60s) until the forecaster, decider and actuator "
        "read the bus",
    )
    parser.add_argument(
        "--at", type=_epoch, default=None, metavar="TIME",
        help="judge staleness at TIME (epoch seconds or ISO 8601; default: now), e.g. for a "
        "replay in virtual time",
    )
    add_bus_arguments(parser)
    args = parser.parse_args(argv)

    async def main() -> int:
        key = deployment_key(args.deployment)
        async with session(args, "status") as (nc, js, settings):
            if args.wait is not None:
                await wait_for_readers(js, settings.stream_name, args.wait)
            await stream_or_error(js, settings)
            runtime = Runtime(name="status", settings=settings, nc=nc, js=js)
            latest = await read_latest(runtime, key)
            now = time.time() if args.at is None else args.at
            blocks = [] if key is not None else [await services_text(js, settings.stream_name)]
            if key is not None and key not in latest:
                raise ToolError(f"nothing on the bus for {key} (the stream holds "
                                f"{len(await read_latest(runtime, None))} deployments)")
            blocks += [describe.describe(k, latest[k], now)
                       for k in sorted(latest, key=str)]
            if not latest:
                blocks.append("No deployment on the bus yet.")
            print("\n\n".join(blocks))
            return 0

    return run("status", main)


def _epoch(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        message = f"{text!r} is neither epoch seconds nor ISO 8601"
        raise argparse.ArgumentTypeError(message) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


async def read_latest(runtime: Runtime,
                      key: DeploymentKey | None) -> dict[DeploymentKey, describe.Latest]:
    """The newest snapshot, forecast, target and ScaleEvent of each deployment in the stream."""
    subject = f"{SUBJECT_PREFIX}.*.{key.namespace}.{key.name}" if key else f"{SUBJECT_PREFIX}.>"
    latest: dict[DeploymentKey, describe.Latest] = {}
    async for msg in runtime.read_stream(subject, DeliverPolicy.LAST_PER_SUBJECT):
        message = parse_message(msg)
        if isinstance(message, Envelope):
            latest.setdefault(message.deployment, describe.Latest()).add(message)
    return latest


async def services_text(js: JetStreamContext, stream: str) -> str:
    consumers = sorted(await js.consumers_info(stream), key=lambda c: c.name)
    durable = [c for c in consumers if bus.works_through(c.config)]  # not history readers
    if not durable:
        return (f"Services: none reads the stream {stream} yet (no durable consumer): start "
                "slaplanner forecaster, decider and actuator")
    rows = [("DURABLE", "READS", "PENDING", "STATE")]
    for c in durable:
        reads = ", ".join(c.config.filter_subjects or [c.config.filter_subject or ">"])
        pending = (c.num_pending or 0) + (c.num_ack_pending or 0)
        state = "reading" if (c.num_waiting or 0) > 0 else "not reading (stopped?)"
        rows.append((c.name, reads, str(pending), state))
    widths = [max(len(row[i]) for row in rows) + 2 for i in range(3)]
    lines = [f"Services (durable consumers of the stream {stream}):"]
    lines += ["  " + "".join(f"{cell:<{w}}" for cell, w in zip(row[:3], widths, strict=True))
              + row[3] for row in rows]
    return "\n".join(lines)


def _reader_of(consumer_name: str) -> str | None:
    # forecaster replicas read as forecaster-0, forecaster-1, ...
    return next((r for r in READERS if consumer_name == r or consumer_name.startswith(r + "-")),
                None)


async def wait_for_readers(js: JetStreamContext, stream: str, timeout_s: float) -> None:
    """Until each reading service has been seen with a fetch waiting on its durable consumer
    (it is up and reading), or ``ToolError`` after ``timeout_s``. The stream may not exist yet:
    the first service to start creates it."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            infos = await js.consumers_info(stream)
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
            raise ToolError("this NATS server has no JetStream: start it with -js "
                            "(nats-server -js)") from None
        except (TimeoutError, nats.errors.Error):
            infos = []  # no stream yet, or a slow answer: ask again
        for c in infos:
            reader = _reader_of(c.name)
            if reader is not None and (c.num_waiting or 0) > 0:
                seen.add(reader)
        missing = [r for r in READERS if r not in seen]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise ToolError(f"after {timeout_s:g} s still waiting for the "
                            f"{', '.join(missing)} to read the bus: start "
                            + " & ".join(f"slaplanner {m}" for m in missing) + " &")
        await asyncio.sleep(0.2)


# --- watch -------------------------------------------------------------------------------------

def watch_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="slaplanner watch",
        description="One line per decision as the planner takes it: load, forecast, replicas "
        "running -> desired, the rule that bound each role, latency p99s and the actuator's "
        "outcome; and the bodies a service rejected. Starts with the decision of the "
        "deployment's newest window (made or on its way), or for all deployments with the "
        "latest decisions in the stream; Ctrl-C stops.",
    )
    parser.add_argument("deployment", nargs="?", help="NAMESPACE/NAME (default: all of them)")
    parser.add_argument(
        "--since", type=settings_mod.parse_duration_s, default=None, metavar="DURATION",
        help="start with the decisions of the last DURATION (e.g. 1h) instead of the latest",
    )
    parser.add_argument("--count", type=int, default=None,
                        help="stop after COUNT decision lines")
    add_bus_arguments(parser)
    args = parser.parse_args(argv)

    async def main() -> int:
        key = deployment_key(args.deployment)
        async with session(args, "watch") as (nc, js, settings):
            await stream_or_error(js, settings)
            await watch(js, settings.stream_name, key, args.since, args.count,
                        lambda line: print(line, flush=True),
                        await newest_window(nc, settings.stream_name, key))
            return 0

    return run("watch", main)


async def newest_window(nc: NATS, stream: str, key: DeploymentKey | None) -> int | None:
    """The stream sequence of the deployment's newest snapshot (``None``: none, or no single
    deployment). A watch that starts there shows that window's decision first, with its load
    and its forecast, whether it is made or still on its way: started at the last message of
    each subject instead, it showed the decision before it whenever the newest one was still
    being made, its snapshot and forecast already replaced by the newer window's."""
    if key is None:
        return None
    subject = METRICS_SUBJECT.format(namespace=key.namespace, name=key.name)
    last = await stored.last_message(nc, stream, subject)
    return None if last is None else last.metadata.sequence.stream


async def watch(js: JetStreamContext, stream: str, key: DeploymentKey | None,
                since_s: float | None, count: int | None, emit: Callable[[str], None],
                start_sequence: int | None = None) -> None:
    """Lines for the decisions from ``since_s`` ago, else from the stream sequence
    ``start_sequence`` (``newest_window``), else from the last message of each subject."""
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        await queue.put(msg)

    if since_s is None and start_sequence is not None:
        start = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                               opt_start_seq=start_sequence)
    elif since_s is None:
        start = ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)
    else:
        start = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                               opt_start_time=datetime.fromtimestamp(time.time() - since_s, UTC))
    subjects = [f"{SUBJECT_PREFIX}.*.{key.namespace}.{key.name}" if key else f"{SUBJECT_PREFIX}.>"]
    if key is not None:
        subjects.append(f"{SUBJECT_PREFIX}.rejected.>")
    subs = [await js.subscribe(subject, stream=stream, cb=on_msg, ordered_consumer=True,
                               config=start if index == 0 else
                               ConsumerConfig(deliver_policy=DeliverPolicy.NEW))
            for index, subject in enumerate(subjects)]
    tracker = describe.Watch()
    shown = 0
    try:
        while count is None or shown < count:
            try:
                msg = await asyncio.wait_for(queue.get(), timeout=QUIET_S)
            except TimeoutError:
                lines = tracker.flush()
            else:
                message = parse_message(msg)
                if isinstance(message, Rejected):
                    lines = [] if not _concerns(message, key) else [rejected_line(message)]
                elif message is not None:
                    lines = tracker.add(message)
                else:
                    lines = []
            for line in lines:
                if count is not None and shown >= count:
                    break
                emit(line)
                shown += not line.startswith("rejected")
    finally:
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def _concerns(message: Rejected, key: DeploymentKey | None) -> bool:
    return key is None or deployment_from_subject(message.subject) == key


def rejected_line(message: Rejected) -> str:
    return (f"rejected by the {message.stage} at {describe.clock(message.received_at)}, on "
            f"{message.subject}: {message.reason}")


# --- publish -----------------------------------------------------------------------------------

def publish_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="slaplanner publish",
        description="Publish one body on a subject, as `nats pub` would, into the stream (with "
        "its id as Nats-Msg-Id). The body is checked first as the services will check it.",
    )
    parser.add_argument("subject", help="e.g. slaplanner.metrics.prod.llama")
    parser.add_argument("body", help="the JSON body, or - to read it from stdin "
                        "(slaplanner schema MESSAGE shows the fields)")
    parser.add_argument("--no-check", action="store_true",
                        help="send a body that does not validate (to see a service reject it)")
    add_bus_arguments(parser)
    args = parser.parse_args(argv)

    async def main() -> int:
        body = (sys.stdin.buffer.read() if args.body == "-" else args.body.encode())
        msg_id = check_body(args.subject, body, enforce=not args.no_check)
        async with session(args, "publish") as (nc, js, settings):
            if args.subject.startswith(SUBJECT_PREFIX + "."):
                await stream_or_error(js, settings)
                headers = {"Nats-Msg-Id": msg_id} if msg_id else None
                ack = await js.publish(args.subject, body, headers=headers)
                note = " (a duplicate of an id the stream has seen: dropped)" if ack.duplicate \
                    else ""
                print(f"published on {args.subject}: stream {ack.stream}, sequence "
                      f"{ack.seq}{note}")
            else:
                await nc.publish(args.subject, body)
                await nc.flush()
                print(f"published on {args.subject} (outside the stream)")
            return 0

    return run("publish", main)


def check_body(subject: str, body: bytes, enforce: bool) -> str | None:
    """The body's id (for ``Nats-Msg-Id``); ``ToolError`` in one line if a service would reject
    it and ``enforce``."""
    tokens = subject.split(".")
    model = FAMILIES.get(tokens[1]) if len(tokens) == 4 and tokens[0] == SUBJECT_PREFIX else None
    if model is None:
        if enforce and subject.startswith(SUBJECT_PREFIX + "."):
            raise ToolError(
                f"{subject} is not a stage subject: slaplanner.<metrics|forecast|target|scaled>"
                ".<namespace>.<name>; --no-check sends it anyway"
            )
        return None
    try:
        message = model.from_json(body, default_id="unset")
    except ValidationError as exc:
        reason = f"not a valid {model.__name__}: {validation_reason(exc)}"
    except (ValueError, RecursionError) as exc:
        reason = str(exc)
    else:
        if deployment_from_subject(subject) == message.deployment:
            return None if message.id == "unset" else message.id
        reason = f"the subject names {'/'.join(tokens[2:])}, the body {message.deployment}"
    if enforce:
        raise ToolError(f"{reason} (slaplanner schema {model.__name__} shows the fields; "
                        "--no-check sends it anyway)")
    return None
