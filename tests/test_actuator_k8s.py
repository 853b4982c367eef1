"""The actuator against the Kubernetes API test server, through the official client.

Each test reads as what an operator would see: the requests the actuator made (verb, path,
content type), the objects afterwards, the Events recorded on them, and the ScaleEvent.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from services.actuator import election
from services.actuator.inflight import HttpInflightProbe
from services.actuator.kube import DELETION_COST, Kube
from services.actuator.kube import api_client as kube_api_client
from services.actuator.status import CONDITIONS_ANNOTATION as CONDITIONS
from shared.messages import Outcome, ReplicaTarget, ScaleEvent
from tests import k8s_api_server as srv
from tests import k8s_rbac
from tests.conftest_k8s import (
    NS,
    SEEN,
    Clock,
    assemble,
    cached,
    deployment,
    dgd,
    dynamo_mapping,
    hpa,
    kube_for,
    lws,
    pod,
    scale_mapping,
    scaled_object,
    settings,
    target,
)

T0 = 1_700_000_000.0
DGD_PATH = "/apis/nvidia.com/v1beta1/namespaces/prod/dynamographdeployments/llama"
ALPHA_PATH = "/apis/nvidia.com/v1alpha1/namespaces/prod/dynamographdeployments/llama"
ALPHA = "nvidia.com/v1alpha1"
PREFILL = {"kind": "Deployment", "name": "llama-prefill"}
DECODE = {"kind": "Deployment", "name": "llama-decode"}



@pytest.fixture
def k8s() -> Iterator[srv.KubeApiServer]:
    """The API test server; its requests go to ``SEEN`` for the RBAC check at the end."""
    with srv.KubeApiServer(timeout_delay_s=1.0) as server:
        yield server
        SEEN.extend(server.requests)


@pytest.fixture
def kube(k8s: srv.KubeApiServer) -> Kube:
    return kube_for(k8s)


def patches(server: srv.KubeApiServer, contains: str = "") -> list[srv.RecordedRequest]:
    return [r for r in server.requests if r.method == "PATCH" and contains in r.path]


def conditions_only(request: srv.RecordedRequest) -> bool:
    """A patch of the conditions annotation alone (no replicas)."""
    body = request.body
    return isinstance(body, dict) and list(body) == ["metadata"] \
        and list(body["metadata"]) == ["annotations"]


def scale_patches(server: srv.KubeApiServer, contains: str = "") -> list[srv.RecordedRequest]:
    return [r for r in patches(server, contains) if not conditions_only(r)]


def without_conditions(body: Any) -> Any:
    """A scale patch's body without the conditions annotation it carries."""
    if isinstance(body, list):
        return [op for op in body if not op["path"].startswith("/metadata/annotations")]
    metadata = {k: v for k, v in body["metadata"].items() if k != "annotations"}
    return {**body, "metadata": metadata}


def conditions_in(body: Any) -> dict[str, dict[str, Any]]:
    """The conditions a scale patch's body carries, by type."""
    if isinstance(body, list):
        [text] = [op["value"] for op in body if op["path"].startswith("/metadata/annotations")]
        text = text[CONDITIONS] if isinstance(text, dict) else text
    else:
        text = body["metadata"]["annotations"][CONDITIONS]
    return {c["type"]: c for c in json.loads(text)}


def events(server: srv.KubeApiServer, reason: str | None = None) -> list[dict[str, Any]]:
    return [e for e in server.objects_of(srv.EVENTS, NS) if reason in (None, e["reason"])]


async def apply(assembly: Any, replicas: tuple[int, int], now: float = T0,
                **target_args: Any) -> ScaleEvent:
    event = await assembly.actuator.handle(target(*replicas, **target_args), now)
    assert event is not None
    assert isinstance(event, ScaleEvent)
    return event


# ----------------------------------------------------------------------------- each backend


