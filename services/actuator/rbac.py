"""The Kubernetes rights the actuator's calls need, named once, next to the code that makes them.

The Roles in ``deploy/`` are these rules written out: ``deploy/base/actuator-rbac.yaml`` holds
``LEADER_ELECTION``, ``deploy/base/actuator-workload-role.yaml`` every rule of ``WORKLOAD``, and
each overlay's ``workload-rbac.yaml`` the rules of its backend (``for_backend``), pinned by name
where it knows the names. tests/test_actuator_rbac.py compares the files with this module, and
drives every call of the actuator against an API server that enforces the files, so neither the
code, nor this list, nor the manifests can drift from the others unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LEASE_NAME = "slaplanner-actuator"


@dataclass(frozen=True)
class Rule:
    """One ``PolicyRule`` of a Role; ``why`` says which call needs it."""

    groups: tuple[str, ...]
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    why: str
    names: tuple[str, ...] = ()

    def grants(self) -> set[tuple[str, str, str]]:
        """(API group, resource[/subresource], verb) triples, as an authorizer checks them."""
        return {(g, r, v) for g in self.groups for r in self.resources for v in self.verbs}

    def as_manifest(self) -> dict[str, Any]:
        body: dict[str, Any] = {"apiGroups": list(self.groups), "resources": list(self.resources)}
        if self.names:
            body["resourceNames"] = list(self.names)
        body["verbs"] = list(self.verbs)
        return body


# In the actuator's own namespace: the one Lease that elects the active actuator (election.py).
LEADER_ELECTION = (
    # create cannot be limited by name: the name is not known before the object exists
    Rule(("coordination.k8s.io",), ("leases",), ("create",), "create the Lease once"),
    Rule(("coordination.k8s.io",), ("leases",), ("get", "update"), "read and renew the Lease",
         names=(LEASE_NAME,)),
)

DYNAMO = (
    Rule(("nvidia.com",), ("dynamographdeployments",), ("get", "list", "watch", "patch"),
         "the DGDs (watch cache); patch their replicas and the conditions annotation"),
    Rule(("nvidia.com",), ("dynamographdeployments/status",), ("patch",),
         "the condition that says a Dynamo Planner in the graph keeps slaplanner off it"),
    Rule(("nvidia.com",), ("dynamographdeploymentscalingadapters",), ("get", "list", "watch"),
         "their scaling adapters (watch cache)"),
    Rule(("nvidia.com",), ("dynamographdeploymentscalingadapters/scale",), ("get", "patch"),
         "scaled through the adapters' scale subresource"),
)
SCALE = (
    Rule(("apps",), ("deployments", "statefulsets"), ("get",),
         "read each workload (pause annotation, ready replicas)"),
    Rule(("apps",), ("deployments/scale", "statefulsets/scale"), ("get", "patch"),
         "scale it"),
    Rule(("leaderworkerset.x-k8s.io",), ("leaderworkersets",), ("get",),
         "read each LeaderWorkerSet"),
    Rule(("leaderworkerset.x-k8s.io",), ("leaderworkersets/scale",), ("get", "patch"),
         "scale it"),
)
# Both backends: Pending and ready pods behind a selector (list; watch for the dynamo backend's
# pod selectors), the other autoscalers that would own the workload, and the Events.
PODS = Rule(("",), ("pods",), ("list", "watch"), "Pending and ready pods behind a selector")
SHARED = (
    PODS,
    Rule(("autoscaling",), ("horizontalpodautoscalers",), ("list", "watch"),
         "one owner per workload: HPAs that target it (watch cache)"),
    Rule(("keda.sh",), ("scaledobjects",), ("list", "watch"),
         "one owner per workload: KEDA ScaledObjects that target it (watch cache)"),
    Rule(("",), ("events",), ("create",), "the Events on the objects scaled or refused"),
)
# Every rule any backend can use in a namespace whose workloads it scales.
WORKLOAD = DYNAMO + SCALE + SHARED


def for_backend(backend: str) -> tuple[Rule, ...]:
    """The rules one backend uses in a workload namespace."""
    own = {"dynamo": DYNAMO, "scale": SCALE}[backend]
    return own + SHARED


def grants(rules: tuple[Rule, ...]) -> set[tuple[str, str, str]]:
    return set().union(*(rule.grants() for rule in rules))
