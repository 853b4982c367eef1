"""The decider's shell over a real NATS server: one durable consumer for forecasts, snapshots and
ScaleEvents, taking over from the three durables of earlier versions."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.decider import service
from services.decider.core import Decider
from services.decider.settings import DeciderSettings
from shared import bus
from shared.messages import ReplicaTarget, derived_id
from shared.perf_model import default_profile_path
from shared.service import Runtime, subject_matches
from tests.conftest import NatsEndpoint
from tests.test_slaplanner_policy_support import (
    BASE_KNOBS,
    LLAMA,
    PROFILE,
    forecast,
    scale_event,
    snapshot,
)

STREAM = "SLAPLANNER"
FAMILIES = ["slaplanner.forecast.>", "slaplanner.metrics.>", "slaplanner.scaled.>"]


def test_subjects_match_as_nats_matches_them() -> None:
    assert subject_matches("slaplanner.metrics.>", "slaplanner.metrics.prod.llama")
    assert not subject_matches("slaplanner.metrics.>", "slaplanner.metrics")
    assert not subject_matches("slaplanner.metrics.>", "slaplanner.forecast.prod.llama")
    assert subject_matches("slaplanner.*.prod.llama", "slaplanner.scaled.prod.llama")
    assert not subject_matches("slaplanner.*.prod", "slaplanner.scaled.prod.llama")
    assert subject_matches("a.b", "a.b") and not subject_matches("a.b", "a.b.c")


def test_a_dynamo_only_decider_reads_forecasts_alone() -> None:
    dynamo = Decider(DeciderSettings(**{**BASE_KNOBS, "policy": "dynamo"}),
                     {str(default_profile_path()): PROFILE})
    assert [r.subject_filter for r in service.routes(dynamo)] == FAMILIES[:1]


@contextlib.asynccontextmanager
async def running_decider(url: str) -> AsyncIterator[Runtime]:
    """A slaplanner decider shell in this process, on its own NATS connection."""
    settings = DeciderSettings(**{**BASE_KNOBS, "nats_url": url})
    nc = await bus.connect(settings, "decider")
    js = nc.jetstream()
    await bus.ensure_stream(js, settings)
    runtime = Runtime(name="decider", settings=settings, nc=nc, js=js)
    decider = Decider(settings, {str(default_profile_path()): PROFILE})
    task = asyncio.create_task(service.run(runtime, decider))
    try:
        yield runtime
    finally:
        runtime.stop.set()
        await asyncio.wait_for(task, 10.0)
        await nc.drain()


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    async def poll() -> None:
        while not await condition():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout_s)


@pytest.mark.filterwarnings("ignore::Warning:statsmodels")
async def test_one_durable_replaces_the_three_of_earlier_versions_and_reads_all_families(
    nats_server: NatsEndpoint, nc: NATS
) -> None:
    js = nc.jetstream()
    await bus.ensure_stream(js, DeciderSettings(**{**BASE_KNOBS, "nats_url": nats_server.url}))
    # What an earlier version left: `decider` on forecasts only, and one durable per family.
    for name, subject in (("decider", FAMILIES[0]), ("decider-fast-path", FAMILIES[1]),
                          ("decider-scaled", FAMILIES[2])):
        await js.add_consumer(STREAM, ConsumerConfig(
            name=name, durable_name=name, filter_subject=subject, ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW, ack_wait=60.0, max_ack_pending=1000))
    targets: list[ReplicaTarget] = []

    async def on_target(msg: Msg) -> None:
        targets.append(ReplicaTarget.from_json(msg.data))

    await nc.subscribe("slaplanner.target.>", cb=on_target)

    async def names() -> set[str]:
        return {c.name for c in await js.consumers_info(STREAM)}

    async with running_decider(nats_server.url):
        async def taken_over() -> bool:
            info = await js.consumer_info(STREAM, "decider")
            return sorted(info.config.filter_subjects or []) == sorted(FAMILIES) and (
                await names() == {"decider"})

        await until(taken_over)
        # One deployment's inputs in stream order: forecast 0, its ScaleEvent, then a burst
        # snapshot the fast path answers.
        await bus.publish(js, forecast(0, 1800.0, observed=snapshot(0, prefill=5, decode=3)))
        await bus.publish(js, scale_event(0, (3, 5, 3), (3, 3, 3)))
        await bus.publish(js, snapshot(5, 750.0, prefill=5, decode=3, window_s=5.0))

        async def answered() -> bool:
            info = await js.consumer_info(STREAM, "decider")
            return len(targets) == 2 and info.num_pending == 0 and info.num_ack_pending == 0

        await until(answered)
        info = await js.consumer_info(STREAM, "decider")
        assert info.delivered.stream_seq == info.ack_floor.stream_seq  # all three, acked
    planned, fast = targets
    assert planned.forecast_id == "fc-0"
    assert fast.id == derived_id("fast-path", "snap-5-5") and fast.forecast_id is None
    assert fast.prefill_replicas > planned.prefill_replicas
    assert LLAMA == planned.deployment == fast.deployment