async def test_on_v1alpha1_the_dynamo_backend_patches_both_services_in_one_merge_patch(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DGDS, dgd("llama", 1, 2))
    version = k8s.get(srv.DGDS, NS, "llama")["metadata"]["resourceVersion"]
    event = await apply(assemble(kube, dynamo_mapping(api_version=ALPHA)), (2, 4))

    [patch] = patches(k8s)
    assert patch.path == ALPHA_PATH and patch.content_type == "application/merge-patch+json"
    # the conditions ride along in the same write
    assert conditions_in(patch.body)["AbleToScale"]["reason"] == "SucceededRescale"
    assert without_conditions(patch.body) == {"metadata": {"resourceVersion": version},
                          "spec": {"services": {"VllmPrefillWorker": {"replicas": 2},
                                                "VllmDecodeWorker": {"replicas": 4}}}}
    services = k8s.get(srv.DGDS, NS, "llama")["spec"]["services"]
    assert (services["VllmPrefillWorker"]["replicas"], services["VllmDecodeWorker"]["replicas"]) \
        == (2, 4)
    assert services["VllmDecodeWorker"]["resources"] == {"limits": {"gpu": "1"}}  # untouched
    assert event.outcome is Outcome.APPLIED and event.backend == "dynamo"
    # ready: what was ready when the change was made
    assert (event.prefill.from_, event.prefill.to, event.prefill.ready) == (1, 2, 1)
    assert (event.decode.from_, event.decode.to, event.decode.ready) == (2, 4, 2)
    assert event.decode.via == "DynamoGraphDeployment prod/llama"
    recorded = events(k8s, "SuccessfulRescale")
    assert len(recorded) == 2
    assert {e["involvedObject"]["kind"] for e in recorded} == {"DynamoGraphDeployment"}
    assert any("New size: 4; reason: ttft_p99 above target; decode 2 -> 4" in e["message"]
               for e in recorded)


