"""Helpers for the actuator's Kubernetes tests: a real client bound to the API test server, an
actuator assembled from a mapping, virtual time, and builders of the objects as the real
controllers show them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from kubernetes import client

from services.actuator import config, wiring
from services.actuator.backends import Publish
from services.actuator.inflight import InflightProbe
from services.actuator.kube import Kube, RetryPolicy
from services.actuator.settings import ActuatorSettings
from shared.messages import DeploymentKey, ReplicaTarget
from tests.k8s_api_server import KubeApiServer, RecordedRequest, ResourceType

JSON = dict[str, Any]
NS = "prod"
KEY = DeploymentKey(namespace=NS, name="llama")


async def no_sleep(seconds: float) -> None:
    return None


def api_client(server: KubeApiServer) -> client.ApiClient:
    """The official client, over plain HTTP to the test server, with no retries of its own."""
    configuration = client.Configuration(host=server.url)
    configuration.retries = False
    configuration.proxy = None
    return client.ApiClient(configuration)


def kube_for(server: KubeApiServer, attempts: int = 4, timeout_s: float = 0.5) -> Kube:
    return Kube(api_client(server), RetryPolicy(attempts, 0.001, 0.005), timeout_s=timeout_s,
                sleep=no_sleep)


# Every request the actuator made to the ``k8s`` servers of test_actuator_k8s.py, for the
# RBAC check at the end of that module.
SEEN: list[RecordedRequest] = []


class Clock:
    """Virtual time for the core: tests move it by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def settings(**overrides: Any) -> ActuatorSettings:
    values: dict[str, Any] = {"leader_election": "off", "backend": "none",
                              "max_total_gpus": 64, "pending_timeout_s": 600.0,
                              "external_change_hold_s": 600.0}
    values.update(overrides)
    return ActuatorSettings.model_validate(values)


# Every assembly made by ``assemble``; ``close_all`` stops their watch threads (a fixture calls
# it after each test of the modules that assemble actuators).
ASSEMBLED: list[wiring.Assembly] = []


def assemble(kube: Kube | None, mapping: JSON, probe: InflightProbe | None = None,
             publish: Publish | None = None, identity: str = "actuator-test",
             **overrides: Any) -> wiring.Assembly:
    """An actuator for ``mapping`` (what the mapping file would hold) against the test server."""
    assembly = wiring.assemble(settings(**overrides), publish, kube_client=kube,
                               probe=probe or _NoProbe(), identity=identity,
                               mapping=config.parse(mapping, "test mapping"))
    ASSEMBLED.append(assembly)
    return assembly


async def cached(assembly: wiring.Assembly, server: KubeApiServer, rt: ResourceType, name: str,
                 namespace: str = NS, timeout_s: float = 10.0) -> None:
    """Wait until the actuator's watch cache holds ``name`` at the server's resourceVersion (a
    change made behind the actuator's back reaches it through its watch, a moment later)."""
    wanted = server.get(rt, namespace, name)["metadata"]["resourceVersion"]
    assert assembly.backends is not None and assembly.backends._informers is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for reflector in assembly.backends._informers.all():
            source = reflector.source
            if (source.kind.plural, source.namespace) == (rt.plural, namespace):
                obj = reflector.get(name)
                if obj is not None and obj["metadata"]["resourceVersion"] == wanted:
                    return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the watch cache never saw {rt.plural} {namespace}/{name} at {wanted}")


def close_all() -> None:
    while ASSEMBLED:
        ASSEMBLED.pop().close()


class _NoProbe:
    async def inflight(self, pod: JSON, port: int | None, path: str) -> float | None:
        return None


def target(prefill: int, decode: int, window_end: float = 1_700_000_060.0,
           key: DeploymentKey = KEY, id: str | None = None,
           reason: str = "ttft_p99 above target") -> ReplicaTarget:
    extra: dict[str, Any] = {"id": id} if id is not None else {}
    return ReplicaTarget(deployment=key, window_end=window_end, policy="slaplanner",
                         prefill_replicas=prefill, decode_replicas=decode,
                         explanation={"prefill_bound_by": reason, "decode_bound_by": reason},
                         **extra)


