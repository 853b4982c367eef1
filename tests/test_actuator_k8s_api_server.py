"""The Kubernetes API test server answers the official client as a real API server would."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests import k8s_api_server as srv
from tests.conftest_k8s import api_client, deployment, dgd, lws

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
SMP = "application/strategic-merge-patch+json"


@pytest.fixture
def server() -> Iterator[srv.KubeApiServer]:
    with srv.KubeApiServer(timeout_delay_s=0.6) as running:
        yield running


@pytest.fixture
def api(server: srv.KubeApiServer) -> client.ApiClient:
    return api_client(server)


def status_of(error: ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(error.body or "{}")
    assert body["kind"] == "Status" and body["apiVersion"] == "v1"
    assert body["status"] == "Failure" and body["code"] == error.status
    return body


# The typed client marks every field optional; these tests read them as the server sent them.
def apps_api(api: client.ApiClient) -> Any:
    return client.AppsV1Api(api)


def core_api(api: client.ApiClient) -> Any:
    return client.CoreV1Api(api)


def custom_api(api: client.ApiClient) -> Any:
    return client.CustomObjectsApi(api)


def test_a_deployment_is_read_and_scaled_through_its_scale_subresource(
        server: srv.KubeApiServer, api: client.ApiClient) -> None:
    server.add(srv.DEPLOYMENTS, deployment("web", 2))
    apps = apps_api(api)
    scale = apps.read_namespaced_deployment_scale("web", "prod")
    assert scale.spec.replicas == 2 and scale.status.selector == "app=web"
    patched = apps.patch_namespaced_deployment_scale(
        "web", "prod", {"spec": {"replicas": 4}}, _content_type=MERGE_PATCH)
    assert patched.spec.replicas == 4
    assert apps.read_namespaced_deployment("web", "prod").status.ready_replicas == 4
    assert server.calls()[-2:] == [("PATCH", "/apis/apps/v1/namespaces/prod/deployments/web/scale"),
                                   ("GET", "/apis/apps/v1/namespaces/prod/deployments/web")]
    assert server.requests[1].content_type == MERGE_PATCH
    assert len(core_api(api).list_namespaced_pod("prod", label_selector="app=web").items) \
        == 4


def test_a_stale_resource_version_answers_409_with_a_status(
        server: srv.KubeApiServer, api: client.ApiClient) -> None:
    server.add(srv.DEPLOYMENTS, deployment("web", 2))
    apps = apps_api(api)
    version = apps.read_namespaced_deployment_scale("web", "prod").metadata.resource_version
    server.mutate(srv.DEPLOYMENTS, "prod", "web", lambda o: o["spec"].update(replicas=3))
    with pytest.raises(ApiException) as error:
        apps.patch_namespaced_deployment_scale(
            "web", "prod", {"metadata": {"resourceVersion": version}, "spec": {"replicas": 5}},
            _content_type=MERGE_PATCH)
    assert error.value.status == 409
    body = status_of(error.value)
    assert body["reason"] == "Conflict"
    assert "the object has been modified" in str(body["message"])
    assert server.get(srv.DEPLOYMENTS, "prod", "web")["spec"]["replicas"] == 3


def test_custom_resources_take_merge_and_json_patches_but_not_strategic_ones(
        server: srv.KubeApiServer, api: client.ApiClient) -> None:
    server.add(srv.DGDS, dgd("llama", 1, 2))
    custom = custom_api(api)
    args = ("nvidia.com", "v1alpha1", "prod", "dynamographdeployments", "llama")
    custom.patch_namespaced_custom_object(
        *args, {"spec": {"services": {"VllmDecodeWorker": {"replicas": 3}}}},
        _content_type=MERGE_PATCH)
    custom.patch_namespaced_custom_object(
        *args, [{"op": "replace", "path": "/spec/services/VllmPrefillWorker/replicas",
                 "value": 2}], _content_type=JSON_PATCH)
    services = custom.get_namespaced_custom_object(*args)["spec"]["services"]
    assert (services["VllmPrefillWorker"]["replicas"], services["VllmDecodeWorker"]["replicas"]) \
        == (2, 3)
    assert services["VllmDecodeWorker"]["subComponentType"] == "decode"  # merged, not replaced
    with pytest.raises(ApiException) as error:
        custom.patch_namespaced_custom_object(*args, {"spec": {}}, _content_type=SMP)
    assert error.value.status == 415 and status_of(error.value)["reason"] == \
        "UnsupportedMediaType"
    with pytest.raises(ApiException) as error:
        custom.patch_namespaced_custom_object(
            *args, [{"op": "test", "path": "/spec/services/VllmPrefillWorker/replicas",
                     "value": 7}], _content_type=JSON_PATCH)
    assert error.value.status == 422


def test_a_custom_resource_with_a_scale_subresource_scales_through_it(
        server: srv.KubeApiServer, api: client.ApiClient) -> None:
    server.add(srv.LEADER_WORKER_SETS, lws("decode", 2))
    custom = custom_api(api)
    args = ("leaderworkerset.x-k8s.io", "v1", "prod", "leaderworkersets", "decode")
    scale = custom.get_namespaced_custom_object_scale(*args)
    assert scale["spec"]["replicas"] == 2
    assert scale["status"]["selector"] == "leaderworkerset.sigs.k8s.io/name=decode"
    custom.patch_namespaced_custom_object_scale(*args, {"spec": {"replicas": 3}},
                                                _content_type=MERGE_PATCH)
    assert server.get(srv.LEADER_WORKER_SETS, "prod", "decode")["spec"]["replicas"] == 3
    with pytest.raises(ApiException) as error:  # a DGD has no scale subresource
        custom.get_namespaced_custom_object_scale("nvidia.com", "v1alpha1", "prod",
                                                  "dynamographdeployments", "llama")
    assert error.value.status == 404


def test_a_missing_object_answers_404_naming_it(api: client.ApiClient) -> None:
    with pytest.raises(ApiException) as error:
        apps_api(api).read_namespaced_deployment("ghost", "prod")
    body = status_of(error.value)
    assert error.value.status == 404 and body["reason"] == "NotFound"
    assert body["message"] == 'deployments.apps "ghost" not found'


def test_a_lease_needs_micro_times_with_six_digits(api: client.ApiClient) -> None:
    # The typed model drops the fraction of a whole second: a real server refuses that.
    lease = client.V1Lease(metadata=client.V1ObjectMeta(name="a"), spec=client.V1LeaseSpec(
        holder_identity="x", lease_duration_seconds=15,
        renew_time=datetime(2024, 1, 1, tzinfo=UTC)))
    with pytest.raises(ApiException) as error:
        client.CoordinationV1Api(api).create_namespaced_lease("prod", lease)
    assert error.value.status == 400
    assert "cannot be handled as a Lease" in status_of(error.value)["message"]
    custom = custom_api(api)
    body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "a"},
            "spec": {"holderIdentity": "x", "leaseDurationSeconds": 15,
                     "renewTime": "2024-01-01T00:00:00.000000Z"}}
    created = custom.create_namespaced_custom_object("coordination.k8s.io", "v1", "prod",
                                                     "leases", body)
    with pytest.raises(ApiException) as error:
        custom.create_namespaced_custom_object("coordination.k8s.io", "v1", "prod", "leases",
                                               body)
    assert error.value.status == 409 and status_of(error.value)["reason"] == "AlreadyExists"
    stale = dict(body, metadata={"name": "a", "resourceVersion": "1"})
    with pytest.raises(ApiException) as error:
        custom.replace_namespaced_custom_object("coordination.k8s.io", "v1", "prod", "leases",
                                                "a", stale)
    assert error.value.status == 409
    current = dict(body, metadata={"name": "a",
                                   "resourceVersion": created["metadata"]["resourceVersion"]})
    custom.replace_namespaced_custom_object("coordination.k8s.io", "v1", "prod", "leases", "a",
                                            current)


def test_injected_faults_answer_the_next_matching_requests(
        server: srv.KubeApiServer, api: client.ApiClient) -> None:
    server.add(srv.DEPLOYMENTS, deployment("web", 1))
    apps = apps_api(api)
    for kind, status in (("500", 500), ("503", 503), ("429", 429), ("403", 403), ("401", 401),
                         ("409", 409), ("404", 404)):
        server.inject(kind, count=1, method="GET")
        with pytest.raises(ApiException) as error:
            apps.read_namespaced_deployment("web", "prod")
        assert error.value.status == status
        status_of(error.value)
    assert error.value.status == 404
    server.inject("429")
    with pytest.raises(ApiException) as error:
        apps.read_namespaced_deployment("web", "prod")
    assert (error.value.headers or {}).get("Retry-After") == "1"
    server.inject("403", path_contains="/scale")
    apps.read_namespaced_deployment("web", "prod")  # does not match: served
    with pytest.raises(ApiException) as error:
        apps.read_namespaced_deployment_scale("web", "prod")
    assert 'cannot get resource "deployments/scale" in API group "apps" in the namespace ' \
        '"prod"' in status_of(error.value)["message"]
    server.inject("timeout")
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        apps.read_namespaced_deployment("web", "prod", _request_timeout=0.2)
    assert apps.read_namespaced_deployment("web", "prod").spec.replicas == 1
    assert [r.status for r in server.requests[-2:]] == [-1, 200]  # -1: no answer sent


def test_an_authorizer_refuses_with_403_naming_the_permission(
        server: srv.KubeApiServer, api: client.ApiClient) -> None:
    server.authorizer = lambda attrs: attrs.verb != "list"
    with pytest.raises(ApiException) as error:
        core_api(api).list_namespaced_pod("prod")
    assert 'cannot list resource "pods" in API group "" in the namespace "prod"' in \
        status_of(error.value)["message"]


def test_label_selectors_filter_lists(server: srv.KubeApiServer, api: client.ApiClient) -> None:
    server.add(srv.DEPLOYMENTS, deployment("a", 2))
    server.add(srv.DEPLOYMENTS, deployment("b", 1))
    core = core_api(api)
    assert len(core.list_namespaced_pod("prod", label_selector="app=a").items) == 2
    assert len(core.list_namespaced_pod("prod", label_selector="app in (a,b)").items) == 3
    assert len(core.list_namespaced_pod("prod", label_selector="app!=a").items) == 1
    assert srv.selector_matches("a,!b", {"a": "1"}) and not srv.selector_matches("!a", {"a": "1"})


def test_a_scale_down_removes_the_cheapest_pods_first(
        server: srv.KubeApiServer, api: client.ApiClient) -> None:
    server.add(srv.DEPLOYMENTS, deployment("web", 3))
    core = core_api(api)
    names = sorted(p.metadata.name for p in core.list_namespaced_pod("prod").items)
    for cost, name in zip((10, 0, 5), names, strict=True):
        core.patch_namespaced_pod(name, "prod", {"metadata": {"annotations": {
            "controller.kubernetes.io/pod-deletion-cost": str(cost)}}},
            _content_type=MERGE_PATCH)
    apps_api(api).patch_namespaced_deployment_scale(
        "web", "prod", {"spec": {"replicas": 1}}, _content_type=MERGE_PATCH)
    assert [p.metadata.name for p in core.list_namespaced_pod("prod").items] == [names[0]]
