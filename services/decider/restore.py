"""The decider's memory after a restart: the inputs its decisions still depend on, replayed from
the stream through the core, nothing published.

A policy's memory (the scale-down stabilisation window, correction factors, the fast path's
recent load, learnt startup times) is built from the deployment's inputs; a decider that starts
empty decides differently from one that never stopped (it scales down at once, past the window
and the step limits). So on start it reads back what its durable consumer delivered before, as
far back as the deployment's knobs look (``replay_horizon_s``), and feeds it to the core in
stream order, exactly as it was handled. The decisions it remakes are not published: they were,
by the instance that died.

The replay ends at the last message the durable delivered. What the dead instance took but did
not ack is delivered again; its answer is the replay's (``Held``), so it is neither decided twice
(the memory would count it twice) nor lost (it may never have been published).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.api import DeliverPolicy

from services.decider.core import Decider
from services.decider.knobs import DeploymentKnobs
from shared import bus
from shared.messages import Envelope, LoadForecast, MetricSnapshot, ScaleEvent
from shared.service import Route, Runtime, route_of

log = logging.getLogger("slaplanner.decider")

# Evidence older than this many half-lives weighs under 1/16 in a correction factor: a replay
# that starts there gives the same factor to well within what moves a replica count.
CORRECTION_HALF_LIVES = 4.0

# The read back gives up after this long (a NATS user without the history reader's rights gets
# no answer at all, only waits): the decider then starts with what it read, seconds.
READ_DEADLINE_S = 120.0

# Inputs replayed between two turns of the event loop (a few to tens of milliseconds).
REPLAY_SLICE = 16

Input = LoadForecast | MetricSnapshot | ScaleEvent


def replay_horizon_s(knobs: DeploymentKnobs) -> float:
    """How far back (window time) a deployment's inputs still shape its next decision: the
    longest memory its knobs give the policy, plus the interval whose decision it starts from.

    The SLA feedback's sliding window is the longest by default (30 min); the scale-down window
    reaches further than its own length:
    whether it may be cut short depends on the forecast's upper counts having held for the
    windows it covers, and those were forecast a lookahead (startup + one interval) earlier.
    """
    lookahead_s = knobs.worker_startup_s + knobs.adjustment_interval_s
    hold_s = (
        knobs.scale_down_window_s
        if knobs.scale_down_window_s is not None
        else lookahead_s  # the policy's default hold: one startup delay plus one interval
    )
    memory_s = max(
        hold_s + lookahead_s,
        knobs.fast_path_window_s,
        knobs.scale_to_zero_idle_s if knobs.scale_to_zero else 0.0,
        CORRECTION_HALF_LIVES * knobs.correction_half_life_s,
        # the SLA feedback judges the misses of its sliding window
        knobs.sla_feedback_window_s if knobs.sla_feedback else 0.0,
    )
    return memory_s + knobs.adjustment_interval_s


def _key(message: Input) -> tuple[str, str, str]:
    return type(message).__name__, str(message.deployment), message.id


@dataclass
class Held:
    """The answers the replay gave to messages the durable will deliver again (taken once)."""

    answers: dict[tuple[str, str, str], list[Envelope]] = field(default_factory=dict)

    def keep(self, sequence: int, message: Input, answer: list[Envelope],
             held_after: int) -> None:
        if sequence > held_after:
            self.answers[_key(message)] = answer

    def take(self, message: Input) -> list[Envelope] | None:
        return self.answers.pop(_key(message), None)

    def __len__(self) -> int:
        return len(self.answers)


@dataclass
class Replay:
    """Inputs read back from the stream, kept per deployment as far back as its horizon from
    its newest input (window time), in stream order. Pure: the shell adds, the core replays."""

    horizon_s: Callable[[str], float]
    inputs: dict[str, deque[tuple[int, Input]]] = field(default_factory=dict)
    newest_s: dict[str, float] = field(default_factory=dict)

    def add(self, sequence: int, message: Input) -> None:
        key = str(message.deployment)
        kept = self.inputs.setdefault(key, deque())
        kept.append((sequence, message))
        newest = max(self.newest_s.get(key, message.window_end), message.window_end)
        self.newest_s[key] = newest
        oldest = newest - self.horizon_s(key)
        while kept and kept[0][1].window_end < oldest:
            kept.popleft()

    def count(self) -> int:
        return sum(len(kept) for kept in self.inputs.values())

    def in_order(self) -> Iterator[tuple[int, Input]]:
        """Every kept input, each deployment's in stream order."""
        for kept in self.inputs.values():
            yield from kept

    def replay(self, decider: Decider, held_after: int) -> Held:
        """Feed every kept input to the core in order; hold the answers to those after stream
        sequence ``held_after`` (taken, not acked: they come again)."""
        held = Held()
        for sequence, message in self.in_order():
            held.keep(sequence, message, feed(decider, message), held_after)
        return held


