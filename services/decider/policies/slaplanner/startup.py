"""How long a new worker takes to serve, learnt from the deployment's own scale-ups.

An applied ScaleEvent that raises a role from ``from`` to ``to`` starts a clock; the first time the
role is seen with ``to`` replicas ready (a later ScaleEvent's ``ready``, or a MetricSnapshot's
worker count, which counts workers that serve) stops it. The sample is an upper bound by at most
one observation interval, which errs on the safe side. The estimate is the slowest of the last
few samples (starts vary with image pulls and node provisioning, and planning for a typical start
would be late half the time); a start still pending for longer than that estimate raises it at
once, so a worker slower than configured is noticed before it is even ready.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from shared.messages import Outcome, ScaleEvent
from shared.roles import ROLE_NAMES as ROLES

RECENT_SAMPLES = 5
# A start pending longer than this is abandoned (the replicas never came, or were withdrawn
# without our seeing it); it stops stretching the estimate.
ABANDON_AFTER_S = 3600.0


@dataclass(frozen=True)
class PendingStart:
    role: str
    requested_at_s: float
    replicas: int  # ready when at least this many replicas of the role serve


@dataclass(frozen=True)
class StartupMemory:
    pending: tuple[PendingStart, ...] = ()
    samples_s: tuple[float, ...] = ()  # oldest first, at most RECENT_SAMPLES
    ready: tuple[int | None, int | None] = (None, None)  # last seen ready (prefill, decode)
    ready_at_s: float | None = None

    def ready_of(self, role: str) -> int | None:
        return self.ready[ROLES.index(role)]


def on_scale_event(memory: StartupMemory, event: ScaleEvent) -> StartupMemory:
    """Start a clock for each role the event raised; stop clocks its ``ready`` counts satisfy."""
    now = event.window_end
    pending = list(memory.pending)
    for role, change in (("prefill", event.prefill), ("decode", event.decode)):
        before = change.from_ if change.from_ is not None else memory.ready_of(role)
        if event.outcome is not Outcome.APPLIED:
            continue
        if before is not None and change.to > before:
            already = any(p.role == role and p.replicas >= change.to for p in pending)
            if not already:
                pending.append(PendingStart(role, now, change.to))
        elif before is not None and change.to < before:
            # asked for fewer: starts towards more than ``to`` will not complete as such
            pending = [p for p in pending if p.role != role or p.replicas <= change.to]
    memory = replace(memory, pending=tuple(pending))
    return on_ready(memory, now, event.prefill.ready, event.decode.ready)


def on_ready(
    memory: StartupMemory, now_s: float, prefill_ready: int | None, decode_ready: int | None
) -> StartupMemory:
    """Record ready counts seen at ``now_s`` and close the starts they complete."""
    samples = list(memory.samples_s)
    still: list[PendingStart] = []
    for start in memory.pending:
        ready = prefill_ready if start.role == "prefill" else decode_ready
        elapsed = now_s - start.requested_at_s
        if ready is not None and ready >= start.replicas and elapsed >= 0:
            samples.append(elapsed)
        elif elapsed <= ABANDON_AFTER_S:
            still.append(start)
    seen = (
        prefill_ready if prefill_ready is not None else memory.ready[0],
        decode_ready if decode_ready is not None else memory.ready[1],
    )
    return replace(
        memory,
        pending=tuple(still),
        samples_s=tuple(samples[-RECENT_SAMPLES:]),
        ready=seen,
        ready_at_s=now_s if (prefill_ready, decode_ready) != (None, None) else memory.ready_at_s,
    )


@dataclass(frozen=True)
class StartupEstimate:
    startup_s: float
    source: str  # "configured", "learnt", "pending"
    detail: dict[str, Any]


def estimate(
    memory: StartupMemory, configured_s: float, now_s: float, learn: bool
) -> StartupEstimate:
    """The startup time to plan with, and where it comes from."""
    learnt = max(memory.samples_s) if memory.samples_s else None
    detail: dict[str, Any] = {
        "configured_s": configured_s,
        "learning": learn,
        "recent_samples_s": list(memory.samples_s),
        "learnt_s": learnt,
        "pending_starts": [
            {"role": p.role, "replicas": p.replicas, "waiting_s": now_s - p.requested_at_s}
            for p in memory.pending
        ],
    }
    if not learn:
        return StartupEstimate(configured_s, "configured", detail)
    startup, source = (learnt, "learnt") if learnt is not None else (configured_s, "configured")
    overdue = _longest_wait(memory.pending, now_s)
    if overdue > startup:
        startup, source = overdue, "pending"
    return StartupEstimate(startup, source, detail)


def _longest_wait(pending: Iterable[PendingStart], now_s: float) -> float:
    return max((now_s - p.requested_at_s for p in pending), default=0.0)
