"""Actuator core: check a target against hard limits, ownership and history; plan; apply.

The planning step (``decide``) is a pure function of numbers: the target, what the cluster shows,
what the actuator remembers of the deployment, the limits and ``now``. ``Actuator.handle`` runs
it against a backend through the small ``WorkerSets`` protocol, which the Kubernetes backends,
the NATS "virtual" backend and the dry run implement; nothing here imports Kubernetes or NATS.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol

from services.actuator import status
from shared import explanation
from shared.messages import (
    DeploymentKey,
    Outcome,
    ReplicaTarget,
    RoleChange,
    ScaleEvent,
    derived_id,
)

log = logging.getLogger("slaplanner.actuator")


class Role(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


ROLES = (Role.PREFILL, Role.DECODE)


class Reason(StrEnum):
    """Why a role ends up at the replicas the plan gives it."""

    WITHIN_BOUNDS = "within_bounds"
    MIN_REPLICAS = "min_replicas"
    MAX_REPLICAS = "max_replicas"
    PAUSED = "paused"
    EXTERNAL_CHANGE_RESPECTED = "external_change_respected"
    PENDING_NOT_STACKED = "pending_not_stacked"
    GPU_CEILING = "gpu_ceiling"
    MIN_AVAILABLE = "min_available"  # the workload's own floor (a DGD component's minAvailable)
    NOT_READY = "not_ready"  # the workload is not Ready: no scale-up on top
    ROLLOUT_IN_PROGRESS = "rollout_in_progress"  # a rollout runs: no change until it ends


class EventReason(StrEnum):
    """The ``reason`` of the Kubernetes Events the actuator records on the objects it scales."""

    SUCCESSFUL_RESCALE = "SuccessfulRescale"
    FAILED_RESCALE = "FailedRescale"
    REFUSED_RESCALE = "RefusedRescale"
    EXTERNAL_RESCALE = "ExternalRescale"
    PENDING_REPLICAS = "PendingReplicas"
    DRY_RUN_RESCALE = "DryRunRescale"
    MODEL_MISMATCH = "ModelMismatch"


# ----------------------------------------------------------------------------- what is observed


@dataclass(frozen=True)
class RoleState:
    """One worker set as the cluster shows it."""

    spec: int  # replicas the workload asks for now
    ready: int | None = None  # replicas ready to serve, if known
    pending: int | None = None  # replicas that cannot be scheduled (or created), if known
    paused_by: str | None = None  # what pauses it, e.g. the annotation and the object
    owners: tuple[str, ...] = ()  # other autoscalers that target this worker set
    obj: str = ""  # "Deployment prod/llama-prefill", for messages
    floor: int | None = None  # fewest replicas the workload accepts above zero (minAvailable)
    not_ready: str | None = None  # why the workload is not Ready, if it is not
    rollout: str | None = None  # the rollout in progress, if one is
    model: str | None = None  # the model its workers serve, where the workload says

    @property
    def waiting(self) -> int:
        """Replicas asked for that are not running: Pending pods if known, else not ready."""
        if self.pending is not None:
            return self.pending
        if self.ready is None:
            return 0
        return max(0, self.spec - self.ready)


@dataclass(frozen=True)
class Observed:
    prefill: RoleState
    decode: RoleState
    # What the backend needs to write safely (resourceVersions, service names); opaque here.
    handle: Any = field(default=None, compare=False, repr=False)

    def role(self, role: Role) -> RoleState:
        return self.prefill if role is Role.PREFILL else self.decode


@dataclass(frozen=True)
class Limits:
    """Hard limits enforced here whatever the target says."""

    min_prefill: int
    max_prefill: int
    min_decode: int
    max_decode: int
    prefill_gpus: int  # GPUs per prefill replica
    decode_gpus: int  # GPUs per decode replica
    max_total_gpus: int

    def bounds(self, role: Role) -> tuple[int, int]:
        if role is Role.PREFILL:
            return self.min_prefill, self.max_prefill
        return self.min_decode, self.max_decode

    def gpus_per_replica(self, role: Role) -> int:
        return self.prefill_gpus if role is Role.PREFILL else self.decode_gpus

    def gpus(self, replicas: Mapping[Role, int]) -> int:
        return sum(replicas[r] * self.gpus_per_replica(r) for r in ROLES)


@dataclass(frozen=True)
class Rules:
    external_change_hold_s: float  # how long a change made by someone else is respected
    pending_timeout_s: float  # replicas waiting longer than this stop further scale-up


# ----------------------------------------------------------------------------- what is remembered


@dataclass(frozen=True)
class RoleMemory:
    applied: int | None = None  # replicas the actuator last set (or adopted at first sight)
    attempted: frozenset[int] = frozenset()  # writes sent but not confirmed (a timeout, say)
    external_at: float | None = None  # when a change by someone else was first seen
    external_value: int | None = None  # the replicas that change set
    waiting_since: float | None = None  # since when replicas have waited without progress
    pending_reported: bool = False  # the "stuck" notice was recorded for this episode
    last_ready: int | None = None  # ready replicas at the last look, to see progress


@dataclass(frozen=True)
class DeploymentMemory:
    last_window_end: float | None = None
    prefill: RoleMemory = RoleMemory()
    decode: RoleMemory = RoleMemory()
    last_refusal: str | None = None  # to record one Event per refusal, not one per interval
    model_mismatch: str | None = None  # the mismatch last warned about (one Event for each)

    def role(self, role: Role) -> RoleMemory:
        return self.prefill if role is Role.PREFILL else self.decode

    def with_role(self, role: Role, memory: RoleMemory) -> DeploymentMemory:
        if role is Role.PREFILL:
            return replace(self, prefill=memory)
        return replace(self, decode=memory)


@dataclass(frozen=True)
class Notice:
    """Something to record as a Kubernetes Event on a role's object (or all, if role is None)."""

    reason: EventReason
    message: str
    role: Role | None = None
    warning: bool = False


