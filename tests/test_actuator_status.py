"""What the actuator shows on a DynamoGraphDeployment: the model its workers serve against the
profile's, and the conditions annotation (pure parts; tests/test_actuator_dynamo.py writes them
through the Kubernetes test server)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.actuator import status
from services.actuator.backends import served_model
from shared.conditions import Condition, ConditionType, Status, metrics_stale_from_target
from shared.messages import DeploymentKey, Outcome, ReplicaTarget, RoleChange, ScaleEvent

T0 = 1_700_000_000.0
PROFILED = "nvidia/Llama-3.1-8B-Instruct-FP8"


@pytest.mark.parametrize(("words", "model"), [
    (["python3", "-m", "dynamo.vllm", "--model", "Qwen/Qwen3-0.6B", "--is-prefill-worker"],
     "Qwen/Qwen3-0.6B"),
    (["--model=Qwen/Qwen3-0.6B", "--served-model-name", "qwen"], "Qwen/Qwen3-0.6B"),
    (["/bin/sh", "-c", "python3 -m dynamo.vllm \\\n  --model Qwen/Qwen3-0.6B --port 8000"],
     "Qwen/Qwen3-0.6B"),
    (["python3", "-m", "dynamo.sglang", "--model-path", "/models/llama", "--tp", "1"],
     "/models/llama"),
    (["python3", "-m", "dynamo.vllm", "--model"], None),  # a flag without its value
    (["python3", "-m", "dynamo.vllm", "--served-model-name", "llama"], None),
    ([], None),
], ids=["vllm's flag and value", "flag=value", "inside a shell script",
        "sglang's --model-path", "no value after the flag", "only the served name", "no args"])
def test_the_model_is_read_off_the_worker_command_line(words: list[str],
                                                       model: str | None) -> None:
    assert status.model_in_args(words) == model


def test_the_model_of_a_component_is_read_in_either_layout() -> None:
    alpha = {"extraPodSpec": {"mainContainer": {"command": ["python3", "-m", "dynamo.vllm"],
                                                "args": ["--model", "Qwen/Qwen3-0.6B"]}}}
    beta = {"podTemplate": {"spec": {"containers": [
        {"name": "sidecar", "args": ["--model", "other"]},
        {"name": "main", "args": ["--model", "Qwen/Qwen3-0.6B"]}]}}}
    assert served_model("services", alpha) == "Qwen/Qwen3-0.6B"
    assert served_model("components", beta) == "Qwen/Qwen3-0.6B"  # the container "main"
    assert served_model("components", {"name": "Frontend"}) is None


@pytest.mark.parametrize(("served", "same"), [
    (PROFILED, True),
    ("NVIDIA/llama-3.1-8b-instruct-fp8", True),  # Hugging Face ids ignore case
    ("/models/Llama-3.1-8B-Instruct-FP8/", True),  # a local copy of the same weights
    ("meta-llama/Llama-3.1-8B-Instruct", False),  # same family, other precision
    ("Qwen/Qwen3-0.6B", False),
], ids=["the same id", "other case", "a local path ending in the name",
        "the unquantised model", "another model"])
def test_a_model_matches_the_profile_by_id_or_by_name(served: str, same: bool) -> None:
    assert status.same_model(served, PROFILED) is same


def test_a_mismatch_names_the_roles_and_both_models_and_unknowns_say_nothing() -> None:
    text = status.model_mismatch(PROFILED, {"prefill": PROFILED, "decode": "Qwen/Qwen3-0.6B"})
    assert text is not None and text.startswith("decode workers serve Qwen/Qwen3-0.6B, but the "
                                                 f"decider's profile was measured on {PROFILED}")
    assert "prefill" not in text
    assert status.model_mismatch(None, {"decode": "Qwen/Qwen3-0.6B"}) is None
    assert status.model_mismatch(PROFILED, {"prefill": None, "decode": None}) is None


def condition(kind: ConditionType, state: Status, reason: str, message: str = "m") -> Condition:
    return Condition(kind, state, reason, message)


def by_type(text: str) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in json.loads(text)}


def test_a_condition_keeps_its_transition_time_while_its_status_stays() -> None:
    first = status.render(status.Shown((
        condition(ConditionType.ABLE_TO_SCALE, Status.TRUE, "SucceededRescale"),
        condition(ConditionType.SCALING_LIMITED, Status.FALSE, "DesiredWithinRange")), T0), None)
    # t0 + 60: AbleToScale is still True (another reason); ScalingLimited turns True
    later = status.render(status.Shown((
        condition(ConditionType.ABLE_TO_SCALE, Status.TRUE, "ReadyForNewScale"),
        condition(ConditionType.SCALING_LIMITED, Status.TRUE, "TooManyReplicas")), T0 + 60),
        first)
    assert by_type(first)["AbleToScale"]["lastTransitionTime"] == "2023-11-14T22:13:20Z"
    assert by_type(later)["AbleToScale"]["lastTransitionTime"] == "2023-11-14T22:13:20Z"
    assert by_type(later)["ScalingLimited"]["lastTransitionTime"] == "2023-11-14T22:14:20Z"
    assert by_type(later)["AbleToScale"]["reason"] == "ReadyForNewScale"


def test_only_a_status_or_reason_change_needs_a_write_of_its_own() -> None:
    shown = status.Shown((condition(ConditionType.ABLE_TO_SCALE, Status.TRUE, "ReadyForNewScale",
                                    "at 10:00"),), T0)
    written = status.render(shown, None)
    assert status.changed(None, shown)  # nothing shown yet
    assert not status.changed(written, status.Shown(
        (condition(ConditionType.ABLE_TO_SCALE, Status.TRUE, "ReadyForNewScale", "at 10:01"),),
        T0 + 60))  # the message only: waits for the next scale write
    assert status.changed(written, status.Shown(
        (condition(ConditionType.ABLE_TO_SCALE, Status.FALSE, "ScaleRefused"),), T0 + 60))
    assert status.changed("not json", shown)


def a_target(**explanation: Any) -> ReplicaTarget:
    return ReplicaTarget(deployment=DeploymentKey(namespace="prod", name="llama"),
                         window_end=T0, policy="slaplanner", prefill_replicas=1,
                         decode_replicas=2, explanation=explanation)


def test_the_conditions_of_a_target_put_a_model_mismatch_above_any_bound() -> None:
    target = a_target(decode_bound_by="max_replicas", profile_model=PROFILED)
    assert status.profile_model(target) == PROFILED
    assert status.profile_model(a_target()) is None  # a target without one: no check
    event = ScaleEvent(deployment=target.deployment, target_id=target.id, window_end=T0,
                       outcome=Outcome.APPLIED, backend="dynamo",
                       prefill=RoleChange(from_=1, to=1),
                       decode=RoleChange(from_=1, to=2))
    bound = {c.type: c for c in status.for_target(target, event, T0).conditions}
    assert (bound[ConditionType.SCALING_LIMITED].reason,
            bound[ConditionType.ABLE_TO_SCALE].reason,
            bound[ConditionType.METRICS_STALE].status) == (
        "TooManyReplicas", "SucceededRescale", Status.FALSE)
    wrong = {c.type: c for c in status.for_target(target, event, T0, "decode serves Qwen")
             .conditions}
    assert (wrong[ConditionType.SCALING_LIMITED].status,
            wrong[ConditionType.SCALING_LIMITED].reason) == (Status.TRUE, "ModelMismatch")


def test_metrics_stale_is_read_from_a_held_target() -> None:
    held = a_target(held=True, hold_reason="held_stale_metrics", hold_detail="no data",
                    held_from="last_target", held_counts={"prefill": 1, "decode": 2})
    stale = metrics_stale_from_target(held)
    assert (stale.status, stale.reason) == (Status.TRUE, "SourceUnreadable")
    fresh = metrics_stale_from_target(a_target(prefill_bound_by="queueing_model"))
    assert (fresh.status, fresh.reason) == (Status.FALSE, "FreshMetrics")
