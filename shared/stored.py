"""Reading what the stream holds, without creating consumers a service's NATS user may not make.

Two reads serve the services' restarts: the last message of every subject of a family (the
collector's last snapshots, the actuator's last targets and ScaleEvents), and every message of a
family since a time (the forecaster's history). The first goes through JetStream's direct get
with the subject in the request subject, which deploy/'s auth.conf limits to the families a user
reads; the second through a history consumer that belongs to the service (created with its
durable, by the admin or by the service) and is rewound with a consumer reset.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import datetime

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared import bus

# Direct gets in flight at once when reading the last message of many subjects.
PARALLEL_GETS = 64


async def subjects(js: JetStreamContext, stream: str, subject_filter: str) -> list[str]:
    """The subjects of ``stream`` that match ``subject_filter`` and hold a message."""
    info = await js.stream_info(stream, subjects_filter=subject_filter)
    return sorted(info.state.subjects or {})


async def last_message(nc: NATS, stream: str, subject: str) -> Msg | None:
    """The last message on ``subject``, or None if there is none (a direct get whose subject
    names the subject, so that permissions on the request subject bind it). The message carries
    its subject, body, headers and stream metadata as if a consumer had delivered it."""
    try:
        reply = await nc.request(f"$JS.API.DIRECT.GET.{stream}.{subject}", b"",
                                 timeout=bus.API_TIMEOUT_S)
    except nats.errors.NoRespondersError:
        return None
    headers = dict(reply.headers or {})
    if "Status" in headers or "Nats-Sequence" not in headers:
        return None  # 404: nothing on that subject (any longer)
    metadata = Msg.Metadata(
        sequence=Msg.Metadata.SequencePair(consumer=0, stream=int(headers["Nats-Sequence"])),
        num_pending=0, num_delivered=1, stream=stream, consumer="",
        timestamp=datetime.fromisoformat(headers["Nats-Time-Stamp"]),
    )
    return Msg(_client=nc, subject=headers.get("Nats-Subject", subject), data=reply.data,
               headers=headers, _metadata=metadata)


async def last_per_subject(nc: NATS, js: JetStreamContext, stream: str,
                           subject_filter: str) -> AsyncIterator[Msg]:
    """The last message of each subject matching ``subject_filter``, in subject order."""
    names = await subjects(js, stream, subject_filter)
    for start in range(0, len(names), PARALLEL_GETS):
        found = await asyncio.gather(*(last_message(nc, stream, name)
                                       for name in names[start:start + PARALLEL_GETS]))
        for msg in found:
            if msg is not None:
                yield msg


async def _first_at(nc: NATS, js: JetStreamContext, stream: str, reader: str,
                    sub: JetStreamContext.PullSubscription, start_time: datetime) -> int:
    """The first stream sequence whose next message on the reader's filter is not older than
    ``start_time``: a binary search over the stream, one rewind and one fetch per step."""
    state = (await js.stream_info(stream)).state
    low, high = max(state.first_seq, 1), state.last_seq + 1  # seq 0 would mean "ack floor"
    while low < high:
        middle = (low + high) // 2
        if await bus.reset_consumer(nc, stream, reader, middle) == 0:
            high = middle  # nothing on the filter from here on
            continue
        [msg] = await sub.fetch(batch=1, timeout=bus.API_TIMEOUT_S)
        meta = msg.metadata
        if meta.timestamp is not None and meta.timestamp >= start_time:
            high = middle
        else:
            low = meta.sequence.stream + 1
    return low


async def since(nc: NATS, js: JetStreamContext, stream: str,
                reader: bus.ConsumerSpec, start_time: datetime | None,
                batch: int = 512, until_seq: int | None = None) -> AsyncIterator[Msg]:
    """Every message on the reader's filter from ``start_time`` (everything if None) up to the
    end of the stream as it is when the read starts (or to ``until_seq``), in stream order."""
    sub = await js.pull_subscribe_bind(durable=reader.name, stream=stream)
    try:
        last = (await js.stream_info(stream)).state.last_seq
        if until_seq is not None:
            last = min(last, until_seq)
        first = 1 if start_time is None else await _first_at(nc, js, stream, reader.name, sub,
                                                              start_time)
        if first > last or await bus.reset_consumer(nc, stream, reader.name, first) == 0:
            return
        while True:
            try:
                msgs: Sequence[Msg] = await sub.fetch(batch=batch, timeout=bus.API_TIMEOUT_S)
            except TimeoutError:
                return
            for msg in msgs:
                if msg.metadata.sequence.stream > last:
                    return
                yield msg
                if msg.metadata.num_pending == 0:
                    return
    finally:
        await sub.unsubscribe()