# ----------------------------------------------------------------------------- the plan

Step = tuple[tuple[Role, int], ...]


@dataclass(frozen=True)
class Plan:
    outcome: Outcome  # APPLIED: write ``steps``; UNCHANGED or REFUSED: write nothing
    replicas: dict[Role, int]  # what each role should have once the steps are written
    steps: tuple[Step, ...] = ()
    reasons: dict[Role, Reason] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    notices: tuple[Notice, ...] = ()
    memory: DeploymentMemory = DeploymentMemory()


def clamp(replicas: int, low: int, high: int) -> tuple[int, Reason]:
    if replicas < low:
        return low, Reason.MIN_REPLICAS
    if replicas > high:
        return high, Reason.MAX_REPLICAS
    return replicas, Reason.WITHIN_BOUNDS


def track(memory: RoleMemory, state: RoleState, role: Role, now: float,
          rules: Rules) -> tuple[RoleMemory, list[Notice]]:
    """Update what is remembered of one role from what the cluster shows now."""
    notices: list[Notice] = []
    if memory.applied is None or state.paused_by is not None:
        # First sight, or paused (the operator scales by hand): adopt what is there.
        memory = replace(memory, applied=state.spec, attempted=frozenset(), external_at=None,
                         external_value=None)
    elif state.spec == memory.applied or state.spec in memory.attempted:
        memory = replace(memory, applied=state.spec, attempted=frozenset(),
                         external_at=None, external_value=None)
    elif state.spec != memory.external_value:
        until = now + rules.external_change_hold_s
        notices.append(Notice(
            EventReason.EXTERNAL_RESCALE,
            f"{role} replicas changed by someone else from {memory.applied} to {state.spec}; "
            f"slaplanner respects the change for {rules.external_change_hold_s:g} s "
            f"(until {until:.0f})", role, warning=True))
        memory = replace(memory, external_at=now, external_value=state.spec)
    progress = (state.ready is not None and memory.last_ready is not None
                and state.ready > memory.last_ready)
    memory = replace(memory, last_ready=state.ready)
    if state.waiting > 0:
        # Waiting replicas while others become ready is a slow start, not a stuck one.
        since = now if memory.waiting_since is None or progress else memory.waiting_since
        memory = replace(memory, waiting_since=since)
        if now - since >= rules.pending_timeout_s and not memory.pending_reported:
            notices.append(Notice(
                EventReason.PENDING_REPLICAS,
                f"{state.waiting} {role} replicas waiting for {now - since:.0f} s "
                f"(more than {rules.pending_timeout_s:g} s); slaplanner will not ask for more "
                "until they run", role, warning=True))
            memory = replace(memory, pending_reported=True)
    else:
        memory = replace(memory, waiting_since=None, pending_reported=False)
    return memory, notices


def external_hold_active(memory: RoleMemory, now: float, rules: Rules) -> bool:
    if memory.external_at is None:
        return False
    return now < memory.external_at + rules.external_change_hold_s