async def test_the_dynamo_backend_uses_configured_service_names(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    obj = dgd("llama-70b", 1, 1)
    services = obj["spec"]["services"]
    services["Prefill"] = services.pop("VllmPrefillWorker")
    services["Decode"] = services.pop("VllmDecodeWorker")
    for service in services.values():
        service.pop("subComponentType", None)
    k8s.add(srv.DGDS, obj)
    mapping = dynamo_mapping("llama-70b", prefill_service="Prefill", decode_service="Decode",
                             api_version=ALPHA)
    event = await apply(assemble(kube, mapping), (3, 1))
    assert event.outcome is Outcome.APPLIED, event.reason
    assert k8s.get(srv.DGDS, NS, "llama-70b")["spec"]["services"]["Prefill"]["replicas"] == 3
    [patch] = patches(k8s)
    assert patch.body["spec"] == {"services": {"Prefill": {"replicas": 3}}}


async def test_on_v1beta1_the_dynamo_backend_sends_one_json_patch_of_the_components(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DGDS_BETA, {"metadata": {"name": "llama", "namespace": NS}, "spec": {
        "components": [{"name": "Frontend", "type": "frontend", "replicas": 1},
                       {"name": "prefill-worker", "type": "prefill", "replicas": 1},
                       {"name": "decode-worker", "type": "decode", "replicas": 2}]}})
    version = k8s.get(srv.DGDS_BETA, NS, "llama")["metadata"]["resourceVersion"]
    event = await apply(assemble(kube, dynamo_mapping()), (2, 3))
    assert event.outcome is Outcome.APPLIED, event.reason
    [patch] = patches(k8s)
    assert patch.path == DGD_PATH and patch.content_type == "application/json-patch+json"
    assert conditions_in(patch.body)["AbleToScale"]["reason"] == "SucceededRescale"
    assert without_conditions(patch.body) == [
        {"op": "test", "path": "/spec/components/1/name", "value": "prefill-worker"},
        {"op": "test", "path": "/spec/components/1/replicas", "value": 1},
        {"op": "add", "path": "/spec/components/1/replicas", "value": 2},
        {"op": "test", "path": "/spec/components/2/name", "value": "decode-worker"},
        {"op": "test", "path": "/spec/components/2/replicas", "value": 2},
        {"op": "add", "path": "/spec/components/2/replicas", "value": 3}]
    assert version  # the replicas tested, not the version: status updates do not conflict
    components = k8s.get(srv.DGDS_BETA, NS, "llama")["spec"]["components"]
    assert [c["replicas"] for c in components] == [1, 2, 3]
    assert event.prefill.via == "DynamoGraphDeployment prod/llama"


async def test_a_dgd_without_a_decode_service_fails_saying_what_to_configure(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    obj = dgd("llama", 1, 1)
    obj["spec"]["services"]["VllmDecodeWorker"]["subComponentType"] = "prefill"
    k8s.add(srv.DGDS, obj)
    event = await apply(assemble(kube, dynamo_mapping()), (2, 2))
    assert event.outcome is Outcome.FAILED and not patches(k8s)
    assert "several services (VllmPrefillWorker, VllmDecodeWorker) with type " \
        "'prefill'; set prefill_service" in (event.reason or "")


@pytest.mark.parametrize(("rt", "obj", "ref"), [
    (srv.DEPLOYMENTS, deployment("llama-decode", 2), DECODE),
    (srv.STATEFULSETS, deployment("llama-decode", 2),
     {"kind": "StatefulSet", "name": "llama-decode"}),
    (srv.LEADER_WORKER_SETS, lws("llama-decode", 2),
     {"kind": "LeaderWorkerSet", "name": "llama-decode"}),
    (srv.ResourceType("example.com", "v1", "workerpools", "WorkerPool", builtin=False,
                      scale=srv.ScalePaths("spec.size", "status.size", None)),
     {"metadata": {"name": "llama-decode", "namespace": NS}, "spec": {"size": 2}},
     {"kind": "WorkerPool", "name": "llama-decode", "api_version": "example.com/v1",
      "plural": "workerpools", "ready_replicas_path": "status.readyReplicas"}),
], ids=["a Deployment", "a StatefulSet", "a LeaderWorkerSet",
        "any custom resource with a scale subresource"])
async def test_the_scale_backend_scales_through_the_scale_subresource(
        k8s: srv.KubeApiServer, kube: Kube, rt: srv.ResourceType, obj: dict[str, Any],
        ref: dict[str, Any]) -> None:
    k8s.register(rt)
    k8s.add(srv.DEPLOYMENTS, deployment("llama-prefill", 1))
    k8s.add(rt, obj)
    event = await apply(assemble(kube, scale_mapping(PREFILL, ref)), (1, 3))
    assert event.outcome is Outcome.APPLIED, event.reason
    [patch] = patches(k8s)
    assert patch.path.endswith(f"/namespaces/prod/{rt.plural}/llama-decode/scale")
    assert patch.path.startswith(f"/apis/{rt.group}/{rt.version}/")
    assert patch.content_type == "application/merge-patch+json"
    assert patch.body["spec"] == {"replicas": 3} and patch.body["metadata"]["resourceVersion"]
    assert srv.get_path(k8s.get(rt, NS, "llama-decode"), (rt.scale or srv.ScalePaths())
                        .spec_replicas) == 3
    assert event.decode.ready == 2 and event.prefill.ready == 1  # ready when it was patched


async def test_the_virtual_backend_publishes_the_checked_target(kube: Kube) -> None:
    published: list[tuple[str, bytes, str]] = []

    async def publish(subject: str, body: bytes, msg_id: str) -> None:
        published.append((subject, body, msg_id))

    mapping = {"deployment": [{"namespace": NS, "name": "llama", "backend": "virtual"}]}
    assembly = assemble(None, mapping, publish=publish, max_decode_replicas=6)
    event = await apply(assembly, (2, 9))  # decode clamped to 6
    assert event.outcome is Outcome.APPLIED and event.backend == "virtual"
    [(subject, body, msg_id)] = published
    sent = ReplicaTarget.from_json(body)
    assert subject == "slaplanner.virtual.prod.llama" and msg_id == sent.id
    assert (sent.prefill_replicas, sent.decode_replicas) == (2, 6)
    assert sent.explanation["source_target_id"] == event.target_id
    again = await apply(assembly, (2, 9), window_end=T0 + 120)
    assert again.outcome is Outcome.UNCHANGED and len(published) == 1


async def test_a_virtual_target_that_cannot_be_published_is_reported_failed() -> None:
    async def broken(subject: str, body: bytes, msg_id: str) -> None:
        raise ConnectionError("no NATS")

    mapping = {"deployment": [{"namespace": NS, "name": "llama", "backend": "virtual"}]}
    event = await apply(assemble(None, mapping, publish=broken), (2, 3))
    assert event.outcome is Outcome.FAILED
    assert "could not publish on slaplanner.virtual.prod.llama" in (event.reason or "")


async def test_a_kubeconfig_file_reaches_its_cluster_with_its_credentials(
        k8s: srv.KubeApiServer, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": k8s.url}}],
        "users": [{"name": "planner", "user": {"token": "s3cret"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "planner"}}]}))
    k8s.add(srv.DGDS, dgd("llama", 1, 2))
    client = kube_api_client(settings(kubeconfig=str(kubeconfig), kube_context="test"))
    kube = Kube(client, timeout_s=1.0)
    event = await apply(assemble(kube, dynamo_mapping()), (2, 2))
    assert event.outcome is Outcome.APPLIED
    assert {r.authorization for r in k8s.requests} == {"Bearer s3cret"}


async def test_the_dry_run_backend_reports_and_touches_nothing(k8s: srv.KubeApiServer) -> None:
    mapping = {"deployment": [{"namespace": NS, "name": "llama", "backend": "dry-run"}]}
    event = await apply(assemble(None, mapping), (2, 3))
    assert event.outcome is Outcome.DRY_RUN and event.backend == "dry-run"
    assert k8s.requests == []


# ----------------------------------------------------------------------------- failures


