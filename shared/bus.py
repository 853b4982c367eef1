"""The bus helper: connect to NATS, keep the JetStream stream, publish, reject.

Every service publishes through JetStream with the message id as ``Nats-Msg-Id`` so that a message
re-sent after a restart is dropped by the stream's duplicate window; every service reads through a
durable pull consumer so that a restarted pod resumes where it stopped.
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from shared.messages import SUBJECT_PREFIX, Envelope, Rejected
from shared.service_settings import ServiceSettings

log = logging.getLogger("slaplanner.bus")

STREAM_SUBJECTS = [f"{SUBJECT_PREFIX}.>"]
# What a Rejected message keeps of the raw body: enough to see what was sent, small enough to
# stay far below any server's max_payload.
REJECTED_RAW_BYTES = 4096


def _tls_context(settings: ServiceSettings) -> ssl.SSLContext | None:
    if not (settings.nats_tls_ca_file or settings.nats_tls_cert_file):
        return None
    context = ssl.create_default_context(cafile=settings.nats_tls_ca_file)
    if settings.nats_tls_cert_file:
        context.load_cert_chain(settings.nats_tls_cert_file, settings.nats_tls_key_file)
    return context


def connect_options(settings: ServiceSettings, name: str) -> dict[str, Any]:
    """nats.connect keyword arguments for the settings' URL list and auth form."""
    options: dict[str, Any] = {
        "servers": list(settings.nats_url),
        "name": f"slaplanner-{name}",
        # Never give up: a planner that stops reconnecting silently stops planning.
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


async def connect(settings: ServiceSettings, name: str) -> NATS:
    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    async def on_disconnected() -> None:
        log.warning("disconnected from NATS; reconnecting")

    async def on_reconnected() -> None:
        log.info("reconnected to NATS at %s", client.connected_url)

    client: NATS = await nats.connect(
        **connect_options(settings, name),
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
    )
    log.info("connected to NATS at %s", client.connected_url)
    return client


def stream_config(settings: ServiceSettings) -> StreamConfig:
    return StreamConfig(
        name=settings.stream_name,
        subjects=STREAM_SUBJECTS,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=settings.stream_max_age_s,
        max_bytes=settings.stream_max_bytes,
        duplicate_window=settings.stream_duplicate_window_s,
    )


# What stream_config sets, and what it never wants: a subject transform, a republish, a source or
# a mirror would route messages somewhere a reader does not expect (a forecast stored as a target).
_PINNED_FIELDS = ("subjects", "retention", "storage", "discard", "max_age", "max_bytes",
                  "duplicate_window")
_UNWANTED_FIELDS = ("subject_transform", "republish", "sources", "mirror")


def stream_matches(current: StreamConfig, wanted: StreamConfig) -> bool:
    return (all(getattr(current, f) == getattr(wanted, f) for f in _PINNED_FIELDS)
            and not any(getattr(current, f) for f in _UNWANTED_FIELDS))


async def ensure_stream(js: JetStreamContext, settings: ServiceSettings) -> None:
    """Create the stream, or bring an existing one back to the configured limits.

    A stream that already matches is left alone, so that the services' NATS users need no right
    to update streams (a right that would let one of them re-route the others' subjects).
    """
    config = stream_config(settings)
    try:
        info = await js.stream_info(settings.stream_name)
    except NotFoundError:
        await js.add_stream(config)
        log.info("created stream %s for %s", settings.stream_name, STREAM_SUBJECTS)
        return
    if not stream_matches(info.config, config):
        await js.update_stream(config)
        log.info("updated stream %s to the configured limits", settings.stream_name)


async def publish(js: JetStreamContext, message: Envelope) -> None:
    await js.publish(
        message.subject(), message.to_json(), headers={"Nats-Msg-Id": message.id}
    )


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