def stuck(memory: RoleMemory, now: float, rules: Rules) -> bool:
    if memory.waiting_since is None:
        return False
    return now - memory.waiting_since >= rules.pending_timeout_s


def order_steps(current: Mapping[Role, int], wanted: Mapping[Role, int],
                limits: Limits) -> tuple[Step, ...]:
    """Scale-downs before scale-ups; in two steps when the sum would pass the ceiling between."""
    downs = tuple((r, wanted[r]) for r in ROLES if wanted[r] < current[r])
    ups = tuple((r, wanted[r]) for r in ROLES if wanted[r] > current[r])
    if not downs and not ups:
        return ()
    if downs and ups:
        between = {r: max(current[r], wanted[r]) for r in ROLES}
        if limits.gpus(between) > limits.max_total_gpus:
            return (downs, ups)
    return (downs + ups,)


def _refused(reason: str, replicas: dict[Role, int], memory: DeploymentMemory,
             role: Role | None = None) -> Plan:
    return Plan(Outcome.REFUSED, replicas, notes=(reason,), memory=memory,
                notices=(Notice(EventReason.REFUSED_RESCALE, reason, role, warning=True),))


def decide(target: Mapping[Role, int], observed: Observed | None, memory: DeploymentMemory,
           limits: Limits, rules: Rules, now: float) -> Plan:
    """The plan for one target: clamp, refuse, respect holds, cap by the ceiling, order."""
    asked = dict(target)
    if observed is not None:
        owners = [o for r in ROLES for o in observed.role(r).owners]
        if owners:
            owned = [r for r in ROLES if observed.role(r).owners]
            return _refused("another autoscaler owns the workload (one owner per workload): "
                            + "; ".join(dict.fromkeys(owners)), asked, memory,
                            owned[0] if len(owned) == 1 else None)
    clamped: dict[Role, int] = {}
    reasons: dict[Role, Reason] = {}
    notes: list[str] = []
    for role in ROLES:
        clamped[role], reasons[role] = clamp(asked[role], *limits.bounds(role))
        if reasons[role] is not Reason.WITHIN_BOUNDS:
            notes.append(f"{role} {asked[role]} clamped to {clamped[role]} ({reasons[role]})")
        floor = observed.role(role).floor if observed is not None else None
        if floor is not None and 0 < clamped[role] < floor:
            notes.append(f"{role} {clamped[role]} raised to {floor}, the workload's minAvailable")
            clamped[role], reasons[role] = floor, Reason.MIN_AVAILABLE
    gpus = limits.gpus(clamped)
    if gpus > limits.max_total_gpus:
        return _refused(f"target needs {gpus} GPUs (prefill {clamped[Role.PREFILL]} x "
                        f"{limits.prefill_gpus} + decode {clamped[Role.DECODE]} x "
                        f"{limits.decode_gpus}), over the ceiling of {limits.max_total_gpus}",
                        clamped, memory)
    if observed is None:  # nothing known of the current state (dry run, virtual at first)
        steps: tuple[Step, ...] = (tuple((r, clamped[r]) for r in ROLES),)
        return Plan(Outcome.APPLIED, clamped, steps, reasons, tuple(notes), memory=memory)

    notices: list[Notice] = []
    final: dict[Role, int] = {}
    held: list[tuple[Role, str]] = []
    for role in ROLES:
        state = observed.role(role)
        role_memory, role_notices = track(memory.role(role), state, role, now, rules)
        notices += role_notices
        want, spec = clamped[role], state.spec
        hold: tuple[Reason, str] | None = None
        if want != spec and state.paused_by is not None:
            hold = (Reason.PAUSED, f"{role} paused by {state.paused_by}")
        elif want != spec and state.rollout is not None:
            hold = (Reason.ROLLOUT_IN_PROGRESS,
                    f"{role} held at {spec}: {state.rollout}; scaling waits for the rollout")
        elif want > spec and state.not_ready is not None:
            # A workload that cannot become Ready gets no more replicas on top; scaling down
            # still applies, or one stuck for lack of GPUs could never recover.
            hold = (Reason.NOT_READY, f"{role} held at {spec}: {state.not_ready}")
        elif want != spec and external_hold_active(role_memory, now, rules):
            assert role_memory.external_at is not None
            left = role_memory.external_at + rules.external_change_hold_s - now
            hold = (Reason.EXTERNAL_CHANGE_RESPECTED,
                    f"{role} set to {spec} by someone else; respected for {left:.0f} s more")
        elif want > spec and stuck(role_memory, now, rules):
            assert role_memory.waiting_since is not None
            hold = (Reason.PENDING_NOT_STACKED,
                    f"{role}: {state.waiting} replicas waiting for "
                    f"{now - role_memory.waiting_since:.0f} s; not asking for more")
        if hold is not None:
            reasons[role] = hold[0]
            held.append((role, hold[1]))
            final[role] = spec
        else:
            final[role] = want
            if role_memory.external_at is not None:  # the hold is over: adopt, then act
                role_memory = replace(role_memory, applied=spec, external_at=None,
                                      external_value=None)
        memory = memory.with_role(role, role_memory)

    current = {r: observed.role(r).spec for r in ROLES}
    if limits.gpus(final) > limits.max_total_gpus:  # a held role leaves less room for the other
        for role in ROLES:
            if final[role] > current[role]:
                others = sum(final[r] * limits.gpus_per_replica(r) for r in ROLES if r != role)
                room = (limits.max_total_gpus - others) // limits.gpus_per_replica(role)
                capped = max(current[role], room)
                if capped < final[role]:
                    notes.append(f"{role} scale-up capped at {capped} by the GPU ceiling of "
                                 f"{limits.max_total_gpus}")
                    final[role], reasons[role] = capped, Reason.GPU_CEILING
    notes += [text for _, text in held]
    steps = order_steps(current, final, limits)
    if len(steps) > 1:
        notes.append("scale-down first, then scale-up: the GPU ceiling is tight")
    held_notices = tuple(Notice(EventReason.REFUSED_RESCALE, text, role, warning=True)
                         for role, text in held)
    if not steps:
        if held:
            return Plan(Outcome.REFUSED, final, (), reasons, tuple(notes),
                        tuple(notices) + held_notices, memory)
        return Plan(Outcome.UNCHANGED, final, (), reasons, tuple([*notes, "already at target"]),
                    tuple(notices), memory)
    return Plan(Outcome.APPLIED, final, steps, reasons, tuple(notes),
                tuple(notices) + held_notices, memory)


