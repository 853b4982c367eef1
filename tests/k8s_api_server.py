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
  carry exactly six fractional digits, or the request answers 400 as a real server does.

Tests can inject faults (the next N matching requests, or every matching request for a period,
answer 500, 503, 409, 429, 403, 401, 404 or time out, or are served and then never answered, as
when a response is lost), plug in an authorizer (for instance one built from an RBAC Role),
simulate controllers (status follows spec at once, or by hand), and read the log of every request
(verb, path, content type, status) to assert on the exact calls a client made.
"""

from __future__ import annotations

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
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

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
DGDS = ResourceType("nvidia.com", "v1alpha1", "dynamographdeployments", "DynamoGraphDeployment",
                    builtin=False)
DGDSAS = ResourceType(
    "nvidia.com", "v1alpha1", "dynamographdeploymentscalingadapters",
    "DynamoGraphDeploymentScalingAdapter", builtin=False,
    scale=ScalePaths(label_selector="status.selector"),
)
LEADER_WORKER_SETS = ResourceType(
    "leaderworkerset.x-k8s.io", "v1", "leaderworkersets", "LeaderWorkerSet", builtin=False,
    scale=ScalePaths(label_selector="status.hpaPodSelector"),
)

DEFAULT_TYPES = (DEPLOYMENTS, STATEFULSETS, PODS, EVENTS, EVENTS_V1, LEASES, HPAS,
                 SCALED_OBJECTS, DGDS, DGDSAS, LEADER_WORKER_SETS)


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
    """

    def __init__(self, unschedulable: set[str] | None = None, ready: bool = True) -> None:
        self.unschedulable = unschedulable if unschedulable is not None else set()
        self.ready = ready

    def __call__(self, server: KubeApiServer, rt: ResourceType, obj: JSON) -> None:
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
        elif rt is DGDS:
            statuses = obj.setdefault("status", {}).setdefault("services", {})
            for name, service in (get_path(obj, "spec.services") or {}).items():
                replicas = service.get("replicas", 1)
                ready = replicas if self.ready else 0
                statuses[name] = {"componentKind": "Deployment", "componentName": name,
                                  "replicas": replicas, "updatedReplicas": replicas,
                                  "readyReplicas": ready, "availableReplicas": ready}

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
                server._objects[server._key(PODS, stored)] = stored
        elif len(live) > want:
            def rank(pod: JSON) -> tuple[int, int, str]:
                annotations = pod["metadata"].get("annotations") or {}
                cost = int(annotations.get("controller.kubernetes.io/pod-deletion-cost", "0"))
                running = get_path(pod, "status.phase") == "Running"
                return (1 if running else 0, cost, pod["metadata"]["name"])

            order = sorted(live, key=lambda p: p["metadata"]["name"], reverse=True) \
                if rt is STATEFULSETS else sorted(live, key=rank)
            for pod in order[:len(live) - want]:
                del server._objects[server._key(PODS, pod)]


instant_ready = ReplicaController()


# ----------------------------------------------------------------------------- the server


@dataclass
class _Route:
    rt: ResourceType
    namespace: str
    name: str
    subresource: str


