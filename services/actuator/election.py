"""Leader election on a ``coordination.k8s.io/v1`` Lease, with time as an argument.

The algorithm is client-go's: the holder renews the Lease every retry period; a candidate takes
it over only when the record has not changed for ``leaseDurationSeconds`` *as measured on the
candidate's own clock* since it last saw it change (so clock skew between pods cannot make a lease
look expired); the holder stops acting when it has not renewed for ``renew_deadline_s``, which is
shorter than the lease duration, so the old leader has stopped before anyone may take over.

``Elector`` is pure: ``decide(record, now)`` says what to write; ``step`` runs one round against a
``LeaseLock`` (the Kubernetes Lease, or anything that offers get/create/update with a version).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

from services.actuator.core import BackendError, ConflictError

log = logging.getLogger("slaplanner.actuator.election")


@dataclass(frozen=True)
class LeaseRecord:
    holder: str | None  # holderIdentity; None or "" when released
    duration_s: int  # leaseDurationSeconds
    acquire_time: float | None = None  # epoch seconds
    renew_time: float | None = None
    transitions: int = 0  # leaseTransitions


class Action(StrEnum):
    CREATE = "create"
    RENEW = "renew"
    TAKE_OVER = "take_over"
    FOLLOW = "follow"


@dataclass(frozen=True)
class Decision:
    action: Action
    record: LeaseRecord | None  # what to write; None when following
    holder: str | None  # who leads after this round, as far as we know


class Elector:
    def __init__(self, identity: str, lease_duration_s: float, renew_deadline_s: float) -> None:
        if renew_deadline_s >= lease_duration_s:
            raise ValueError("renew_deadline_s must be shorter than lease_duration_s")
        self.identity = identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self._observed: LeaseRecord | None = None
        self._observed_at: float | None = None
        self._valid_until: float | None = None  # we may act until then
        self.leader: str | None = None
        self.transitions_seen = 0
        self.lease_error: str | None = None  # the last failure to read or write the Lease

    def trouble(self, error: str | None) -> None:
        """Log a failure to reach the Lease once, and its end once, not every retry period."""
        if error is not None and self.lease_error is None:
            log.warning("%s: %s; retrying every period, quietly until it works", self.identity,
                        error)
        elif error is None and self.lease_error is not None:
            log.warning("%s: the lease can be read and written again", self.identity)
        self.lease_error = error

    def is_leader(self, now: float) -> bool:
        return self._valid_until is not None and now < self._valid_until

    def decide(self, current: LeaseRecord | None, now: float) -> Decision:
        if current != self._observed:
            self._observed, self._observed_at = current, now
        duration = int(max(1, round(self.lease_duration_s)))
        if current is None:
            return Decision(Action.CREATE, LeaseRecord(self.identity, duration, now, now, 0),
                            self.identity)
        if current.holder == self.identity:
            return Decision(Action.RENEW, replace(current, renew_time=now, duration_s=duration),
                            self.identity)
        assert self._observed_at is not None
        expired = now >= self._observed_at + current.duration_s
        if not current.holder or expired:
            return Decision(Action.TAKE_OVER,
                            LeaseRecord(self.identity, duration, now, now,
                                        current.transitions + 1), self.identity)
        self._valid_until = None
        return Decision(Action.FOLLOW, None, current.holder)

    def succeeded(self, decision: Decision, now: float) -> None:
        """The write of ``decision`` succeeded at ``now``: we lead until the renew deadline."""
        assert decision.record is not None
        if self.leader != self.identity:
            log.info("%s leads now (%s)", self.identity, decision.action)
        self._observed, self._observed_at = decision.record, now
        self._valid_until = now + self.renew_deadline_s
        self.leader = self.identity

    def lost(self, holder: str | None) -> None:
        """Someone else wrote the Lease first (a conflict): follow at once."""
        if self.leader == self.identity:
            log.warning("%s lost the lease", self.identity)
        self._valid_until = None
        self.leader = holder

    def followed(self, holder: str | None) -> None:
        if self.leader == self.identity:
            log.warning("%s no longer leads; %s does", self.identity, holder)
        self.leader = holder

    def release(self) -> LeaseRecord | None:
        """The record to write when stopping, so another instance can take over at once."""
        if self._observed is None or self._observed.holder != self.identity:
            return None
        self._valid_until = None
        return replace(self._observed, holder=None, duration_s=1)


class LeaseLock(Protocol):
    async def get(self) -> tuple[LeaseRecord, str] | None:
        """The record and its resourceVersion, or None if there is no Lease yet."""
        ...

    async def create(self, record: LeaseRecord) -> None:
        """Create the Lease; ConflictError if it exists already."""
        ...

    async def update(self, record: LeaseRecord, version: str) -> None:
        """Replace the Lease if still at ``version``; ConflictError otherwise."""
        ...


async def step(elector: Elector, lock: LeaseLock, now: float) -> Decision | None:
    """One round of election: read, decide, write. None if the Lease could not be read."""
    try:
        found = await lock.get()
    except BackendError as exc:
        elector.trouble(f"cannot read the lease: {exc}")
        return None
    current, version = found if found is not None else (None, "")
    decision = elector.decide(current, now)
    if decision.action is Action.FOLLOW:
        elector.followed(decision.holder)
        return decision
    assert decision.record is not None
    try:
        if decision.action is Action.CREATE:
            await lock.create(decision.record)
        else:
            await lock.update(decision.record, version)
    except ConflictError:
        elector.lost(None)
        return Decision(Action.FOLLOW, None, None)
    except BackendError as exc:
        elector.trouble(f"cannot {decision.action} the lease: {exc}")
        return None
    elector.trouble(None)
    elector.succeeded(decision, now)
    return decision


async def release(elector: Elector, lock: LeaseLock) -> None:
    record = elector.release()
    if record is None:
        return
    try:
        found = await lock.get()
        if found is not None and found[0].holder == elector.identity:
            await lock.update(record, found[1])
    except (BackendError, ConflictError) as exc:
        log.info("could not release the lease (%s); it will expire", exc)
