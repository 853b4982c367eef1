"""The actuator's pure core: the plan for a target, the Lease election in virtual time, the
mapping file, and the actuator's memory (duplicates, stale targets) with the dry run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.actuator import config, core, election
from services.actuator.backends import limits_for
from services.actuator.core import (
    DeploymentMemory,
    Limits,
    Observed,
    Reason,
    Role,
    RoleMemory,
    RoleState,
    Rules,
)
from services.actuator.election import Action, Elector, LeaseRecord
from shared.messages import DeploymentKey, Outcome, ReplicaTarget
from tests.conftest_k8s import settings

P, D = Role.PREFILL, Role.DECODE
T0 = 1_700_000_000.0
# prefill 1 GPU per replica, decode 2; ceiling 16 GPUs; replicas 1..8 each.
LIMITS = Limits(min_prefill=1, max_prefill=8, min_decode=1, max_decode=8,
                prefill_gpus=1, decode_gpus=2, max_total_gpus=16)
RULES = Rules(external_change_hold_s=300.0, pending_timeout_s=600.0)


def seen(prefill: int, decode: int, **role_fields: RoleState) -> Observed:
    return Observed(role_fields.get("p", RoleState(prefill, prefill)),
                    role_fields.get("d", RoleState(decode, decode)))


def remembered(prefill: int | None, decode: int | None, **changes: RoleMemory) -> DeploymentMemory:
    return DeploymentMemory(prefill=changes.get("p", RoleMemory(applied=prefill)),
                            decode=changes.get("d", RoleMemory(applied=decode)))


@dataclass(frozen=True)
class Case:
    target: tuple[int, int]
    observed: Observed | None
    memory: DeploymentMemory
    outcome: Outcome
    replicas: tuple[int, int]
    steps: tuple[tuple[tuple[Role, int], ...], ...] = ()
    reason: dict[Role, Reason] | None = None
    now: float = T0


CASES = {
    "a target within bounds and different from the cluster is applied in one step": Case(
        (3, 4), seen(2, 4), remembered(2, 4), Outcome.APPLIED, (3, 4),
        steps=(((P, 3),),)),  # 3*1 + 4*2 = 11 <= 16
    "a target above a role's maximum is clamped to it": Case(
        (12, 2), seen(2, 2), remembered(2, 2), Outcome.APPLIED, (8, 2),
        steps=(((P, 8),),), reason={P: Reason.MAX_REPLICAS}),  # min(12, 8)
    "a target below a role's minimum is raised to it": Case(
        (0, 2), seen(2, 2), remembered(2, 2), Outcome.APPLIED, (1, 2),
        steps=(((P, 1),),), reason={P: Reason.MIN_REPLICAS}),  # max(0, 1)
    "a target over the GPU ceiling is refused, not trimmed": Case(
        (6, 6), seen(2, 2), remembered(2, 2), Outcome.REFUSED, (6, 6)),  # 6*1 + 6*2 = 18 > 16
    "a target the cluster already has changes nothing": Case(
        (2, 3), seen(2, 3), remembered(2, 3), Outcome.UNCHANGED, (2, 3)),
    "a paused role is held while the other role still moves": Case(
        (4, 4), seen(2, 3, p=RoleState(2, 2, paused_by="annotation")), remembered(2, 3),
        Outcome.APPLIED, (2, 4), steps=(((D, 4),),), reason={P: Reason.PAUSED}),
    "a target whose every change is paused is refused": Case(
        (4, 3), seen(2, 3, p=RoleState(2, 2, paused_by="annotation")), remembered(2, 3),
        Outcome.REFUSED, (2, 3), reason={P: Reason.PAUSED}),
    "another autoscaler on either role refuses the whole target": Case(
        (4, 4), seen(2, 3, d=RoleState(3, 3, owners=("HorizontalPodAutoscaler prod/x",))),
        remembered(2, 3), Outcome.REFUSED, (4, 4)),
    "a change made by someone else is respected during the hold": Case(
        (2, 3), seen(2, 5), remembered(2, 3), Outcome.REFUSED, (2, 5),
        reason={D: Reason.EXTERNAL_CHANGE_RESPECTED}),  # seen 5, last applied 3
    "after the hold the target applies again": Case(
        (2, 3), seen(2, 5), remembered(2, 3, d=RoleMemory(3, external_at=T0 - 301,
                                                         external_value=5)),
        Outcome.APPLIED, (2, 3), steps=(((D, 3),),)),  # T0 - 301 + 300 < T0
    "a write that landed without an answer is recognised as ours": Case(
        (2, 5), seen(2, 5), remembered(2, 3, d=RoleMemory(3, attempted=frozenset({5}))),
        Outcome.UNCHANGED, (2, 5)),
    "replicas pending longer than the timeout stop further scale-up": Case(
        (5, 3), seen(3, 3, p=RoleState(3, 1, pending=2)),
        remembered(3, 3, p=RoleMemory(3, waiting_since=T0 - 601)),
        Outcome.REFUSED, (3, 3), reason={P: Reason.PENDING_NOT_STACKED}),  # 601 s >= 600 s
    "replicas pending for less than the timeout do not stop a scale-up": Case(
        (5, 3), seen(3, 3, p=RoleState(3, 1, pending=2)),
        remembered(3, 3, p=RoleMemory(3, waiting_since=T0 - 599)),
        Outcome.APPLIED, (5, 3), steps=(((P, 5),),)),  # 599 s < 600 s
    "replicas waiting while others become ready are a slow start, not stuck": Case(
        (5, 3), seen(3, 3, p=RoleState(3, 2)),  # waiting 3 - 2 = 1, ready 1 -> 2
        remembered(3, 3, p=RoleMemory(3, waiting_since=T0 - 900, last_ready=1)),
        Outcome.APPLIED, (5, 3), steps=(((P, 5),),)),
    "pending replicas do not stop a scale-down": Case(
        (2, 3), seen(3, 3, p=RoleState(3, 1, pending=2)),
        remembered(3, 3, p=RoleMemory(3, waiting_since=T0 - 601)),
        Outcome.APPLIED, (2, 3), steps=(((P, 2),),)),
    "the scale-down goes first and alone when the ceiling is tight": Case(
        (6, 5), seen(2, 7), remembered(2, 7), Outcome.APPLIED, (6, 5),
        steps=(((D, 5),), ((P, 6),))),  # between: 6*1 + 7*2 = 20 > 16; after: 6 + 10 = 16
    "both roles move in one step, scale-down listed first, when there is room": Case(
        (3, 4), seen(2, 5), remembered(2, 5), Outcome.APPLIED, (3, 4),
        steps=(((D, 4), (P, 3)),)),  # between: 3*1 + 5*2 = 13 <= 16
    "a held role leaves less room, so the other's scale-up is capped by the ceiling": Case(
        (6, 4), seen(2, 6, d=RoleState(6, 6, paused_by="annotation")), remembered(2, 6),
        Outcome.APPLIED, (4, 6), steps=(((P, 4),),),
        reason={P: Reason.GPU_CEILING, D: Reason.PAUSED}),  # (16 - 6*2) // 1 = 4
    "a role's own minAvailable raises a target below it": Case(
        (2, 1), seen(2, 3, d=RoleState(3, 3, floor=2)), remembered(2, 3),
        Outcome.APPLIED, (2, 2), steps=(((D, 2),),),
        reason={D: Reason.MIN_AVAILABLE}),  # max(1, minAvailable 2)
    "a workload that is not Ready gets no scale-up": Case(
        (4, 3), seen(2, 3, p=RoleState(2, 1, not_ready="DGD not Ready")), remembered(2, 3),
        Outcome.REFUSED, (2, 3), reason={P: Reason.NOT_READY}),
    "a workload that is not Ready may still scale down": Case(
        (1, 3), seen(2, 3, p=RoleState(2, 1, not_ready="DGD not Ready")), remembered(2, 3),
        Outcome.APPLIED, (1, 3), steps=(((P, 1),),)),
    "a rollout in progress holds every change of that role": Case(
        (1, 3), seen(2, 3, p=RoleState(2, 2, rollout="rolling update InProgress")),
        remembered(2, 3), Outcome.REFUSED, (2, 3), reason={P: Reason.ROLLOUT_IN_PROGRESS}),
    "with nothing known of the cluster (a dry run's first target) the target applies as is": Case(
        (3, 4), None, DeploymentMemory(), Outcome.APPLIED, (3, 4), steps=(((P, 3), (D, 4)),)),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_the_plan_for_a_target(case: Case) -> None:
    target = {P: case.target[0], D: case.target[1]}
    plan = core.decide(target, case.observed, case.memory, LIMITS, RULES, case.now)
    assert plan.outcome is case.outcome, plan.notes
    assert (plan.replicas[P], plan.replicas[D]) == case.replicas
    assert plan.steps == case.steps
    for role, reason in (case.reason or {}).items():
        assert plan.reasons[role] is reason


def test_a_change_by_someone_else_is_noticed_once_with_the_numbers() -> None:
    memory = remembered(2, 3)
    plan = core.decide({P: 2, D: 3}, seen(2, 5), memory, LIMITS, RULES, T0)
    [notice] = [n for n in plan.notices if n.reason is core.EventReason.EXTERNAL_RESCALE]
    assert notice.role is D and "from 3 to 5" in notice.message
    again = core.decide({P: 2, D: 3}, seen(2, 5), plan.memory, LIMITS, RULES, T0 + 60)
    assert not [n for n in again.notices if n.reason is core.EventReason.EXTERNAL_RESCALE]
    assert "respected for 240 s more" in "; ".join(again.notes)  # 300 - 60


def test_a_change_made_while_paused_is_adopted_not_held_against_the_operator() -> None:
    paused = seen(4, 3, p=RoleState(4, 4, paused_by="annotation"))  # scaled 2 -> 4 by hand
    plan = core.decide({P: 5, D: 3}, paused, remembered(2, 3), LIMITS, RULES, T0)
    assert plan.outcome is Outcome.REFUSED and plan.reasons[P] is Reason.PAUSED
    assert not [n for n in plan.notices if n.reason is core.EventReason.EXTERNAL_RESCALE]
    [refusal] = plan.notices
    assert refusal.role is P  # recorded on the paused object only
    resumed = core.decide({P: 5, D: 3}, seen(4, 3), plan.memory, LIMITS, RULES, T0 + 60)
    assert resumed.outcome is Outcome.APPLIED and resumed.steps == (((P, 5),),)


def test_pending_replicas_are_reported_once_when_they_pass_the_timeout() -> None:
    pending = seen(3, 3, p=RoleState(3, 1, pending=2))
    plan = core.decide({P: 3, D: 3}, pending, remembered(3, 3), LIMITS, RULES, T0)
    assert plan.memory.prefill.waiting_since == T0 and not plan.notices
    later = core.decide({P: 3, D: 3}, pending, plan.memory, LIMITS, RULES, T0 + 600)
    [notice] = later.notices
    assert notice.reason is core.EventReason.PENDING_REPLICAS and "2 prefill replicas" in \
        notice.message
    assert not core.decide({P: 3, D: 3}, pending, later.memory, LIMITS, RULES, T0 + 660).notices
    cleared = core.decide({P: 3, D: 3}, seen(3, 3), later.memory, LIMITS, RULES, T0 + 700)
    assert cleared.memory.prefill.waiting_since is None


def test_replicas_waiting_counts_pending_pods_when_known_else_not_ready() -> None:
    assert RoleState(spec=4, ready=1, pending=2).waiting == 2
    assert RoleState(spec=4, ready=1).waiting == 3
    assert RoleState(spec=4).waiting == 0


def test_per_deployment_limits_only_tighten_the_global_ones() -> None:
    limits = limits_for(settings(max_prefill_replicas=10, max_total_gpus=32),
                        config.LimitsConfig(max_prefill_replicas=20, min_decode_replicas=2,
                                            max_total_gpus=8, decode_engine_num_gpu=4), "x")
    assert (limits.max_prefill, limits.min_decode, limits.max_total_gpus) == (10, 2, 8)
    assert limits.decode_gpus == 4  # more GPUs per replica than the global setting: tighter


@pytest.mark.parametrize(("global_gpus", "own_gpus", "expected"), [
    pytest.param(8, 1, 8, id="a deployment cannot count fewer GPUs per replica than the global"),
    pytest.param(1, 4, 4, id="a deployment with bigger engines counts more"),
    pytest.param(2, None, 2, id="without its own setting the global one holds"),
])
def test_gpus_per_replica_only_tighten_the_gpu_ceiling(
        global_gpus: int, own_gpus: int | None, expected: int) -> None:
    limits = limits_for(settings(prefill_engine_num_gpu=global_gpus, max_total_gpus=32),
                        config.LimitsConfig(prefill_engine_num_gpu=own_gpus), "x")
    assert limits.prefill_gpus == expected
    # 8 prefill replicas at the counted GPUs each, plus one decode GPU, against 32
    plan = core.decide({Role.PREFILL: 8, Role.DECODE: 1}, None, core.DeploymentMemory(), limits,
                       RULES, 0.0)
    assert plan.outcome is (Outcome.REFUSED if 8 * expected + 1 > 32 else Outcome.APPLIED)
    with pytest.raises(ValueError, match="decode limits are empty"):
        limits_for(settings(max_decode_replicas=3), config.LimitsConfig(min_decode_replicas=5),
                   "x")


# ----------------------------------------------------------------------------- election


async def step(elector: Elector, lease: MemoryLease, now: float) -> Action:
    decision = await election.step(elector, lease, now)
    assert decision is not None
    return decision.action


class MemoryLease:
    """A LeaseLock in memory with resourceVersions, for the election's pure timeline."""

    def __init__(self) -> None:
        self.record: LeaseRecord | None = None
        self.version = 0

    async def get(self) -> tuple[LeaseRecord, str] | None:
        return None if self.record is None else (self.record, str(self.version))

    async def create(self, record: LeaseRecord) -> None:
        if self.record is not None:
            raise core.ConflictError("exists")
        self.record, self.version = record, self.version + 1

    async def update(self, record: LeaseRecord, version: str) -> None:
        if version != str(self.version):
            raise core.ConflictError("moved")
        self.record, self.version = record, self.version + 1


