"""An HTTP server that speaks the Kubernetes REST API, for tests that drive the real client.

It is not an API server: it stores objects in memory and implements the parts of the protocol the
actuator relies on, exactly as a real API server answers them:

- the real paths (``/api/v1/namespaces/{ns}/{resource}/{name}``, ``/apis/{group}/{version}/...``,
  the ``scale`` subresource of Deployments, StatefulSets and custom resources that declare one);
- the verbs get, list (with ``labelSelector``), create, update (PUT), patch and delete;
- the patch content types ``application/merge-patch+json`` (RFC 7386),
  ``application/json-patch+json`` (RFC 6902, with ``test``), and
  ``application/strategic-merge-patch+json`` (built-in kinds only; custom resources answer 415 as
  a real server does; lists are replaced, which is what the strategic merge of the fields patched
  here does too);
- ``metadata.resourceVersion`` on every object, bumped on each write; an update or patch carrying a
  stale ``resourceVersion`` answers 409 Conflict; a failed JSON-patch ``test`` answers 422;
- ``Status`` bodies with the real reasons and messages for 400, 401, 403, 404, 409, 415, 422, 429,
  500 and 503;
- ``MicroTime`` fields (a Lease's ``acquireTime``/``renewTime``, an Event's ``eventTime``) must
  carry exactly six fractional digits, or the request answers 400 as a real server does;
- watch (``?watch=true``): chunked JSON events (ADDED, MODIFIED, DELETED, and BOOKMARK when
  ``allowWatchBookmarks`` is set) from a ``resourceVersion`` on, and an ERROR event with a 410
  ``Expired`` Status when that version is older than the history kept (``compact()`` drops it);
- custom resources from real CRDs (``tests/k8s_crd.py``): Dynamo's DynamoGraphDeployment and its
  scaling adapter in both served versions, stored in the storage version and converted, with
  unknown fields pruned, schema defaults, schema and CEL validation (422 ``Invalid``), the
  ``status`` subresource, and the operator's admission webhook (direct replica edits of
  adapter-managed components answer 422 for anyone but the operator and a planner).

Tests can inject faults (the next N matching requests, or every matching request for a period,
answer 500, 503, 409, 429, 403, 401, 404 or time out, or are served and then never answered, as
when a response is lost), plug in an authorizer (for instance one built from an RBAC Role),
simulate controllers (status follows spec at once, or by hand), and read the log of every request
(verb, path, content type, status) to assert on the exact calls a client made.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import itertools
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests import k8s_crd

JSON = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

_MICRO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})$")


@dataclass(frozen=True)
class ScalePaths:
    """Where a resource keeps what its ``scale`` subresource shows (as a CRD declares it)."""

    spec_replicas: str = "spec.replicas"
    status_replicas: str = "status.replicas"
    label_selector: str | None = "status.selector"


@dataclass(frozen=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    builtin: bool = True  # built-in kinds accept strategic merge patches; custom resources do not
    scale: ScalePaths | None = None
    micro_time_fields: tuple[str, ...] = ()
    # From a CRD: the version's OpenAPI schema (prune, default, validate), whether writes to the
    # object leave its status alone (a ``status`` subresource), and, for a kind served in several
    # versions, the storage version and the conversion into any version.
    schema: JSON | None = field(default=None, compare=False, repr=False)
    status_subresource: bool = False
    storage_version: str | None = None
    convert: Callable[[JSON, str], JSON] | None = field(default=None, compare=False, repr=False)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


DEPLOYMENTS = ResourceType(
    "apps", "v1", "deployments", "Deployment",
    scale=ScalePaths(label_selector=None),  # the selector comes from spec.selector, see below
)
STATEFULSETS = ResourceType(
    "apps", "v1", "statefulsets", "StatefulSet", scale=ScalePaths(label_selector=None)
)
PODS = ResourceType("", "v1", "pods", "Pod")
EVENTS = ResourceType("", "v1", "events", "Event", micro_time_fields=("eventTime",))
EVENTS_V1 = ResourceType(
    "events.k8s.io", "v1", "events", "Event", micro_time_fields=("eventTime",)
)
LEASES = ResourceType(
    "coordination.k8s.io", "v1", "leases", "Lease",
    micro_time_fields=("spec.acquireTime", "spec.renewTime"),
)
HPAS = ResourceType("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler")
SCALED_OBJECTS = ResourceType("keda.sh", "v1alpha1", "scaledobjects", "ScaledObject",
                              builtin=False)


def from_crd(path: Path) -> dict[str, ResourceType]:
    """One resource type per served version of a CRD file, by version."""
    versions = k8s_crd.load(path)
    storage = next(v.version for v in versions if v.storage)
    converter = k8s_crd.dgd_convert if versions[0].plural == "dynamographdeployments" else \
        k8s_crd.dgdsa_convert
    types = {}
    for v in versions:
        scale = v.subresources.get("scale")
        paths = None if scale is None else ScalePaths(
            scale["specReplicasPath"].lstrip("."), scale["statusReplicasPath"].lstrip("."),
            (scale.get("labelSelectorPath") or "").lstrip(".") or None)
        types[v.version] = ResourceType(
            v.group, v.version, v.plural, v.kind, builtin=False, scale=paths, schema=v.schema,
            status_subresource="status" in v.subresources, storage_version=storage,
            convert=converter if len(versions) > 1 else None)
    return types


_DGD_VERSIONS = from_crd(k8s_crd.DGD_CRD)
_DGDSA_VERSIONS = from_crd(k8s_crd.DGDSA_CRD)
# Dynamo's own CRDs: v1alpha1 (deprecated, ``spec.services``) and v1beta1 (storage,
# ``spec.components``).
DGDS = _DGD_VERSIONS["v1alpha1"]
DGDS_BETA = _DGD_VERSIONS["v1beta1"]
DGDSAS = _DGDSA_VERSIONS["v1alpha1"]
DGDSAS_BETA = _DGDSA_VERSIONS["v1beta1"]
LEADER_WORKER_SETS = ResourceType(
    "leaderworkerset.x-k8s.io", "v1", "leaderworkersets", "LeaderWorkerSet", builtin=False,
    scale=ScalePaths(label_selector="status.hpaPodSelector"),
)

DEFAULT_TYPES = (DEPLOYMENTS, STATEFULSETS, PODS, EVENTS, EVENTS_V1, LEASES, HPAS,
                 SCALED_OBJECTS, DGDS, DGDS_BETA, DGDSAS, DGDSAS_BETA, LEADER_WORKER_SETS)


@dataclass(frozen=True)
class RequestAttributes:
    """What an authorizer sees of a request (the fields of a SubjectAccessReview)."""

    verb: str  # get, list, watch, create, update, patch, delete
    group: str
    resource: str
    subresource: str
    namespace: str
    name: str


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str
    body: Any
    status: int = 0
    attributes: RequestAttributes | None = None
    authorization: str = ""  # the Authorization header, as sent

    @property
    def verb(self) -> str:
        return self.attributes.verb if self.attributes else ""


@dataclass
class Fault:
    """Answer the next ``count`` matching requests with ``kind`` instead of serving them; or, with
    ``until`` (a ``time.monotonic()`` deadline), every matching request until then."""

    # "500", "503", "409", "429", "403", "401", "404", "timeout" (no answer), or "lost-response"
    # (the request is served, a write lands, and then no answer either)
    kind: str
    count: int = 1
    method: str | None = None
    path_contains: str | None = None
    until: float | None = None
    served: int = 0  # requests answered with this fault so far
    # Called (in the server's thread) each time the fault strikes; for "lost-response", once the
    # request has been served: a test can kill the client between the write and its answer.
    on_strike: Callable[[], None] | None = None

    def active(self, now: float) -> bool:
        return now < self.until if self.until is not None else self.count > 0

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        return self.path_contains is None or self.path_contains in path


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str,
                 details: JSON | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers or {}

    def status(self) -> JSON:
        body: JSON = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                      "status": "Failure", "message": self.message, "reason": self.reason,
                      "code": self.code}
        if self.details is not None:
            body["details"] = self.details
        return body


def _details(rt: ResourceType, name: str) -> JSON:
    return {"name": name, "group": rt.group, "kind": rt.plural}


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rt.group_resource} "{name}" not found',
                    _details(rt, name))


def conflict(rt: ResourceType, name: str) -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rt.group_resource} '
                    f'"{name}": the object has been modified; please apply your changes to the '
                    "latest version and try again", _details(rt, name))


def forbidden(attrs: RequestAttributes, user: str) -> ApiError:
    resource = attrs.resource + (f"/{attrs.subresource}" if attrs.subresource else "")
    who = f'{attrs.resource}.{attrs.group} "{attrs.name}"' if attrs.group else \
        f'{attrs.resource} "{attrs.name}"'
    if not attrs.name:
        who = f"{attrs.resource}.{attrs.group}" if attrs.group else attrs.resource
    where = f' in the namespace "{attrs.namespace}"' if attrs.namespace else " at the cluster scope"
    return ApiError(
        403, "Forbidden",
        f'{who} is forbidden: User "{user}" cannot {attrs.verb} resource "{resource}" in API '
        f'group "{attrs.group}"{where}',
        {"name": attrs.name, "group": attrs.group, "kind": attrs.resource},
    )


# ----------------------------------------------------------------------------- JSON helpers


def get_path(obj: JSON, dotted: str) -> Any:
    node: Any = obj
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def set_path(obj: JSON, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = obj
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge, ``null`` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, tokens: list[str], path: str) -> tuple[Any, str]:
    node = doc
    for token in tokens[:-1]:
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise ApiError(422, "Invalid", f"the server rejected our request due to an error in "
                           f"our request: missing path {path!r}")
    return node, tokens[-1]


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 add, remove, replace, move, copy and test."""
    if not isinstance(ops, list):
        raise ApiError(400, "BadRequest", "json patch must be a list of operations")
    result = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ApiError(400, "BadRequest", f"invalid json patch operation {op!r}")
        kind, path = op["op"], op["path"]
        if kind in ("move", "copy"):
            value = _read_pointer(result, op.get("from", ""))
            if kind == "move":
                result = json_patch(result, [{"op": "remove", "path": op.get("from", "")}])
            result = json_patch(result, [{"op": "add", "path": path, "value": value}])
            continue
        if kind == "test":
            if _read_pointer(result, path) != op.get("value"):
                raise ApiError(422, "Invalid", "the server rejected our request due to an error "
                               f"in our request: testing value {path} failed")
            continue
        tokens = _pointer(path)
        if not tokens:
            result = copy.deepcopy(op.get("value"))
            continue
        parent, last = _parent(result, tokens, path)
        if kind == "add":
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                parent.insert(index, copy.deepcopy(op.get("value")))
            else:
                parent[last] = copy.deepcopy(op.get("value"))
        elif kind in ("replace", "remove"):
            if isinstance(parent, list):
                if not last.isdigit() or int(last) >= len(parent):
                    raise ApiError(422, "Invalid", f"missing path {path!r}")
                if kind == "remove":
                    parent.pop(int(last))
                else:
                    parent[int(last)] = copy.deepcopy(op.get("value"))
            else:
                if last not in parent:
                    raise ApiError(422, "Invalid", "the server rejected our request due to an "
                                   f"error in our request: missing path {path!r}")
                if kind == "remove":
                    del parent[last]
                else:
                    parent[last] = copy.deepcopy(op.get("value"))
        else:
            raise ApiError(400, "BadRequest", f"unknown json patch operation {kind!r}")
    return result


