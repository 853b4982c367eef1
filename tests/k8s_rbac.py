"""RBAC as the API server evaluates it, for checking the actuator's Roles against its calls.

A request is permitted when one rule of one Role matches it: the API group, the resource (with
its subresource written ``resource/subresource``), the verb, and (when the rule lists
``resourceNames``) the object's name; ``create`` and ``list`` carry no name, so a rule with
``resourceNames`` never permits them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes_validate.utils import resources_from_file

from tests.k8s_api_server import RequestAttributes

REPO = Path(__file__).resolve().parent.parent
RBAC_FILE = REPO / "deploy" / "base" / "actuator-rbac.yaml"
# Every right a backend can use in a workload namespace (a reference the overlays take subsets of).
WORKLOAD_ROLE_FILE = REPO / "deploy" / "base" / "actuator-workload-role.yaml"


@dataclass(frozen=True)
class Rule:
    role: str
    namespace: str
    groups: frozenset[str]
    resources: frozenset[str]
    verbs: frozenset[str]
    names: frozenset[str]

    def permits(self, attrs: RequestAttributes) -> bool:
        resource = attrs.resource + (f"/{attrs.subresource}" if attrs.subresource else "")
        return ((attrs.group in self.groups or "*" in self.groups)
                and (resource in self.resources or "*" in self.resources)
                and (attrs.verb in self.verbs or "*" in self.verbs)
                and (not self.names or attrs.name in self.names))

    def grants(self) -> set[tuple[str, str, str]]:
        return {(g, r, v) for g in self.groups for r in self.resources for v in self.verbs}


def documents(*paths: Path) -> list[dict[str, Any]]:
    """The objects of the files (default: the base RBAC and the workload Role reference)."""
    found: list[dict[str, Any]] = []
    for path in paths or (RBAC_FILE, WORKLOAD_ROLE_FILE):
        found += resources_from_file(str(path))
    return found


def rules(docs: list[dict[str, Any]] | None = None) -> list[Rule]:
    found = []
    for doc in docs if docs is not None else documents():
        if doc["kind"] not in ("Role", "ClusterRole"):
            continue
        for rule in doc.get("rules", []):
            found.append(Rule(doc["metadata"]["name"], doc["metadata"].get("namespace", ""),
                              frozenset(rule.get("apiGroups", [])),
                              frozenset(rule.get("resources", [])),
                              frozenset(rule.get("verbs", [])),
                              frozenset(rule.get("resourceNames", []))))
    return found


def permitted(attrs: RequestAttributes, all_rules: list[Rule]) -> bool:
    return any(rule.permits(attrs) for rule in all_rules)


def used(attrs: RequestAttributes) -> tuple[str, str, str]:
    resource = attrs.resource + (f"/{attrs.subresource}" if attrs.subresource else "")
    return attrs.group, resource, attrs.verb
