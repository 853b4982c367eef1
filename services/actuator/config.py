"""The actuator's mapping file: which objects back each deployment, and what it may touch.

TOML (``.toml``) or JSON (``.json``)::

    [[allow]]
    namespace = "prod"
    kind = "DynamoGraphDeployment"
    name = "llama"

    [[deployment]]
    namespace = "prod"
    name = "llama"
    backend = "dynamo"                       # dynamo, scale, virtual or dry-run
    dynamo = { prefill_service = "VllmPrefillWorker", decode_service = "VllmDecodeWorker" }

    [[deployment]]
    namespace = "prod"
    name = "qwen"
    backend = "scale"
    scale.prefill = { kind = "Deployment", name = "qwen-prefill" }
    scale.decode = { kind = "LeaderWorkerSet", name = "qwen-decode" }

Every error names the file and the field (``deploy.toml: deployment[1].scale.decode.kind: ...``).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.actuator.core import ObjectRef
from shared.messages import DNS_LABEL, MAX_REPLICAS, DeploymentKey

# DNS-1123 subdomain: what Kubernetes allows for most object names.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
KIND = r"^[A-Z][A-Za-z0-9]{0,62}$"


class KindInfo(BaseModel):
    """Where the API serves a kind: group, version and plural resource name."""

    model_config = ConfigDict(frozen=True)
    kind: str
    group: str
    version: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KNOWN_KINDS: dict[str, KindInfo] = {
    info.kind: info for info in (
        KindInfo(kind="Deployment", group="apps", version="v1", plural="deployments"),
        KindInfo(kind="StatefulSet", group="apps", version="v1", plural="statefulsets"),
        KindInfo(kind="LeaderWorkerSet", group="leaderworkerset.x-k8s.io", version="v1",
                 plural="leaderworkersets"),
        KindInfo(kind="DynamoGraphDeploymentScalingAdapter", group="nvidia.com",
                 version="v1beta1", plural="dynamographdeploymentscalingadapters"),
        KindInfo(kind="DynamoGraphDeployment", group="nvidia.com", version="v1beta1",
                 plural="dynamographdeployments"),
    )
}


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ObjectConfig(_Strict):
    """One workload with a ``scale`` subresource."""

    kind: str = Field(pattern=KIND, description="Deployment, StatefulSet, LeaderWorkerSet, ...")
    name: str = Field(pattern=DNS_SUBDOMAIN)
    namespace: str | None = Field(default=None, pattern=DNS_LABEL,
                                  description="default: the deployment's namespace")
    api_version: str | None = Field(
        default=None, pattern=r"^([a-z0-9.-]+/)?v[0-9a-z]+$",
        description="group/version; required for kinds not built in")
    plural: str | None = Field(default=None, pattern=r"^[a-z0-9]+$",
                               description="resource name; required for kinds not built in")
    ready_replicas_path: str = Field(
        default="status.readyReplicas", pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$",
        description="where the object reports its ready replicas")
    metrics_port: int | None = Field(default=None, ge=1, le=65535,
                                     description="port of the worker pods' /metrics")
    metrics_path: str = Field(default="/metrics", pattern=r"^/")

    @model_validator(mode="after")
    def _kind_known_or_spelled_out(self) -> Self:
        known = KNOWN_KINDS.get(self.kind)
        if known is None and (self.api_version is None or self.plural is None):
            raise ValueError(f"kind {self.kind!r} is not built in: give api_version and plural")
        if known is not None and self.kind == "DynamoGraphDeployment":
            raise ValueError("a DynamoGraphDeployment has no scale subresource: use the dynamo "
                             "backend, or its DynamoGraphDeploymentScalingAdapters")
        return self

    def kind_info(self) -> KindInfo:
        known = KNOWN_KINDS.get(self.kind)
        group, _, version = (self.api_version or "").rpartition("/")
        if known is None:
            assert self.api_version is not None and self.plural is not None
            return KindInfo(kind=self.kind, group=group, version=version, plural=self.plural)
        if self.api_version is None:
            return known
        return KindInfo(kind=self.kind, group=group, version=version,
                        plural=self.plural or known.plural)


class DynamoConfig(_Strict):
    """A DynamoGraphDeployment whose prefill and decode services are scaled."""

    name: str | None = Field(default=None, pattern=DNS_SUBDOMAIN,
                             description="the DGD's name; default: the deployment's name")
    namespace: str | None = Field(default=None, pattern=DNS_LABEL)
    api_version: str = Field(default="nvidia.com/v1beta1",
                             pattern=r"^nvidia\.com/v[0-9a-z]+$",
                             description="the version to read and write: v1beta1 (the storage "
                             "version of current Dynamo releases) or v1alpha1 (older ones)")
    prefill_service: str | None = Field(
        default=None, min_length=1, max_length=253,
        description="service name; default: the service whose subComponentType is prefill")
    decode_service: str | None = Field(
        default=None, min_length=1, max_length=253,
        description="service name; default: the service whose subComponentType is decode")
    prefill_pod_selector: str | None = Field(
        default=None, max_length=1024, description="label selector of the prefill pods")
    decode_pod_selector: str | None = Field(
        default=None, max_length=1024, description="label selector of the decode pods")

    def kind_info(self) -> KindInfo:
        group, _, version = self.api_version.rpartition("/")
        return KindInfo(kind="DynamoGraphDeployment", group=group, version=version,
                        plural="dynamographdeployments")


class ScaleConfig(_Strict):
    prefill: ObjectConfig
    decode: ObjectConfig


class LimitsConfig(_Strict):
    """Tighter limits for one deployment; the global settings stay the hard outer bound."""

    min_prefill_replicas: int | None = Field(default=None, ge=0, le=MAX_REPLICAS)
    max_prefill_replicas: int | None = Field(default=None, ge=0, le=MAX_REPLICAS)
    min_decode_replicas: int | None = Field(default=None, ge=0, le=MAX_REPLICAS)
    max_decode_replicas: int | None = Field(default=None, ge=0, le=MAX_REPLICAS)
    prefill_engine_num_gpu: int | None = Field(default=None, ge=1, le=64)
    decode_engine_num_gpu: int | None = Field(default=None, ge=1, le=64)
    max_total_gpus: int | None = Field(default=None, ge=1)


class DeploymentConfig(_Strict):
    namespace: str = Field(pattern=DNS_LABEL)
    name: str = Field(pattern=DNS_LABEL)
    backend: Literal["dynamo", "scale", "virtual", "dry-run"]
    dynamo: DynamoConfig | None = None
    scale: ScaleConfig | None = None
    limits: LimitsConfig = LimitsConfig()

    @model_validator(mode="after")
    def _backend_has_its_table(self) -> Self:
        if self.backend == "scale" and self.scale is None:
            raise ValueError("backend 'scale' needs a scale table with prefill and decode")
        if self.backend != "scale" and self.scale is not None:
            raise ValueError(f"a scale table is given but the backend is {self.backend!r}")
        if self.backend != "dynamo" and self.dynamo is not None:
            raise ValueError(f"a dynamo table is given but the backend is {self.backend!r}")
        return self

    @property
    def key(self) -> DeploymentKey:
        return DeploymentKey(namespace=self.namespace, name=self.name)


class AllowConfig(_Strict):
    namespace: str = Field(pattern=DNS_LABEL)
    kind: str = Field(pattern=KIND)
    name: str = Field(pattern=DNS_SUBDOMAIN)

    def ref(self) -> ObjectRef:
        return ObjectRef(self.namespace, self.kind, self.name)


class ActuatorConfig(_Strict):
    allow: list[AllowConfig] = Field(default_factory=list)
    deployment: list[DeploymentConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_entry_per_deployment(self) -> Self:
        seen: set[tuple[str, str]] = set()
        for entry in self.deployment:
            if (entry.namespace, entry.name) in seen:
                raise ValueError(f"deployment {entry.namespace}/{entry.name} is listed twice")
            seen.add((entry.namespace, entry.name))
        return self

    def allowlist(self) -> frozenset[ObjectRef]:
        return frozenset(a.ref() for a in self.allow)

    def by_key(self) -> dict[DeploymentKey, DeploymentConfig]:
        return {d.key: d for d in self.deployment}


class ConfigError(ValueError):
    """A mapping file that cannot be used; the message names the file and the field."""


def _where(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text or "(top level)"


def parse(data: Any, source: str) -> ActuatorConfig:
    try:
        return ActuatorConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: {_where(tuple(e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def load(path: str | Path) -> ActuatorConfig:
    """Read and validate a mapping file (``.toml`` or ``.json``)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(raw)
        elif path.suffix == ".toml":
            data = tomllib.loads(raw.decode("utf-8"))
        else:
            raise ConfigError(f"{path}: unknown format; name it .toml or .json")
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from None
    return parse(data, str(path))