# ----------------------------------------------------------------------------- objects


def deployment(name: str, replicas: int, namespace: str = NS,
               annotations: dict[str, str] | None = None) -> JSON:
    labels = {"app": name}
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels),
                     "annotations": dict(annotations or {})},
        "spec": {"replicas": replicas, "selector": {"matchLabels": dict(labels)},
                 "template": {"metadata": {"labels": dict(labels)},
                              "spec": {"containers": [{"name": "main", "image": "vllm"}]}}},
    }


def pod(name: str, app: str, namespace: str = NS, phase: str = "Running",
        ip: str | None = "127.0.0.1", port: int | None = None, scheduled: bool = True) -> JSON:
    annotations = {"prometheus.io/port": str(port)} if port is not None else {}
    status: JSON = {"phase": phase,
                    "conditions": [{"type": "PodScheduled",
                                    "status": "True" if scheduled else "False",
                                    **({} if scheduled else {"reason": "Unschedulable"})}]}
    if ip is not None and scheduled:
        status["podIP"] = ip
    return {"metadata": {"name": name, "namespace": namespace, "labels": {"app": app},
                         "annotations": annotations},
            "spec": {"containers": [{"name": "main", "image": "vllm"}]},
            "status": status}


def dgd(name: str, prefill: int, decode: int, namespace: str = NS,
        annotations: dict[str, str] | None = None, **service_extra: Any) -> JSON:
    def service(sub: str, replicas: int) -> JSON:
        return {"componentType": "worker", "subComponentType": sub, "replicas": replicas,
                "resources": {"limits": {"gpu": "1"}}, **service_extra.get(sub, {})}

    return {
        "metadata": {"name": name, "namespace": namespace,
                     "annotations": dict(annotations or {})},
        "spec": {"backendFramework": "vllm",
                 "services": {"Frontend": {"componentType": "frontend", "replicas": 1},
                              "VllmPrefillWorker": service("prefill", prefill),
                              "VllmDecodeWorker": service("decode", decode)}},
    }


def lws(name: str, replicas: int, namespace: str = NS) -> JSON:
    return {"metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": replicas, "leaderWorkerTemplate": {"size": 2}},
            "status": {"hpaPodSelector": f"leaderworkerset.sigs.k8s.io/name={name}"}}


def hpa(name: str, kind: str, target_name: str, api_version: str = "apps/v1",
        namespace: str = NS) -> JSON:
    return {"metadata": {"name": name, "namespace": namespace},
            "spec": {"scaleTargetRef": {"apiVersion": api_version, "kind": kind,
                                        "name": target_name},
                     "minReplicas": 1, "maxReplicas": 10}}


def scaled_object(name: str, target_name: str, namespace: str = NS) -> JSON:
    return {"metadata": {"name": name, "namespace": namespace},
            "spec": {"scaleTargetRef": {"name": target_name},
                     "triggers": [{"type": "prometheus", "metadata": {}}]}}


def dynamo_mapping(name: str = "llama", **dynamo: Any) -> JSON:
    entry: JSON = {"namespace": NS, "name": "llama", "backend": "dynamo"}
    if dynamo or name != "llama":
        entry["dynamo"] = {"name": name, **dynamo}
    return {"allow": [{"namespace": NS, "kind": "DynamoGraphDeployment", "name": name}],
            "deployment": [entry]}


def scale_mapping(prefill: JSON, decode: JSON, allow: bool = True) -> JSON:
    allowed = [{"namespace": NS, "kind": o["kind"], "name": o["name"]} for o in (prefill, decode)]
    return {"allow": allowed if allow else [],
            "deployment": [{"namespace": NS, "name": "llama", "backend": "scale",
                            "scale": {"prefill": prefill, "decode": decode}}]}