async def test_a_lease_changes_hands_only_after_it_expires_on_the_candidates_clock() -> None:
    lease = MemoryLease()
    a, b = Elector("a", 15.0, 10.0), Elector("b", 15.0, 10.0)
    t0 = T0
    assert await step(a, lease, t0) is Action.CREATE  # t0: a creates
    assert await step(b, lease, t0 + 1) is Action.FOLLOW  # b sees a
    assert await step(a, lease, t0 + 2) is Action.RENEW  # a's last renewal
    assert await step(b, lease, t0 + 3) is Action.FOLLOW  # b sees the renewal
    assert a.is_leader(t0 + 11.9) and not a.is_leader(t0 + 12)  # renew deadline: t0 + 2 + 10
    assert await step(b, lease, t0 + 17.9) is Action.FOLLOW  # 14.9 s unchanged
    assert await step(b, lease, t0 + 18) is Action.TAKE_OVER  # 15 s unchanged on b's clock
    assert lease.record is not None and lease.record.holder == "b"
    assert lease.record.transitions == 1
    assert b.is_leader(t0 + 18) and not a.is_leader(t0 + 18)
    assert await step(a, lease, t0 + 19) is Action.FOLLOW  # a comes back


async def test_a_candidate_whose_clock_runs_ahead_still_waits_the_full_duration() -> None:
    lease = MemoryLease()
    a, b = Elector("a", 15.0, 10.0), Elector("b", 15.0, 10.0)
    await election.step(a, lease, T0)
    skew = 3600.0  # b's clock is an hour ahead: the renewTime in the record looks ancient
    assert await step(b, lease, T0 + skew + 1) is Action.FOLLOW
    assert await step(b, lease, T0 + skew + 15.9) is Action.FOLLOW
    assert await step(b, lease, T0 + skew + 16) is Action.TAKE_OVER


