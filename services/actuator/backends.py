"""The backends behind ``WorkerSets``: Kubernetes (``dynamo``, ``scale``), NATS (``virtual``).

- ``dynamo``: one DynamoGraphDeployment; its prefill and decode services are found by their
  ``subComponentType`` (or configured names) and patched in one request (a JSON merge patch of
  ``spec.services.<name>.replicas``, or a JSON patch when the services are a list), guarded by the
  object's ``resourceVersion``.
- ``scale``: one workload per role with a ``scale`` subresource (Deployment, StatefulSet,
  LeaderWorkerSet, DynamoGraphDeploymentScalingAdapter, any custom resource with one), patched
  through that subresource, guarded by its ``resourceVersion``.
- ``virtual``: the target, after every check, published on a NATS subject for an orchestrator
  outside Kubernetes.

``build_router`` turns the settings and the mapping file into the router the core asks.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from services.actuator import status
from services.actuator.config import ActuatorConfig, DeploymentConfig, KindInfo, LimitsConfig
from services.actuator.core import (
    ROLES,
    BackendError,
    ConflictError,
    DryRunWorkerSets,
    EventReason,
    Limits,
    Notice,
    ObjectRef,
    Observed,
    Role,
    RoleState,
    Route,
    Step,
    WorkerSets,
    target_reason,
)
from services.actuator.inflight import InflightProbe
from services.actuator.informer import Informers, Source
from services.actuator.kube import (
    DELETION_COST,
    HPAS,
    JSON_PATCH,
    MERGE_PATCH,
    PODS,
    SCALED_OBJECTS,
    Kube,
)
from services.actuator.settings import ActuatorSettings
from shared.messages import DeploymentKey, ReplicaTarget, derived_id

log = logging.getLogger("slaplanner.actuator.backends")

JSON = dict[str, Any]
Publish = Callable[[str, bytes, str], Awaitable[None]]  # subject, body, message id

# A pod whose requests in flight cannot be read is kept as long as possible.
UNKNOWN_INFLIGHT_COST = 1_000_000
MAX_DELETION_COST = 2**31 - 1


def get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def involved(obj: JSON, kind: KindInfo) -> JSON:
    """An ``involvedObject`` reference to ``obj`` for an Event."""
    meta = obj.get("metadata") or {}
    return {"apiVersion": kind.api_version, "kind": kind.kind, "name": meta.get("name"),
            "namespace": meta.get("namespace"), "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion")}


def ready_pods(pods: list[JSON]) -> int:
    """Pods running, not terminating, with their Ready condition true."""
    return sum(1 for pod in pods if get_path(pod, "status.phase") == "Running"
               and not get_path(pod, "metadata.deletionTimestamp")
               and any(c.get("type") == "Ready" and c.get("status") == "True"
                       for c in get_path(pod, "status.conditions") or []))


def pending_replicas(pods: list[JSON], spec: int) -> int:
    """Pods the scheduler cannot place, plus replicas whose pods were not even created."""
    live = [p for p in pods if not get_path(p, "metadata.deletionTimestamp")
            and get_path(p, "status.phase") not in ("Succeeded", "Failed")]
    unschedulable = 0
    for pod in live:
        if get_path(pod, "status.phase") != "Pending":
            continue
        for condition in get_path(pod, "status.conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                unschedulable += 1
                break
    return unschedulable + max(0, spec - len(live))


@dataclass(frozen=True)
class KubeOptions:
    pause_annotation: str = "slaplanner.io/paused"
    deletion_cost: bool = True
    check_other_autoscalers: bool = True
    record_events: bool = True
    identity: str = "slaplanner-actuator"

    @classmethod
    def from_settings(cls, settings: ActuatorSettings, identity: str) -> KubeOptions:
        return cls(settings.pause_annotation, settings.pod_deletion_cost,
                   settings.check_other_autoscalers, settings.record_events, identity)

    def paused_by(self, obj: JSON, what: str) -> str | None:
        value = (get_path(obj, "metadata.annotations") or {}).get(self.pause_annotation)
        if str(value).strip().lower() == "true":
            return f'annotation {self.pause_annotation}="true" on {what}'
        return None


class Autoscalers:
    """HPAs and KEDA ScaledObjects per namespace, from the watch cache."""

    def __init__(self, informers: Informers) -> None:
        self.informers = informers

    async def _refs(self, namespace: str) -> list[tuple[str, str, str, str]]:
        """(owner, group, kind, name) of every scale target in the namespace."""
        refs: list[tuple[str, str, str, str]] = []
        hpas = await self.informers.synced(Source(HPAS, namespace))
        for hpa in hpas.items():
            ref = get_path(hpa, "spec.scaleTargetRef") or {}
            refs.append((f"HorizontalPodAutoscaler {namespace}/{get_path(hpa, 'metadata.name')}",
                         str(ref.get("apiVersion") or "").rpartition("/")[0],
                         str(ref.get("kind") or ""), str(ref.get("name") or "")))
        scaled_objects = await self.informers.synced(Source(SCALED_OBJECTS, namespace))
        for scaled in scaled_objects.items():  # none when KEDA is not installed
            ref = get_path(scaled, "spec.scaleTargetRef") or {}
            refs.append((f"ScaledObject {namespace}/{get_path(scaled, 'metadata.name')}",
                         str(ref.get("apiVersion") or "apps/v1").rpartition("/")[0],
                         str(ref.get("kind") or "Deployment"), str(ref.get("name") or "")))
        return refs

    async def targeting(self, namespace: str, targets: Iterable[tuple[KindInfo, str]]) -> list[str]:
        refs = await self._refs(namespace)
        found = []
        for kind, name in targets:
            for owner, group, ref_kind, ref_name in refs:
                if (group, ref_kind, ref_name) == (kind.group, kind.kind, name):
                    found.append(f"{owner} targets {kind.kind} {namespace}/{name}")
        return found


class _KubeWorkerSets:
    """What the two Kubernetes backends share: options, other autoscalers, Events."""

    backend_name = "kubernetes"
    applies = True

    def __init__(self, kube: Kube, options: KubeOptions, autoscalers: Autoscalers) -> None:
        self.kube = kube
        self.options = options
        self.autoscalers = autoscalers
        # The objects last read per deployment and role, for the Events about them.
        self._involved: dict[DeploymentKey, dict[Role, JSON]] = {}

    async def record(self, key: DeploymentKey, notices: Iterable[Notice], now: float) -> None:
        if not self.options.record_events:
            return
        objects = self._involved.get(key)
        if not objects:
            return
        # One Event per object and notice; refusals of both roles of one object (a DGD) merge.
        events: dict[tuple[int, str, int], tuple[JSON, Notice]] = {}
        for index, notice in enumerate(notices):
            roles = [notice.role] if notice.role is not None else list(ROLES)
            for ref in {id(objects[r]): objects[r] for r in roles if r in objects}.values():
                merge = notice.reason is EventReason.REFUSED_RESCALE
                slot = (id(ref), notice.reason, -1 if merge else index)
                entry = notice
                if slot in events:
                    first = events[slot][1]
                    entry = replace(first, message=f"{first.message}; {notice.message}")
                events[slot] = (ref, entry)
        for ref, notice in events.values():
            try:
                await self.kube.create_event(ref["namespace"], ref, notice.reason, notice.message,
                                             notice.warning, now, self.options.identity)
            except (BackendError, ConflictError) as exc:
                log.warning("%s: could not record the event %s: %s", key, notice.reason, exc)

    async def show(self, key: DeploymentKey, shown: status.Shown) -> None:
        return None  # the conditions go on DynamoGraphDeployments only (their annotation)


# ----------------------------------------------------------------------------- scale


@dataclass(frozen=True)
class ScaleTarget:
    kind: KindInfo
    namespace: str
    name: str
    ready_replicas_path: str = "status.readyReplicas"
    metrics_port: int | None = None
    metrics_path: str = "/metrics"

    def ref(self) -> ObjectRef:
        return ObjectRef(self.namespace, self.kind.kind, self.name)


@dataclass
class _ScaleSeen:
    target: ScaleTarget
    scale_version: str | None
    pods: list[JSON] | None = field(default=None, repr=False)


class ScaleWorkerSets(_KubeWorkerSets):
    backend_name = "scale"

    def __init__(self, kube: Kube, options: KubeOptions, autoscalers: Autoscalers,
                 probe: InflightProbe) -> None:
        super().__init__(kube, options, autoscalers)
        self.probe = probe
        self.targets: dict[DeploymentKey, dict[Role, ScaleTarget]] = {}

    def add(self, key: DeploymentKey, prefill: ScaleTarget, decode: ScaleTarget) -> None:
        self.targets[key] = {Role.PREFILL: prefill, Role.DECODE: decode}

    def objects(self, key: DeploymentKey) -> list[ObjectRef]:
        return [t.ref() for t in self.targets[key].values()]

    async def read(self, key: DeploymentKey) -> Observed:
        states: dict[Role, RoleState] = {}
        seen: dict[Role, _ScaleSeen] = {}
        involved_objects: dict[Role, JSON] = {}
        for role, target in self.targets[key].items():
            obj = await self.kube.get_object(target.kind, target.namespace, target.name)
            scale = await self.kube.get_scale(target.kind, target.namespace, target.name)
            spec = _int_or_none(get_path(scale, "spec.replicas")) or 0
            selector = get_path(scale, "status.selector")
            pods = await self.kube.list_pods(target.namespace, selector) if selector else None
            owners: list[str] = []
            if self.options.check_other_autoscalers:
                owners = await self.autoscalers.targeting(target.namespace,
                                                          [(target.kind, target.name)])
            what = str(target.ref())
            ready = _int_or_none(get_path(obj, target.ready_replicas_path))
            if ready is None and pods is not None:
                # e.g. a DynamoGraphDeploymentScalingAdapter: its status has no ready count,
                # but its scale names the pods behind it.
                ready = ready_pods(pods)
            states[role] = RoleState(
                spec=spec, ready=ready,
                pending=pending_replicas(pods, spec) if pods is not None else None,
                paused_by=self.options.paused_by(obj, what), owners=tuple(owners), obj=what)
            seen[role] = _ScaleSeen(target, get_path(scale, "metadata.resourceVersion"), pods)
            involved_objects[role] = involved(obj, target.kind)
        self._involved[key] = involved_objects
        return Observed(states[Role.PREFILL], states[Role.DECODE], seen)

    async def write(self, key: DeploymentKey, step: Step, observed: Observed | None,
                    target: ReplicaTarget,
                    shown: status.Shown | None = None) -> Mapping[Role, str]:
        assert observed is not None, "the scale backend always reads before it writes"
        seen: dict[Role, _ScaleSeen] = observed.handle
        via: dict[Role, str] = {}
        for role, replicas in sorted(step, key=lambda rs: rs[1] - observed.role(rs[0]).spec):
            item = seen[role]
            where = item.target
            if (replicas < observed.role(role).spec and self.options.deletion_cost
                    and where.kind.kind == "Deployment" and where.kind.group == "apps"
                    and item.pods):
                await self._mark_least_busy(where, item.pods)
            await self.kube.patch_scale(where.kind, where.namespace, where.name, replicas,
                                        item.scale_version)
            via[role] = f"{where.ref()}/scale"
        return via

    async def _mark_least_busy(self, where: ScaleTarget, pods: list[JSON]) -> None:
        """Give each running pod a deletion cost equal to its requests in flight."""
        running = [p for p in pods if get_path(p, "status.phase") == "Running"
                   and not get_path(p, "metadata.deletionTimestamp")]
        values = await asyncio.gather(*(self.probe.inflight(p, where.metrics_port,
                                                            where.metrics_path)
                                        for p in running))
        for pod, inflight in zip(running, values, strict=True):
            cost = UNKNOWN_INFLIGHT_COST if inflight is None else \
                min(MAX_DELETION_COST, max(0, round(inflight)))
            current = (get_path(pod, "metadata.annotations") or {}).get(DELETION_COST)
            if current != str(cost):
                try:
                    await self.kube.annotate_pod(where.namespace, get_path(pod, "metadata.name"),
                                                 DELETION_COST, str(cost))
                except BackendError as exc:
                    # Without the right to patch pods (the default RBAC does not grant it) the
                    # scale-down goes on; the ReplicaSet then picks the pods itself.
                    log.warning("%s: pod-deletion-cost not set (%s); scaling down without it",
                                where.ref(), exc)
                    return


# ----------------------------------------------------------------------------- dynamo


@dataclass(frozen=True)
class DynamoTarget:
    kind: KindInfo
    namespace: str
    name: str
    services: dict[Role, str | None] = field(default_factory=dict)  # configured names
    pod_selectors: dict[Role, str | None] = field(default_factory=dict)

    def ref(self) -> ObjectRef:
        return ObjectRef(self.namespace, self.kind.kind, self.name)


@dataclass
class _DynamoSeen:
    target: DynamoTarget
    version: str
    layout: str  # "services" (a map, v1alpha1) or "components" (a list, v1beta1)
    names: dict[Role, str]
    indexes: dict[Role, int]
    adapters: dict[Role, JSON | None]  # each role's scaling adapter, if the cache has one
    managed: dict[Role, bool]  # the component asks for a scaling adapter
    replicas: dict[Role, int | None]  # each component's replicas field as read (None: unset)
    annotations: dict[str, str] | None  # the DGD's annotations as read (None: the field is unset)


DEFAULT_DGD_KIND = KindInfo(kind="DynamoGraphDeployment", group="nvidia.com",
                            version="v1beta1", plural="dynamographdeployments")
PLANNER_CONDITION = "slaplanner.io/ScalingActive"
# Set to "true" on a DGD whose Dynamo Planner only observes (its ``no-operation`` mode).
ALLOW_DYNAMO_PLANNER = "slaplanner.io/allow-dynamo-planner"
ROLLING = ("Pending", "InProgress")


def adapter_kind(version: str) -> KindInfo:
    return KindInfo(kind="DynamoGraphDeploymentScalingAdapter", group="nvidia.com",
                    version=version, plural="dynamographdeploymentscalingadapters")


def adapter_name(dgd: str, service: str) -> str:
    """Dynamo's naming of a component's adapter: ``<dgd>-<component in lower case>``."""
    return f"{dgd}-{service.lower()}"


def _role_of(layout: str, service: JSON) -> str:
    if layout == "components":
        return str(service.get("type") or "")
    kind, sub = service.get("componentType", ""), service.get("subComponentType", "")
    return str(sub or kind or service.get("type") or "")


def _managed(layout: str, service: JSON) -> bool:
    adapter = service.get("scalingAdapter")
    if layout == "components":
        return isinstance(adapter, dict)  # v1beta1: presence opts in
    return isinstance(adapter, dict) and adapter.get("enabled") is True  # v1alpha1


def served_model(layout: str, service: JSON) -> str | None:
    """The model a component's workers serve, from its main container's command line:
    ``extraPodSpec.mainContainer`` (v1alpha1) or the container ``main`` (else the first) of
    ``podTemplate.spec.containers`` (v1beta1)."""
    if layout == "components":
        containers = [c for c in get_path(service, "podTemplate.spec.containers") or []
                      if isinstance(c, dict)]
        container = next((c for c in containers if c.get("name") == "main"),
                         containers[0] if containers else None)
    else:
        container = get_path(service, "extraPodSpec.mainContainer")
    if not isinstance(container, dict):
        return None
    words = [*(container.get("command") or []), *(container.get("args") or [])]
    return status.model_in_args(words)


def ready_condition(dgd: JSON) -> JSON | None:
    return next((c for c in get_path(dgd, "status.conditions") or []
                 if isinstance(c, dict) and c.get("type") == "Ready"), None)


class DynamoWorkerSets(_KubeWorkerSets):
    """A DynamoGraphDeployment, read from the watch cache, scaled through its components'
    scaling adapters where they exist (``/scale``) and by patching the DGD otherwise, as
    Dynamo's own planner does."""

    backend_name = "dynamo"

    def __init__(self, kube: Kube, options: KubeOptions, autoscalers: Autoscalers,
                 informers: Informers) -> None:
        super().__init__(kube, options, autoscalers)
        self.informers = informers
        self.targets: dict[DeploymentKey, DynamoTarget] = {}
        self._stale: set[DeploymentKey] = set()  # read from the API next time (a conflict)

    def add(self, key: DeploymentKey, target: DynamoTarget) -> None:
        self.targets[key] = target

    def target(self, key: DeploymentKey) -> DynamoTarget:
        """The configured DGD, or (for the default backend) the DGD named like the deployment."""
        return self.targets.get(key) or DynamoTarget(DEFAULT_DGD_KIND, key.namespace, key.name)

    def objects(self, key: DeploymentKey) -> list[ObjectRef]:
        return [self.target(key).ref()]

    @staticmethod
    def _services(dgd: JSON, what: str) -> tuple[str, dict[str, JSON], dict[str, int]]:
        services = get_path(dgd, "spec.services")
        if isinstance(services, dict):
            return "services", {k: v for k, v in services.items() if isinstance(v, dict)}, {}
        components = get_path(dgd, "spec.components")
        if isinstance(components, list):
            by_name = {str(c.get("name")): c for c in components if isinstance(c, dict)}
            indexes = {str(c.get("name")): i for i, c in enumerate(components)
                       if isinstance(c, dict)}
            return "components", by_name, indexes
        raise BackendError(f"{what} has neither spec.services nor spec.components")

    @staticmethod
    def _find(role: Role, configured: str | None, services: dict[str, JSON], layout: str,
              what: str) -> str:
        if configured is not None:
            if configured not in services:
                raise BackendError(f"{what} has no service {configured!r} (configured as the "
                                   f"{role} service); it has: {', '.join(sorted(services))}")
            return configured
        matches = [name for name, svc in services.items() if _role_of(layout, svc) == role.value]
        if len(matches) != 1:
            field_name = "type" if layout == "components" else "subComponentType"
            found = "no service" if not matches else f"several services ({', '.join(matches)})"
            raise BackendError(f"{what} has {found} with {field_name} {role.value!r}; "
                               f"set {role.value}_service in the actuator's configuration")
        return matches[0]

    async def _dgd(self, key: DeploymentKey, target: DynamoTarget) -> JSON:
        dgds = await self.informers.synced(Source(target.kind, target.namespace))
        dgd = dgds.get(target.name)
        if dgd is None or key in self._stale:
            # Not in the cache (a 404 says so, in words) or the cache lost a race: ask the API.
            dgd = await self.kube.get_object(target.kind, target.namespace, target.name)
            dgds.observe(dgd)
        return dgd

    def _planner(self, dgd: JSON, layout: str, services: dict[str, JSON], what: str) -> str | None:
        annotations = get_path(dgd, "metadata.annotations") or {}
        if str(annotations.get(ALLOW_DYNAMO_PLANNER, "")).strip().lower() == "true":
            return None
        planners = [name for name, svc in services.items()
                    if _role_of(layout, svc) == "planner"
                    or (layout == "services" and svc.get("componentType") == "planner")]
        if not planners:
            return None
        return (f"Dynamo Planner component {planners[0]!r} in {what} scales the same workers "
                f"(two planners would fight): remove that component from the DGD, or, if it "
                f"runs with no-operation: true, annotate the DGD {ALLOW_DYNAMO_PLANNER}=true")

    async def read(self, key: DeploymentKey) -> Observed:
        target = self.target(key)
        what = str(target.ref())
        dgd = await self._dgd(key, target)
        layout, services, indexes = self._services(dgd, what)
        names = {role: self._find(role, target.services.get(role), services, layout, what)
                 for role in ROLES}
        adapters_kind = adapter_kind(target.kind.version)
        adapters_cache = await self.informers.synced(Source(adapters_kind, target.namespace))
        adapters = {r: adapters_cache.get(adapter_name(target.name, names[r])) for r in ROLES}
        if key in self._stale:
            for role in ROLES:
                if adapters[role] is not None:
                    fresh = await self.kube.get_object(adapters_kind, target.namespace,
                                                       adapter_name(target.name, names[role]))
                    adapters_cache.observe(fresh)
                    adapters[role] = fresh
            self._stale.discard(key)
        owners: list[str] = []
        if self.options.check_other_autoscalers:
            owners = await self.autoscalers.targeting(
                target.namespace,
                [(target.kind, target.name),
                 *((adapters_kind, adapter_name(target.name, names[r])) for r in ROLES)])
        planner = self._planner(dgd, layout, services, what)
        if planner is not None:
            owners.append(planner)
            await self._say_planner_conflict(target, dgd, planner)
        paused = self.options.paused_by(dgd, what)
        statuses = get_path(dgd, "status.components") if layout == "components" else \
            get_path(dgd, "status.services")
        statuses = statuses if isinstance(statuses, dict) else {}
        condition = ready_condition(dgd)
        not_ready = None
        if condition is None or condition.get("status") != "True":
            not_ready = (f"{what} is not Ready ("
                         + (f"{condition.get('reason')}: {condition.get('message')}"
                            if condition else "no Ready condition yet") + ")")
        phase = get_path(dgd, "status.rollingUpdate.phase")
        annotations = get_path(dgd, "metadata.annotations")
        states: dict[Role, RoleState] = {}
        for role in ROLES:
            service = services[names[role]]
            status = statuses.get(names[role])
            status = status if isinstance(status, dict) else {}
            ready = _int_or_none(status.get("availableReplicas"))
            if ready is None:
                ready = _int_or_none(status.get("readyReplicas"))
            spec = _int_or_none(service.get("replicas"))
            spec = 1 if spec is None else spec  # unset: the operator's default of one
            adapter = adapters[role]
            if adapter is not None:  # the adapter's spec is the source of truth
                spec = _int_or_none(get_path(adapter, "spec.replicas")) or spec
            rollout = None
            if phase in ROLLING:
                rollout = f"rolling update of {what} is {phase}"
            elif (_int_or_none(status.get("updatedReplicas")) or 0) < (
                    _int_or_none(status.get("replicas")) or 0):
                rollout = (f"service {names[role]} is rolling out ({status.get('updatedReplicas')}"
                           f" of {status.get('replicas')} replicas updated)")
            pending = None
            selector = target.pod_selectors.get(role)
            if selector:
                pods = await self.informers.synced(Source(PODS, target.namespace, selector))
                pending = pending_replicas(pods.items(), spec)
            states[role] = RoleState(
                spec=spec, ready=ready, pending=pending, paused_by=paused, owners=tuple(owners),
                obj=f"{what} service {names[role]}",
                floor=_int_or_none(service.get("minAvailable")), not_ready=not_ready,
                rollout=rollout, model=served_model(layout, service))
        self._involved[key] = dict.fromkeys(ROLES, involved(dgd, target.kind))
        seen = _DynamoSeen(target, str(get_path(dgd, "metadata.resourceVersion")), layout,
                           names, {r: indexes.get(names[r], -1) for r in ROLES}, adapters,
                           {r: _managed(layout, services[names[r]]) for r in ROLES},
                           {r: _int_or_none(services[names[r]].get("replicas")) for r in ROLES},
                           annotations if isinstance(annotations, dict) else None)
        return Observed(states[Role.PREFILL], states[Role.DECODE], seen)

    async def _say_planner_conflict(self, target: DynamoTarget, dgd: JSON, text: str) -> None:
        """A condition on the DGD's status saying why slaplanner does not scale it (once)."""
        conditions = get_path(dgd, "status.conditions") or []
        for index, condition in enumerate(conditions):
            if condition.get("type") == PLANNER_CONDITION:
                if condition.get("status") == "False" and condition.get("message") == text:
                    return
                path = f"/status/conditions/{index}"
                op = "replace"
                break
        else:
            path, op = ("/status/conditions/-", "add") if isinstance(conditions, list) and \
                get_path(dgd, "status.conditions") is not None else ("/status/conditions", "add")
        condition = {
            "type": PLANNER_CONDITION, "status": "False", "reason": "DynamoPlannerPresent",
            "message": text, "observedGeneration": get_path(dgd, "metadata.generation") or 1,
            "lastTransitionTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        value: Any = [condition] if path == "/status/conditions" else condition
        ops: list[JSON] = [{"op": "test", "path": "/metadata/resourceVersion",
                            "value": get_path(dgd, "metadata.resourceVersion")}]
        if get_path(dgd, "status") is None:
            ops.append({"op": "add", "path": "/status", "value": {}})
        ops.append({"op": op, "path": path, "value": value})
        try:
            written = await self.kube.patch_status(target.kind, target.namespace, target.name,
                                                   ops)
        except (BackendError, ConflictError) as exc:
            log.warning("%s: could not set the condition %s: %s", target.ref(),
                        PLANNER_CONDITION, exc)
            return
        dgds = await self.informers.synced(Source(target.kind, target.namespace))
        dgds.observe(written)

    async def write(self, key: DeploymentKey, step: Step, observed: Observed | None,
                    target: ReplicaTarget,
                    shown: status.Shown | None = None) -> Mapping[Role, str]:
        assert observed is not None, "the dynamo backend always reads before it writes"
        seen: _DynamoSeen = observed.handle
        where = seen.target
        via: dict[Role, str] = {}
        direct: list[tuple[Role, int]] = []
        kind = adapter_kind(where.kind.version)
        for role, replicas in step:
            if seen.adapters[role] is None and not seen.managed[role]:
                direct.append((role, replicas))
                continue
            name = adapter_name(where.name, seen.names[role])
            adapter = seen.adapters[role]
            version = get_path(adapter, "metadata.resourceVersion") if adapter else None
            try:
                scale = await self.kube.patch_scale(kind, where.namespace, name, replicas,
                                                    version)
            except BackendError as exc:
                if exc.status != 404:
                    raise
                direct.append((role, replicas))  # no adapter after all: patch the DGD
                continue
            except ConflictError:
                self._stale.add(key)
                raise
            via[role] = f"{kind.kind} {where.namespace}/{name}/scale"
            if adapter is not None:
                updated = copy.deepcopy(adapter)
                updated["spec"]["replicas"] = replicas
                updated["metadata"]["resourceVersion"] = get_path(
                    scale, "metadata.resourceVersion")
                adapters = await self.informers.synced(Source(kind, where.namespace))
                adapters.observe(updated)
        if direct:
            try:
                written = await self._patch_dgd(seen, direct, shown)
            except ConflictError:
                self._stale.add(key)
                raise
            dgds = await self.informers.synced(Source(where.kind, where.namespace))
            dgds.observe(written)
            for role, _ in direct:
                via[role] = f"{where.kind.kind} {where.namespace}/{where.name}"
        return via

    async def _patch_dgd(self, seen: _DynamoSeen, step: list[tuple[Role, int]],
                         shown: status.Shown | None) -> JSON:
        """One patch: the replicas, and the conditions annotation with them (one write per
        target, and the conditions never claim a change the API server refused)."""
        where = seen.target
        conditions = None if shown is None else status.render(
            shown, (seen.annotations or {}).get(status.CONDITIONS_ANNOTATION))
        if seen.layout == "services":
            metadata: JSON = {"resourceVersion": seen.version}
            if conditions is not None:
                metadata["annotations"] = {status.CONDITIONS_ANNOTATION: conditions}
            body: JSON | list[JSON] = {
                "metadata": metadata,
                "spec": {"services": {seen.names[r]: {"replicas": n} for r, n in step}},
            }
            return await self.kube.patch_custom_object(where.kind, where.namespace, where.name,
                                                       body, MERGE_PATCH)
        # Each "test" pins the component the index points at and the replicas it was planned
        # from: a change of someone else's to them fails the patch (a conflict, read again),
        # while the operator's status updates in between do not. A component without replicas
        # cannot be tested that way: then the whole object's resourceVersion is the guard.
        ops: list[JSON] = []
        for role, replicas in step:
            index = seen.indexes[role]
            ops.append({"op": "test", "path": f"/spec/components/{index}/name",
                        "value": seen.names[role]})
            if seen.replicas[role] is not None:
                ops.append({"op": "test", "path": f"/spec/components/{index}/replicas",
                            "value": seen.replicas[role]})
            elif not ops or ops[0]["path"] != "/metadata/resourceVersion":
                ops.insert(0, {"op": "replace", "path": "/metadata/resourceVersion",
                               "value": seen.version})
            ops.append({"op": "add", "path": f"/spec/components/{index}/replicas",
                        "value": replicas})
        if conditions is not None:
            if seen.annotations is None:
                ops.append({"op": "add", "path": "/metadata/annotations",
                            "value": {status.CONDITIONS_ANNOTATION: conditions}})
            else:
                ops.append({"op": "add", "path": "/metadata/annotations/"
                            + status.CONDITIONS_ANNOTATION.replace("~", "~0").replace("/", "~1"),
                            "value": conditions})
        return await self.kube.patch_custom_object(where.kind, where.namespace, where.name, ops,
                                                   JSON_PATCH)

    async def show(self, key: DeploymentKey, shown: status.Shown) -> None:
        """The conditions annotation, written on its own when no scale write carried it and a
        condition's status or reason moved; the object is the watch cache's (no read)."""
        where = self.target(key)
        dgds = await self.informers.synced(Source(where.kind, where.namespace))
        dgd = dgds.get(where.name)
        if dgd is None:
            return
        previous = (get_path(dgd, "metadata.annotations") or {}).get(
            status.CONDITIONS_ANNOTATION)
        if not status.changed(previous, shown):
            return
        # A merge of one annotation: nobody else writes it, so no resourceVersion guard.
        body = {"metadata": {"annotations": {
            status.CONDITIONS_ANNOTATION: status.render(shown, previous)}}}
        try:
            written = await self.kube.patch_custom_object(where.kind, where.namespace,
                                                          where.name, body, MERGE_PATCH)
        except (BackendError, ConflictError) as exc:
            log.warning("%s: could not write the annotation %s: %s", where.ref(),
                        status.CONDITIONS_ANNOTATION, exc)
            return
        dgds.observe(written)


# ----------------------------------------------------------------------------- virtual


class VirtualWorkerSets:
    """Publishes the checked target for an orchestrator outside Kubernetes."""

    backend_name = "virtual"
    applies = True

    def __init__(self, publish: Publish, subject_pattern: str) -> None:
        self.publish = publish
        self.subject_pattern = subject_pattern
        self._published: dict[DeploymentKey, dict[Role, int]] = {}

    def objects(self, key: DeploymentKey) -> list[ObjectRef]:
        return []

    async def read(self, key: DeploymentKey) -> Observed | None:
        last = self._published.get(key)
        if last is None:
            return None
        return Observed(RoleState(last[Role.PREFILL]), RoleState(last[Role.DECODE]))

    async def write(self, key: DeploymentKey, step: Step, observed: Observed | None,
                    target: ReplicaTarget,
                    shown: status.Shown | None = None) -> Mapping[Role, str]:
        replicas = dict(self._published.get(key) or {})
        if observed is not None:
            replicas.update({r: observed.role(r).spec for r in ROLES if r not in replicas})
        replicas.update(dict(step))
        prefill = replicas.get(Role.PREFILL, target.prefill_replicas)
        decode = replicas.get(Role.DECODE, target.decode_replicas)
        message = ReplicaTarget(
            id=derived_id("virtual", f"{target.id}:{prefill}:{decode}"),
            deployment=key, window_end=target.window_end, window_s=target.window_s,
            policy=target.policy, prefill_replicas=prefill, decode_replicas=decode,
            forecast_id=target.forecast_id,
            explanation={"source_target_id": target.id, "reason": target_reason(target)},
        )
        subject = self.subject_pattern.format(namespace=key.namespace, name=key.name)
        try:
            await self.publish(subject, message.to_json(), message.id)
        except Exception as exc:  # whatever the bus raised: this target was not handed over
            raise BackendError(f"could not publish on {subject}: {exc!r}") from exc
        self._published[key] = {Role.PREFILL: prefill, Role.DECODE: decode}
        return dict.fromkeys((role for role, _ in step), subject)

    async def record(self, key: DeploymentKey, notices: Iterable[Notice], now: float) -> None:
        for notice in notices:  # the shell logs the outcome once; the details at debug
            log.debug("%s: %s: %s", key, notice.reason, notice.message)

    async def show(self, key: DeploymentKey, shown: status.Shown) -> None:
        return None  # the orchestrator outside reads the ScaleEvents


# ----------------------------------------------------------------------------- routing


def limits_for(settings: ActuatorSettings, override: LimitsConfig, where: str) -> Limits:
    """The global limits, tightened (never loosened) by a deployment's own."""

    def tighter(global_value: int, own: int | None, pick: Callable[[int, int], int]) -> int:
        return global_value if own is None else pick(global_value, own)

    limits = Limits(
        min_prefill=tighter(settings.min_prefill_replicas, override.min_prefill_replicas, max),
        max_prefill=tighter(settings.max_prefill_replicas, override.max_prefill_replicas, min),
        min_decode=tighter(settings.min_decode_replicas, override.min_decode_replicas, max),
        max_decode=tighter(settings.max_decode_replicas, override.max_decode_replicas, min),
        # GPUs per replica count towards the ceiling: a deployment may say more than the global
        # setting (its engines are bigger), never fewer, or it would loosen the ceiling.
        prefill_gpus=tighter(settings.prefill_engine_num_gpu, override.prefill_engine_num_gpu,
                             max),
        decode_gpus=tighter(settings.decode_engine_num_gpu, override.decode_engine_num_gpu, max),
        max_total_gpus=tighter(settings.max_total_gpus, override.max_total_gpus, min),
    )
    for role in ROLES:
        low, high = limits.bounds(role)
        if low > high:
            raise ValueError(f"{where}: {role} limits are empty (min {low} > max {high}) once "
                             "combined with the global settings")
    return limits


def needs_kubernetes(settings: ActuatorSettings, config: ActuatorConfig) -> bool:
    return settings.backend == "dynamo" or any(
        d.backend in ("dynamo", "scale") for d in config.deployment)


@dataclass
class MappedRouter:
    routes: dict[DeploymentKey, Route]
    default: Route | None
    refusal: str

    def route(self, key: DeploymentKey) -> Route | str:
        found = self.routes.get(key) or self.default
        return found if found is not None else self.refusal.format(key=key)


@dataclass
class Backends:
    """One instance of each backend, shared by the deployments that use it."""

    kube: Kube | None
    options: KubeOptions
    probe: InflightProbe
    publish: Publish | None
    settings: ActuatorSettings
    dry_run: DryRunWorkerSets = field(default_factory=DryRunWorkerSets)
    _dynamo: DynamoWorkerSets | None = None
    _scale: ScaleWorkerSets | None = None
    _virtual: VirtualWorkerSets | None = None
    _autoscalers: Autoscalers | None = None
    _informers: Informers | None = None

    def _kube(self) -> Kube:
        if self.kube is None:
            raise ValueError("a Kubernetes backend is configured but no Kubernetes client was "
                             "given")
        return self.kube

    def informers(self) -> Informers:
        if self._informers is None:
            kube = self._kube()
            self._informers = Informers(kube.list_raw, kube.health,
                                        sync_timeout_s=self.settings.kube_request_timeout_s * 3,
                                        watch_timeout_s=int(self.settings.watch_timeout_s),
                                        request_timeout_s=self.settings.kube_request_timeout_s)
        return self._informers

    def autoscalers(self) -> Autoscalers:
        if self._autoscalers is None:
            self._autoscalers = Autoscalers(self.informers())
        return self._autoscalers

    def dynamo(self) -> DynamoWorkerSets:
        if self._dynamo is None:
            self._dynamo = DynamoWorkerSets(self._kube(), self.options, self.autoscalers(),
                                            self.informers())
        return self._dynamo

    def scale(self) -> ScaleWorkerSets:
        if self._scale is None:
            self._scale = ScaleWorkerSets(self._kube(), self.options, self.autoscalers(),
                                          self.probe)
        return self._scale

    def virtual(self) -> VirtualWorkerSets:
        if self._virtual is None:
            if self.publish is None:
                raise ValueError("the virtual backend needs a NATS publisher")
            self._virtual = VirtualWorkerSets(self.publish, self.settings.virtual_subject)
        return self._virtual

    def for_entry(self, entry: DeploymentConfig) -> WorkerSets:
        key = entry.key
        if entry.backend == "scale":
            assert entry.scale is not None
            scale = self.scale()
            targets = []
            for obj in (entry.scale.prefill, entry.scale.decode):
                targets.append(ScaleTarget(obj.kind_info(), obj.namespace or key.namespace,
                                           obj.name, obj.ready_replicas_path, obj.metrics_port,
                                           obj.metrics_path))
            scale.add(key, targets[0], targets[1])
            return scale
        if entry.backend == "dynamo":
            own = entry.dynamo
            dynamo = self.dynamo()
            if own is not None:
                dynamo.add(key, DynamoTarget(
                    own.kind_info(), own.namespace or key.namespace, own.name or key.name,
                    {Role.PREFILL: own.prefill_service, Role.DECODE: own.decode_service},
                    {Role.PREFILL: own.prefill_pod_selector,
                     Role.DECODE: own.decode_pod_selector}))
            return dynamo
        if entry.backend == "virtual":
            return self.virtual()
        return self.dry_run


def build_router(settings: ActuatorSettings, config: ActuatorConfig, source: str,
                 backends: Backends) -> MappedRouter:
    routes: dict[DeploymentKey, Route] = {}
    for index, entry in enumerate(config.deployment):
        where = f"{source}: deployment[{index}] ({entry.namespace}/{entry.name})"
        routes[entry.key] = Route(backends.for_entry(entry),
                                  limits_for(settings, entry.limits, where))
    global_limits = limits_for(settings, LimitsConfig(), "settings")
    default: Route | None = None
    if settings.backend == "dry-run":
        default = Route(backends.dry_run, global_limits)
    elif settings.backend == "dynamo":
        default = Route(backends.dynamo(), global_limits)
    elif settings.backend == "virtual":
        default = Route(backends.virtual(), global_limits)
    refusal = (f"deployment {{key}} is not in the actuator's configuration ({source}) and the "
               "default backend is none")
    return MappedRouter(routes, default, refusal)