# ----------------------------------------------------------------------------- the protocols


@dataclass(frozen=True, order=True)
class ObjectRef:
    """A Kubernetes object the actuator may touch, as the allowlist names it."""

    namespace: str
    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


class BackendError(Exception):
    """A failure that retrying will not fix (forbidden, not found, invalid); says what is wrong."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status, when an API server answered


class RejectedError(BackendError):
    """The API server refused the change itself (schema, CEL rule, admission webhook): retrying
    the same change will not help; the target is refused with the server's own message."""


class ConflictError(Exception):
    """Someone else wrote the object between our read and our write; read again and re-plan."""


class WorkerSets(Protocol):
    """The prefill and decode worker sets of deployments, as one backend sees them."""

    backend_name: str
    applies: bool  # False for the dry run: it reports what it would do

    def objects(self, key: DeploymentKey) -> list[ObjectRef]:
        """The Kubernetes objects this backend would touch for ``key`` (none outside it)."""
        ...

    async def read(self, key: DeploymentKey) -> Observed | None:
        """What the worker sets have now (None if nothing is known yet)."""
        ...

    async def write(self, key: DeploymentKey, step: Step, observed: Observed | None,
                    target: ReplicaTarget,
                    shown: status.Shown | None = None) -> Mapping[Role, str] | None:
        """Set the replicas of the roles in ``step`` (and, in the same write where the backend
        can, the conditions ``shown``); what was written for each role (an object and
        subresource, a subject), or None. Raises ConflictError, RejectedError or
        BackendError."""
        ...

    async def record(self, key: DeploymentKey, notices: Iterable[Notice], now: float) -> None:
        """Record notices where operators look (Kubernetes Events); never raises."""
        ...

    async def show(self, key: DeploymentKey, shown: status.Shown) -> None:
        """Show the conditions where operators look, if they moved since last shown; never
        raises. Backends without such a place do nothing."""
        ...


class LeaderGate(Protocol):
    def is_leader(self, now: float) -> bool: ...


@dataclass(frozen=True)
class Route:
    worker_sets: WorkerSets
    limits: Limits


class Router(Protocol):
    def route(self, key: DeploymentKey) -> Route | str:
        """The backend and limits of a deployment, or why there is none."""
        ...