async def test_a_released_lease_is_taken_at_once() -> None:
    lease = MemoryLease()
    a, b = Elector("a", 15.0, 10.0), Elector("b", 15.0, 10.0)
    await election.step(a, lease, T0)
    await election.step(b, lease, T0 + 1)
    await election.release(a, lease)
    assert not a.is_leader(T0 + 2)
    assert await step(b, lease, T0 + 2) is Action.TAKE_OVER


async def test_two_candidates_racing_for_a_new_lease_elect_one() -> None:
    lease = MemoryLease()
    a, b = Elector("a", 15.0, 10.0), Elector("b", 15.0, 10.0)
    a_decision = a.decide(None, T0)
    b_decision = b.decide(None, T0)
    await lease.create(a_decision.record)  # type: ignore[arg-type]
    a.succeeded(a_decision, T0)
    with pytest.raises(core.ConflictError):
        await lease.create(b_decision.record)  # type: ignore[arg-type]
    b.lost(None)
    assert a.is_leader(T0) and not b.is_leader(T0)


def test_a_renew_deadline_not_shorter_than_the_lease_is_refused() -> None:
    with pytest.raises(ValueError, match="shorter"):
        Elector("a", 10.0, 10.0)
    with pytest.raises(ValueError, match="lease_renew_deadline_s"):
        settings(lease_duration_s=10.0, lease_renew_deadline_s=12.0)


