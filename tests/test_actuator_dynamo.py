"""The dynamo backend against Dynamo's real CRDs (tests/data/dynamo), through the watch cache.

The test server serves both versions with their real schemas, prunes what they do not know,
runs their CEL rules and the operator's webhook that refuses direct replica edits of components
with a scaling adapter, and acts as the operator and the adapter controller towards replicas.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from services.actuator.kube import Kube
from shared.messages import Outcome, ScaleEvent
from tests import k8s_api_server as srv
from tests.conftest_k8s import NS, assemble, cached, dynamo_mapping, kube_for, target

T0 = 1_700_000_000.0
JSON = dict[str, Any]



@pytest.fixture
def k8s() -> Iterator[srv.KubeApiServer]:
    with srv.KubeApiServer(timeout_delay_s=1.0, bookmark_interval_s=0.2) as server:
        yield server


@pytest.fixture
def kube(k8s: srv.KubeApiServer) -> Kube:
    return kube_for(k8s)


def beta_dgd(name: str, prefill: int, decode: int, **decode_extra: Any) -> JSON:
    return {"metadata": {"name": name, "namespace": NS}, "spec": {"backendFramework": "vllm",
            "components": [{"name": "Frontend", "type": "frontend", "replicas": 1},
                           {"name": "VllmPrefillWorker", "type": "prefill", "replicas": prefill},
                           {"name": "VllmDecodeWorker", "type": "decode", "replicas": decode,
                            **decode_extra}]}}


def conditions_of(server: srv.KubeApiServer, name: str) -> dict[str, JSON]:
    """The conditions the actuator wrote on a DGD, by type."""
    text = server.get(srv.DGDS_BETA, NS, name)["metadata"]["annotations"][
        "slaplanner.io/conditions"]
    return {c["type"]: c for c in json.loads(text)}


def patches(server: srv.KubeApiServer) -> list[srv.RecordedRequest]:
    return [r for r in server.requests if r.method == "PATCH"]


def replica_patches(server: srv.KubeApiServer) -> list[srv.RecordedRequest]:
    """Patches other than the conditions annotation alone (and the status)."""
    return [r for r in patches(server) if "/status" not in r.path
            and not (isinstance(r.body, dict) and list(r.body) == ["metadata"]
                     and list(r.body["metadata"]) == ["annotations"])]


async def apply(assembly: Any, replicas: tuple[int, int], window_end: float = T0 + 60,
                now: float = T0) -> ScaleEvent:
    event = await assembly.actuator.handle(target(*replicas, window_end=window_end), now)
    assert isinstance(event, ScaleEvent)
    return event


def test_the_real_crds_prune_what_a_version_does_not_know_and_convert_between_versions(
        k8s: srv.KubeApiServer) -> None:
    obj = beta_dgd("llama", 1, 2)
    obj["spec"]["components"][2]["autoscaling"] = {"enabled": True}  # v1alpha1 only
    k8s.add(srv.DGDS_BETA, obj)
    beta = k8s.get(srv.DGDS_BETA, NS, "llama")
    assert "autoscaling" not in beta["spec"]["components"][2]
    assert "services" not in beta["spec"]
    alpha = k8s.get(srv.DGDS, NS, "llama")
    assert "components" not in alpha["spec"]
    assert alpha["spec"]["services"]["VllmDecodeWorker"]["subComponentType"] == "decode"
    assert alpha["status"]["services"]["VllmDecodeWorker"]["readyReplicas"] == 2


async def test_with_a_scaling_adapter_the_actuator_scales_through_it_and_says_so(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DGDS_BETA, beta_dgd("llama", 1, 2, scalingAdapter={}))
    assert k8s.get(srv.DGDSAS_BETA, NS, "llama-vllmdecodeworker")["spec"]["replicas"] == 2
    event = await apply(assemble(kube, dynamo_mapping()), (2, 4))
    assert event.outcome is Outcome.APPLIED, event.reason
    assert event.decode.via == ("DynamoGraphDeploymentScalingAdapter "
                                "prod/llama-vllmdecodeworker/scale")
    assert event.prefill.via == "DynamoGraphDeployment prod/llama"  # no adapter: the DGD
    paths = [r.path.rsplit("/", 2)[-2:] for r in patches(k8s)]
    assert paths == [["llama-vllmdecodeworker", "scale"], ["dynamographdeployments", "llama"]]
    components = k8s.get(srv.DGDS_BETA, NS, "llama")["spec"]["components"]
    assert [c["replicas"] for c in components] == [1, 2, 4]  # the adapter controller wrote it


async def test_a_direct_edit_of_an_adapter_managed_component_is_refused_with_the_webhooks_words(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DGDS_BETA, beta_dgd("llama", 1, 2, scalingAdapter={}))
    k8s.mutate(srv.DGDSAS_BETA, NS, "llama-vllmdecodeworker", lambda o: None)
    with k8s._lock:  # the operator has not created the adapter (yet): the /scale answers 404
        k8s._drop(("nvidia.com", "dynamographdeploymentscalingadapters", NS,
                   "llama-vllmdecodeworker"))
    event = await apply(assemble(kube, dynamo_mapping()), (1, 4))
    assert event.outcome is Outcome.REFUSED  # not "failed", not retried as a conflict
    # the adapter's /scale, the DGD's replicas; then the conditions saying so, on their own
    assert [r.status for r in patches(k8s)] == [404, 422, 200]
    assert list(patches(k8s)[-1].body) == ["metadata"]
    assert conditions_of(k8s, "llama")["AbleToScale"]["reason"] == "ScaleRefused"
    assert 'admission webhook "vdynamographdeployment.kb.io" denied the request: ' \
        'DynamoGraphDeployment.nvidia.com "llama" is invalid: spec.components[2].replicas: ' \
        "Forbidden: cannot be modified directly when scaling adapter is enabled" \
        in (event.reason or "")


async def test_min_available_is_a_floor_and_a_cel_rejection_is_refused_not_retried(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DGDS_BETA, beta_dgd("llama", 1, 4, minAvailable=3))
    assembly = assemble(kube, dynamo_mapping())
    floored = await apply(assembly, (1, 2))
    assert floored.outcome is Outcome.APPLIED and floored.decode.to == 3
    assert "decode 2 raised to 3, the workload's minAvailable" in (floored.reason or "")
    # the same CEL rule, as the API server runs it, refuses a write below minAvailable
    current = k8s.get(srv.DGDS_BETA, NS, "llama")
    current["spec"]["components"][2]["replicas"] = 2
    with pytest.raises(srv.ApiError, match="minAvailable must be less than or equal to replicas"):
        k8s._admit(srv.DGDS_BETA, "llama", k8s.get(srv.DGDS_BETA, NS, "llama"), current)


async def test_a_rollout_in_progress_holds_every_change(k8s: srv.KubeApiServer,
                                                        kube: Kube) -> None:
    k8s.add(srv.DGDS_BETA, beta_dgd("llama", 2, 2))
    assembly = assemble(kube, dynamo_mapping())
    assert (await apply(assembly, (2, 2))).outcome is Outcome.UNCHANGED  # the cache is filled
    k8s.mutate(srv.DGDS_BETA, NS, "llama",
               lambda o: o["status"].update(rollingUpdate={"phase": "InProgress"}))
    await cached(assembly, k8s, srv.DGDS_BETA, "llama")
    event = await apply(assembly, (1, 3), window_end=T0 + 120)
    assert event.outcome is Outcome.REFUSED and not replica_patches(k8s)
    assert "rolling update of DynamoGraphDeployment prod/llama is InProgress" in (
        event.reason or "")
    assert conditions_of(k8s, "llama")["AbleToScale"]["reason"] == "ScaleRefused"


async def test_a_dynamo_planner_in_the_graph_is_refused_with_a_condition_and_an_event(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    obj = beta_dgd("llama", 1, 2)
    obj["spec"]["components"].append({"name": "Planner", "type": "planner", "replicas": 1})
    k8s.add(srv.DGDS_BETA, obj)
    event = await apply(assemble(kube, dynamo_mapping()), (2, 3))
    assert event.outcome is Outcome.REFUSED and not replica_patches(k8s)
    assert "Dynamo Planner component 'Planner'" in (event.reason or "")
    [condition] = [c for c in k8s.get(srv.DGDS_BETA, NS, "llama")["status"]["conditions"]
                   if c["type"] == "slaplanner.io/ScalingActive"]
    assert (condition["status"], condition["reason"]) == ("False", "DynamoPlannerPresent")
    assert "annotate the DGD slaplanner.io/allow-dynamo-planner=true" in condition["message"]
    [warning] = [e for e in k8s.objects_of(srv.EVENTS, NS) if e["reason"] == "RefusedRescale"]
    assert "Dynamo Planner component 'Planner'" in warning["message"]


async def test_in_steady_state_a_target_costs_one_write_and_no_read(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DGDS_BETA, beta_dgd("llama", 1, 1))
    assembly = assemble(kube, dynamo_mapping(), record_events=False)
    await apply(assembly, (1, 2))  # first sight: the watches start (lists, then watches)
    k8s.clear_log()
    for step in range(1, 6):
        await cached(assembly, k8s, srv.DGDS_BETA, "llama")
        event = await apply(assembly, (1, 2 + step), window_end=T0 + 60 * (step + 1))
        assert event.outcome is Outcome.APPLIED, event.reason
    # (long-lived watch requests aside: they are not per target)
    calls = [r.method for r in k8s.requests if r.query.get("watch") != ["true"]]
    assert calls == ["PATCH"] * 5


async def test_a_watch_resumes_after_it_is_closed_and_lists_again_after_410_gone(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DGDS_BETA, beta_dgd("llama", 1, 1))
    assembly = assemble(kube, dynamo_mapping(), record_events=False)
    await apply(assembly, (1, 1))
    k8s.close_watches()  # resumes from its resourceVersion: no new list
    k8s.mutate(srv.DGDS_BETA, NS, "llama",
               lambda o: o["metadata"].setdefault("labels", {}).update(seen="1"))
    await cached(assembly, k8s, srv.DGDS_BETA, "llama")
    lists = [r for r in k8s.requests if r.method == "GET" and "watch" not in r.query
             and r.path.endswith("/dynamographdeployments")]
    assert len(lists) == 1
    # The watch drops and cannot come back for a while; meanwhile the object changes and the
    # history is compacted: the resumed watch answers 410 Gone, and the cache lists again.
    k8s.inject("503", for_s=0.5, method="GET", path_contains="dynamographdeployments")
    k8s.close_watches()
    k8s.mutate(srv.DGDS_BETA, NS, "llama",
               lambda o: o["metadata"]["labels"].update(seen="2"))
    k8s.compact()
    await cached(assembly, k8s, srv.DGDS_BETA, "llama")
    lists = [r for r in k8s.requests if r.method == "GET" and "watch" not in r.query
             and r.path.endswith("/dynamographdeployments")]
    assert len(lists) == 2


async def test_readiness_follows_whether_the_api_answers(kube: Kube) -> None:
    with srv.KubeApiServer(bookmark_interval_s=0.2) as server:
        server.add(srv.DGDS_BETA, beta_dgd("llama", 1, 1))
        assembly = assemble(kube_for(server), dynamo_mapping(), record_events=False)
        await apply(assembly, (1, 1))
        assert assembly.not_ready() is None
        server.stop()
        await apply(assembly, (1, 2), window_end=T0 + 120)  # the write cannot reach it
        assert "the Kubernetes API does not answer" in (assembly.not_ready() or "")
        server.start()  # same port
        server.close_watches()
        event = await apply(assembly, (1, 2), window_end=T0 + 180)
        # applied now, or found applied: on a busy machine the write "that cannot reach it" may
        # have landed as the server stopped, its answer lost
        assert event.outcome in (Outcome.APPLIED, Outcome.UNCHANGED), event.reason
        assert event.decode.to == 2
        services = server.get(srv.DGDS_BETA, NS, "llama")["spec"]["components"]
        assert [c["replicas"] for c in services if c["type"] == "decode"] == [2]
        # a watch still backing off may report its last failure late (seconds on a busy machine)
        deadline = time.monotonic() + 60.0
        while assembly.not_ready() is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert assembly.not_ready() is None


async def test_the_deprecated_autoscaling_field_no_longer_refuses_a_v1alpha1_dgd(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    obj = {"metadata": {"name": "llama", "namespace": NS}, "spec": {"services": {
        "Prefill": {"componentType": "worker", "subComponentType": "prefill", "replicas": 1,
                    "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4}},
        "Decode": {"componentType": "worker", "subComponentType": "decode", "replicas": 1}}}}
    k8s.add(srv.DGDS, obj)
    event = await apply(assemble(kube, dynamo_mapping(api_version="nvidia.com/v1alpha1")),
                        (2, 2))
    assert event.outcome is Outcome.APPLIED, event.reason  # Dynamo ignores the field too


async def test_a_scaling_adapter_mapped_with_the_scale_backend_reads_readiness_from_its_pods(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DGDS_BETA, beta_dgd("llama", 1, 2, scalingAdapter={}))
    labels = {"nvidia.com/dynamo-graph-deployment-name": "llama",
              "nvidia.com/dynamo-component": "VllmDecodeWorker"}
    for index, ready in enumerate((True, False)):  # one pod ready, one still starting
        k8s.add(srv.PODS, {"metadata": {"name": f"decode-{index}", "namespace": NS,
                                        "labels": labels},
                           "status": {"phase": "Running", "conditions": [
                               {"type": "Ready", "status": "True" if ready else "False"}]}})
    k8s.add(srv.DEPLOYMENTS, {"metadata": {"name": "llama-prefill", "namespace": NS},
                              "spec": {"replicas": 1, "selector": {"matchLabels": {"a": "p"}},
                                       "template": {"metadata": {"labels": {"a": "p"}}}}})
    adapter = {"kind": "DynamoGraphDeploymentScalingAdapter", "name": "llama-vllmdecodeworker"}
    mapping = {"allow": [{"namespace": NS, "kind": "Deployment", "name": "llama-prefill"},
                         {"namespace": NS, **adapter}],
               "deployment": [{"namespace": NS, "name": "llama", "backend": "scale", "scale": {
                   "prefill": {"kind": "Deployment", "name": "llama-prefill"},
                   "decode": adapter}}]}
    event = await apply(assemble(kube, mapping, record_events=False), (1, 3))
    assert event.outcome is Outcome.APPLIED, event.reason
    # the adapter's status has no ready count (status.readyReplicas does not exist)
    assert (event.decode.from_, event.decode.ready) == (2, 1)
    assert event.decode.via == ("DynamoGraphDeploymentScalingAdapter "
                                "prod/llama-vllmdecodeworker/scale")
    components = k8s.get(srv.DGDS_BETA, NS, "llama")["spec"]["components"]
    assert components[2]["replicas"] == 3


def set_model(dgd: JSON, model: str) -> None:
    """Have the prefill and decode workers of ``dgd`` (v1beta1) serve ``model``, as Dynamo's
    examples write it (the container ``main``, ``--model`` in its args)."""
    for component in dgd["spec"]["components"][1:]:
        component["podTemplate"] = {"spec": {"containers": [{
            "name": "main", "image": "nvcr.io/nvidia/ai-dynamo/vllm-runtime:0.7.0",
            "command": ["python3", "-m", "dynamo.vllm"],
            "args": ["--model", model, "--disaggregation-mode", component["type"]]}]}}


def profiled(prefill: int, decode: int, window_end: float,
             model: str = "nvidia/Llama-3.1-8B-Instruct-FP8") -> Any:
    """A target whose explanation names the model of the decider's profile."""
    plain = target(prefill, decode, window_end=window_end)
    return plain.model_copy(update={"explanation": {**plain.explanation, "profile_model": model}})