class DryRunWorkerSets:
    """Remembers what it was asked for; never touches a cluster."""

    backend_name = "dry-run"
    applies = False

    def __init__(self) -> None:
        self._replicas: dict[DeploymentKey, dict[Role, int]] = {}

    def objects(self, key: DeploymentKey) -> list[ObjectRef]:
        return []

    def forget(self, key: DeploymentKey) -> None:
        self._replicas.pop(key, None)

    async def read(self, key: DeploymentKey) -> Observed | None:
        known = self._replicas.get(key)
        if known is None:
            return None
        return Observed(RoleState(known[Role.PREFILL]), RoleState(known[Role.DECODE]))

    async def write(self, key: DeploymentKey, step: Step, observed: Observed | None,
                    target: ReplicaTarget,
                    shown: status.Shown | None = None) -> Mapping[Role, str] | None:
        self._replicas.setdefault(key, {Role.PREFILL: 0, Role.DECODE: 0}).update(dict(step))
        return None

    async def record(self, key: DeploymentKey, notices: Iterable[Notice], now: float) -> None:
        for notice in notices:  # the shell logs the outcome once; the details at debug
            log.debug("%s: %s: %s (dry run, not recorded)", key, notice.reason, notice.message)

    async def show(self, key: DeploymentKey, shown: status.Shown) -> None:
        return None


@dataclass(frozen=True)
class StaticRouter:
    """One backend and one set of limits for every deployment."""

    worker_sets: WorkerSets
    limits: Limits

    def route(self, key: DeploymentKey) -> Route | str:
        return Route(self.worker_sets, self.limits)


def target_reason(target: ReplicaTarget, role: Role | None = None) -> str:
    """The rule that bound the target, from its explanation, for Events and logs."""
    reason = explanation.reason_text(target.explanation, None if role is None else role.value)
    return (reason or f"policy {target.policy}")[:200]


# ----------------------------------------------------------------------------- the actuator