# ----------------------------------------------------------------------------- mapping file

TOML = """
[[allow]]
namespace = "prod"
kind = "DynamoGraphDeployment"
name = "llama"

[[deployment]]
namespace = "prod"
name = "llama"
backend = "dynamo"
dynamo = { prefill_service = "VllmPrefillWorker" }

[[deployment]]
namespace = "prod"
name = "qwen"
backend = "scale"
scale.prefill = { kind = "Deployment", name = "qwen-prefill" }
scale.decode = { kind = "LeaderWorkerSet", name = "qwen-decode" }
limits = { max_decode_replicas = 4 }
"""


def test_a_toml_mapping_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "actuator.toml"
    path.write_text(TOML)
    mapping = config.load(path)
    assert mapping.allowlist() == {core.ObjectRef("prod", "DynamoGraphDeployment", "llama")}
    qwen = mapping.by_key()[DeploymentKey(namespace="prod", name="qwen")]
    assert qwen.scale is not None
    assert qwen.scale.decode.kind_info().plural == "leaderworkersets"
    assert qwen.scale.decode.kind_info().api_version == "leaderworkerset.x-k8s.io/v1"


def test_a_json_mapping_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "actuator.json"
    path.write_text(json.dumps({"deployment": [
        {"namespace": "prod", "name": "x", "backend": "scale", "scale": {
            "prefill": {"kind": "Workers", "api_version": "example.com/v1", "plural": "workers",
                        "name": "x-prefill"},
            "decode": {"kind": "StatefulSet", "name": "x-decode"}}}]}))
    entry = config.load(path).deployment[0]
    assert entry.scale is not None
    assert entry.scale.prefill.kind_info().api_version == "example.com/v1"