async def test_the_conditions_ride_with_the_scale_write_and_are_written_alone_only_on_a_change(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    k8s.add(srv.DGDS_BETA, beta_dgd("llama", 1, 1))
    assembly = assemble(kube, dynamo_mapping(), record_events=False)
    assert (await apply(assembly, (1, 3))).outcome is Outcome.APPLIED
    [scale] = patches(k8s)  # t0: the replicas and the conditions, one write
    assert any(op["path"] == "/metadata/annotations" for op in scale.body)
    assert conditions_of(k8s, "llama")["AbleToScale"]["reason"] == "SucceededRescale"
    assert conditions_of(k8s, "llama")["ScalingLimited"]["status"] == "False"
    # t0 + 60: already at the target; AbleToScale says so (a new reason): the annotation alone
    await cached(assembly, k8s, srv.DGDS_BETA, "llama")
    assert (await apply(assembly, (1, 3), window_end=T0 + 120)).outcome is Outcome.UNCHANGED
    assert len(patches(k8s)) == 2 and list(patches(k8s)[-1].body) == ["metadata"]
    shown = conditions_of(k8s, "llama")
    assert shown["AbleToScale"]["reason"] == "ReadyForNewScale"
    assert shown["AbleToScale"]["lastTransitionTime"] == "2023-11-14T22:13:20Z"  # still True
    # t0 + 120: nothing moved: no write at all
    await cached(assembly, k8s, srv.DGDS_BETA, "llama")
    assert (await apply(assembly, (1, 3), window_end=T0 + 180)).outcome is Outcome.UNCHANGED
    assert len(patches(k8s)) == 2


async def test_a_workload_serving_another_model_is_warned_of_once_and_shown_as_limited(
        k8s: srv.KubeApiServer, kube: Kube) -> None:
    served = beta_dgd("llama", 1, 1)
    set_model(served, "Qwen/Qwen3-0.6B")
    k8s.add(srv.DGDS_BETA, served)
    assembly = assemble(kube, dynamo_mapping())

    def warnings() -> list[JSON]:
        return [e for e in k8s.objects_of(srv.EVENTS, NS) if e["reason"] == "ModelMismatch"]

    for step in range(3):  # three intervals, one warning
        if step:  # the watch cache has seen the last write
            await cached(assembly, k8s, srv.DGDS_BETA, "llama")
        event = await assembly.actuator.handle(profiled(1, 2 + step, T0 + 60 * (step + 1)),
                                               T0 + 60 * step)
        assert event is not None and event.outcome is Outcome.APPLIED, event
    [warning] = warnings()
    assert warning["type"] == "Warning"
    assert warning["involvedObject"]["kind"] == "DynamoGraphDeployment"
    assert warning["message"].startswith(
        "prefill workers serve Qwen/Qwen3-0.6B; decode workers serve Qwen/Qwen3-0.6B, but the "
        "decider's profile was measured on nvidia/Llama-3.1-8B-Instruct-FP8")
    limited = conditions_of(k8s, "llama")["ScalingLimited"]
    assert (limited["status"], limited["reason"]) == ("True", "ModelMismatch")
    # the operator deploys the profiled model: the condition clears, no new warning
    k8s.mutate(srv.DGDS_BETA, NS, "llama",
               lambda o: set_model(o, "nvidia/Llama-3.1-8B-Instruct-FP8"))
    await cached(assembly, k8s, srv.DGDS_BETA, "llama")
    await assembly.actuator.handle(profiled(1, 4, T0 + 240), T0 + 180)
    assert conditions_of(k8s, "llama")["ScalingLimited"]["reason"] == "DesiredWithinRange"
    assert len(warnings()) == 1
    # back to the other model: a new mismatch, warned of again
    k8s.mutate(srv.DGDS_BETA, NS, "llama", lambda o: set_model(o, "Qwen/Qwen3-0.6B"))
    await cached(assembly, k8s, srv.DGDS_BETA, "llama")
    await assembly.actuator.handle(profiled(1, 4, T0 + 300), T0 + 240)
    assert len(warnings()) == 2
    assert conditions_of(k8s, "llama")["ScalingLimited"]["reason"] == "ModelMismatch"
