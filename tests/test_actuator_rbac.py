"""The actuator's RBAC in deploy/: valid manifests, least privilege, and exactly what it uses.

A tour drives every backend and feature against the API test server, which enforces the Roles
of ``deploy/base/actuator-rbac.yaml`` and ``actuator-workload-role.yaml`` as its authorizer: any
call they do not permit answers 403 and fails the tour. Then every call is checked against the
rules, and every rule must have been used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from services.actuator import election, rbac
from shared.messages import DeploymentKey, Outcome
from tests import k8s_api_server as srv
from tests import k8s_rbac
from tests.conftest_k8s import (
    NS,
    Clock,
    assemble,
    deployment,
    dgd,
    dynamo_mapping,
    kube_for,
    lws,
    pod,
    target,
)

KUBERNETES_VERSIONS = ["1.29.0", "1.31.0", kubernetes_validate.utils.latest_version()]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_rbac_manifests_are_valid_kubernetes_objects(version: str) -> None:
    docs = k8s_rbac.documents()
    assert [d["kind"] for d in docs] == ["ServiceAccount", "Role", "RoleBinding", "Role"]
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_nothing_is_granted_cluster_wide_and_the_bindings_hold_together() -> None:
    docs = k8s_rbac.documents()
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    [account] = [d for d in docs if d["kind"] == "ServiceAccount"]
    roles = {d["metadata"]["name"] for d in docs if d["kind"] == "Role"}
    for binding in (d for d in docs if d["kind"] == "RoleBinding"):
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": binding["metadata"]["name"]}
        assert binding["roleRef"]["name"] in roles
        assert binding["subjects"] == [{"kind": "ServiceAccount",
                                        "name": account["metadata"]["name"],
                                        "namespace": account["metadata"]["namespace"]}]
    for rule in k8s_rbac.rules():
        assert "*" not in rule.groups | rule.resources | rule.verbs
        assert not rule.verbs & {"delete", "deletecollection", "escalate", "bind",
                                 "impersonate"}, rule
        assert "secrets" not in rule.resources


def rules_of(path: Path, role: str) -> list[dict[str, Any]]:
    [doc] = [d for d in k8s_rbac.documents(path)
             if d["kind"] == "Role" and d["metadata"]["name"] == role]
    return list(doc["rules"])


def drift(path: Path, role: str, named: tuple[rbac.Rule, ...]) -> dict[str, list[Any]]:
    """How the Role ``role`` of ``path`` differs from the rules the code names."""
    have, want = rules_of(path, role), [r.as_manifest() for r in named]
    return {"missing from the manifest": [r for r in want if r not in have],
            "not named in the code": [r for r in have if r not in want],
            "out of order": [] if have == want or sorted(map(str, have)) != sorted(
                map(str, want)) else have}


NO_DRIFT: dict[str, list[Any]] = {"missing from the manifest": [], "not named in the code": [],
                                  "out of order": []}


def test_the_manifests_write_out_the_rules_the_code_names() -> None:
    """deploy/ and services/actuator/rbac.py say the same, rule for rule and in order."""
    overlays = k8s_rbac.REPO / "deploy" / "overlays"
    assert drift(k8s_rbac.RBAC_FILE, "slaplanner-actuator-leader-election",
                 rbac.LEADER_ELECTION) == NO_DRIFT
    assert drift(k8s_rbac.WORKLOAD_ROLE_FILE, "slaplanner-actuator", rbac.WORKLOAD) == NO_DRIFT
    assert drift(overlays / "dynamo" / "workload-rbac.yaml", "slaplanner-actuator",
                 rbac.for_backend("dynamo")) == NO_DRIFT
    # the scale overlay pins its Deployments by name and lists pods without a watch: a subset
    pinned = k8s_rbac.rules(k8s_rbac.documents(overlays / "scale" / "workload-rbac.yaml"))
    assert set().union(*(rule.grants() for rule in pinned)) <= rbac.grants(
        rbac.for_backend("scale"))


def test_a_manifest_that_drifts_from_the_code_is_caught_rule_by_rule(tmp_path: Path) -> None:
    role = k8s_rbac.documents(k8s_rbac.WORKLOAD_ROLE_FILE)[0]
    events = {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}
    secrets = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}
    role["rules"] = [r for r in role["rules"] if r != events] + [secrets]
    edited = tmp_path / "role.yaml"
    edited.write_text(json.dumps(role))  # JSON is YAML
    found = drift(edited, "slaplanner-actuator", rbac.WORKLOAD)
    assert found["missing from the manifest"] == [events]
    assert found["not named in the code"] == [secrets]


def in_namespace(rules: list[k8s_rbac.Rule], namespace: str) -> list[k8s_rbac.Rule]:
    return [rule for rule in rules if rule.namespace == namespace]


@pytest.mark.parametrize(("verb", "resource", "subresource", "name"), [
    pytest.param("patch", "pods", "", "slaplanner-nats-0", id="patch the NATS pod"),
    pytest.param("patch", "pods", "", "slaplanner-decider-7d9f", id="patch any pod"),
    pytest.param("patch", "statefulsets", "scale", "slaplanner-nats", id="scale NATS to zero"),
    pytest.param("patch", "deployments", "scale", "slaplanner-decider", id="scale a service"),
    pytest.param("get", "statefulsets", "", "slaplanner-nats", id="read the NATS StatefulSet"),
])
def test_in_its_own_namespace_the_actuator_touches_no_workload(
        verb: str, resource: str, subresource: str, name: str) -> None:
    """What deploy/base applies in the namespace slaplanner: the Lease, nothing else."""
    group = "" if resource == "pods" else "apps"
    rules = in_namespace(k8s_rbac.rules(k8s_rbac.documents(k8s_rbac.RBAC_FILE)), "slaplanner")
    attrs = srv.RequestAttributes(verb, group, resource, subresource, "slaplanner", name)
    assert not k8s_rbac.permitted(attrs, rules)


@pytest.mark.parametrize(("verb", "resource", "subresource", "name", "allowed"), [
    pytest.param("patch", "pods", "", "llama-decode-5f6c", False,
                 id="no patch on the worker pods by default"),
    pytest.param("patch", "deployments", "scale", "llama-decode", True,
                 id="scale the mapped Deployment"),
    pytest.param("patch", "deployments", "scale", "other-app", False,
                 id="not any other Deployment of the namespace"),
    pytest.param("get", "deployments", "", "other-app", False,
                 id="nor read one"),
])
def test_the_scale_overlay_grants_the_mapped_workloads_only(
        verb: str, resource: str, subresource: str, name: str, allowed: bool) -> None:
    docs = k8s_rbac.documents(k8s_rbac.REPO / "deploy" / "overlays" / "scale" /
                              "workload-rbac.yaml")
    rules = in_namespace(k8s_rbac.rules(docs), "llm")
    group = "" if resource == "pods" else "apps"
    attrs = srv.RequestAttributes(verb, group, resource, subresource, "llm", name)
    assert k8s_rbac.permitted(attrs, rules) is allowed


def test_a_lease_rule_with_a_name_does_not_permit_other_leases_or_creation() -> None:
    rules = k8s_rbac.rules()
    lease = srv.RequestAttributes("update", "coordination.k8s.io", "leases", "", "slaplanner",
                                  "slaplanner-actuator")
    assert k8s_rbac.permitted(lease, rules)
    assert not k8s_rbac.permitted(srv.RequestAttributes(
        "update", "coordination.k8s.io", "leases", "", "slaplanner", "kube-scheduler"), rules)
    assert not k8s_rbac.permitted(srv.RequestAttributes(
        "patch", "apps", "deployments", "", NS, "x"), rules)  # only the scale subresource


async def tour(server: srv.KubeApiServer) -> None:
    """Every backend and feature once, as the actuator would run them in a cluster."""
    kube = kube_for(server)
    clock = Clock()
    # The Lease: created once, then read and renewed.
    leader = assemble(kube, dynamo_mapping(), leader_election="on", lease_namespace="slaplanner")
    assert leader.elector is not None and leader.lock is not None
    await election.step(leader.elector, leader.lock, clock())
    await election.step(leader.elector, leader.lock, clock.advance(2))
    assert leader.elector.is_leader(clock())

    # dynamo: watch the DGDs, adapters and other autoscalers, patch, record Events; after a
    # conflict read the DGD from the API.
    server.add(srv.DGDS, dgd("llama", 1, 2))
    event = await leader.actuator.handle(target(2, 3), clock())
    assert event is not None and event.outcome is Outcome.APPLIED, event
    server.inject("409", method="PATCH", path_contains="dynamographdeployments/llama")
    event = await leader.actuator.handle(target(3, 3, window_end=clock() + 120), clock())
    assert event is not None and event.outcome is Outcome.APPLIED, event
    # A DGD with Dynamo's own planner (refused, said in a condition), watched pods behind the
    # mapping's selectors.
    gemma = dgd("gemma", 1, 1)
    gemma["spec"]["services"]["Planner"] = {"componentType": "planner", "replicas": 1}
    server.add(srv.DGDS, gemma)
    selectors = {"prefill_pod_selector": "app=gemma-prefill",
                 "decode_pod_selector": "app=gemma-decode"}
    mapping = {"allow": [{"namespace": NS, "kind": "DynamoGraphDeployment", "name": "gemma"}],
               "deployment": [{"namespace": NS, "name": "gemma", "backend": "dynamo",
                               "dynamo": selectors}]}
    refused = await assemble(kube, mapping).actuator.handle(
        target(2, 2, key=DeploymentKey(namespace=NS, name="gemma")), clock())
    assert refused is not None and refused.outcome is Outcome.REFUSED, refused

    # scale: a Deployment (with pods to mark before its scale-down) and a StatefulSet, then a
    # LeaderWorkerSet and a DynamoGraphDeploymentScalingAdapter.
    for index in range(3):
        server.add(srv.PODS, pod(f"qwen-prefill-{index}", "qwen-prefill"))
    server.add(srv.DEPLOYMENTS, deployment("qwen-prefill", 3))
    server.add(srv.STATEFULSETS, deployment("qwen-decode", 1))
    server.add(srv.LEADER_WORKER_SETS, lws("mixtral-decode", 1))
    server.add(srv.DGDSAS_BETA, {"metadata": {"name": "mixtral-prefill", "namespace": NS},
                                 "spec": {"replicas": 1, "dgdRef": {
                                     "name": "mixtral", "componentName": "prefill"}}})
    objects: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("qwen", {"kind": "Deployment", "name": "qwen-prefill"},
         {"kind": "StatefulSet", "name": "qwen-decode"}),
        ("mixtral", {"kind": "DynamoGraphDeploymentScalingAdapter", "name": "mixtral-prefill"},
         {"kind": "LeaderWorkerSet", "name": "mixtral-decode"}),
    ]
    for name, prefill, decode in objects:
        mapping = {"allow": [{"namespace": NS, "kind": o["kind"], "name": o["name"]}
                             for o in (prefill, decode)],
                   "deployment": [{"namespace": NS, "name": name, "backend": "scale",
                                   "scale": {"prefill": prefill, "decode": decode}}]}
        scaler = assemble(kube, mapping, pod_deletion_cost=False)  # as overlays/scale sets
        key = DeploymentKey(namespace=NS, name=name)
        event = await scaler.actuator.handle(target(2, 2, key=key), clock())
        assert event is not None
        assert event.outcome is Outcome.APPLIED, event.reason


async def test_the_role_permits_every_call_of_a_full_tour_and_grants_nothing_unused() -> None:
    rules = k8s_rbac.rules()
    with srv.KubeApiServer() as server:
        server.authorizer = lambda attrs: k8s_rbac.permitted(attrs, rules)
        await tour(server)
        calls = [r.attributes for r in server.requests if r.attributes is not None]
    assert not [r for r in server.requests if r.status == 403]
    used = {k8s_rbac.used(a) for a in calls}
    granted = set().union(*(rule.grants() for rule in rules))
    assert used <= granted
    assert granted == rbac.grants(rbac.LEADER_ELECTION + rbac.WORKLOAD)  # the code's own list
    assert granted - used == set(), "the Role grants rights the actuator never uses"
    lease_calls = [a for a in calls if a.resource == "leases"]
    assert {(a.verb, a.namespace) for a in lease_calls} == {
        ("create", "slaplanner"), ("get", "slaplanner"), ("update", "slaplanner")}


async def test_without_the_role_the_actuator_says_which_permission_is_missing() -> None:
    rules = [r for r in k8s_rbac.rules() if "deployments/scale" not in r.resources]
    with srv.KubeApiServer() as server:
        server.authorizer = lambda attrs: k8s_rbac.permitted(attrs, rules)
        server.add(srv.DEPLOYMENTS, deployment("qwen-prefill", 1))
        server.add(srv.DEPLOYMENTS, deployment("qwen-decode", 1))
        mapping = {"allow": [{"namespace": NS, "kind": "Deployment", "name": n}
                             for n in ("qwen-prefill", "qwen-decode")],
                   "deployment": [{"namespace": NS, "name": "qwen", "backend": "scale", "scale": {
                       "prefill": {"kind": "Deployment", "name": "qwen-prefill"},
                       "decode": {"kind": "Deployment", "name": "qwen-decode"}}}]}
        event = await assemble(kube_for(server), mapping).actuator.handle(
            target(1, 2, key=DeploymentKey(namespace=NS, name="qwen")), Clock()())
    assert event is not None and event.outcome is Outcome.FAILED
    assert "may not get deployments/scale (API group 'apps') in namespace 'prod'" in (
        event.reason or "")