def feed(decider: Decider, message: Input) -> list[Envelope]:
    """One input to the core, as the shell hands it live; the targets it answers."""
    if isinstance(message, LoadForecast):
        return [decider.decide(message)]
    if isinstance(message, MetricSnapshot):
        target = decider.on_snapshot(message)
        return [] if target is None else [target]
    decider.on_scale_event(message)
    return []


async def from_stream(
    runtime: Runtime, decider: Decider, routes: list[Route[Any]], durable: str,
    max_age_s: float, owns: Callable[[str], bool] = lambda subject: True,
    clock: Callable[[], float] = time.time,
) -> Held:
    """Replay into ``decider`` what durable ``durable`` delivered lately on ``routes`` (the
    deployments ``owns`` accepts); the answers held for its redeliveries."""
    stream = runtime.settings.stream_name
    try:
        info = await runtime.js.consumer_info(stream, durable)
        delivered, acked = info.delivered.stream_seq or 0, info.ack_floor.stream_seq or 0
    except nats.js.errors.NotFoundError:
        log.info("no durable %s yet: nothing to restore", durable)
        return Held()
    if delivered == 0:
        return Held()

    def horizon_s(key: str) -> float:
        return min(max_age_s, replay_horizon_s(decider.config.for_deployment(key)))

    # The wall clock only bounds the read; each deployment keeps its own horizon in window
    # time (a replay in virtual time runs its windows faster than the clock).
    longest_s = min(max_age_s, max(replay_horizon_s(k) for k in decider.config.all_knobs()))
    since = datetime.fromtimestamp(clock() - longest_s, UTC)
    models: Mapping[str, Route[Any]] = {route.subject_filter: route for route in routes}
    replay = Replay(horizon_s)

    async def read() -> None:
        async for msg in runtime.read_stream(tuple(models), DeliverPolicy.BY_START_TIME, since,
                                             until_seq=delivered):
            route = route_of(routes, msg.subject)
            if route is not None and owns(msg.subject) and (
                    message := runtime.stored(route.model, msg.subject, msg.data)) is not None:
                replay.add(msg.metadata.sequence.stream, message)

    try:
        await asyncio.wait_for(read(), READ_DEADLINE_S)
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error, bus.BusError) as exc:
        # Deciding with part of the memory beats not deciding: go on with what was read.
        log.warning("could not read back all the inputs to restore from (%s); starting with "
                    "what was read", str(exc) or type(exc).__name__)
    # Replayed in slices, letting the event loop run between them: a long replay (thousands of
    # deployments at a short interval) must not silence /healthz and get the pod restarted.
    held = Held()
    for count, (sequence, message) in enumerate(replay.in_order(), start=1):
        held.keep(sequence, message, feed(decider, message), acked)
        if count % REPLAY_SLICE == 0:
            await asyncio.sleep(0)
    log.info("restored %d deployments from %d inputs up to %g s back; %d answers held for "
             "redelivery", len(replay.inputs), replay.count(), longest_s, len(held))
    return held