BAD = {
    "a custom kind without its api_version names the field": (
        {"deployment": [{"namespace": "prod", "name": "x", "backend": "scale", "scale": {
            "prefill": {"kind": "Workers", "name": "a"}, "decode": {"kind": "Deployment",
                                                                    "name": "b"}}}]},
        "deployment[0].scale.prefill: Value error, kind 'Workers' is not built in"),
    "a scale backend without its table is refused": (
        {"deployment": [{"namespace": "prod", "name": "x", "backend": "scale"}]},
        "deployment[0]: Value error, backend 'scale' needs a scale table"),
    "an unknown field is refused": (
        {"deployment": [{"namespace": "prod", "name": "x", "backend": "dry-run", "replicas": 3}]},
        "deployment[0].replicas: Extra inputs are not permitted"),
    "an unknown backend is refused": (
        {"deployment": [{"namespace": "prod", "name": "x", "backend": "helm"}]},
        "deployment[0].backend: Input should be"),
    "a deployment listed twice is refused": (
        {"deployment": [{"namespace": "prod", "name": "x", "backend": "dry-run"}] * 2},
        "deployment prod/x is listed twice"),
    "an allowlist entry with a bad name is refused": (
        {"allow": [{"namespace": "prod", "kind": "Deployment", "name": "Bad_Name"}]},
        "allow[0].name: String should match pattern"),
}