async def test_a_conflict_is_read_again_and_then_succeeds(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DGDS, dgd("llama", 1, 2))
    k8s.inject("409", count=1, method="PATCH")
    event = await apply(assemble(kube, dynamo_mapping()), (1, 3))
    assert event.outcome is Outcome.APPLIED, event.reason
    assert [r.status for r in patches(k8s)] == [409, 200]
    gets = [r for r in k8s.requests if r.method == "GET" and r.path == DGD_PATH]
    assert len(gets) == 1  # from the watch cache, and read from the API after the conflict


async def test_a_real_resource_version_conflict_re_plans_from_the_new_state(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DEPLOYMENTS, deployment("llama-prefill", 1))
    k8s.add(srv.DEPLOYMENTS, deployment("llama-decode", 2))
    assembly = assemble(kube, scale_mapping(PREFILL, DECODE))
    original = kube.patch_scale
    raced: list[dict[str, Any]] = []

    async def racing(*args: Any, **kwargs: Any) -> dict[str, Any]:
        if not raced:  # someone writes between our read and our patch
            raced.append(k8s.mutate(srv.DEPLOYMENTS, NS, "llama-decode",
                                    lambda o: o["metadata"].setdefault("labels", {}).update(
                                        touched="yes")))
        return await original(*args, **kwargs)

    kube.patch_scale = racing  # type: ignore[method-assign]
    event = await apply(assembly, (1, 4))
    assert event.outcome is Outcome.APPLIED, event.reason
    assert [r.status for r in patches(k8s, "/scale")] == [409, 200]
    assert k8s.get(srv.DEPLOYMENTS, NS, "llama-decode")["spec"]["replicas"] == 4


@pytest.mark.parametrize("fault", ["500", "503", "429", "timeout"])
async def test_transient_faults_are_retried_with_backoff(
        k8s: srv.KubeApiServer, fault: str) -> None:
    k8s.add(srv.DGDS, dgd("llama", 1, 2))
    k8s.inject(fault, count=2, method="PATCH")
    kube = kube_for(k8s, attempts=4, timeout_s=0.2)
    event = await apply(assemble(kube, dynamo_mapping()), (1, 3))
    assert event.outcome is Outcome.APPLIED, event.reason
    assert len(patches(k8s)) == 3  # two faults, then success


async def test_retries_give_up_and_report_the_last_fault(k8s: srv.KubeApiServer) -> None:
    k8s.add(srv.DGDS, dgd("llama", 1, 2))
    k8s.inject("503", count=10, method="PATCH")
    event = await apply(assemble(kube_for(k8s, attempts=3), dynamo_mapping()), (1, 3))
    assert event.outcome is Outcome.FAILED and len(patches(k8s)) == 3
    assert "failed 3 times; last: 503" in (event.reason or "")
    assert events(k8s, "FailedRescale")


async def test_a_403_is_reported_at_once_naming_the_missing_permission(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DEPLOYMENTS, deployment("llama-prefill", 1))
    k8s.add(srv.DEPLOYMENTS, deployment("llama-decode", 2))
    k8s.inject("403", count=1, method="PATCH", path_contains="llama-decode/scale")
    event = await apply(assemble(kube, scale_mapping(PREFILL, DECODE)), (1, 3))
    assert event.outcome is Outcome.FAILED
    assert len(patches(k8s)) == 1  # not retried
    assert "forbidden: the actuator may not patch deployments/scale (API group 'apps') in " \
        "namespace 'prod'; grant it in the actuator's Role" in (event.reason or "")
    assert 'User "system:serviceaccount:slaplanner:slaplanner-actuator" cannot patch resource ' \
        '"deployments/scale"' in (event.reason or "")