class KubeApiServer:
    """Start with ``start()`` (or use as a context manager); ``url`` is ``http://127.0.0.1:PORT``."""

    def __init__(self, types: tuple[ResourceType, ...] = DEFAULT_TYPES,
                 controller: Controller | None = instant_ready,
                 timeout_delay_s: float = 1.5,
                 user: str = "system:serviceaccount:slaplanner:slaplanner-actuator") -> None:
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        for rt in types:
            self.register(rt)
        self.controller = controller
        self.timeout_delay_s = timeout_delay_s
        self.user = user
        self.authorizer: Callable[[RequestAttributes], bool] | None = None
        self.requests: list[RecordedRequest] = []
        self.faults: list[Fault] = []
        self._objects: dict[tuple[str, str, str, str], JSON] = {}
        self._rv = itertools.count(1000)
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> KubeApiServer:
        handler = _make_handler(self)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,),
                                        name="kube-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
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
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

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

    def add(self, rt: ResourceType, obj: JSON) -> JSON:
        """Store an object as if created by someone else (no request is logged)."""
        with self._lock:
            stored = self._prepare_new(rt, copy.deepcopy(obj), obj["metadata"].get("namespace", ""))
            self._objects[self._key(rt, stored)] = stored
            self._run_controller(rt, stored)
            return copy.deepcopy(stored)

    def get(self, rt: ResourceType, namespace: str, name: str) -> JSON:
        with self._lock:
            obj = self._objects.get((rt.group, rt.plural, namespace, name))
            if obj is None:
                raise KeyError(f"{rt.plural} {namespace}/{name}")
            return copy.deepcopy(obj)

    def objects_of(self, rt: ResourceType, namespace: str | None = None) -> list[JSON]:
        with self._lock:
            return [copy.deepcopy(o) for (g, p, ns, _), o in sorted(self._objects.items())
                    if (g, p) == (rt.group, rt.plural) and namespace in (None, ns)]

    def mutate(self, rt: ResourceType, namespace: str, name: str,
               change: Callable[[JSON], None], run_controller: bool = False) -> JSON:
        """Change a stored object as another client would (a new resourceVersion)."""
        with self._lock:
            obj = self._objects[(rt.group, rt.plural, namespace, name)]
            change(obj)
            obj["metadata"]["resourceVersion"] = str(next(self._rv))
            if run_controller:
                self._run_controller(rt, obj)
            return copy.deepcopy(obj)

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

    # -- request handling

    def handle(self, method: str, raw_path: str, content_type: str, raw_body: bytes,
               authorization: str = "") -> tuple[int, JSON | None, dict[str, str]]:
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
        if route.subresource and route.subresource != "scale":
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if route.subresource == "scale" and rt.scale is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if method == "GET" and not route.name:
            return 200, self._list(rt, route.namespace, query)
        if method == "POST" and not route.name:
            return 201, self._create(rt, route.namespace, body)
        if not route.name:
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on "
                           "the requested resource")
        key = (rt.group, rt.plural, route.namespace, route.name)
        current = self._objects.get(key)
        if current is None:
            raise not_found(rt, route.name)
        if method == "GET":
            view = self._scale_view(rt, current) if route.subresource else current
            return 200, copy.deepcopy(view)
        if method == "DELETE":
            del self._objects[key]
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                         "status": "Success", "details": _details(rt, route.name)}
        if method == "PUT":
            updated = self._check_body(rt, body, route)
            return 200, self._write(rt, route, current, updated)
        if method == "PATCH":
            base = self._scale_view(rt, current) if route.subresource else current
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
            items.append(copy.deepcopy(obj))
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                "metadata": {"resourceVersion": str(next(self._rv))}, "items": items}

    def _check_body(self, rt: ResourceType, body: Any, route: _Route | None) -> JSON:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request is not a JSON object")
        expected_kind = "Scale" if route is not None and route.subresource else rt.kind
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
        stored = self._prepare_new(rt, obj, namespace)
        self._objects[self._key(rt, stored)] = stored
        self._run_controller(rt, stored)
        return copy.deepcopy(stored)

    def _prepare_new(self, rt: ResourceType, obj: JSON, namespace: str) -> JSON:
        obj["apiVersion"] = rt.api_version
        obj["kind"] = rt.kind
        meta = obj.setdefault("metadata", {})
        meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = str(next(self._rv))
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
        """Store ``new`` (the object, or its Scale) over ``current`` if its version is current."""
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
            stored = copy.deepcopy(current)
            set_path(stored, rt.scale.spec_replicas, replicas)
        else:
            stored = copy.deepcopy(new)
            for immutable in ("uid", "creationTimestamp", "namespace", "name"):
                stored["metadata"][immutable] = current["metadata"].get(immutable)
            stored["apiVersion"], stored["kind"] = rt.api_version, rt.kind
        if stored.get("spec") != current.get("spec"):
            stored["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        stored["metadata"]["resourceVersion"] = str(next(self._rv))
        self._objects[(rt.group, rt.plural, route.namespace, route.name)] = stored
        answer = self._scale_view(rt, stored) if route.subresource else copy.deepcopy(stored)
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

    def _run_controller(self, rt: ResourceType, obj: JSON) -> None:
        if self.controller is None:
            return
        before = copy.deepcopy(obj.get("status"))
        self.controller(self, rt, obj)
        if obj.get("status") != before:
            # A status update is a write of its own, as a controller's would be.
            obj["metadata"]["resourceVersion"] = str(next(self._rv))


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
            payload = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    return Handler


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[KubeApiServer]:
    server = KubeApiServer(**kwargs).start()
    try:
        yield server
    finally:
        server.stop()