def _read_pointer(doc: Any, path: str) -> Any:
    node = doc
    for token in _pointer(path):
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
    return node


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors: ``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``, and ``in``."""
    for term in _split_selector(selector):
        term = term.strip()
        if not term:
            continue
        match = re.fullmatch(r"([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)", term)
        if match:
            key, op, values = match.groups()
            allowed = {v.strip() for v in values.split(",")}
            if (labels.get(key) in allowed) != (op == "in"):
                return False
            continue
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _split_selector(selector: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return terms


def _rfc3339(now: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- controllers

Controller = Callable[["KubeApiServer", ResourceType, JSON], None]


class ReplicaController:
    """Status follows spec at once, as if every controller were instant.

    Deployments and StatefulSets also get pods: missing ones are created from the pod template
    (Running and ready, or Pending and unschedulable for the workloads named in
    ``unschedulable``); extra ones are removed the way a ReplicaSet chooses them, lowest
    ``controller.kubernetes.io/pod-deletion-cost`` first (a StatefulSet: highest ordinal first).

    DynamoGraphDeployments get what Dynamo's operator reports: per component ``replicas``,
    ``updatedReplicas``, ``readyReplicas`` and ``availableReplicas``, ``observedGeneration``, the
    ``state`` and the ``Ready`` condition; a scaling adapter for every component with
    ``scalingAdapter``, whose replicas the adapter's controller then writes into the DGD.
    """

    def __init__(self, unschedulable: set[str] | None = None, ready: bool = True) -> None:
        self.unschedulable = unschedulable if unschedulable is not None else set()
        self.ready = ready

    def __call__(self, server: KubeApiServer, rt: ResourceType, obj: JSON) -> None:
        if rt.plural == "dynamographdeployments":
            self._dgd(server, obj)
            return
        if rt.plural == "dynamographdeploymentscalingadapters":
            self._adapter(server, obj)
            return
        if rt in (DEPLOYMENTS, STATEFULSETS):
            self._pods(server, rt, obj)
        if rt.scale is not None:
            replicas = get_path(obj, rt.scale.spec_replicas) or 0
            ready = replicas if self.ready else 0
            if rt in (DEPLOYMENTS, STATEFULSETS):
                pods = server._live_pods(obj)
                replicas = len(pods)
                ready = sum(1 for p in pods if get_path(p, "status.phase") == "Running")
            status = obj.setdefault("status", {})
            status.update({"replicas": replicas, "readyReplicas": ready,
                           "availableReplicas": ready, "updatedReplicas": replicas})

    def _dgd(self, server: KubeApiServer, obj: JSON) -> None:
        """``obj`` in the storage version (v1beta1)."""
        name = obj["metadata"]["name"]
        status = obj.setdefault("status", {})
        components = status.setdefault("components", {})
        all_ready = True
        for component in get_path(obj, "spec.components") or []:
            replicas = component.get("replicas", 1)
            ready = replicas if self.ready else 0
            all_ready = all_ready and ready == replicas
            components[component["name"]] = {
                "componentKind": "Deployment",
                "componentNames": [f"{name}-{component['name'].lower()}"],
                "replicas": replicas, "updatedReplicas": replicas,
                "readyReplicas": ready, "availableReplicas": ready}
            if "scalingAdapter" in component:
                self._ensure_adapter(server, obj, component)
        status["observedGeneration"] = obj["metadata"].get("generation", 1)
        status["state"] = "successful" if all_ready else "pending"
        reason = "all_resources_are_ready" if all_ready else "pods_not_ready"
        others = [c for c in status.get("conditions") or [] if c.get("type") != "Ready"]
        status["conditions"] = [*others, {
            "type": "Ready", "status": "True" if all_ready else "False", "reason": reason,
            "message": "All resources are ready" if all_ready else "Some pods are not ready",
            "lastTransitionTime": _rfc3339(),
            "observedGeneration": obj["metadata"].get("generation", 1)}]

    @staticmethod
    def _ensure_adapter(server: KubeApiServer, dgd: JSON, component: JSON) -> None:
        namespace, dgd_name = dgd["metadata"]["namespace"], dgd["metadata"]["name"]
        name = k8s_crd.adapter_name(dgd_name, component["name"])
        key = (DGDSAS_BETA.group, DGDSAS_BETA.plural, namespace, name)
        replicas = component.get("replicas", 1)
        selector = k8s_crd.pod_selector(dgd_name, component["name"])
        current = server._objects.get(key)
        if current is None:
            adapter = {"apiVersion": DGDSAS_BETA.api_version, "kind": DGDSAS_BETA.kind,
                       "metadata": {"name": name},
                       "spec": {"dgdRef": {"name": dgd_name, "componentName": component["name"]},
                                "replicas": replicas},
                       "status": {"replicas": replicas, "selector": selector}}
            stored = server._prepare_new(DGDSAS_BETA, adapter, namespace)
            server._put(key, stored, "ADDED")
        elif get_path(current, "status.replicas") != replicas:
            changed = copy.deepcopy(current)
            changed["status"] = {**(current.get("status") or {}), "replicas": replicas,
                                 "selector": selector}
            server._put(key, changed, "MODIFIED", bump=True)

    def _adapter(self, server: KubeApiServer, adapter: JSON) -> None:
        """The adapter controller: its ``spec.replicas`` is written into the DGD's component."""
        namespace = adapter["metadata"]["namespace"]
        ref = get_path(adapter, "spec.dgdRef") or {}
        key = (DGDS_BETA.group, DGDS_BETA.plural, namespace, ref.get("name", ""))
        dgd = server._objects.get(key)
        if dgd is None:
            return
        wanted = get_path(adapter, "spec.replicas")
        for component in get_path(dgd, "spec.components") or []:
            if component.get("name") == ref.get("componentName") and "scalingAdapter" in component:
                if component.get("replicas", 1) != wanted:
                    changed = copy.deepcopy(dgd)
                    for item in changed["spec"]["components"]:
                        if item.get("name") == component["name"]:
                            item["replicas"] = wanted
                    changed["metadata"]["generation"] = dgd["metadata"].get("generation", 1) + 1
                    self._dgd(server, changed)
                    server._put(key, changed, "MODIFIED", bump=True)
                    adapter.setdefault("status", {})["lastScaleTime"] = _rfc3339()
                adapter.setdefault("status", {}).update(
                    replicas=wanted, selector=k8s_crd.pod_selector(ref["name"],
                                                                   component["name"]))

    def _pods(self, server: KubeApiServer, rt: ResourceType, obj: JSON) -> None:
        name = obj["metadata"]["name"]
        namespace = obj["metadata"]["namespace"]
        want = get_path(obj, "spec.replicas") or 0
        live = server._live_pods(obj)
        template = get_path(obj, "spec.template") or {}
        if len(live) < want:
            taken = {p["metadata"]["name"] for p in live}
            ordinals = (i for i in itertools.count() if f"{name}-{i}" not in taken)
            for _ in range(want - len(live)):
                pod_name = f"{name}-{next(ordinals)}" if rt is STATEFULSETS else \
                    f"{name}-{uuid.uuid4().hex[:5]}"
                placed = name not in self.unschedulable
                status: JSON = {
                    "phase": "Running" if placed else "Pending",
                    "conditions": [{"type": "PodScheduled", "status": "True" if placed
                                    else "False", **({} if placed else
                                                     {"reason": "Unschedulable"})}]}
                if placed:
                    status["podIP"] = "127.0.0.1"
                    status["conditions"].append({"type": "Ready", "status": "True"})
                pod = {"metadata": {"name": pod_name,
                                    "labels": dict(get_path(template, "metadata.labels") or {}),
                                    "annotations": dict(
                                        get_path(template, "metadata.annotations") or {})},
                       "spec": copy.deepcopy(template.get("spec") or {"containers": []}),
                       "status": status}
                stored = server._prepare_new(PODS, pod, namespace)
                server._put(server._key(PODS, stored), stored, "ADDED")
        elif len(live) > want:
            def rank(pod: JSON) -> tuple[int, int, str]:
                annotations = pod["metadata"].get("annotations") or {}
                cost = int(annotations.get("controller.kubernetes.io/pod-deletion-cost", "0"))
                running = get_path(pod, "status.phase") == "Running"
                return (1 if running else 0, cost, pod["metadata"]["name"])

            order = sorted(live, key=lambda p: p["metadata"]["name"], reverse=True) \
                if rt is STATEFULSETS else sorted(live, key=rank)
            for pod in order[:len(live) - want]:
                server._drop(server._key(PODS, pod))


