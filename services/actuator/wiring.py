"""Put an actuator together from its settings: mapping file, backends, limits, election."""

from __future__ import annotations

from dataclasses import dataclass

from services.actuator import backends, config, kube
from services.actuator.core import Actuator, Rules
from services.actuator.election import Elector, LeaseLock
from services.actuator.inflight import HttpInflightProbe, InflightProbe
from services.actuator.settings import ActuatorSettings


@dataclass
class Assembly:
    actuator: Actuator
    elector: Elector | None
    lock: LeaseLock | None
    kube: kube.Kube | None
    backends: backends.Backends | None = None

    def not_ready(self) -> str | None:
        """Why the actuator cannot apply targets now (the Kubernetes API does not answer)."""
        if self.kube is None or self.kube.health.reachable:
            return None
        return f"the Kubernetes API does not answer: {self.kube.health.last_error}"

    def close(self) -> None:
        if self.backends is not None and self.backends._informers is not None:
            self.backends._informers.stop()


def rules(settings: ActuatorSettings) -> Rules:
    return Rules(external_change_hold_s=settings.external_change_hold_s,
                 pending_timeout_s=settings.pending_timeout_s)


def assemble(settings: ActuatorSettings, publish: backends.Publish | None,
             kube_client: kube.Kube | None = None, probe: InflightProbe | None = None,
             identity: str | None = None, mapping: config.ActuatorConfig | None = None,
             ) -> Assembly:
    """Everything the shell runs; raises ``config.ConfigError`` or ``ValueError`` if misconfigured.

    The mapping is read from ``settings.config_file`` unless given. ``kube_client`` is built from
    the settings when a Kubernetes backend is in use and none is given (tests give one bound to
    their API server).
    """
    source = settings.config_file or "(no config file)"
    if mapping is None:
        mapping = (config.load(settings.config_file) if settings.config_file
                   else config.ActuatorConfig())
    uses_kubernetes = backends.needs_kubernetes(settings, mapping)
    if uses_kubernetes and kube_client is None:
        kube_client = kube.Kube(
            kube.api_client(settings),
            kube.RetryPolicy(settings.kube_retry_attempts, settings.kube_retry_base_s,
                             settings.kube_retry_max_s),
            timeout_s=settings.kube_request_timeout_s, field_manager=settings.field_manager)
    identity = identity or settings.identity or kube.own_identity()
    parts = backends.Backends(
        kube=kube_client, options=backends.KubeOptions.from_settings(settings, identity),
        probe=probe or HttpInflightProbe(settings.inflight_metrics,
                                         settings.inflight_metrics_port,
                                         settings.inflight_probe_timeout_s),
        publish=publish, settings=settings)
    router = backends.build_router(settings, mapping, source, parts)
    # Replicas that share the deployments each act on their own: no leader among them.
    elect = settings.replica_count == 1 and (settings.leader_election == "on" or (
        settings.leader_election == "auto" and uses_kubernetes))
    elector: Elector | None = None
    lock: LeaseLock | None = None
    if elect:
        if kube_client is None:
            kube_client = kube.Kube(kube.api_client(settings),
                                    timeout_s=settings.kube_request_timeout_s,
                                    field_manager=settings.field_manager)
        elector = Elector(identity, settings.lease_duration_s, settings.lease_renew_deadline_s)
        lock = kube.KubeLeaseLock(kube_client, settings.lease_namespace or kube.own_namespace(),
                                  settings.lease_name)
    actuator = Actuator(router, rules(settings), mapping.allowlist(), gate=elector,
                        conflict_attempts=settings.conflict_attempts)
    return Assembly(actuator, elector, lock, kube_client, parts)
