"""The planner's ConfigMap, read by each service's own settings classes, for the base and overlays.

Every key must be a setting of some service (a misspelt key would otherwise be ignored by all of
them), every service must accept the values, the files the settings name must be mounted and load
with the services' own loaders, and the services must agree with each other (one interval, the
same GPUs per replica, a GPU ceiling that holds the decider's budget).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import pytest
from pydantic import ValidationError

from services.actuator import config as actuator_config
from services.actuator.settings import ActuatorSettings
from services.collector import query_config
from services.collector.settings import CollectorSettings
from services.decider.settings import DeciderSettings
from services.forecaster.settings import ForecasterSettings
from shared.bus_admin import BusAdminSettings
from shared.service_settings import ServiceSettings
from shared.settings import ENV_PREFIX, env_name, field_meta, settings_from
from tests import test_deploy_manifests as deploy

SETTINGS: dict[str, type[ServiceSettings]] = {
    "collector": CollectorSettings,
    "forecaster": ForecasterSettings,
    "decider": DeciderSettings,
    "actuator": ActuatorSettings,
    # the NATS pod's bus-admin container (`slaplanner bus setup`) reads the ConfigMap too
    "bus-admin": BusAdminSettings,
}
S = TypeVar("S", bound=ServiceSettings)
# What the Deployments add to the ConfigMap's environment for every service.
POD_ENV = {"SLAPLANNER_NATS_USER": "someone", "SLAPLANNER_NATS_PASSWORD": "secret"}


def unknown_keys(env: dict[str, str]) -> list[str]:
    """Keys no service reads (a deprecated name is read, under its new name)."""
    known = {
        env_name(name)
        for cls in SETTINGS.values()
        for field, info in cls.model_fields.items()
        for name in (field, *field_meta(info).deprecated)
    }
    return sorted(key for key in env if key not in known)


def local_env(target: str, env: dict[str, str] | None = None) -> dict[str, str]:
    return {**deploy.local_env(target, env), **POD_ENV}


def parsed(target: str, cls: type[S]) -> S:
    return settings_from(cls, {}, local_env(target))


@pytest.mark.parametrize("target", deploy.TARGETS)
def test_every_key_is_a_setting_of_some_service(target: str) -> None:
    env = deploy.planner_env(target)
    assert all(key.startswith(ENV_PREFIX) for key in env)
    assert unknown_keys(env) == []


@pytest.mark.parametrize("service", [*deploy.SERVICES, "bus-admin"])
@pytest.mark.parametrize("target", deploy.TARGETS)
def test_each_service_accepts_the_configuration(target: str, service: str) -> None:
    settings = parsed(target, SETTINGS[service])
    # the values given are the values used: a service reads every key it knows
    env = deploy.planner_env(target)
    for field in SETTINGS[service].model_fields:
        if env_name(field) in env:
            assert field in settings.model_fields_set, field


@pytest.mark.parametrize(
    ("key", "value", "caught_by"),
    [
        ("SLAPLANNER_TTFT_TARGET", "500ms", "unknown key"),  # the _S is missing
        # 500 s, milliseconds meant without a unit: both read it, both refuse it
        ("SLAPLANNER_TTFT_TARGET_S", "500", "collector,decider"),
        ("SLAPLANNER_INTERVAL_S", "1 minute", "collector"),
        ("SLAPLANNER_LEADER_ELECTION", "yes", "actuator"),
        ("SLAPLANNER_PREDICTOR", "arima2", "forecaster"),
        ("SLAPLANNER_NATS_URL", "", None),  # every service takes an empty list...
    ],
    ids=["a misspelt key", "a latency in milliseconds without unit", "a duration in words",
         "an unknown election mode", "an unknown predictor", "an empty NATS URL list"],
)
def test_a_mistake_in_the_configmap_fails_these_checks(
    key: str, value: str, caught_by: str | None
) -> None:
    env = {**deploy.planner_env("base"), key: value}
    if caught_by == "unknown key":
        assert unknown_keys(env) == [key]
        return
    failing = []
    for service, cls in SETTINGS.items():
        try:
            settings_from(cls, {}, local_env("base", env))
        except ValidationError:
            failing.append(service)
    if caught_by is None:  # ... which the URL check below catches instead
        assert failing == []
        with pytest.raises(AssertionError):
            check_nats_url(env)
    else:
        assert failing == caught_by.split(",")


@pytest.mark.parametrize("target", deploy.TARGETS)
def test_the_files_the_settings_name_load_with_the_services_loaders(target: str) -> None:
    env = local_env(target)
    mapping = actuator_config.load(env["SLAPLANNER_CONFIG_FILE"])
    decider = parsed(target, DeciderSettings)
    decider.deployment_config()  # raises with the file and the field
    if "SLAPLANNER_QUERIES_FILE" in env:
        query_config.load(env["SLAPLANNER_QUERIES_FILE"])
    if target == "base":
        assert mapping.deployment == [] and mapping.allow == []
    else:
        assert {d.backend for d in mapping.deployment} == {target}
        # every object a deployment names is allowlisted
        allowed = {(a.namespace, a.kind, a.name) for a in mapping.allow}
        for entry in mapping.deployment:
            if entry.backend == "dynamo":
                dgd = entry.dynamo.name if entry.dynamo and entry.dynamo.name else entry.name
                assert (entry.namespace, "DynamoGraphDeployment", dgd) in allowed
            if entry.scale is not None:
                for obj in (entry.scale.prefill, entry.scale.decode):
                    assert (obj.namespace or entry.namespace, obj.kind, obj.name) in allowed


@pytest.mark.parametrize("target", deploy.TARGETS)
def test_the_services_agree_with_each_other(target: str) -> None:
    collector = parsed(target, CollectorSettings)
    forecaster = parsed(target, ForecasterSettings)
    decider = parsed(target, DeciderSettings)
    actuator = parsed(target, ActuatorSettings)
    # one planning interval
    assert collector.interval_s == decider.adjustment_interval_s == forecaster.warm_start_window_s
    # a worker asked for now is planned for the load it meets when ready
    assert forecaster.horizon_s >= decider.worker_startup_s
    # the same GPUs per replica, and a ceiling that holds any budget the decider may use
    assert decider.prefill_engine_num_gpu == actuator.prefill_engine_num_gpu
    assert decider.decode_engine_num_gpu == actuator.decode_engine_num_gpu
    for knobs in decider.deployment_config().all_knobs():
        assert knobs.max_total_gpus <= actuator.max_total_gpus
    # the collector reads the Prometheus of the kustomization, which scrapes every 15 s or less
    assert collector.source == "prometheus"
    # arrivals are counted in whole bins of the window, and more than one (test_deploy_prometheus
    # checks that Prometheus scrapes the arrival counter once a bin)
    bins = collector.interval_s / collector.arrival_bin_s
    assert bins >= 2 and bins == round(bins)


def service_port(name: str) -> int:
    docs = deploy.resources(deploy.BASE)
    service = deploy.find(docs, "Service", name)
    [port] = service["spec"]["ports"]
    return int(port["port"])


def check_nats_url(env: dict[str, str]) -> None:
    urls = [u.strip() for u in env["SLAPLANNER_NATS_URL"].split(",") if u.strip()]
    assert urls, "no NATS URL"
    for url in urls:
        parsed_url = urlparse(url)
        assert (parsed_url.scheme, parsed_url.hostname, parsed_url.port) == (
            "tls", "slaplanner-nats", service_port("slaplanner-nats")), url


@pytest.mark.parametrize("target", deploy.TARGETS)
def test_the_urls_name_the_services_of_the_kustomization(target: str) -> None:
    env = deploy.planner_env(target)
    check_nats_url(env)
    prometheus = urlparse(env["SLAPLANNER_PROMETHEUS_URL"])
    assert (prometheus.hostname, prometheus.port) == (
        "slaplanner-prometheus", service_port("slaplanner-prometheus"))


def test_the_files_are_mounted_where_the_settings_look() -> None:
    for service in deploy.SERVICES:
        pod = deploy.workload(service)["spec"]["template"]["spec"]
        container = deploy.main_container(service)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        files = volumes[mounts[deploy.FILES_MOUNT.rstrip("/")]]["configMap"]
        assert files["name"] == "slaplanner-files"
        if service == "decider":
            profile = volumes[mounts[deploy.PROFILE_MOUNT.rstrip("/")]]["configMap"]
            assert profile == {"name": "slaplanner-profile", "optional": True}
        assert volumes[mounts["/tmp"]]["emptyDir"], "a writable /tmp on a read-only root"


def test_without_a_custom_profile_the_decider_uses_the_one_inside_the_image() -> None:
    env = deploy.planner_env("base")
    assert "SLAPLANNER_PROFILE_PATH" not in env
    decider = parsed("base", DeciderSettings)
    assert Path(decider.profile_path).is_dir()  # the bundled profile, installed with the package


def test_every_setting_the_deploy_files_and_the_guide_name_exists() -> None:
    texts = [deploy.REPO / "docs" / "operations.md",
             *(p for p in deploy.DEPLOY.rglob("*") if p.is_file() and p.suffix != ".json")]
    named = {name for path in texts
             for name in re.findall(r"\bSLAPLANNER_[A-Z0-9_]*[A-Z0-9]\b", path.read_text())}
    assert "SLAPLANNER_TTFT_TARGET_S" in named
    assert unknown_keys(dict.fromkeys(named, "")) == []


def test_an_old_configmap_keeps_the_deciders_budget_and_gpus_under_their_former_names(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before the decider and the actuator shared one name, a ConfigMap set both spellings; the
    # decider keeps what its own lines said, and says which lines to remove.
    env = {**deploy.planner_env("base"), "SLAPLANNER_MAX_TOTAL_GPUS": "32",
           "SLAPLANNER_MAX_GPU_BUDGET": "16", "SLAPLANNER_PREFILL_ENGINE_GPUS": "2"}
    decider = settings_from(DeciderSettings, {}, local_env("base", env))
    actuator = settings_from(ActuatorSettings, {}, local_env("base", env))
    assert (decider.max_total_gpus, decider.prefill_engine_num_gpu) == (16, 2)
    assert actuator.max_total_gpus == 32
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "SLAPLANNER_MAX_GPU_BUDGET is deprecated; use SLAPLANNER_MAX_TOTAL_GPUS" in warned
    assert unknown_keys(env) == []