class Actuator:
    """Applies targets through the router's backends; remembers each deployment's history."""

    def __init__(self, router: Router, rules: Rules, allowlist: Iterable[ObjectRef] = (),
                 gate: LeaderGate | None = None, conflict_attempts: int = 5,
                 conflict_backoff_s: float = 0.05,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 remembered_targets: int = 4096) -> None:
        self.router = router
        self.rules = rules
        self.allowlist = frozenset(allowlist)
        self.gate = gate
        self.conflict_attempts = max(1, conflict_attempts)
        self.conflict_backoff_s = conflict_backoff_s
        self.sleep = sleep
        self.memory: dict[DeploymentKey, DeploymentMemory] = {}
        # keyed by deployment and target id: two deployments' targets may share an id (derived
        # from snapshot ids, which only the deployment's subject makes unique)
        self._seen: OrderedDict[tuple[DeploymentKey, str], Outcome] = OrderedDict()
        # the ScaleEvent each recent target got: a target delivered again (its report lost with
        # the connection, say) gets the very same event, so the stream keeps one report of it,
        # the one that says what was done
        self._reported: OrderedDict[tuple[DeploymentKey, str], ScaleEvent] = OrderedDict()
        self._remembered_targets = remembered_targets
        # the newest window handled per deployment, to forget the idle ones
        self._last_seen: dict[DeploymentKey, float] = {}

    def restore(self, event: ScaleEvent) -> None:
        """Seed the memory from a ScaleEvent published earlier (after a restart or failover).

        The window always counts (older targets stay ignored); the replicas count only if the
        same backend set them, so a dry run's numbers never look like someone else's change.
        """
        if event.outcome not in (Outcome.APPLIED, Outcome.UNCHANGED, Outcome.DRY_RUN):
            return
        key = event.deployment
        memory = self.memory.get(key, DeploymentMemory())
        if memory.last_window_end is not None and memory.last_window_end > event.window_end:
            return
        memory = replace(memory, last_window_end=event.window_end)
        route = self.router.route(key)
        same_backend = not isinstance(route, str) and (
            route.worker_sets.backend_name == event.backend)
        if same_backend and event.outcome is not Outcome.DRY_RUN:
            memory = replace(memory, prefill=replace(memory.prefill, applied=event.prefill.to),
                             decode=replace(memory.decode, applied=event.decode.to))
        self.memory[key] = memory
        self._remember((key, event.target_id), event.outcome)

    def restore_unconfirmed(self, target: ReplicaTarget) -> None:
        """Seed the memory from the last target in the stream when no ScaleEvent reports it
        (call after ``restore``): the previous instance may have written it and died before
        reporting. Replicas the cluster then shows at its numbers are this actuator's own
        change, not someone else's to respect for ``external_change_hold_s``."""
        key = target.deployment
        memory = self.memory.get(key)
        if memory is None or (key, target.id) in self._seen:
            return  # nothing restored (first sight adopts anyway), or reported
        if memory.last_window_end is not None and target.window_end < memory.last_window_end:
            return
        route = self.router.route(key)
        if isinstance(route, str):
            return
        for role, asked in ((Role.PREFILL, target.prefill_replicas),
                            (Role.DECODE, target.decode_replicas)):
            replicas, _ = clamp(asked, *route.limits.bounds(role))
            role_memory = memory.role(role)
            memory = memory.with_role(role, replace(
                role_memory, attempted=role_memory.attempted | {replicas}))
        self.memory[key] = memory

    def _remember(self, seen: tuple[DeploymentKey, str], outcome: Outcome,
                  event: ScaleEvent | None = None) -> None:
        self._seen[seen] = outcome
        self._seen.move_to_end(seen)
        while len(self._seen) > self._remembered_targets:
            self._seen.popitem(last=False)
        if event is not None:
            self._reported[seen] = event
            self._reported.move_to_end(seen)
            while len(self._reported) > self._remembered_targets:
                self._reported.popitem(last=False)

    async def handle(self, target: ReplicaTarget, now: float) -> ScaleEvent | None:
        """Apply one target; None when this instance is not the leader (leave it to the leader)."""
        if self.gate is not None and not self.gate.is_leader(now):
            return None
        reported = self._reported.get((target.deployment, target.id))
        if reported is not None:
            return reported  # delivered again: the same report (JetStream drops a repeat)
        event = await self._handle(target, now)
        if event.outcome is not Outcome.FAILED:
            self._remember((target.deployment, target.id), event.outcome, event)
        seen = self._last_seen.pop(target.deployment, target.window_end)
        self._last_seen[target.deployment] = max(seen, target.window_end)
        return event

    def newest_seen_s(self) -> float | None:
        """The newest ``window_end`` of any target handled; ``None`` before the first."""
        return max(self._last_seen.values(), default=None)

    def forget_idle(self, now_s: float, idle_s: float) -> list[DeploymentKey]:
        """Forget every deployment whose newest target is ``idle_s`` or more behind ``now_s``
        (window time), its memory and the dry run's numbers; the ones forgotten. One that
        comes back is met as a new one (its replicas adopted as found)."""
        idle = [key for key, seen in self._last_seen.items() if now_s - seen >= idle_s]
        for key in idle:
            del self._last_seen[key]
            self.memory.pop(key, None)
            route = self.router.route(key)
            if not isinstance(route, str) and isinstance(route.worker_sets, DryRunWorkerSets):
                route.worker_sets.forget(key)
        gone = set(idle)
        for seen in [s for s in self._reported if s[0] in gone]:
            del self._reported[seen]
        return idle

    async def _handle(self, target: ReplicaTarget, now: float) -> ScaleEvent:
        key = target.deployment
        memory = self.memory.get(key, DeploymentMemory())
        asked = {Role.PREFILL: target.prefill_replicas, Role.DECODE: target.decode_replicas}
        remembered = {r: memory.role(r).applied for r in ROLES}
        known = {r: asked[r] if remembered[r] is None else int(remembered[r] or 0) for r in ROLES}

        def event(outcome: Outcome, reason: str, to: Mapping[Role, int],
                  before: Observed | None = None, after: Observed | None = None,
                  backend: str = "none", via: Mapping[Role, str] | None = None) -> ScaleEvent:
            def change(role: Role) -> RoleChange:
                was = before.role(role).spec if before is not None else remembered[role]
                ready = after.role(role).ready if after is not None else (
                    before.role(role).ready if before is not None else None)
                return RoleChange(from_=was, to=to[role], ready=ready,
                                  via=(via or {}).get(role))

            return ScaleEvent(
                id=derived_id("scaled", target.id), deployment=key, target_id=target.id,
                window_end=target.window_end, window_s=target.window_s, outcome=outcome,
                backend=backend, reason=reason[:4096],
                prefill=change(Role.PREFILL), decode=change(Role.DECODE))

        route = self.router.route(key)
        backend = "none" if isinstance(route, str) else route.worker_sets.backend_name
        previous = self._seen.get((key, target.id))
        if previous is not None:
            return event(Outcome.UNCHANGED, f"duplicate delivery of target {target.id} "
                         f"(already handled: {previous}); nothing done", known, backend=backend)
        if memory.last_window_end is not None and target.window_end < memory.last_window_end:
            return event(Outcome.UNCHANGED, f"target for window {target.window_end:.0f} is "
                         f"older than the last applied ({memory.last_window_end:.0f}); ignored",
                         known, backend=backend)
        if isinstance(route, str):
            return event(Outcome.REFUSED, route, asked)
        ws = route.worker_sets
        outside = [o for o in ws.objects(key) if o not in self.allowlist]
        if outside:
            return event(Outcome.REFUSED, "not in the allowlist: " + ", ".join(map(str, outside))
                         + "; the actuator touches only the objects its configuration allows",
                         asked, backend=ws.backend_name)

        for attempt in range(1, self.conflict_attempts + 1):
            try:
                observed = await ws.read(key)
            except BackendError as exc:
                await ws.record(key, [Notice(EventReason.FAILED_RESCALE, str(exc), warning=True)],
                                now)
                return event(Outcome.FAILED, f"could not read the worker sets: {exc}", asked,
                             backend=ws.backend_name)
            mismatch = None if observed is None else status.model_mismatch(
                status.profile_model(target), {r.value: observed.role(r).model for r in ROLES})
            memory = await self._warn_of_model(ws, key, memory, mismatch, now)
            plan = decide(asked, observed, memory, route.limits, self.rules, now)
            memory = plan.memory
            self.memory[key] = memory

            async def shown(result: ScaleEvent, seen: Observed | None = observed,
                            wrong_model: str | None = mismatch) -> ScaleEvent:
                # Not on a paused workload (left alone), nor after a failed write: the API
                # that just failed would be asked again for the annotation.
                paused = seen is None or any(seen.role(r).paused_by for r in ROLES)
                if not paused and result.outcome is not Outcome.FAILED:
                    await ws.show(key, status.for_target(target, result, now, wrong_model))
                return result

            if plan.outcome is not Outcome.APPLIED:
                await self._record(ws, key, plan, now)
                if plan.outcome is Outcome.UNCHANGED:
                    self.memory[key] = replace(self.memory[key],
                                               last_window_end=target.window_end)
                return await shown(event(plan.outcome, "; ".join(plan.notes), plan.replicas,
                                         observed, backend=ws.backend_name))
            # The conditions as they stand once the plan is written, written with its last step.
            expected = status.for_target(target, event(
                Outcome.APPLIED if ws.applies else Outcome.DRY_RUN, "", plan.replicas, observed,
                backend=ws.backend_name), now, mismatch)
            done: list[tuple[Role, int]] = []
            via: dict[Role, str] = {}
            try:
                current = observed
                for index, step in enumerate(plan.steps):
                    if index > 0:  # fresh versions for the next write; nobody moved meanwhile?
                        current = await self._still(ws, key, observed, step)
                    for role, replicas in step:
                        role_memory = memory.role(role)
                        memory = memory.with_role(role, replace(
                            role_memory, attempted=role_memory.attempted | {replicas}))
                    self.memory[key] = memory
                    last = index == len(plan.steps) - 1
                    via.update(await ws.write(key, step, current, target,
                                              expected if last else None) or {})
                    done += step
            except ConflictError as exc:
                if attempt < self.conflict_attempts:
                    log.info("%s: conflict (%s); reading again (attempt %d of %d)", key, exc,
                             attempt, self.conflict_attempts)
                    await self.sleep(self.conflict_backoff_s * attempt)
                    continue
                return await shown(await self._failed(
                    ws, key, target, plan, done, observed, now, event,
                    f"conflict persisted after {attempt} attempts: {exc}"))
            except RejectedError as exc:
                return await shown(await self._failed(ws, key, target, plan, done, observed,
                                                      now, event, str(exc), Outcome.REFUSED))
            except BackendError as exc:
                return await shown(await self._failed(ws, key, target, plan, done, observed,
                                                      now, event, str(exc)))
            return await shown(await self._applied(ws, key, target, plan, observed, now, event,
                                                   via))
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    async def _still(ws: WorkerSets, key: DeploymentKey, planned_from: Observed | None,
                     step: Step) -> Observed | None:
        """Read again between two steps; a conflict if a role still to write has moved."""
        fresh = await ws.read(key)
        if planned_from is not None and fresh is not None:
            for role, _ in step:
                if fresh.role(role).spec != planned_from.role(role).spec:
                    raise ConflictError(f"{role} moved from {planned_from.role(role).spec} to "
                                        f"{fresh.role(role).spec} between two steps")
        return fresh

    @staticmethod
    async def _warn_of_model(ws: WorkerSets, key: DeploymentKey, memory: DeploymentMemory,
                             mismatch: str | None, now: float) -> DeploymentMemory:
        """One warning Event per mismatch between the workload's model and the profile's (not
        one per interval); a mismatch that goes away and comes back is warned of again."""
        if mismatch == memory.model_mismatch:
            return memory
        if mismatch is not None:
            await ws.record(key, [Notice(EventReason.MODEL_MISMATCH, mismatch, warning=True)],
                            now)
        return replace(memory, model_mismatch=mismatch)

    async def _record(self, ws: WorkerSets, key: DeploymentKey, plan: Plan, now: float) -> None:
        """Record the plan's notices; a refusal only when it differs from the last one."""
        memory = self.memory[key]
        refusals = [n for n in plan.notices if n.reason is EventReason.REFUSED_RESCALE]
        others = [n for n in plan.notices if n.reason is not EventReason.REFUSED_RESCALE]
        text = "; ".join(n.message for n in refusals) or None
        if text is not None and text == memory.last_refusal:
            refusals = []
        self.memory[key] = replace(memory, last_refusal=text)
        if others or refusals:
            await ws.record(key, others + refusals, now)

    async def _failed(self, ws: WorkerSets, key: DeploymentKey, target: ReplicaTarget, plan: Plan,
                      done: list[tuple[Role, int]], observed: Observed | None, now: float,
                      event: Callable[..., ScaleEvent], error: str,
                      outcome: Outcome = Outcome.FAILED) -> ScaleEvent:
        memory = self.memory[key]
        for role, replicas in done:
            memory = memory.with_role(role, replace(memory.role(role), applied=replicas,
                                                    attempted=frozenset()))
        self.memory[key] = memory
        partial = (" (already applied: " + ", ".join(f"{r} {n}" for r, n in done) + ")"
                   if done else "")
        refused = outcome is Outcome.REFUSED
        reason = f"{'refused' if refused else 'failed to apply'}: {error}{partial}"
        notices = [Notice(EventReason.REFUSED_RESCALE if refused else EventReason.FAILED_RESCALE,
                          f"{reason}; target {target.id}", role, warning=True)
                   for step in plan.steps for role, n in step if (role, n) not in done]
        await ws.record(key, notices, now)
        return event(outcome, "; ".join([*plan.notes, reason]), plan.replicas, observed,
                     backend=ws.backend_name)

    async def _applied(self, ws: WorkerSets, key: DeploymentKey, target: ReplicaTarget,
                       plan: Plan, observed: Observed | None, now: float,
                       event: Callable[..., ScaleEvent],
                       via: Mapping[Role, str] | None = None) -> ScaleEvent:
        memory = self.memory[key]
        for step in plan.steps:
            for role, replicas in step:
                memory = memory.with_role(role, replace(
                    memory.role(role), applied=replicas, attempted=frozenset(),
                    external_at=None, external_value=None))
        self.memory[key] = replace(memory, last_window_end=target.window_end)
        notes = list(plan.notes)
        try:
            after = await ws.read(key)
        except BackendError as exc:
            after = None
            notes.append(f"could not read back: {exc}")
        changed = [(role, n) for step in plan.steps for role, n in step]
        was = {r: str(observed.role(r).spec) if observed is not None else "unknown"
               for r in ROLES}
        verb = "applied" if ws.applies else "would apply (dry run)"
        notes.insert(0, f"{verb}: " + ", ".join(f"{r} {was[r]}->{n}" for r, n in changed))
        if after is not None:
            for role, replicas in changed:
                seen = after.role(role).spec
                if seen != replicas:
                    notes.append(f"{role} reads back {seen} replicas, not {replicas}")
        if ws.applies:
            notices = [Notice(EventReason.SUCCESSFUL_RESCALE,
                              f"New size: {n}; reason: {target_reason(target, role)}; {role} "
                              f"{was[role]} -> {n} (target {target.id})", role)
                       for role, n in changed]
        else:
            notices = [Notice(EventReason.DRY_RUN_RESCALE,
                              f"Dry run: would set {role} to {n} (now {was[role]}); reason: "
                              f"{target_reason(target, role)} (target {target.id})", role)
                       for role, n in changed]
        await self._record(ws, key, replace(plan, notices=plan.notices + tuple(notices)), now)
        outcome = Outcome.APPLIED if ws.applies else Outcome.DRY_RUN
        # ``ready`` is what was ready when the change was made: new replicas take minutes, and
        # a read right after the write would show the same or a race.
        return event(outcome, "; ".join(notes), plan.replicas, observed,
                     backend=ws.backend_name, via=via)