instant_ready = ReplicaController()


# ----------------------------------------------------------------------------- the server


@dataclass
class _Route:
    rt: ResourceType
    namespace: str
    name: str
    subresource: str


class _Server(ThreadingHTTPServer):
    # A real API server accepts many connections at once (watches hold theirs open); the
    # default backlog of 5 would refuse connections under a burst of requests.
    request_queue_size = 256
    allow_reuse_address = True


class _Watch:
    """A watch request the HTTP handler streams (``KubeApiServer.stream``)."""

    def __init__(self, route: _Route, query: dict[str, list[str]]) -> None:
        self.route = route
        self.resource_version = query.get("resourceVersion", [""])[0]
        self.selector = query.get("labelSelector", [""])[0]
        self.bookmarks = query.get("allowWatchBookmarks", ["false"])[0] in ("true", "1")
        timeout = query.get("timeoutSeconds", [""])[0]
        self.timeout_s = float(timeout) if timeout.isdigit() else 1800.0


class KubeApiServer:
    """Start with ``start()`` (or use as a context manager); ``url`` is ``http://127.0.0.1:PORT``."""

    def __init__(self, types: tuple[ResourceType, ...] = DEFAULT_TYPES,
                 controller: Controller | None = instant_ready,
                 timeout_delay_s: float = 1.5,
                 user: str = "system:serviceaccount:slaplanner:slaplanner-actuator",
                 history: int = 100_000, bookmark_interval_s: float = 1.0,
                 port: int = 0) -> None:
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        for rt in types:
            self.register(rt)
        self.controller = controller
        self.timeout_delay_s = timeout_delay_s
        self.user = user
        self.authorizer: Callable[[RequestAttributes], bool] | None = None
        # Admission webhooks: (resource type in the storage version, old or None, new, user)
        # -> field errors; any error refuses the write with 422, as a validating webhook does.
        self.admission: list[tuple[str, Callable[[JSON | None, JSON, str], list[str]]]] = [
            ("dynamographdeployments", self._dynamo_webhook)]
        self.requests: list[RecordedRequest] = []
        self.faults: list[Fault] = []
        self.history = history
        self.bookmark_interval_s = bookmark_interval_s
        self._objects: dict[tuple[str, str, str, str], JSON] = {}
        self._rv = itertools.count(1000)
        self._current_rv = 999
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        # Every change, in order: (resourceVersion, type, key, object in the storage version).
        self._log: list[tuple[int, str, tuple[str, str, str, str], JSON]] = []
        self._log_base = 0  # changes dropped from the front of the log so far
        self._compacted_rv = 0  # a watch from an older version answers 410
        self._watch_epoch = 0  # bumped to end every open watch
        self._stopping = False
        self._requested_port = port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> KubeApiServer:
        handler = _make_handler(self)
        self._stopping = False
        self._httpd = _Server(("127.0.0.1", self._requested_port), handler)
        self._httpd.daemon_threads = True
        self._requested_port = int(self._httpd.server_address[1])  # a restart keeps the port
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,),
                                        name="kube-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._requested_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- what tests set up and inspect

    def register(self, rt: ResourceType) -> None:
        self.types[(rt.group, rt.version, rt.plural)] = rt

    def inject(self, kind: str, count: int = 1, method: str | None = None,
               path_contains: str | None = None, for_s: float | None = None,
               on_strike: Callable[[], None] | None = None) -> Fault:
        """The next ``count`` requests matching ``method``/``path_contains`` answer ``kind``; with
        ``for_s``, every matching request for that many seconds from now (``count`` unused)."""
        until = None if for_s is None else time.monotonic() + for_s
        fault = Fault(kind, count, method, path_contains, until, on_strike=on_strike)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Serve every request again from now on."""
        with self._lock:
            self.faults.clear()

    def compact(self) -> None:
        """Forget the history of changes, as etcd's compaction does: a watch that resumes from a
        version before now answers 410 Gone."""
        with self._changed:
            if self._log:
                self._compacted_rv = self._log[-1][0]
            self._log_base += len(self._log)
            self._log.clear()
            self._changed.notify_all()

    def close_watches(self) -> None:
        """End every open watch (as an API server restart or a load balancer would)."""
        with self._changed:
            self._watch_epoch += 1
            self._changed.notify_all()

    def add(self, rt: ResourceType, obj: JSON) -> JSON:
        """Store an object as if created by someone else (no request is logged)."""
        with self._lock:
            namespace = obj["metadata"].get("namespace", "")
            obj = copy.deepcopy(obj)
            if rt.schema is not None:  # what the schema does not know is dropped, as on create
                obj = k8s_crd.prune(obj, rt.schema, root=True)
            stored = self._prepare_new(rt, self._to_storage(rt, obj), namespace)
            self._put(self._key(rt, stored), stored, "ADDED")
            self._run_controller(rt, stored)
            return self._in_version(rt, stored)

    def get(self, rt: ResourceType, namespace: str, name: str) -> JSON:
        with self._lock:
            obj = self._objects.get((rt.group, rt.plural, namespace, name))
            if obj is None:
                raise KeyError(f"{rt.plural} {namespace}/{name}")
            return self._in_version(rt, obj)

    def objects_of(self, rt: ResourceType, namespace: str | None = None) -> list[JSON]:
        with self._lock:
            return [self._in_version(rt, o) for (g, p, ns, _), o in sorted(self._objects.items())
                    if (g, p) == (rt.group, rt.plural) and namespace in (None, ns)]

    def mutate(self, rt: ResourceType, namespace: str, name: str,
               change: Callable[[JSON], None], run_controller: bool = False) -> JSON:
        """Change a stored object as another client would (a new resourceVersion); ``change``
        sees the object in ``rt``'s version."""
        with self._lock:
            key = (rt.group, rt.plural, namespace, name)
            obj = self._in_version(rt, self._objects[key])
            change(obj)
            stored = self._to_storage(rt, obj)
            if run_controller:
                self._run_controller(rt, stored, record=False)
            self._put(key, stored, "MODIFIED", bump=True)
            return self._in_version(rt, stored)

    def calls(self) -> list[tuple[str, str]]:
        """(method, path) of every request, in order."""
        with self._lock:
            return [(r.method, r.path) for r in self.requests]

    def writes(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.method in ("POST", "PUT", "PATCH", "DELETE")]

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- storage: one version per kind, every change logged for the watches

    def _to_storage(self, rt: ResourceType, obj: JSON) -> JSON:
        if rt.convert is None or rt.storage_version in (None, rt.version):
            return obj
        return rt.convert(obj, rt.storage_version)

    def _in_version(self, rt: ResourceType, obj: JSON) -> JSON:
        if rt.convert is None or rt.storage_version in (None, rt.version):
            return copy.deepcopy(obj)
        return rt.convert(obj, rt.version)

    def _bump(self) -> str:
        self._current_rv = next(self._rv)
        return str(self._current_rv)

    def _put(self, key: tuple[str, str, str, str], obj: JSON, kind: str,
             bump: bool = False) -> None:
        """Store ``obj`` (its resourceVersion new, or a new one with ``bump``) and log it."""
        if bump:
            obj["metadata"]["resourceVersion"] = self._bump()
        self._objects[key] = obj
        self._record(int(obj["metadata"]["resourceVersion"]), kind, key, obj)

    def _drop(self, key: tuple[str, str, str, str]) -> None:
        obj = self._objects.pop(key)
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = self._bump()
        self._record(self._current_rv, "DELETED", key, gone)

    def _record(self, rv: int, kind: str, key: tuple[str, str, str, str], obj: JSON) -> None:
        self._log.append((rv, kind, key, copy.deepcopy(obj)))
        if len(self._log) > self.history:
            dropped = len(self._log) - self.history // 2
            self._compacted_rv = self._log[dropped - 1][0]
            del self._log[:dropped]
            self._log_base += dropped
        self._changed.notify_all()

    # -- watch

    def stream(self, watch: _Watch) -> Iterator[JSON]:
        """The events of one watch, until it times out, is closed or the server stops."""
        route = watch.route
        rt = route.rt

        def matches(key: tuple[str, str, str, str], obj: JSON) -> bool:
            group, plural, namespace, _ = key
            if (group, plural) != (rt.group, rt.plural):
                return False
            if route.namespace and namespace != route.namespace:
                return False
            labels = get_path(obj, "metadata.labels") or {}
            return not watch.selector or selector_matches(watch.selector, labels)

        deadline = time.monotonic() + watch.timeout_s
        with self._changed:
            epoch = self._watch_epoch
            initial: list[JSON] = []
            if watch.resource_version in ("", "0"):
                position = self._current_rv
                initial = [{"type": "ADDED", "object": self._in_version(rt, obj)}
                           for key, obj in sorted(self._objects.items()) if matches(key, obj)]
            else:
                try:
                    position = int(watch.resource_version)
                except ValueError:
                    position = -1
                if position < self._compacted_rv:
                    yield self._expired(watch.resource_version)
                    return
            index = self._log_base + bisect.bisect_right([e[0] for e in self._log], position)
        yield from initial
        next_bookmark = time.monotonic() + self.bookmark_interval_s
        while True:
            with self._changed:
                events: list[tuple[str, JSON]] = []
                expired = None
                if index < self._log_base:  # history dropped under us
                    expired = self._expired(str(position))
                else:
                    taken = self._log[index - self._log_base:]
                    if not taken:
                        wait = min(deadline, next_bookmark) - time.monotonic()
                        if not self._stopping and epoch == self._watch_epoch and wait > 0:
                            self._changed.wait(wait)
                        taken = self._log[max(0, index - self._log_base):]
                    index += len(taken)
                    events = [(kind, copy.deepcopy(obj)) for _, kind, key, obj in taken
                              if matches(key, obj)]
                    if self._log:
                        position = max(position, self._log[-1][0])
                closed = self._stopping or epoch != self._watch_epoch
            if expired is not None:
                yield expired
                return
            for kind, obj in events:
                yield {"type": kind, "object": self._in_version(rt, obj)}
            if closed or time.monotonic() >= deadline:
                return
            if watch.bookmarks and time.monotonic() >= next_bookmark:
                yield {"type": "BOOKMARK", "object": {
                    "kind": rt.kind, "apiVersion": rt.api_version,
                    "metadata": {"resourceVersion": str(position)}}}
                next_bookmark = time.monotonic() + self.bookmark_interval_s

    @staticmethod
    def _expired(version: str) -> JSON:
        return {"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": f"too old resource version: {version}", "reason": "Expired",
            "code": 410}}

    # -- request handling

    def handle(self, method: str, raw_path: str, content_type: str, raw_body: bytes,
               authorization: str = "") -> tuple[int, JSON | _Watch | None, dict[str, str]]:
        parts = urlsplit(raw_path)
        query = parse_qs(parts.query)
        body: Any = None
        if raw_body:
            try:
                body = json.loads(raw_body)
            except ValueError:
                body = raw_body.decode("utf-8", "replace")
        record = RecordedRequest(method, parts.path, query, content_type, body,
                                 authorization=authorization)
        with self._lock:
            self.requests.append(record)
        try:
            route = self._route(parts.path)
            if route is None:
                if parts.path == "/version":
                    record.status = 200
                    return 200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0"}, {}
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            record.attributes = self._attributes(method, route, query)
            fault = self._take_fault(method, parts.path)
            if fault is not None:
                if fault.kind == "lost-response":
                    try:
                        with self._lock:
                            record.status, _ = self._serve(method, route, query, content_type,
                                                           body)
                    except ApiError as error:
                        record.status = error.code
                if fault.on_strike is not None:
                    fault.on_strike()
                if fault.kind in ("timeout", "lost-response"):
                    record.status = record.status or -1
                    return -1, None, {}
                raise self._fault_error(fault, record.attributes, route)
            if self.authorizer is not None and not self.authorizer(record.attributes):
                raise forbidden(record.attributes, self.user)
            if record.attributes.verb == "watch":
                record.status = 200
                return 200, _Watch(route, query), {}
            with self._lock:
                code, result = self._serve(method, route, query, content_type, body)
            record.status = code
            return code, result, {}
        except ApiError as error:
            record.status = error.code
            return error.code, error.status(), error.headers

    def _take_fault(self, method: str, path: str) -> Fault | None:
        now = time.monotonic()
        with self._lock:
            for fault in self.faults:
                if fault.active(now) and fault.matches(method, path):
                    if fault.until is None:
                        fault.count -= 1
                    fault.served += 1
                    return fault
            return None

    def _fault_error(self, fault: Fault, attrs: RequestAttributes, route: _Route) -> ApiError:
        rt, name = route.rt, route.name
        match fault.kind:
            case "500":
                return ApiError(500, "InternalError", "Internal error occurred: injected fault")
            case "503":
                return ApiError(503, "ServiceUnavailable", "the server is currently unable to "
                                "handle the request")
            case "409":
                return conflict(rt, name)
            case "429":
                return ApiError(429, "TooManyRequests", "Too many requests, please try again "
                                "later.", {"retryAfterSeconds": 1}, {"Retry-After": "1"})
            case "403":
                return forbidden(attrs, self.user)
            case "401":
                return ApiError(401, "Unauthorized", "Unauthorized")
            case "404":
                return not_found(rt, name)
        raise ValueError(f"unknown fault {fault.kind!r}")

    def _route(self, path: str) -> _Route | None:
        segments = [s for s in path.split("/") if s]
        if len(segments) >= 2 and segments[0] == "api":
            group, version, rest = "", segments[1], segments[2:]
        elif len(segments) >= 3 and segments[0] == "apis":
            group, version, rest = segments[1], segments[2], segments[3:]
        else:
            return None
        namespace = ""
        if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) != 2:
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            return None
        rt = self.types.get((group, version, rest[0]))
        if rt is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        return _Route(rt, namespace, name, sub)

    @staticmethod
    def _attributes(method: str, route: _Route, query: dict[str, list[str]]) -> RequestAttributes:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
            method, "get")
        if method == "GET" and not route.name:
            verb = "watch" if query.get("watch", ["false"])[0] in ("true", "1") else "list"
        return RequestAttributes(verb, route.rt.group, route.rt.plural, route.subresource,
                                 route.namespace, route.name)

    def _serve(self, method: str, route: _Route, query: dict[str, list[str]],
               content_type: str, body: Any) -> tuple[int, JSON]:
        rt = route.rt
        if route.subresource not in ("", "scale", "status") or (
                route.subresource == "scale" and rt.scale is None) or (
                route.subresource == "status" and not rt.status_subresource):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if method == "GET" and not route.name:
            return 200, self._list(rt, route.namespace, query)
        if method == "POST" and not route.name:
            return 201, self._create(rt, route.namespace, body)
        if not route.name:
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on "
                           "the requested resource")
        key = (rt.group, rt.plural, route.namespace, route.name)
        stored = self._objects.get(key)
        if stored is None:
            raise not_found(rt, route.name)
        current = self._in_version(rt, stored)
        if method == "GET":
            view = self._scale_view(rt, current) if route.subresource == "scale" else current
            return 200, view
        if method == "DELETE":
            self._drop(key)
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                         "status": "Success", "details": _details(rt, route.name)}
        if method == "PUT":
            updated = self._check_body(rt, body, route)
            return 200, self._write(rt, route, current, updated)
        if method == "PATCH":
            base = self._scale_view(rt, current) if route.subresource == "scale" else current
            patched = self._apply_patch(rt, base, content_type, body)
            return 200, self._write(rt, route, current, patched)
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the "
                       "requested resource")

    def _list(self, rt: ResourceType, namespace: str, query: dict[str, list[str]]) -> JSON:
        selector = query.get("labelSelector", [""])[0]
        field_selector = query.get("fieldSelector", [""])[0]
        items = []
        for (g, p, ns, name), obj in sorted(self._objects.items()):
            if (g, p) != (rt.group, rt.plural) or (namespace and ns != namespace):
                continue
            if selector and not selector_matches(selector, obj["metadata"].get("labels") or {}):
                continue
            if field_selector and not selector_matches(
                    field_selector, {"metadata.name": name, "metadata.namespace": ns}):
                continue
            items.append(self._in_version(rt, obj))
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                "metadata": {"resourceVersion": str(self._current_rv)}, "items": items}

    def _check_body(self, rt: ResourceType, body: Any, route: _Route | None) -> JSON:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request is not a JSON object")
        expected_kind = "Scale" if route is not None and route.subresource == "scale" else rt.kind
        if body.get("kind") not in (None, expected_kind):
            raise ApiError(400, "BadRequest", f"the kind of the body {body.get('kind')!r} does "
                           f"not match the resource ({expected_kind})")
        metadata = body.setdefault("metadata", {})
        if route is not None:
            if metadata.get("name", route.name) != route.name:
                raise ApiError(400, "BadRequest", "the name of the object "
                               f"({metadata.get('name')}) does not match the name on the URL "
                               f"({route.name})")
            if metadata.get("namespace", route.namespace) != route.namespace:
                raise ApiError(400, "BadRequest", "the namespace of the object does not match "
                               "the namespace on the request")
        for dotted in rt.micro_time_fields:
            value = get_path(body, dotted)
            if value is not None and not (isinstance(value, str) and _MICRO_TIME.match(value)):
                raise ApiError(
                    400, "BadRequest",
                    f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
                    f'parsing time "{value}" as "2006-01-02T15:04:05.000000Z07:00": cannot '
                    'parse as ".000000"',
                )
        return body

    def _admit(self, rt: ResourceType, name: str, old: JSON | None, new: JSON) -> JSON:
        """Prune, default and validate ``new`` (in ``rt``'s version) as the API server does for a
        custom resource, run the admission webhooks on the storage version; the object to
        store."""
        if rt.schema is not None:
            new = k8s_crd.prune(new, rt.schema, root=True)
            errors = k8s_crd.validate(new, rt.schema, old=old)
            if errors:
                raise invalid(rt, name, errors)
        stored = self._to_storage(rt, new)
        before = None if old is None else self._to_storage(rt, old)
        for plural, webhook in self.admission:
            if plural == rt.plural:
                errors = webhook(before, stored, self.user)
                if errors:
                    raise invalid(rt, name, errors, webhook=k8s_crd.WEBHOOK)
        return stored

    @staticmethod
    def _dynamo_webhook(old: JSON | None, new: JSON, user: str) -> list[str]:
        return [] if old is None else k8s_crd.adapter_replica_errors(old, new, user)

    def _create(self, rt: ResourceType, namespace: str, body: Any) -> JSON:
        obj = self._check_body(rt, body, None)
        meta = obj["metadata"]
        if meta.get("namespace", namespace) != namespace:
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not "
                           "match the namespace sent on the request")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", f"{rt.kind} is invalid: metadata.name: Required value")
        if rt.plural == "events" and rt.group == "":
            involved = obj.get("involvedObject") or {}
            if involved.get("namespace", namespace) != namespace:
                raise ApiError(422, "Invalid", "Event is invalid: involvedObject.namespace: "
                               "Invalid value: does not match event.namespace")
        if rt is LEASES:
            duration = get_path(obj, "spec.leaseDurationSeconds")
            if duration is not None and (not isinstance(duration, int) or duration <= 0):
                raise ApiError(422, "Invalid", "Lease is invalid: spec.leaseDurationSeconds: "
                               "must be greater than 0")
        if (rt.group, rt.plural, namespace, meta["name"]) in self._objects:
            raise ApiError(409, "AlreadyExists",
                           f'{rt.group_resource} "{meta["name"]}" already exists',
                           _details(rt, meta["name"]))
        if rt.status_subresource:
            obj.pop("status", None)  # a create through the main resource sets no status
        stored = self._prepare_new(rt, self._admit(rt, meta["name"], None, obj), namespace)
        self._put(self._key(rt, stored), stored, "ADDED")
        answer = self._in_version(rt, stored)
        self._run_controller(rt, stored)
        return answer

    def _prepare_new(self, rt: ResourceType, obj: JSON, namespace: str) -> JSON:
        obj["apiVersion"] = f"{rt.group}/{rt.storage_version}" if rt.storage_version else \
            rt.api_version
        obj["kind"] = rt.kind
        meta = obj.setdefault("metadata", {})
        meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = self._bump()
        meta.setdefault("creationTimestamp", _rfc3339())
        meta["generation"] = 1
        return obj

    @staticmethod
    def _key(rt: ResourceType, obj: JSON) -> tuple[str, str, str, str]:
        meta = obj["metadata"]
        return rt.group, rt.plural, meta.get("namespace", ""), meta["name"]

    def _apply_patch(self, rt: ResourceType, base: JSON, content_type: str, body: Any) -> JSON:
        media = content_type.split(";")[0].strip().lower()
        if media == MERGE_PATCH:
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
            return merge_patch(base, body)
        if media == JSON_PATCH:
            return json_patch(base, body)
        if media == STRATEGIC_MERGE_PATCH and rt.builtin:
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "a strategic merge patch must be an object")
            return merge_patch(base, body)
        accepted = [JSON_PATCH, MERGE_PATCH, APPLY_PATCH]
        if rt.builtin:
            accepted.insert(2, STRATEGIC_MERGE_PATCH)
        raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown "
                       f"format - accepted media types include: {', '.join(accepted)}")

    def _write(self, rt: ResourceType, route: _Route, current: JSON, new: JSON) -> JSON:
        """Store ``new`` (the object, its Scale or its status, in ``rt``'s version) over
        ``current`` if its version is current."""
        self._check_body(rt, new, route)
        sent_rv = (new.get("metadata") or {}).get("resourceVersion")
        if sent_rv not in (None, "") and sent_rv != current["metadata"]["resourceVersion"]:
            raise conflict(rt, route.name)
        if route.subresource == "scale":
            assert rt.scale is not None
            replicas = get_path(new, "spec.replicas")
            if not isinstance(replicas, int) or replicas < 0:
                raise ApiError(422, "Invalid", f'Scale.autoscaling "{route.name}" is invalid: '
                               "spec.replicas: Invalid value: must be greater than or equal to 0")
            updated = copy.deepcopy(current)
            set_path(updated, rt.scale.spec_replicas, replicas)
        else:
            updated = copy.deepcopy(new)
            for immutable in ("uid", "creationTimestamp", "namespace", "name", "generation"):
                if immutable in current["metadata"]:
                    updated["metadata"][immutable] = current["metadata"][immutable]
            updated["apiVersion"], updated["kind"] = rt.api_version, rt.kind
            if rt.status_subresource and route.subresource == "status":
                updated["spec"] = copy.deepcopy(current.get("spec"))
            elif rt.status_subresource:
                updated["status"] = copy.deepcopy(current.get("status"))
                if updated["status"] is None:
                    del updated["status"]
        stored = self._admit(rt, route.name, current, updated)
        if stored.get("spec") != self._to_storage(rt, current).get("spec"):
            stored["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        key = (rt.group, rt.plural, route.namespace, route.name)
        self._put(key, stored, "MODIFIED", bump=True)
        answer = self._in_version(rt, stored)
        if route.subresource == "scale":
            answer = self._scale_view(rt, answer)
        self._run_controller(rt, stored)
        return answer

    def _scale_view(self, rt: ResourceType, obj: JSON) -> JSON:
        assert rt.scale is not None
        meta = obj["metadata"]
        selector = None
        if rt.scale.label_selector:
            selector = get_path(obj, rt.scale.label_selector)
        else:
            labels = get_path(obj, "spec.selector.matchLabels") or {}
            selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or None
        status: JSON = {"replicas": get_path(obj, rt.scale.status_replicas) or 0}
        if selector:
            status["selector"] = selector
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                                  "creationTimestamp") if k in meta},
                "spec": {"replicas": get_path(obj, rt.scale.spec_replicas) or 0},
                "status": status}

    def _live_pods(self, workload: JSON) -> list[JSON]:
        """The pods a Deployment's or StatefulSet's selector matches."""
        labels = get_path(workload, "spec.selector.matchLabels") or {}
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        namespace = workload["metadata"]["namespace"]
        return [o for (g, p, ns, _), o in sorted(self._objects.items())
                if (g, p, ns) == ("", "pods", namespace)
                and selector_matches(selector, o["metadata"].get("labels") or {})
                and not get_path(o, "metadata.deletionTimestamp")]

    def _run_controller(self, rt: ResourceType, obj: JSON, record: bool = True) -> None:
        """Let the controller act on the stored ``obj`` (storage version); a status it changes
        is a write of its own, as a controller's would be."""
        if self.controller is None:
            return
        before = copy.deepcopy(obj.get("status"))
        self.controller(self, rt, obj)
        if obj.get("status") != before and record:
            self._put(self._key(rt, obj), obj, "MODIFIED", bump=True)


