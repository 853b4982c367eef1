"""The explanation of a target, read back by every reader: the actuator's Events, the decider's
log line, the dry run. Targets come from the real decider; none is made up here."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from services.actuator.core import Role, target_reason
from services.decider import service
from services.decider.core import Decider, decision_line
from services.decider.settings import DeciderSettings
from shared.explanation import (
    Explanation,
    HoldCause,
    RoleExplanation,
    Rule,
    RunningNow,
    Trail,
    reason_text,
    rule_text,
)
from shared.messages import DeploymentKey, ForecastStep, LoadForecast, MetricSnapshot, ReplicaTarget
from tests import k8s_api_server as srv
from tests.conftest_k8s import NS, assemble, dgd, dynamo_mapping, kube_for

KEY = DeploymentKey(namespace=NS, name="llama")
T0 = 1_700_000_000.0


def forecast(requests: float, upper: float, window_end: float = T0, steps: int = 6,
             **observed: Any) -> LoadForecast:
    snapshot = MetricSnapshot(
        deployment=KEY, window_end=window_end, window_s=60.0, num_requests=requests,
        isl_avg=3000.0, osl_avg=300.0, ttft_avg_s=0.12, itl_avg_s=0.009,
        request_duration_avg_s=3.0, prefill_workers=3, decode_workers=2,
        **observed,
    )
    return LoadForecast(
        id=f"f-{window_end}", deployment=KEY, window_end=window_end, window_s=60.0,
        model="horizon-smoothing",
        steps=[
            ForecastStep(window_end=window_end + 60.0 * (i + 1), num_requests=requests,
                         num_requests_upper=upper, isl_avg=3000.0, isl_avg_upper=3000.0,
                         osl_avg=300.0, osl_avg_upper=300.0)
            for i in range(steps)
        ],
        observed=snapshot,
    )


def decider(**knobs: Any) -> Decider:
    values = {"policy": "slaplanner", "max_total_gpus": 64, "ttft_target_s": 0.3,
              "itl_target_s": 0.02, **knobs}
    return Decider(DeciderSettings.model_validate(values))


@pytest.fixture
def k8s() -> Iterator[srv.KubeApiServer]:
    with srv.KubeApiServer(timeout_delay_s=1.0) as server:
        yield server


def test_the_actuator_names_the_rule_the_real_decider_says_bound_each_count() -> None:
    target = decider().decide(forecast(1800.0, 2400.0))
    why = Explanation.from_dict(target.explanation)

    assert target.explanation["prefill_bound_by"] == "queueing_model"
    assert target_reason(target, Role.PREFILL) == why.bound_text("prefill")
    assert target_reason(target, Role.PREFILL).startswith(
        "queueing model at forecast upper quantile"
    )
    assert target_reason(target, Role.DECODE) == rule_text(
        target.explanation["decode_bound_by"], tuple(target.explanation["rules"])
    )
    assert "policy slaplanner" not in target_reason(target)


def test_a_held_target_says_why_in_its_event_reason() -> None:
    planner = decider()
    planner.decide(forecast(1800.0, 2400.0))
    held = planner.decide(forecast(1800.0, 2400.0, window_end=T0 + 60, stale=True))
    assert held.explanation["held"] is True
    assert target_reason(held, Role.PREFILL) == (
        "held: stale metrics (the observed snapshot is marked stale)"
    )


def test_a_target_without_an_explanation_falls_back_to_its_policy() -> None:
    bare = ReplicaTarget(deployment=KEY, window_end=T0, policy="dynamo", prefill_replicas=1,
                         decode_replicas=1)
    assert target_reason(bare) == "policy dynamo"


async def test_kubernetes_events_name_the_binding_rule_of_a_real_decision(
        k8s: srv.KubeApiServer) -> None:
    k8s.add(srv.DGDS, dgd("llama", 1, 1))
    target = decider().decide(forecast(1800.0, 2400.0))
    assert target.prefill_replicas > 1
    event = await assemble(kube_for(k8s), dynamo_mapping()).actuator.handle(target, T0)
    assert event is not None

    messages = [e["message"] for e in k8s.objects_of(srv.EVENTS, NS)
                if e["reason"] == "SuccessfulRescale"]
    prefill = target.prefill_replicas
    assert any(
        f"New size: {prefill}; reason: queueing model at forecast upper quantile" in m
        and f"prefill 1 -> {prefill}" in m
        for m in messages
    ), messages


def test_the_summary_says_the_need_and_what_bound_it_with_the_decisions_numbers() -> None:
    # A budget of 8 GPUs under a load that needs many more: the step limit and then the budget
    # bind, and the sentence must carry the need, not the counts the limits left.
    planner = decider(max_total_gpus=8, min_endpoint=1)
    target = planner.decide(forecast(9000.0, 12000.0))
    why = target.explanation
    budget = why["gpu_budget"]
    assert budget["binds"]
    need_p = why["prefill"]["steps"][0]["replicas"]
    need_d = why["decode"]["steps"][0]["replicas"]
    assert budget["need"] == {"prefill": need_p, "decode": need_d}
    assert f"prefill needs {need_p}" in budget["why"]
    summary = why["summary"]
    assert f"prefill 3 -> {target.prefill_replicas}" in summary
    assert f"(needed {need_p})" in summary
    assert f"predicted attainment {budget['predicted_attainment']:.2%}" in summary
    assert why["predicted_attainment"] == pytest.approx(budget["predicted_attainment"])


async def test_the_decider_service_logs_one_info_line_per_decision(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="slaplanner.decider")
    planner = decider()
    [on_forecast, *_] = [route.handler for route in service.routes(planner)]
    published = await on_forecast(forecast(1800.0, 2400.0))
    assert published is not None
    [target] = list(published)
    assert isinstance(target, ReplicaTarget)
    lines = [r for r in caplog.records if r.name == "slaplanner.decider"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    message = lines[0].getMessage()
    assert message == decision_line(target)
    assert message.startswith(
        f"{KEY} planned (slaplanner): prefill 3 -> {target.prefill_replicas}: queueing model"
    )
    assert "predicted attainment" in message


@pytest.mark.parametrize(
    ("steps", "bound_by"),
    [
        pytest.param([("need", 5, Rule.QUEUEING_MODEL)], "queueing_model",
                     id="the sizing rule binds when nothing changed the count"),
        pytest.param([("need", 5, Rule.QUEUEING_MODEL), ("limit", 5, Rule.WITHIN_BOUNDS),
                      ("budget", 3, Rule.GPU_BUDGET_SLA_SPLIT)], "gpu_budget_sla_split",
                     id="the last step that changed the count binds"),
        pytest.param([("need", 5, Rule.PROFILE_CAPACITY), ("floor", 5, Rule.MIN_ENDPOINT)],
                     "profile_capacity",
                     id="a step that names a rule but keeps the count does not bind"),
        pytest.param([("need", 0, Rule.PROFILE_CAPACITY), ("floor", 1, Rule.MIN_ENDPOINT),
                      ("budget", 1, Rule.WITHIN_BOUNDS)], "min_endpoint",
                     id="a raise to the floor binds"),
    ],
)
def test_one_trail_names_the_binding_rule(steps: list[tuple[str, int, Rule]],
                                          bound_by: str) -> None:
    trail = Trail()
    for name, replicas, rule in steps:
        trail.add(name, replicas, rule)
    assert trail.bound_by() == bound_by
    assert Trail.from_list(trail.as_list()).bound_by() == bound_by


def test_an_explanation_reads_back_from_its_json_with_the_same_numbers() -> None:
    trail = Trail()
    trail.add("profile_capacity", 4, Rule.PROFILE_CAPACITY)
    trail.add("gpu_budget", 3, Rule.GPU_BUDGET)
    explained = Explanation(
        policy="dynamo",
        prefill=RoleExplanation(3, trail.bound_by(), trail, {"needed_replicas": 4}),
        decode=RoleExplanation(2, str(Rule.HELD_STALE_METRICS)),
        current=RunningNow(2, 2, "last target"),
        sections={"load": {"num_requests": 10.0}},
    )
    raw = explained.to_dict()
    back = Explanation.from_dict(raw, 3, 2)
    assert back.to_dict() == raw
    assert back.prefill.need == 4 and back.decode.trail is None
    assert raw["summary"] == back.summary()
    assert reason_text(raw, "prefill") == "Dynamo's proportional GPU budget cut"


def test_a_hold_cause_reads_back() -> None:
    held = Explanation.from_dict({"held": True, "hold_reason": "held_missing_metrics",
                                  "hold_detail": "not observed: ttft_avg_s",
                                  "held_from": "last target",
                                  "held_counts": {"prefill": 2, "decode": 3},
                                  "prefill_bound_by": "held_missing_metrics",
                                  "decode_bound_by": "held_missing_metrics"}, 2, 3)
    assert held.held is not None
    assert held.held.cause == HoldCause(Rule.HELD_MISSING_METRICS, "not observed: ttft_avg_s")
    assert held.summary() == "held last target 2 + 3: not observed: ttft_avg_s"
