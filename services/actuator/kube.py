"""The Kubernetes calls the actuator makes: off the event loop, retried, with errors that say why.

Every call goes through ``Kube.call``, which runs the blocking client call in a worker thread
(``asyncio.to_thread``), retries 429, 5xx, timeouts and dropped connections with exponential
backoff (honouring ``Retry-After``), turns a 409 into ``ConflictError`` (the caller reads again and
re-plans), and turns 401, 403 and 404 at once into a ``BackendError`` whose message names the
permission or the object that is missing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from services.actuator.config import KindInfo
from services.actuator.core import BackendError, ConflictError, RejectedError
from services.actuator.election import LeaseRecord
from services.actuator.informer import Health
from services.actuator.settings import ActuatorSettings

log = logging.getLogger("slaplanner.actuator.kube")

T = TypeVar("T")
JSON = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

LEASES = KindInfo(kind="Lease", group="coordination.k8s.io", version="v1", plural="leases")
PODS = KindInfo(kind="Pod", group="", version="v1", plural="pods")
EVENTS = KindInfo(kind="Event", group="", version="v1", plural="events")
HPAS = KindInfo(kind="HorizontalPodAutoscaler", group="autoscaling", version="v2",
                plural="horizontalpodautoscalers")
SCALED_OBJECTS = KindInfo(kind="ScaledObject", group="keda.sh", version="v1alpha1",
                          plural="scaledobjects")


@dataclass(frozen=True)
class Op:
    """One API call, described the way RBAC and operators name it."""

    verb: str  # get, list, create, update, patch
    kind: KindInfo
    namespace: str
    name: str = ""
    subresource: str = ""

    @property
    def resource(self) -> str:
        return self.kind.plural + (f"/{self.subresource}" if self.subresource else "")

    def __str__(self) -> str:
        target = f"{self.kind.kind} {self.namespace}/{self.name}" if self.name else \
            f"{self.kind.plural} in namespace {self.namespace}"
        return f"{self.verb} {self.resource} ({target})"


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_s: float = 0.2
    max_s: float = 5.0


def _server_message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "{}")
        return str(body.get("message") or exc.reason or "")
    except (ValueError, AttributeError):
        return str(exc.reason or exc.body or "")


def patch_failed(exc: ApiException) -> bool:
    """A 422 for a JSON patch that could not be applied (a ``test`` operation failed), as opposed
    to a rejection of the patched object by the schema, a CEL rule or an admission webhook."""
    try:
        body = json.loads(exc.body or "{}")
    except ValueError:
        return False
    causes = (body.get("details") or {}).get("causes") or []
    text = " ".join([str(body.get("message") or "")] + [str(c.get("message")) for c in causes])
    return "testing value" in text or "test failed" in text


def not_served(said: str) -> bool:
    """A 404 for the resource type itself (CRD not installed), not for one object."""
    return "could not find the requested resource" in said


def permanent_error(op: Op, exc: ApiException) -> BackendError:
    said = _server_message(exc)
    if exc.status == 401:
        message = (f"unauthorized: the API server did not accept the actuator's credentials to "
                   f"{op} (token expired or missing?): {said}")
    elif exc.status == 403:
        message = (f"forbidden: the actuator may not {op.verb} {op.resource} (API group "
                   f"{op.kind.group!r}) in namespace {op.namespace!r}; grant it in the actuator's "
                   f"Role (deploy/base/actuator-rbac.yaml). The API server said: {said}")
    elif exc.status == 404 and op.name and not not_served(said):
        message = (f"{op.kind.kind} {op.namespace}/{op.name} not found ({op.verb} "
                   f"{op.kind.api_version} {op.resource}); check the name in the actuator's "
                   f"configuration. The API server said: {said}")
    elif exc.status == 404:
        message = (f"{op.kind.api_version} {op.resource} is not served (is its CRD installed, "
                   f"at that version?) while trying to {op}: {said}")
    elif exc.status == 422:
        return RejectedError(f"the API server refused to {op}: {said}", exc.status)
    else:
        message = f"{op} refused with {exc.status} {exc.reason}: {said}"
    return BackendError(message, exc.status)


class Kube:
    """The typed and custom-object clients, and the retry discipline around them."""

    def __init__(self, api: client.ApiClient, policy: RetryPolicy = RetryPolicy(),
                 timeout_s: float = 10.0, field_manager: str = "slaplanner-actuator",
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 rng: random.Random | None = None, health: Health | None = None) -> None:
        self.api = api
        self.health = health or Health()
        self.policy = policy
        self.timeout_s = timeout_s
        self.field_manager = field_manager
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.autoscaling = client.AutoscalingV2Api(api)

    def as_json(self, value: Any) -> JSON:
        result = self.api.sanitize_for_serialization(value)
        return result if isinstance(result, dict) else {}

    async def call(self, op: Op, fn: Callable[[], T]) -> T:
        last = ""
        for attempt in range(1, self.policy.attempts + 1):
            delay = min(self.policy.max_s, self.policy.base_s * 2 ** (attempt - 1))
            delay *= 0.5 + self.rng.random() / 2  # jitter: two actuators do not retry in step
            started = time.monotonic()
            try:
                result = await asyncio.to_thread(fn)
            except ApiException as exc:
                status = exc.status or 0
                if status < 500 and status != 429:
                    self.health.ok(started)  # it answered
                if status == 409:
                    raise ConflictError(f"{op}: {_server_message(exc)}") from None
                if status == 422 and patch_failed(exc):
                    # A JSON patch "test" failed: the object changed since it was read.
                    raise ConflictError(f"{op}: {_server_message(exc)}") from None
                if status != 429 and status < 500:
                    raise permanent_error(op, exc) from None
                last = f"{status} {exc.reason}: {_server_message(exc)}"
                self.health.failed(f"{status} {exc.reason}")
                retry_after = (exc.headers or {}).get("Retry-After") if status == 429 else None
                if retry_after is not None and retry_after.isdigit():
                    delay = min(self.policy.max_s, float(retry_after))
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                self.health.failed(last)
            else:
                self.health.ok(started)
                return result
            if attempt < self.policy.attempts:
                # Health logs the change of state once; each attempt only at debug level.
                log.debug("%s failed (%s); retrying in %.2f s", op, last, delay)
                await self.sleep(delay)
        raise BackendError(f"{op} failed {self.policy.attempts} times; last: {last}")

    # -- workloads

    async def get_object(self, kind: KindInfo, namespace: str, name: str) -> JSON:
        op = Op("get", kind, namespace, name)
        if kind.api_version == "apps/v1" and kind.kind == "Deployment":
            return self.as_json(await self.call(op, lambda: self.apps.read_namespaced_deployment(
                name, namespace, _request_timeout=self.timeout_s)))
        if kind.api_version == "apps/v1" and kind.kind == "StatefulSet":
            return self.as_json(await self.call(op, lambda: self.apps.read_namespaced_stateful_set(
                name, namespace, _request_timeout=self.timeout_s)))
        return self.as_json(await self.call(op, lambda: self.custom.get_namespaced_custom_object(
            kind.group, kind.version, namespace, kind.plural, name,
            _request_timeout=self.timeout_s)))

    async def get_scale(self, kind: KindInfo, namespace: str, name: str) -> JSON:
        op = Op("get", kind, namespace, name, "scale")
        if kind.api_version == "apps/v1" and kind.kind == "Deployment":
            return self.as_json(await self.call(
                op, lambda: self.apps.read_namespaced_deployment_scale(
                    name, namespace, _request_timeout=self.timeout_s)))
        if kind.api_version == "apps/v1" and kind.kind == "StatefulSet":
            return self.as_json(await self.call(
                op, lambda: self.apps.read_namespaced_stateful_set_scale(
                    name, namespace, _request_timeout=self.timeout_s)))
        return self.as_json(await self.call(
            op, lambda: self.custom.get_namespaced_custom_object_scale(
                kind.group, kind.version, namespace, kind.plural, name,
                _request_timeout=self.timeout_s)))

    async def patch_scale(self, kind: KindInfo, namespace: str, name: str, replicas: int,
                          resource_version: str | None) -> JSON:
        """Set ``spec.replicas`` through the scale subresource; 409 if the version moved."""
        body: JSON = {"spec": {"replicas": replicas}}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        op = Op("patch", kind, namespace, name, "scale")
        if kind.api_version == "apps/v1" and kind.kind == "Deployment":
            return self.as_json(await self.call(
                op, lambda: self.apps.patch_namespaced_deployment_scale(
                    name, namespace, body, field_manager=self.field_manager,
                    _content_type=MERGE_PATCH, _request_timeout=self.timeout_s)))
        if kind.api_version == "apps/v1" and kind.kind == "StatefulSet":
            return self.as_json(await self.call(
                op, lambda: self.apps.patch_namespaced_stateful_set_scale(
                    name, namespace, body, field_manager=self.field_manager,
                    _content_type=MERGE_PATCH, _request_timeout=self.timeout_s)))
        return self.as_json(await self.call(
            op, lambda: self.custom.patch_namespaced_custom_object_scale(
                kind.group, kind.version, namespace, kind.plural, name, body,
                field_manager=self.field_manager, _content_type=MERGE_PATCH,
                _request_timeout=self.timeout_s)))

    async def patch_custom_object(self, kind: KindInfo, namespace: str, name: str,
                                  body: JSON | list[JSON], content_type: str) -> JSON:
        op = Op("patch", kind, namespace, name)
        return self.as_json(await self.call(
            op, lambda: self.custom.patch_namespaced_custom_object(
                kind.group, kind.version, namespace, kind.plural, name, body,
                field_manager=self.field_manager, _content_type=content_type,
                _request_timeout=self.timeout_s)))

    def list_raw(self, kind: KindInfo, namespace: str, selector: str, **kwargs: Any) -> Any:
        """A list (or, with ``watch=True``, a watch) of ``kind`` in ``namespace``, for the
        informers (blocking: they call it from their own threads)."""
        label_selector = selector or None
        if kind.group == "" and kind.plural == "pods":
            return self.core.list_namespaced_pod(namespace, label_selector=label_selector,
                                                 **kwargs)
        return self.custom.list_namespaced_custom_object(
            kind.group, kind.version, namespace, kind.plural, label_selector=label_selector,
            **kwargs)

    async def patch_status(self, kind: KindInfo, namespace: str, name: str,
                           body: list[JSON]) -> JSON:
        """A JSON patch of the ``status`` subresource."""
        op = Op("patch", kind, namespace, name, "status")
        return self.as_json(await self.call(
            op, lambda: self.custom.patch_namespaced_custom_object_status(
                kind.group, kind.version, namespace, kind.plural, name, body,
                field_manager=self.field_manager, _content_type=JSON_PATCH,
                _request_timeout=self.timeout_s)))

    # -- pods

    async def list_pods(self, namespace: str, selector: str) -> list[JSON]:
        result = await self.call(Op("list", PODS, namespace), lambda: self.core.list_namespaced_pod(
            namespace, label_selector=selector, _request_timeout=self.timeout_s))
        return list(self.as_json(result).get("items") or [])

    async def annotate_pod(self, namespace: str, name: str, key: str, value: str) -> None:
        body = {"metadata": {"annotations": {key: value}}}
        await self.call(Op("patch", PODS, namespace, name), lambda: self.core.patch_namespaced_pod(
            name, namespace, body, field_manager=self.field_manager, _content_type=MERGE_PATCH,
            _request_timeout=self.timeout_s))

    # -- other autoscalers

    async def list_hpas(self, namespace: str) -> list[JSON]:
        result = await self.call(
            Op("list", HPAS, namespace),
            lambda: self.autoscaling.list_namespaced_horizontal_pod_autoscaler(
                namespace, _request_timeout=self.timeout_s))
        return list(self.as_json(result).get("items") or [])

    async def list_scaled_objects(self, namespace: str) -> list[JSON] | None:
        """KEDA ScaledObjects, or None when KEDA is not installed (its API is not served)."""
        op = Op("list", SCALED_OBJECTS, namespace)
        try:
            result = await self.call(op, lambda: self.custom.list_namespaced_custom_object(
                SCALED_OBJECTS.group, SCALED_OBJECTS.version, namespace, SCALED_OBJECTS.plural,
                _request_timeout=self.timeout_s))
        except BackendError as exc:
            if exc.status == 404:
                return None
            raise
        return list(self.as_json(result).get("items") or [])

    # -- events

    async def create_event(self, namespace: str, involved: JSON, reason: str, message: str,
                           warning: bool, now: float, instance: str) -> None:
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "metadata": {"name": f"{involved['name']}.{uuid.uuid4().hex[:16]}",
                         "namespace": namespace},
            "involvedObject": involved,
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": "slaplanner-actuator"},
            "reportingComponent": "slaplanner.io/actuator",
            "reportingInstance": instance[:128],
            "action": "Scale",
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        event = client.CoreV1Event.from_dict(body)
        assert event is not None
        await self.call(Op("create", EVENTS, namespace), lambda: self.core.create_namespaced_event(
            namespace, event, field_manager=self.field_manager, _request_timeout=self.timeout_s))


# ----------------------------------------------------------------------------- the Lease


def micro_time(epoch_s: float) -> str:
    """A ``MicroTime``: RFC 3339 with exactly six fractional digits, as the API server parses it.

    (The typed ``V1Lease`` model serialises through ``datetime.isoformat()``, which drops the
    fraction when it is zero; the API server then refuses the Lease. So the Lease is written as a
    plain object.)
    """
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class KubeLeaseLock:
    """The election's lock: one ``coordination.k8s.io/v1`` Lease."""

    def __init__(self, kube: Kube, namespace: str, name: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name

    def _body(self, record: LeaseRecord, version: str | None) -> JSON:
        spec: JSON = {"holderIdentity": record.holder or "",
                      "leaseDurationSeconds": record.duration_s,
                      "leaseTransitions": record.transitions}
        if record.acquire_time is not None:
            spec["acquireTime"] = micro_time(record.acquire_time)
        if record.renew_time is not None:
            spec["renewTime"] = micro_time(record.renew_time)
        metadata: JSON = {"name": self.name, "namespace": self.namespace}
        if version:
            metadata["resourceVersion"] = version
        return {"apiVersion": LEASES.api_version, "kind": "Lease", "metadata": metadata,
                "spec": spec}

    async def get(self) -> tuple[LeaseRecord, str] | None:
        op = Op("get", LEASES, self.namespace, self.name)
        custom = self.kube.custom
        try:
            obj = await self.kube.call(op, lambda: self.kube.as_json(
                custom.get_namespaced_custom_object(
                    LEASES.group, LEASES.version, self.namespace, LEASES.plural, self.name,
                    _request_timeout=self.kube.timeout_s)))
        except BackendError as exc:
            if exc.status == 404:
                return None
            raise
        spec = obj.get("spec") or {}
        record = LeaseRecord(
            holder=spec.get("holderIdentity") or None,
            duration_s=int(spec.get("leaseDurationSeconds") or 15),
            acquire_time=parse_time(spec.get("acquireTime")),
            renew_time=parse_time(spec.get("renewTime")),
            transitions=int(spec.get("leaseTransitions") or 0),
        )
        return record, str(obj["metadata"]["resourceVersion"])

    async def create(self, record: LeaseRecord) -> None:
        body = self._body(record, None)
        custom = self.kube.custom
        await self.kube.call(Op("create", LEASES, self.namespace, self.name),
                             lambda: custom.create_namespaced_custom_object(
                                 LEASES.group, LEASES.version, self.namespace, LEASES.plural,
                                 body, field_manager=self.kube.field_manager,
                                 _request_timeout=self.kube.timeout_s))

    async def update(self, record: LeaseRecord, version: str) -> None:
        body = self._body(record, version)
        custom = self.kube.custom
        await self.kube.call(Op("update", LEASES, self.namespace, self.name),
                             lambda: custom.replace_namespaced_custom_object(
                                 LEASES.group, LEASES.version, self.namespace, LEASES.plural,
                                 self.name, body, field_manager=self.kube.field_manager,
                                 _request_timeout=self.kube.timeout_s))


# ----------------------------------------------------------------------------- setup


def api_client(settings: ActuatorSettings) -> client.ApiClient:
    """A client for the configured cluster: a bare URL, a kubeconfig, or the in-cluster config."""
    if settings.kube_api_url:
        configuration = client.Configuration(host=settings.kube_api_url)
    elif settings.kubeconfig:
        configuration = client.Configuration()
        config.load_kube_config(settings.kubeconfig, settings.kube_context,
                                client_configuration=configuration)
    else:
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except ConfigException:
            config.load_kube_config(context=settings.kube_context,
                                    client_configuration=configuration)
    # Retries are ours (Kube.call): urllib3's own would hide them and double the attempts.
    configuration.retries = False
    return client.ApiClient(configuration)


def own_namespace(default: str = "default") -> str:
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as handle:
            return handle.read().strip() or default
    except OSError:
        return default


def own_identity() -> str:
    """The pod name (its host name) and the process id: unique among the actuator's replicas."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{os.getpid()}"
