"""Actuator settings: the default backend, the hard limits, Kubernetes access and the safety rules.

Which objects back which deployment (and the allowlist) live in the mapping file named by
``config_file`` (see ``services/actuator/config.py`` and ``docs/actuator.md``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from shared.messages import MAX_REPLICAS
from shared.partition import ReplicaIndex
from shared.service_settings import DEFAULT_HTTP_PORTS, ServiceSettings, http_port_field
from shared.settings import CommaList, DurationS


class ActuatorSettings(ServiceSettings):
    http_port: int = http_port_field(DEFAULT_HTTP_PORTS["actuator"])
    backend: Literal["dry-run", "dynamo", "virtual", "none"] = Field(
        default="dry-run",
        description="backend for deployments the config file does not list: dry-run (report "
        "only), dynamo (the DynamoGraphDeployment named like the deployment, if allowlisted), "
        "virtual (publish on NATS), none (refuse them)",
    )
    config_file: str | None = Field(
        default=None,
        description="TOML or JSON file mapping deployments to backends and objects, with the "
        "allowlist of objects the actuator may touch",
    )
    min_prefill_replicas: int = Field(default=1, ge=0, le=MAX_REPLICAS,
                                      description="hard floor for prefill workers")
    max_prefill_replicas: int = Field(default=64, ge=0, le=MAX_REPLICAS,
                                      description="hard ceiling for prefill workers")
    min_decode_replicas: int = Field(default=1, ge=0, le=MAX_REPLICAS,
                                     description="hard floor for decode workers")
    max_decode_replicas: int = Field(default=64, ge=0, le=MAX_REPLICAS,
                                     description="hard ceiling for decode workers")
    prefill_engine_num_gpu: int = Field(default=1, ge=1, le=64,
                                        description="GPUs per prefill worker")
    decode_engine_num_gpu: int = Field(default=1, ge=1, le=64,
                                       description="GPUs per decode worker")
    max_total_gpus: int = Field(default=64, ge=1, description="GPU ceiling over both roles")

    kube_api_url: str | None = Field(
        default=None,
        description="Kubernetes API URL to use without credentials (kubectl proxy, tests); "
        "default: in-cluster config, else the kubeconfig",
    )
    kubeconfig: str | None = Field(default=None, description="kubeconfig file to use")
    kube_context: str | None = Field(default=None, description="kubeconfig context to use")
    kube_request_timeout_s: DurationS = Field(
        default=10.0, description="timeout of one Kubernetes API request, seconds")
    kube_retry_attempts: int = Field(
        default=5, ge=1, le=20,
        description="attempts for a Kubernetes call that fails with 429, 5xx or a timeout")
    kube_retry_base_s: DurationS = Field(
        default=0.2, description="first backoff between those attempts, seconds (doubles)")
    kube_retry_max_s: DurationS = Field(default=5.0, description="longest backoff, seconds")
    conflict_attempts: int = Field(
        default=5, ge=1, le=20,
        description="read-plan-write rounds when a write meets a 409 conflict")

    leader_election: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="elect one active actuator with a coordination.k8s.io Lease; auto: on when "
        "a Kubernetes backend is in use",
    )
    lease_name: str = Field(default="slaplanner-actuator", description="name of the Lease")
    lease_namespace: str | None = Field(
        default=None, description="namespace of the Lease; default: the pod's own namespace")
    lease_duration_s: DurationS = Field(
        default=15.0, description="a Lease not renewed for this long may be taken over, seconds")
    lease_renew_deadline_s: DurationS = Field(
        default=10.0, description="the leader stops acting if it could not renew for this long")
    lease_retry_period_s: DurationS = Field(
        default=2.0, description="interval between attempts to acquire or renew, seconds")
    identity: str | None = Field(
        default=None, description="this instance's name in the Lease; default: the host name")

    pause_annotation: str = Field(
        default="slaplanner.io/paused",
        description='annotation that, set to "true" on a workload, makes the actuator leave it '
        "alone",
    )
    external_change_hold_s: DurationS = Field(
        default=600.0,
        description="a replica change made by someone else is respected this long, seconds")
    pending_timeout_s: DurationS = Field(
        default=600.0,
        description="replicas Pending (or not ready, if pods are not visible) longer than this "
        "are reported, and no more are asked for on top of them, seconds")
    pod_deletion_cost: bool = Field(
        default=True,
        description="before lowering a Deployment, mark its least busy pods with "
        "controller.kubernetes.io/pod-deletion-cost so they go first")
    inflight_metrics: CommaList = Field(
        default_factory=lambda: ["vllm:num_requests_running", "vllm:num_requests_waiting"],
        description="worker metrics summed as a pod's requests in flight (comma separated)")
    inflight_metrics_port: int = Field(
        default=8000, ge=1, le=65535,
        description="port of the workers' /metrics when neither the mapping nor the pod's "
        "prometheus.io/port annotation says")
    inflight_probe_timeout_s: DurationS = Field(
        default=1.0, description="timeout of one pod's /metrics read, seconds")
    check_other_autoscalers: bool = Field(
        default=True,
        description="refuse workloads targeted by an HPA or a KEDA ScaledObject")
    autoscaler_cache_s: DurationS = Field(
        default=30.0, description="unused: HPAs and ScaledObjects are now read from the watch "
        "cache; kept so that existing configurations still start")
    watch_timeout_s: DurationS = Field(
        default=300.0, ge=1.0,
        description="each watch of the watch cache asks the API server to end it after this "
        "long, seconds; it then resumes from the last resourceVersion seen")
    replica_count: int = Field(
        default=1, ge=1, le=1024,
        description="actuator replicas that share the deployments, each deployment handled by "
        "exactly one (rendezvous hashing of namespace/name, as the forecaster's replicas); "
        "with more than one, leader election is off and every replica needs its own index")
    replica_index: ReplicaIndex = Field(
        default=0, le=1023,
        description="this replica's index, 0 to replica_count - 1 (a StatefulSet pod name such "
        "as slaplanner-actuator-2 is read as its ordinal)")
    record_events: bool = Field(
        default=True, description="record Kubernetes Events on the objects scaled or refused")
    field_manager: str = Field(
        default="slaplanner-actuator", description="fieldManager sent with every write")
    virtual_subject: str = Field(
        default="slaplanner.virtual.{namespace}.{name}",
        description="subject the virtual backend publishes targets on")
    max_in_flight: int = Field(
        default=64, ge=1, le=10_000,
        description="targets applied side by side, at most (those of one deployment in order); "
        "with many deployments the API round trips of different ones overlap")
    idle_forget_s: DurationS = Field(
        default=6 * 3600.0, ge=0.0,
        description="forget a deployment (its memory and its outcome counters) once its newest "
        "target is this far behind the newest one, seconds of window time (6 h), as the "
        "forecaster's and the decider's setting of that name; 0 never forgets")
    restore_from_stream: bool = Field(
        default=True,
        description="on start (and on becoming leader) read the last ScaleEvent of each "
        "deployment from the stream, so older targets stay ignored")

    @model_validator(mode="after")
    def _consistent(self) -> ActuatorSettings:
        if self.min_prefill_replicas > self.max_prefill_replicas:
            raise ValueError("min_prefill_replicas is above max_prefill_replicas")
        if self.min_decode_replicas > self.max_decode_replicas:
            raise ValueError("min_decode_replicas is above max_decode_replicas")
        if self.lease_renew_deadline_s >= self.lease_duration_s:
            raise ValueError("lease_renew_deadline_s must be shorter than lease_duration_s, or "
                             "two actuators could act at once")
        if self.lease_retry_period_s >= self.lease_renew_deadline_s:
            raise ValueError("lease_retry_period_s must be shorter than lease_renew_deadline_s")
        if self.replica_index >= self.replica_count:
            raise ValueError(f"replica_index {self.replica_index} is not below replica_count "
                             f"{self.replica_count}")
        if "{namespace}" not in self.virtual_subject or "{name}" not in self.virtual_subject:
            raise ValueError("virtual_subject must contain {namespace} and {name}")
        return self