def invalid(rt: ResourceType, name: str, errors: list[str], webhook: str | None = None) -> ApiError:
    """422 Invalid, worded as the API server (or a validating webhook through it) words it."""
    listed = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
    message = f'{rt.kind}.{rt.group} "{name}" is invalid: {listed}'
    if webhook is not None:
        message = f'admission webhook "{webhook}" denied the request: {message}'
    causes = []
    for error in errors:
        field_path, _, detail = error.partition(": ")
        causes.append({"reason": "FieldValueInvalid", "message": detail, "field": field_path})
    return ApiError(422, "Invalid", message, {"name": name, "group": rt.group, "kind": rt.kind,
                                              "causes": causes})


def _make_handler(server: KubeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # Headers and body are two writes: without this, Nagle's algorithm and the
            # client's delayed ACK add 40 ms to every keep-alive request.
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            code, body, headers = server.handle(self.command, self.path,
                                                self.headers.get("Content-Type", ""), raw,
                                                self.headers.get("Authorization", ""))
            if code == -1:  # an injected timeout: say nothing, then hang up
                time.sleep(server.timeout_delay_s)
                self.close_connection = True
                return
            if isinstance(body, _Watch):
                self._stream(body)
                return
            payload = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def _stream(self, watch: _Watch) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.close_connection = True
            try:
                for event in server.stream(watch):
                    line = json.dumps(event).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                return  # the client went away

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    return Handler


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[KubeApiServer]:
    server = KubeApiServer(**kwargs).start()
    try:
        yield server
    finally:
        server.stop()