async def test_a_404_and_a_401_name_the_object_and_the_credentials(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    event = await apply(assemble(kube, dynamo_mapping()), (1, 3))
    assert event.outcome is Outcome.FAILED
    assert "DynamoGraphDeployment prod/llama not found (get nvidia.com/v1beta1 " \
        "dynamographdeployments)" in (event.reason or "")
    assert not k8s.writes()
    k8s.add(srv.DGDS, dgd("llama", 1, 2))
    k8s.inject("401", method="PATCH")
    event = await apply(assemble(kube, dynamo_mapping()), (1, 3), window_end=T0 + 120)
    assert event.outcome is Outcome.FAILED and "unauthorized" in (event.reason or "")


# ----------------------------------------------------------------------------- safety


async def test_a_target_for_an_object_outside_the_allowlist_is_refused_untouched(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DEPLOYMENTS, deployment("llama-prefill", 1))
    k8s.add(srv.DEPLOYMENTS, deployment("llama-decode", 2))
    event = await apply(assemble(kube, scale_mapping(PREFILL, DECODE, allow=False)), (4, 4))
    assert event.outcome is Outcome.REFUSED
    assert event.reason == ("not in the allowlist: Deployment prod/llama-prefill, Deployment "
                            "prod/llama-decode; the actuator touches only the objects its "
                            "configuration allows")
    assert k8s.requests == []


async def test_an_unmapped_deployment_is_refused_when_there_is_no_default_backend(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    event = await apply(assemble(kube, dynamo_mapping()), (1, 1),
                        key=target(1, 1).deployment.model_copy(update={"name": "other"}))
    assert event.outcome is Outcome.REFUSED
    assert "deployment prod/other is not in the actuator's configuration" in (event.reason or "")
    assert k8s.requests == []


async def test_a_paused_workload_is_left_alone_and_said_so_once(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DGDS, dgd("llama", 1, 2, annotations={"slaplanner.io/paused": "true"}))
    assembly = assemble(kube, dynamo_mapping())
    first = await apply(assembly, (3, 3))
    second = await apply(assembly, (3, 4), now=T0 + 60, window_end=T0 + 120)
    for event in (first, second):
        assert event.outcome is Outcome.REFUSED
        assert 'paused by annotation slaplanner.io/paused="true" on DynamoGraphDeployment ' \
            "prod/llama" in (event.reason or "")
    assert patches(k8s) == []
    [refusal] = events(k8s, "RefusedRescale")  # one Event for the pause, not one per interval
    assert refusal["involvedObject"]["kind"] == "DynamoGraphDeployment"
    k8s.mutate(srv.DGDS, NS, "llama", lambda o: o["metadata"]["annotations"].clear())
    await cached(assembly, k8s, srv.DGDS_BETA, "llama")
    resumed = await apply(assembly, (3, 4), now=T0 + 180, window_end=T0 + 240)
    assert resumed.outcome is Outcome.APPLIED


@pytest.mark.parametrize(("rt", "owner", "name"), [
    (srv.HPAS, hpa("decode-hpa", "Deployment", "llama-decode"),
     "HorizontalPodAutoscaler prod/decode-hpa targets Deployment prod/llama-decode"),
    (srv.SCALED_OBJECTS, scaled_object("decode-keda", "llama-decode"),
     "ScaledObject prod/decode-keda targets Deployment prod/llama-decode"),
], ids=["an HPA", "a KEDA ScaledObject"])
async def test_a_workload_with_another_autoscaler_is_refused_naming_it(
        k8s: srv.KubeApiServer, kube: Kube, rt: srv.ResourceType, owner: dict[str, Any],
        name: str) -> None:
    k8s.add(srv.DEPLOYMENTS, deployment("llama-prefill", 1))
    k8s.add(srv.DEPLOYMENTS, deployment("llama-decode", 2))
    k8s.add(rt, owner)
    event = await apply(assemble(kube, scale_mapping(PREFILL, DECODE)), (2, 3))
    assert event.outcome is Outcome.REFUSED and name in (event.reason or "")
    assert patches(k8s) == []
    [refusal] = events(k8s, "RefusedRescale")
    assert refusal["type"] == "Warning" and name in refusal["message"]


async def test_an_hpa_on_a_dgd_scaling_adapter_refuses_the_dgd(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DGDS, dgd("llama", 1, 2))
    k8s.add(srv.HPAS, hpa("x", "DynamoGraphDeploymentScalingAdapter", "llama-vllmdecodeworker",
                          api_version="nvidia.com/v1alpha1"))
    event = await apply(assemble(kube, dynamo_mapping()), (1, 3))
    assert event.outcome is Outcome.REFUSED
    assert "HorizontalPodAutoscaler prod/x targets DynamoGraphDeploymentScalingAdapter " \
        "prod/llama-vllmdecodeworker" in (event.reason or "")


async def test_without_keda_installed_the_check_goes_on(kube: Kube) -> None:
    with srv.KubeApiServer(types=tuple(t for t in srv.DEFAULT_TYPES
                                       if t is not srv.SCALED_OBJECTS)) as server:
        server.add(srv.DGDS, dgd("llama", 1, 2))
        event = await apply(assemble(kube_for(server), dynamo_mapping()), (1, 3))
        assert event.outcome is Outcome.APPLIED, event.reason


async def test_limits_are_enforced_again_whatever_the_target_says(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DGDS, dgd("llama", 1, 2))
    assembly = assemble(kube, dynamo_mapping(), max_decode_replicas=5, max_total_gpus=6)
    clamped = await apply(assembly, (1, 40))
    assert clamped.outcome is Outcome.APPLIED and clamped.decode.to == 5
    assert "decode 40 clamped to 5 (max_replicas)" in (clamped.reason or "")
    refused = await apply(assembly, (4, 5), window_end=T0 + 120)
    assert refused.outcome is Outcome.REFUSED and "over the ceiling of 6" in (refused.reason or "")
    assert len(scale_patches(k8s)) == 1
    # the refusal changes AbleToScale: the conditions alone are written, once
    [shown] = [r for r in patches(k8s) if conditions_only(r)]
    assert conditions_in(shown.body)["AbleToScale"]["reason"] == "ScaleRefused"


async def test_the_same_target_twice_patches_once_and_an_older_one_not_at_all(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DGDS, dgd("llama", 1, 2))
    assembly = assemble(kube, dynamo_mapping())
    newer = target(2, 3, window_end=T0 + 120, id="target-2")
    first = await assembly.actuator.handle(newer, T0)
    again = await assembly.actuator.handle(newer, T0 + 1)
    older = await assembly.actuator.handle(target(5, 5, window_end=T0 + 60, id="target-1"),
                                           T0 + 2)
    assert first is not None and again is not None and older is not None
    assert first.outcome is Outcome.APPLIED
    assert again == first  # the same report again: the stream keeps one
    assert older.outcome is Outcome.UNCHANGED
    assert len(patches(k8s)) == 1  # duplicates and older targets read nothing, show nothing
    same = await apply(assembly, (2, 3), window_end=T0 + 180)
    assert same.outcome is Outcome.UNCHANGED and len(scale_patches(k8s)) == 1  # already there


# ----------------------------------------------------------------------------- scale-down


class MetricsServer:
    """A worker's /metrics on 127.0.0.1 with a given number of requests in flight."""

    def __init__(self, running: int, waiting: int) -> None:
        text = ("# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{model_name="llama"}} {running}\n'
                "# TYPE vllm:num_requests_waiting gauge\n"
                f'vllm:num_requests_waiting{{model_name="llama"}} {waiting}\n').encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def workers() -> Iterator[list[MetricsServer]]:
    servers = [MetricsServer(4, 2), MetricsServer(0, 0), MetricsServer(1, 1)]
    yield servers
    for server in servers:
        server.close()


async def test_a_deployment_scale_down_removes_the_least_busy_pods(
        k8s: srv.KubeApiServer, kube: Kube, workers: list[MetricsServer]) -> None:
    for name, worker in zip(("busy", "idle", "light"), workers, strict=True):
        k8s.add(srv.PODS, pod(f"llama-decode-{name}", "llama-decode", port=worker.port))
    k8s.add(srv.PODS, pod("llama-decode-dark", "llama-decode", port=1))  # metrics unreadable
    k8s.add(srv.DEPLOYMENTS, deployment("llama-prefill", 1))
    k8s.add(srv.DEPLOYMENTS, deployment("llama-decode", 4))
    probe = HttpInflightProbe(["vllm:num_requests_running", "vllm:num_requests_waiting"],
                              8000, 0.5)
    event = await apply(assemble(kube, scale_mapping(PREFILL, DECODE), probe=probe), (1, 2))
    assert event.outcome is Outcome.APPLIED, event.reason
    costs = {r.path.rsplit("/", 1)[1]: r.body["metadata"]["annotations"][DELETION_COST]
             for r in patches(k8s, "/pods/")}
    assert costs == {"llama-decode-busy": "6", "llama-decode-idle": "0",
                     "llama-decode-light": "2", "llama-decode-dark": "1000000"}
    order = [r.path for r in patches(k8s)]
    assert order[-1].endswith("/deployments/llama-decode/scale")  # after the marks
    remaining = sorted(p["metadata"]["name"] for p in k8s.objects_of(srv.PODS, NS)
                       if p["metadata"]["labels"]["app"] == "llama-decode")
    assert remaining == ["llama-decode-busy", "llama-decode-dark"]


async def test_the_scale_down_goes_first_when_the_gpu_ceiling_is_tight(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DEPLOYMENTS, deployment("llama-prefill", 2))
    k8s.add(srv.DEPLOYMENTS, deployment("llama-decode", 6))
    assembly = assemble(kube, scale_mapping(PREFILL, DECODE), max_total_gpus=8)
    event = await apply(assembly, (4, 4))  # between: 4 + 6 = 10 > 8 GPUs
    assert event.outcome is Outcome.APPLIED, event.reason
    scale_patches = [r.path.split("/")[-2] for r in patches(k8s, "/scale")]
    assert scale_patches == ["llama-decode", "llama-prefill"]
    assert "scale-down first, then scale-up" in (event.reason or "")


async def test_a_tight_ceiling_splits_a_dgd_change_into_two_patches(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DGDS, dgd("llama", 2, 6))
    event = await apply(assemble(kube, dynamo_mapping(), max_total_gpus=8), (4, 4))
    assert event.outcome is Outcome.APPLIED
    written = [[(o["path"], o["value"]) for o in without_conditions(r.body) if o["op"] == "add"]
               for r in patches(k8s)]
    assert written == [[("/spec/components/2/replicas", 4)],
                       [("/spec/components/1/replicas", 4)]]


async def test_a_failed_scale_down_stops_the_scale_up(k8s: srv.KubeApiServer,
                                                      kube: Kube) -> None:
    k8s.add(srv.DEPLOYMENTS, deployment("llama-prefill", 2))
    k8s.add(srv.DEPLOYMENTS, deployment("llama-decode", 6))
    k8s.inject("403", method="PATCH", path_contains="llama-decode/scale")
    event = await apply(assemble(kube, scale_mapping(PREFILL, DECODE), max_total_gpus=8), (4, 4))
    assert event.outcome is Outcome.FAILED
    assert [r.path.split("/")[-2] for r in patches(k8s, "/scale")] == ["llama-decode"]
    assert k8s.get(srv.DEPLOYMENTS, NS, "llama-prefill")["spec"]["replicas"] == 2


# ----------------------------------------------------------------------------- someone else


async def test_a_change_by_someone_else_is_respected_for_a_while_and_reported(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DEPLOYMENTS, deployment("llama-prefill", 1))
    k8s.add(srv.DEPLOYMENTS, deployment("llama-decode", 2))
    clock = Clock(T0)
    assembly = assemble(kube, scale_mapping(PREFILL, DECODE), external_change_hold_s=300.0)
    assert (await apply(assembly, (1, 3), now=clock())).outcome is Outcome.APPLIED
    k8s.mutate(srv.DEPLOYMENTS, NS, "llama-decode", lambda o: o["spec"].update(replicas=6),
               run_controller=True)  # an operator: kubectl scale --replicas=6

    held = await apply(assembly, (1, 3), now=clock.advance(60), window_end=T0 + 120)
    assert held.outcome is Outcome.REFUSED
    assert held.decode.from_ == 6 and held.decode.to == 6
    assert "decode set to 6 by someone else; respected for 300 s more" in (held.reason or "")
    [external] = events(k8s, "ExternalRescale")
    assert "decode replicas changed by someone else from 3 to 6" in external["message"]
    assert external["involvedObject"]["name"] == "llama-decode"

    still = await apply(assembly, (1, 3), now=clock.advance(240), window_end=T0 + 180)  # t0+300
    assert still.outcome is Outcome.REFUSED and "respected for 60 s more" in (still.reason or "")
    after = await apply(assembly, (1, 3), now=clock.advance(61), window_end=T0 + 240)  # t0+361
    assert after.outcome is Outcome.APPLIED, after.reason
    assert k8s.get(srv.DEPLOYMENTS, NS, "llama-decode")["spec"]["replicas"] == 3
    assert len(events(k8s, "ExternalRescale")) == 1


async def test_pending_replicas_are_reported_and_not_stacked_upon(kube: Kube) -> None:
    controller = srv.ReplicaController(unschedulable=set())
    with srv.KubeApiServer(controller=controller) as server:
        kube = kube_for(server)
        server.add(srv.DEPLOYMENTS, deployment("llama-prefill", 1))
        server.add(srv.DEPLOYMENTS, deployment("llama-decode", 2))
        controller.unschedulable.add("llama-decode")  # the cluster is out of GPUs from now on
        clock = Clock(T0)
        assembly = assemble(kube, scale_mapping(PREFILL, DECODE), pending_timeout_s=300.0)
        up = await apply(assembly, (1, 4), now=clock())
        assert up.outcome is Outcome.APPLIED and up.decode.ready == 2  # 2 new pods Pending
        more = await apply(assembly, (1, 6), now=clock.advance(120), window_end=T0 + 120)
        assert more.outcome is Outcome.APPLIED  # pending for 120 s only: still asks
        stuck = await apply(assembly, (1, 8), now=clock.advance(300), window_end=T0 + 180)
        assert stuck.outcome is Outcome.REFUSED
        assert "decode: 4 replicas waiting for 300 s; not asking for more" in (stuck.reason or "")
        assert server.get(srv.DEPLOYMENTS, NS, "llama-decode")["spec"]["replicas"] == 6
        [pending] = [e for e in server.objects_of(srv.EVENTS, NS)
                     if e["reason"] == "PendingReplicas"]
        assert "4 decode replicas waiting for 300 s" in pending["message"]
        down = await apply(assembly, (1, 2), now=clock.advance(60), window_end=T0 + 240)
        assert down.outcome is Outcome.APPLIED  # scaling down is always allowed


async def test_a_dgd_that_is_not_ready_gets_no_scale_up_but_may_scale_down(kube: Kube) -> None:
    with srv.KubeApiServer(controller=srv.ReplicaController(ready=False)) as server:
        server.add(srv.DGDS, dgd("llama", 1, 2))
        assembly = assemble(kube_for(server), dynamo_mapping())
        held = await apply(assembly, (2, 3))
        assert held.outcome is Outcome.REFUSED
        assert not scale_patches(server)
        assert "prefill held at 1: DynamoGraphDeployment prod/llama is not Ready " \
            "(pods_not_ready: Some pods are not ready)" in (held.reason or "")
        assert (held.prefill.ready, held.decode.ready) == (0, 0)
        down = await apply(assembly, (1, 1), window_end=T0 + 120)
        assert down.outcome is Outcome.APPLIED, down.reason


# ----------------------------------------------------------------------------- one leader


async def test_two_actuators_with_one_lease_only_the_leader_patches(
        k8s: srv.KubeApiServer) -> None:
    k8s.add(srv.DGDS, dgd("llama", 1, 2))
    common: dict[str, Any] = {"leader_election": "on", "lease_namespace": NS,
                              "lease_duration_s": 15.0, "lease_renew_deadline_s": 10.0,
                              "lease_retry_period_s": 2.0}
    a = assemble(kube_for(k8s), dynamo_mapping(), identity="actuator-a", **common)
    b = assemble(kube_for(k8s), dynamo_mapping(), identity="actuator-b", **common)
    assert a.elector is not None and a.lock is not None
    assert b.elector is not None and b.lock is not None
    clock = Clock(T0)

    await election.step(a.elector, a.lock, clock())  # t0: a creates the Lease and leads
    await election.step(b.elector, b.lock, clock.advance(1))  # t0+1: b follows
    lease = k8s.get(srv.LEASES, NS, "slaplanner-actuator")
    assert lease["spec"]["holderIdentity"] == "actuator-a"
    assert lease["spec"]["renewTime"] == "2023-11-14T22:13:20.000000Z"  # MicroTime, 6 digits

    first = target(2, 3, window_end=T0 + 60)
    from_a = await a.actuator.handle(first, clock())
    from_b = await b.actuator.handle(first, clock())
    assert from_a is not None and from_a.outcome is Outcome.APPLIED
    assert from_b is None  # the follower leaves the target to the leader
    assert len(patches(k8s, "dynamographdeployments")) == 1

    # a stops renewing (it hangs, or its pod is gone); after the lease duration b takes over.
    await election.step(b.elector, b.lock, clock.advance(10))  # t0+11: a's record unchanged
    assert not a.elector.is_leader(clock()) and not b.elector.is_leader(clock())
    await election.step(b.elector, b.lock, clock.advance(5))  # t0+16: 15 s since b saw it
    assert b.elector.is_leader(clock())
    lease = k8s.get(srv.LEASES, NS, "slaplanner-actuator")
    assert lease["spec"]["holderIdentity"] == "actuator-b"
    assert lease["spec"]["leaseTransitions"] == 1

    second = target(2, 4, window_end=T0 + 120)
    assert await a.actuator.handle(second, clock()) is None
    from_b = await b.actuator.handle(second, clock())
    assert from_b is not None and from_b.outcome is Outcome.APPLIED
    assert len(patches(k8s, "dynamographdeployments")) == 2
    lease_writes = [(r.method, r.status) for r in k8s.requests if "/leases" in r.path
                    and r.method != "GET"]
    assert lease_writes == [("POST", 201), ("PUT", 200)]


# ----------------------------------------------------------------------------- last: RBAC


def test_every_call_these_tests_saw_the_actuator_make_is_permitted_by_the_role() -> None:
    """Runs last in this module: the requests of every test above that used the ``k8s`` server
    (the made-up ``example.com`` kind aside: a custom kind of one's own needs its own rule)."""
    calls = [r.attributes for r in SEEN if r.attributes is not None
             and r.attributes.group != "example.com"]
    if not calls:
        pytest.skip("run with the other tests of this module")
    # with the opt-in right to patch pods, which the pod-deletion-cost test uses
    rules = k8s_rbac.rules(k8s_rbac.documents() + k8s_rbac.documents(
        k8s_rbac.REPO / "deploy" / "overlays" / "scale" / "pod-deletion-cost.yaml"))
    refused = sorted({k8s_rbac.used(a) for a in calls if not k8s_rbac.permitted(a, rules)})
    assert refused == []
    assert {k8s_rbac.used(a) for a in calls} >= {
        ("nvidia.com", "dynamographdeployments", "patch"), ("apps", "deployments/scale", "patch"),
        ("coordination.k8s.io", "leases", "update"), ("", "events", "create")}