@pytest.mark.parametrize(("mapping", "message"), list(BAD.values()), ids=list(BAD))
def test_a_bad_mapping_file_names_the_file_and_the_field(
        tmp_path: Path, mapping: dict[str, object], message: str) -> None:
    path = tmp_path / "actuator.json"
    path.write_text(json.dumps(mapping))
    with pytest.raises(config.ConfigError) as error:
        config.load(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_an_unreadable_or_malformed_mapping_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"missing\.toml: cannot read"):
        config.load(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[[deployment]\n")
    with pytest.raises(config.ConfigError, match=r"broken\.toml: not valid TOML"):
        config.load(broken)
    other = tmp_path / "mapping.yaml"
    other.write_text("a: 1")
    with pytest.raises(config.ConfigError, match=r"mapping\.yaml: unknown format"):
        config.load(other)


# ----------------------------------------------------------------------------- the actuator


def dry_run_actuator() -> core.Actuator:
    return core.Actuator(core.StaticRouter(core.DryRunWorkerSets(), LIMITS), RULES)


def a_target(prefill: int, decode: int, window_end: float, id: str | None = None,
             ) -> ReplicaTarget:
    extra = {"id": id} if id else {}
    return ReplicaTarget(deployment=DeploymentKey(namespace="prod", name="llama"),
                         window_end=window_end, policy="slaplanner", prefill_replicas=prefill,
                         decode_replicas=decode, **extra)  # type: ignore[arg-type]


async def test_the_dry_run_reports_what_it_would_do_and_then_that_nothing_changed() -> None:
    actuator = dry_run_actuator()
    first = await actuator.handle(a_target(2, 3, T0), T0)
    assert first is not None and first.outcome is Outcome.DRY_RUN
    assert (first.prefill.from_, first.prefill.to, first.decode.to) == (None, 2, 3)
    assert first.reason == "would apply (dry run): prefill unknown->2, decode unknown->3"
    assert (first.prefill.ready, first.decode.ready) == (None, None)  # no replicas exist
    second = await actuator.handle(a_target(2, 3, T0 + 60), T0 + 60)
    assert second is not None and second.outcome is Outcome.UNCHANGED
    assert second.prefill.from_ == 2 and second.prefill.ready is None


async def test_a_dry_run_records_dry_run_notices_not_successful_rescales() -> None:
    recorded: list[core.Notice] = []
    dry = core.DryRunWorkerSets()

    async def record(key: DeploymentKey, notices: Any, now: float) -> None:
        recorded.extend(notices)

    dry.record = record  # type: ignore[method-assign]
    limits = core.Limits(1, 8, 1, 8, 1, 1, 16)
    actuator = core.Actuator(core.StaticRouter(dry, limits), core.Rules(600.0, 600.0))
    await actuator.handle(a_target(2, 3, T0), T0)
    assert [n.reason for n in recorded] == [core.EventReason.DRY_RUN_RESCALE] * 2
    assert recorded[0].message.startswith("Dry run: would set prefill to 2 (now unknown)")


async def test_the_same_target_twice_and_an_older_one_change_nothing() -> None:
    writes: list[core.Step] = []
    dry = core.DryRunWorkerSets()
    original = dry.write

    async def counting(key: DeploymentKey, step: core.Step, observed: Observed | None,
                       target: ReplicaTarget, shown: Any = None) -> None:
        writes.append(step)
        await original(key, step, observed, target, shown)

    dry.write = counting  # type: ignore[method-assign]
    actuator = core.Actuator(core.StaticRouter(dry, LIMITS), RULES)
    newer = a_target(2, 3, T0 + 60, id="t2")
    first = await actuator.handle(newer, T0)
    again = await actuator.handle(newer, T0 + 1)
    older = await actuator.handle(a_target(5, 5, T0, id="t1"), T0 + 2)
    assert first is not None and again is not None and older is not None
    assert len(writes) == 1
    # the very same report, so JetStream drops it as a duplicate, or, if the first report was
    # lost (the connection went with it), the stream still learns what was done
    assert again == first and again.outcome is Outcome.DRY_RUN
    assert older.outcome is Outcome.UNCHANGED and "older than the last applied" in (
        older.reason or "")


async def test_a_restored_dry_run_never_looks_like_someone_elses_change() -> None:
    actuator = dry_run_actuator()
    dry = await dry_run_actuator().handle(a_target(3, 3, T0), T0)
    assert dry is not None and dry.outcome is Outcome.DRY_RUN
    actuator.restore(dry)
    assert actuator.memory[dry.deployment].prefill.applied is None  # only the window counts
    assert actuator.memory[dry.deployment].last_window_end == T0


async def test_a_restored_scale_event_makes_older_targets_stale() -> None:
    actuator = dry_run_actuator()
    applied = await dry_run_actuator().handle(a_target(2, 3, T0 + 120), T0)
    assert applied is not None
    actuator.restore(applied.model_copy(update={"outcome": Outcome.APPLIED}))
    older = await actuator.handle(a_target(4, 4, T0 + 60), T0 + 130)
    assert older is not None and older.outcome is Outcome.UNCHANGED
    assert (older.prefill.to, older.decode.to) == (2, 3)


async def test_a_follower_leaves_the_target_to_the_leader() -> None:
    class Follower:
        def is_leader(self, now: float) -> bool:
            return False

    actuator = core.Actuator(core.StaticRouter(core.DryRunWorkerSets(), LIMITS), RULES,
                             gate=Follower())
    assert await actuator.handle(a_target(2, 3, T0), T0) is None


def test_a_target_that_names_no_rule_gives_its_policy_as_the_reason() -> None:
    # Targets built by the real decider: tests/test_explanation.py.
    assert core.target_reason(a_target(2, 3, T0)) == "policy slaplanner"
