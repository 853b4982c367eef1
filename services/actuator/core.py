"""Actuator core: check a target against hard limits and history, apply it through a backend.

Pure apart from the backend it is given: the Kubernetes backend and the dry run implement the same
small ``WorkerSets`` protocol, and tests use an in-memory one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from services.actuator.settings import ActuatorSettings
from shared.messages import (
    DeploymentKey,
    Outcome,
    ReplicaTarget,
    RoleChange,
    ScaleEvent,
    derived_id,
)


@dataclass(frozen=True)
class Replicas:
    prefill: int
    decode: int
    prefill_ready: int | None = None
    decode_ready: int | None = None


class WorkerSets(Protocol):
    """The prefill and decode worker sets of one deployment, as a backend sees them."""

    backend_name: str
    applies: bool  # False for the dry run: it reports what it would do

    def read(self, key: DeploymentKey) -> Replicas | None: ...

    def write(self, key: DeploymentKey, prefill: int, decode: int) -> None: ...


class DryRunWorkerSets:
    """Remembers what it was asked for; never touches a cluster."""

    backend_name = "dry-run"
    applies = False

    def __init__(self) -> None:
        self._replicas: dict[DeploymentKey, Replicas] = {}

    def read(self, key: DeploymentKey) -> Replicas | None:
        return self._replicas.get(key)

    def write(self, key: DeploymentKey, prefill: int, decode: int) -> None:
        self._replicas[key] = Replicas(prefill, decode, prefill, decode)


class Actuator:
    def __init__(self, settings: ActuatorSettings, worker_sets: WorkerSets) -> None:
        self.settings = settings
        self.worker_sets = worker_sets
        self._last_window_end: dict[DeploymentKey, float] = {}

    def limit(self, target: ReplicaTarget) -> tuple[int, int, list[str]]:
        """Enforce the hard limits again, whatever the target says."""
        s = self.settings
        notes: list[str] = []
        prefill = min(max(target.prefill_replicas, s.min_prefill_replicas), s.max_prefill_replicas)
        decode = min(max(target.decode_replicas, s.min_decode_replicas), s.max_decode_replicas)
        if (prefill, decode) != (target.prefill_replicas, target.decode_replicas):
            notes.append(f"clamped to per-role limits: prefill {prefill}, decode {decode}")
        gpus = prefill * s.prefill_engine_num_gpu + decode * s.decode_engine_num_gpu
        if gpus > s.max_total_gpus:
            # Refuse rather than guess which role to cut: the decider owns that trade-off.
            notes.append(f"needs {gpus} GPUs, over the ceiling of {s.max_total_gpus}")
            return -1, -1, notes
        return prefill, decode, notes

    def apply(self, target: ReplicaTarget) -> ScaleEvent:
        key = target.deployment
        current = self.worker_sets.read(key)
        before_p = current.prefill if current else None
        before_d = current.decode if current else None

        def event(outcome: Outcome, reason: str, prefill: int, decode: int,
                  after: Replicas | None) -> ScaleEvent:
            return ScaleEvent(
                id=derived_id("scaled", target.id), deployment=key, target_id=target.id,
                window_end=target.window_end, window_s=target.window_s, outcome=outcome,
                backend=self.worker_sets.backend_name, reason=reason,
                prefill=RoleChange(from_=before_p, to=prefill,
                                   ready=after.prefill_ready if after else None),
                decode=RoleChange(from_=before_d, to=decode,
                                  ready=after.decode_ready if after else None),
            )

        last = self._last_window_end.get(key)
        if last is not None and target.window_end < last:
            return event(Outcome.UNCHANGED,
                         f"target for window {target.window_end} is older than the last applied"
                         f" ({last}); ignored", before_p or 0, before_d or 0, current)
        prefill, decode, notes = self.limit(target)
        if prefill < 0:
            return event(Outcome.REFUSED, "; ".join(notes), target.prefill_replicas,
                         target.decode_replicas, current)
        self._last_window_end[key] = target.window_end
        if current is not None and (current.prefill, current.decode) == (prefill, decode):
            return event(Outcome.UNCHANGED, "; ".join([*notes, "already at target"]),
                         prefill, decode, current)
        self.worker_sets.write(key, prefill, decode)
        after = self.worker_sets.read(key)
        verb = "applied" if self.worker_sets.applies else "would apply (dry run)"
        reason = "; ".join([*notes, f"{verb}: prefill {before_p}->{prefill}, "
                            f"decode {before_d}->{decode}"])
        outcome = Outcome.APPLIED if self.worker_sets.applies else Outcome.DRY_RUN
        return event(outcome, reason, prefill, decode, after)
