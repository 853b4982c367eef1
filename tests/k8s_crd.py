"""Custom resources as the API server treats them, from the real CustomResourceDefinitions.

For ``tests/k8s_api_server.py``: a CRD file is loaded as one ``ResourceType`` per served version,
with its OpenAPI v3 schema. Every write is then handled as the API server does before it stores:
unknown fields are pruned, schema defaults applied, and the value validated (types, bounds, enums,
required fields, patterns, and the CEL rules of ``x-kubernetes-validations`` that this module
knows; see ``KNOWN_RULES``), answering 422 with the API server's own wording.

Dynamo's part (the CRDs are Dynamo's, ``tests/data/dynamo/README.md`` names the release): the
conversion between ``v1alpha1`` and the storage version ``v1beta1`` of DynamoGraphDeployments and
their scaling adapters (the fields the actuator reads or writes, as the operator's conversion
webhook maps them), the operator's validating webhook that refuses direct replica edits of
adapter-managed components, and a controller that behaves like the operator towards replicas.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

JSON = dict[str, Any]
DATA = Path(__file__).resolve().parent / "data" / "dynamo"
DGD_CRD = DATA / "nvidia.com_dynamographdeployments.yaml"
DGDSA_CRD = DATA / "nvidia.com_dynamographdeploymentscalingadapters.yaml"


@dataclass(frozen=True)
class CrdVersion:
    group: str
    version: str
    plural: str
    kind: str
    schema: JSON
    storage: bool
    subresources: JSON
    deprecated: bool


@cache
def load(path: Path) -> tuple[CrdVersion, ...]:
    """The served versions of the CRD in ``path``."""
    with path.open(encoding="utf-8") as handle:
        [crd] = [d for d in yaml.load_all(handle, Loader=yaml.CSafeLoader) if d]
    spec = crd["spec"]
    return tuple(CrdVersion(spec["group"], v["name"], spec["names"]["plural"],
                            spec["names"]["kind"], v["schema"]["openAPIV3Schema"],
                            bool(v.get("storage")), v.get("subresources") or {},
                            bool(v.get("deprecated")))
                 for v in spec["versions"] if v.get("served"))


# ----------------------------------------------------------------------------- pruning, defaults


def prune(value: Any, schema: JSON, root: bool = False) -> Any:
    """Drop the fields the structural schema does not know and fill in its defaults."""
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
            return value
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        result: JSON = {}
        for key, item in value.items():
            if root and key in ("apiVersion", "kind", "metadata"):
                result[key] = item
            elif properties is not None and key in properties:
                result[key] = prune(item, properties[key])
            elif isinstance(extra, dict):
                result[key] = prune(item, extra)
            elif properties is None and extra is None:
                result[key] = item  # a free-form object (type: object and nothing more)
            elif schema.get("x-kubernetes-preserve-unknown-fields"):
                result[key] = item
        for key, sub in (properties or {}).items():
            if key not in result and "default" in sub:
                result[key] = copy.deepcopy(sub["default"])
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"]) for item in value]
    return value


# ----------------------------------------------------------------------------- validation


def _has(obj: Any, key: str) -> bool:
    return isinstance(obj, dict) and key in obj


def _min_available_within_replicas(self: JSON, old: Any) -> bool:
    if not _has(self, "minAvailable"):
        return True
    if _has(self, "replicas") and self["replicas"] == 0:
        return True
    return bool(self["minAvailable"] <= (self["replicas"] if _has(self, "replicas") else 1))


def _min_available_immutable(self: JSON, old: Any) -> bool:
    return not _has(old, "minAvailable") or (
        _has(self, "minAvailable") and self["minAvailable"] == old["minAvailable"])


def _names_unique_ignoring_case(self: list[Any], old: Any) -> bool:
    names = [c["name"].lower() for c in self if _has(c, "name")]
    return len(names) == len(set(names))


# The CEL rules of Dynamo's CRDs this double evaluates, by their exact text in the CRD: a rule
# whose text changes upstream is no longer evaluated here (and the tests that rely on it fail).
# Rules not listed are not evaluated.
KNOWN_RULES: dict[str, Callable[[Any, Any], bool]] = {
    "!has(self.minAvailable) || (has(self.replicas) && self.replicas == 0) || "
    "self.minAvailable <= (has(self.replicas) ? self.replicas : 1)": _min_available_within_replicas,
    "!has(oldSelf.minAvailable) || (has(self.minAvailable) && self.minAvailable == "
    "oldSelf.minAvailable)": _min_available_immutable,
    "!has(self.eppConfig) || (has(self.type) && self.type == 'epp')":
        lambda self, old: not _has(self, "eppConfig") or self.get("type") == "epp",
    "self.filter(c, has(c.type) && c.type == 'epp').size() <= 1":
        lambda self, old: sum(1 for c in self if _has(c, "type") and c["type"] == "epp") <= 1,
    "self.all(c1, !has(c1.name) || self.filter(c2, has(c2.name) && c2.name.lowerAscii() == "
    "c1.name.lowerAscii()).size() == 1)": _names_unique_ignoring_case,
}

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float),
}


def _type_name(value: Any) -> str:
    for name, kinds in (("boolean", (bool,)), ("integer", (int,)), ("number", (float,)),
                        ("string", (str,)), ("array", (list,)), ("object", (dict,))):
        if isinstance(value, kinds):
            return name
    return "null"


def _shown(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps("object" if isinstance(value, dict) else "array")
    return json.dumps(value)


def validate(value: Any, schema: JSON, path: str = "", old: Any = None) -> list[str]:
    """Field errors, worded as the API server words them (``field.Error``)."""
    errors: list[str] = []
    where = path or "<root>"
    kind = schema.get("type")
    int_or_string = schema.get("x-kubernetes-int-or-string")
    if value is None:
        return []
    if int_or_string:
        if not isinstance(value, int | str) or isinstance(value, bool):
            errors.append(f"{where}: Invalid value: {_shown(value)}: {where} in body must be of "
                          f"type integer or string: {_shown(_type_name(value))}")
            return errors
    elif kind in _TYPES and (not isinstance(value, _TYPES[kind])
                             or (kind in ("integer", "number") and isinstance(value, bool))):
        errors.append(f"{where}: Invalid value: {_shown(_type_name(value))}: {where} in body "
                      f"must be of type {kind}: {_shown(_type_name(value))}")
        return errors
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: Invalid value: {value}: {where} in body should be greater "
                          f"than or equal to {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: Invalid value: {value}: {where} in body should be less "
                          f"than or equal to {schema['maximum']}")
    if isinstance(value, str):
        if "enum" in schema and value not in schema["enum"]:
            allowed = ", ".join(json.dumps(v) for v in schema["enum"])
            errors.append(f"{where}: Unsupported value: {json.dumps(value)}: supported values: "
                          f"{allowed}")
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{where}: Invalid value: {json.dumps(value)}: {where} in body should "
                          f"be at least {schema['minLength']} chars long")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{where}: Too long: may not be more than {schema['maxLength']} bytes")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: Invalid value: {json.dumps(value)}: {where} in body should "
                          f"match '{schema['pattern']}'")
    if isinstance(value, dict):
        for key in schema.get("required") or []:
            if key not in value:
                errors.append(f"{path + '.' if path else ''}{key}: Required value")
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key) or (extra if isinstance(extra, dict) else None)
            if sub is None or (not path and key in ("apiVersion", "kind", "metadata")):
                continue
            child = f"{path}.{key}" if key in properties else f"{path}[{key}]"
            child = child.lstrip(".")
            previous = old.get(key) if isinstance(old, dict) else None
            errors += validate(item, sub, child, previous)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{where}: Too many: {len(value)}: must have at most "
                          f"{schema['maxItems']} items")
        keys = schema.get("x-kubernetes-list-map-keys") or []
        old_by_key = {}
        if schema.get("x-kubernetes-list-type") == "map" and isinstance(old, list):
            old_by_key = {tuple(o.get(k) for k in keys): o for o in old if isinstance(o, dict)}
        for index, item in enumerate(value):
            previous = old_by_key.get(tuple(item.get(k) for k in keys)) \
                if isinstance(item, dict) and old_by_key else None
            errors += validate(item, schema["items"], f"{path}[{index}]", previous)
    for rule in schema.get("x-kubernetes-validations") or []:
        check = KNOWN_RULES.get(rule["rule"])
        if check is None or ("oldSelf" in rule["rule"] and old is None):
            continue
        if not check(value, old):
            errors.append(f"{where}: Invalid value: {_shown(value)}: {rule['message']}")
    return errors


# ----------------------------------------------------------------------------- Dynamo conversion

# Stored on the v1beta1 object: the v1alpha1 service fields the conversion does not map (the
# operator's webhook keeps such fields in annotations too), so a v1alpha1 client reads back what
# it wrote.
ALPHA_EXTRAS = "conversion.test/v1alpha1-services"
_ALPHA_MAPPED = {"componentType", "subComponentType", "replicas", "minAvailable",
                 "scalingAdapter", "multinode", "globalDynamoNamespace", "modelRef"}
_SPEC_COMMON = ("annotations", "labels", "backendFramework", "priorityClassName", "restart",
                "topologyConstraint", "experimental", "providerOverride")
_STATUS_COMMON = ("observedGeneration", "state", "conditions", "restart", "checkpoints",
                  "placement")
_REPLICA_STATUS = ("componentKind", "componentNames", "replicas", "updatedReplicas",
                   "readyReplicas", "availableReplicas")


def _component_from_service(name: str, service: JSON) -> JSON:
    component: JSON = {"name": name}
    kind, sub = service.get("componentType", ""), service.get("subComponentType", "")
    role = sub if kind == "worker" and sub in ("prefill", "decode") else kind
    if role:
        component["type"] = role
    for key in ("replicas", "minAvailable", "multinode", "globalDynamoNamespace", "modelRef"):
        if key in service:
            component[key] = copy.deepcopy(service[key])
    if (service.get("scalingAdapter") or {}).get("enabled"):
        component["scalingAdapter"] = {}
    return component


def _service_from_component(component: JSON, extras: JSON) -> JSON:
    service: JSON = copy.deepcopy(extras)
    role = component.get("type", "")
    if role in ("prefill", "decode"):
        service["componentType"], service["subComponentType"] = "worker", role
    elif role:
        service["componentType"] = role
    for key in ("replicas", "minAvailable", "multinode", "globalDynamoNamespace", "modelRef"):
        if key in component:
            service[key] = copy.deepcopy(component[key])
    if "scalingAdapter" in component:
        service["scalingAdapter"] = {"enabled": True}
    return service


def dgd_to_v1beta1(obj: JSON) -> JSON:
    out = {k: copy.deepcopy(v) for k, v in obj.items() if k not in ("spec", "status")}
    out["apiVersion"] = "nvidia.com/v1beta1"
    spec = obj.get("spec") or {}
    new_spec: JSON = {k: copy.deepcopy(spec[k]) for k in _SPEC_COMMON if k in spec}
    if "envs" in spec:
        new_spec["env"] = copy.deepcopy(spec["envs"])
    services = spec.get("services") or {}
    new_spec["components"] = [_component_from_service(n, s) for n, s in services.items()
                              if isinstance(s, dict)]
    extras = {n: {k: v for k, v in s.items() if k not in _ALPHA_MAPPED}
              for n, s in services.items() if isinstance(s, dict)}
    if any(extras.values()):
        meta = out.setdefault("metadata", {})
        meta.setdefault("annotations", {})[ALPHA_EXTRAS] = json.dumps(extras, sort_keys=True)
    out["spec"] = new_spec
    status = obj.get("status")
    if isinstance(status, dict):
        new_status: JSON = {k: copy.deepcopy(status[k]) for k in _STATUS_COMMON if k in status}
        new_status["components"] = {
            name: {k: copy.deepcopy(s[k]) for k in _REPLICA_STATUS if k in s}
            for name, s in (status.get("services") or {}).items()}
        if "rollingUpdate" in status:
            rolling = copy.deepcopy(status["rollingUpdate"])
            if "updatedServices" in rolling:
                rolling["updatedComponents"] = rolling.pop("updatedServices")
            new_status["rollingUpdate"] = rolling
        out["status"] = new_status
    return out


def dgd_to_v1alpha1(obj: JSON) -> JSON:
    out = {k: copy.deepcopy(v) for k, v in obj.items() if k not in ("spec", "status")}
    out["apiVersion"] = "nvidia.com/v1alpha1"
    annotations = (out.get("metadata") or {}).get("annotations") or {}
    extras = json.loads(annotations.pop(ALPHA_EXTRAS, "{}"))
    if "annotations" in out.get("metadata", {}) and not annotations:
        del out["metadata"]["annotations"]
    spec = obj.get("spec") or {}
    new_spec: JSON = {k: copy.deepcopy(spec[k]) for k in _SPEC_COMMON if k in spec}
    if "env" in spec:
        new_spec["envs"] = copy.deepcopy(spec["env"])
    new_spec["services"] = {c["name"]: _service_from_component(c, extras.get(c["name"], {}))
                            for c in spec.get("components") or [] if isinstance(c, dict)}
    out["spec"] = new_spec
    status = obj.get("status")
    if isinstance(status, dict):
        new_status: JSON = {k: copy.deepcopy(status[k]) for k in _STATUS_COMMON if k in status}
        services: JSON = {}
        for name, s in (status.get("components") or {}).items():
            entry = {k: copy.deepcopy(s[k]) for k in _REPLICA_STATUS if k in s}
            entry["componentName"] = (s.get("componentNames") or [name])[-1]
            services[name] = entry
        new_status["services"] = services
        if "rollingUpdate" in status:
            rolling = copy.deepcopy(status["rollingUpdate"])
            if "updatedComponents" in rolling:
                rolling["updatedServices"] = rolling.pop("updatedComponents")
            new_status["rollingUpdate"] = rolling
        out["status"] = new_status
    return out


def dgdsa_convert(obj: JSON, version: str) -> JSON:
    out = copy.deepcopy(obj)
    out["apiVersion"] = f"nvidia.com/{version}"
    ref = (out.get("spec") or {}).get("dgdRef")
    if isinstance(ref, dict):
        if version == "v1beta1" and "serviceName" in ref:
            ref["componentName"] = ref.pop("serviceName")
        elif version == "v1alpha1" and "componentName" in ref:
            ref["serviceName"] = ref.pop("componentName")
    return out


def dgd_convert(obj: JSON, version: str) -> JSON:
    current = str(obj.get("apiVersion", "")).rpartition("/")[2]
    if current == version:
        return copy.deepcopy(obj)
    return dgd_to_v1beta1(obj) if version == "v1beta1" else dgd_to_v1alpha1(obj)


# ----------------------------------------------------------------------------- Dynamo's operator

OPERATOR_USER = "system:serviceaccount:dynamo-system:dynamo-operator-controller-manager"
PLANNER_SERVICE_ACCOUNT = "planner-serviceaccount"
WEBHOOK = "vdynamographdeployment.kb.io"
ADAPTER_MESSAGE = ("cannot be modified directly when scaling adapter is enabled; scale or update "
                   "the related DynamoGraphDeploymentScalingAdapter instead")


def may_modify_replicas(user: str) -> bool:
    """The webhook's ``CanModifyDGDReplicas``: the operator, or any planner service account."""
    if not user.startswith("system:serviceaccount:"):
        return False
    parts = user.split(":")
    return user == OPERATOR_USER or (len(parts) == 4 and parts[3] == PLANNER_SERVICE_ACCOUNT)


def adapter_replica_errors(old: JSON, new: JSON, user: str) -> list[str]:
    """The validating webhook's refusal of direct replica edits (both objects in v1beta1)."""
    if may_modify_replicas(user):
        return []
    before = {c.get("name"): c for c in (old.get("spec") or {}).get("components") or []}
    errors = []
    for index, component in enumerate((new.get("spec") or {}).get("components") or []):
        previous = before.get(component.get("name"))
        if previous is None:
            continue
        managed = "scalingAdapter" in component or "scalingAdapter" in previous
        if managed and component.get("replicas", 1) != previous.get("replicas", 1):
            errors.append(f"spec.components[{index}].replicas: Forbidden: {ADAPTER_MESSAGE}")
    return errors


def adapter_name(dgd_name: str, component: str) -> str:
    return f"{dgd_name}-{component.lower()}"


def pod_selector(dgd_name: str, component: str) -> str:
    return (f"nvidia.com/dynamo-component={component},"
            f"nvidia.com/dynamo-graph-deployment-name={dgd_name}")
