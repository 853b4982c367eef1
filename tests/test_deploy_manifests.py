"""deploy/: valid Kubernetes objects, kustomizations that hold together, pods that come up right.

Every manifest is validated strictly against the schemas of current Kubernetes versions. The
kustomization files are not Kubernetes objects: every file they name must exist, and what the
overlays merge or patch must exist in the base. When ``kubectl`` is installed, the base and the
overlays are also rendered with its kustomize and every rendered object is validated and its
references (ConfigMaps, Secrets, ServiceAccounts) checked.

The helpers here (reading kustomizations, env files and manifests) are used by the other
``test_deploy_*`` modules too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml  # type: ignore[import-untyped]

from services.decider.settings import DeciderSettings
from services.forecaster.settings import ForecasterSettings
from shared import embedded_nats

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "base"
OVERLAYS = {"dynamo": DEPLOY / "overlays" / "dynamo", "scale": DEPLOY / "overlays" / "scale"}
TARGETS = {"base": BASE, **OVERLAYS}
# Components an overlay may add; what they name and render is checked on the base.
FORECASTER_REPLICAS = DEPLOY / "components" / "forecaster-replicas"
NO_CERT_MANAGER = DEPLOY / "components" / "no-cert-manager"
DECIDER_REPLICAS = DEPLOY / "components" / "decider-replicas"
SERVICES = ("collector", "forecaster", "decider", "actuator")
# The forecaster is a StatefulSet (its replicas need stable ordinals), the others Deployments.
WORKLOAD_KINDS = {service: "StatefulSet" if service in ("forecaster", "decider") else "Deployment"
                  for service in SERVICES}
K8S_VERSIONS = ["1.31.0", kubernetes_validate.utils.latest_version()]
GENERATORS = ("configMapGenerator", "secretGenerator")
# Where the Deployments mount the ConfigMap slaplanner-files and the optional profile.
FILES_MOUNT = "/etc/slaplanner/"
PROFILE_MOUNT = "/etc/slaplanner-profile/"

Doc = dict[str, Any]
# An image as deploy/ names one: name:tag, and by digest name:tag@sha256:<index digest>.
IMAGE_REFERENCE = re.compile(
    r"(?P<name>[\w./-]+):(?P<tag>[\w.-]+)(@(?P<digest>sha256:[0-9a-f]{64}))?")
# Kinds that no Kubernetes version's schema has; tests/test_deploy_monitoring.py validates them
# against their projects' own CRD schemas.
CUSTOM_RESOURCE_GROUPS = ("keda.sh", "monitoring.coreos.com", "cert-manager.io")
# Kustomizations beside the base and overlays: examples and add-ons applied on their own.
EXTRA_KUSTOMIZATIONS = (DEPLOY / "monitoring", DEPLOY / "examples" / "keda",
                        DEPLOY / "examples" / "hpa")


# --- reading deploy/ ---------------------------------------------------------------------------

def is_custom(doc: Doc) -> bool:
    """A custom resource: validated against its project's CRD (tests/test_deploy_monitoring.py),
    not against Kubernetes' own schemas."""
    return str(doc["apiVersion"]).split("/")[0] in CUSTOM_RESOURCE_GROUPS


def load_yaml_documents(text: str) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


@cache
def documents(path: Path) -> tuple[Doc, ...]:
    return tuple(load_yaml_documents(path.read_text()))


@cache
def kustomization(directory: Path) -> Doc:
    doc = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def generator_sources(entry: Doc) -> list[tuple[str, Path]]:
    """(key, file) of a generator entry; ``key=path`` names the key, else the file's name."""
    sources: list[tuple[str, Path]] = []
    for item in entry.get("files", []):
        key, _, path = item.rpartition("=")
        sources.append((key or Path(path).name, Path(path)))
    for item in entry.get("envs", []):
        sources.append(("", Path(item)))
    return sources


def referenced_paths(directory: Path) -> list[Path]:
    """Every file or directory a kustomization names."""
    k = kustomization(directory)
    names = [*k.get("resources", []), *k.get("components", []),
             *k.get("patchesStrategicMerge", [])]
    names += [p["path"] for p in k.get("patches", []) if "path" in p]
    for kind in GENERATORS:
        for entry in k.get(kind, []):
            names += [str(path) for _, path in generator_sources(entry)]
    return [(directory / name).resolve() for name in names]


def resource_files(directory: Path) -> list[Path]:
    """The manifest files of a kustomization and of the kustomizations it builds on."""
    files: list[Path] = []
    for name in kustomization(directory).get("resources", []):
        path = (directory / name).resolve()
        files += resource_files(path) if path.is_dir() else [path]
    return files


def resources(directory: Path) -> list[Doc]:
    return [doc for path in resource_files(directory) for doc in documents(path)]


def generator_files() -> set[Path]:
    return {
        (directory / path).resolve()
        for directory in TARGETS.values()
        for kind in GENERATORS
        for entry in kustomization(directory).get(kind, [])
        for _, path in generator_sources(entry)
    }


def manifest_files(include_custom: bool = False) -> list[Path]:
    """Every YAML file in deploy/ that is a Kubernetes manifest (not a kustomization, not data);
    those of custom resources (KEDA, the Prometheus Operator) only with ``include_custom``."""
    data = generator_files()
    return sorted(
        path for path in DEPLOY.rglob("*.y*ml")
        if path.name != "kustomization.yaml" and path.resolve() not in data
        and (include_custom or not any(is_custom(doc) for doc in documents(path)))
    )


def parse_env_file(path: Path) -> dict[str, str]:
    """An env file as kustomize reads it: KEY=VALUE lines, # comments, values kept verbatim."""
    env: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and key, f"{path}:{number}: not KEY=VALUE"
        assert key not in env, f"{path}:{number}: {key} given twice"
        env[key] = value
    return env


def generated(directory: Path, kind: str, name: str) -> dict[str, str]:
    """The data of a generated ConfigMap or Secret: the base's, then each overlay's merge."""
    data: dict[str, str] = {}
    k = kustomization(directory)
    for path in k.get("resources", []):
        if (directory / path).is_dir():
            data.update(generated((directory / path).resolve(), kind, name))
    for entry in k.get(kind, []):
        if entry["name"] != name:
            continue
        if entry.get("behavior") == "replace":
            data = {}
        for key, path in generator_sources(entry):
            if key:
                data[key] = (directory / path).read_text()
            else:
                data.update(parse_env_file(directory / path))
    return data


def generated_files(directory: Path, name: str) -> dict[str, Path]:
    """Which source file each key of a generated files ConfigMap comes from, after the merges."""
    files: dict[str, Path] = {}
    k = kustomization(directory)
    for path in k.get("resources", []):
        if (directory / path).is_dir():
            files.update(generated_files((directory / path).resolve(), name))
    for entry in k.get("configMapGenerator", []):
        if entry["name"] == name:
            if entry.get("behavior") == "replace":
                files = {}
            files.update({key: (directory / path).resolve()
                          for key, path in generator_sources(entry) if key})
    return files


def planner_env(target: str) -> dict[str, str]:
    return generated(TARGETS[target], "configMapGenerator", "slaplanner-config")


def local_env(target: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The ConfigMap's environment, with the mounted files' paths pointing at their sources."""
    files = generated_files(TARGETS[target], "slaplanner-files")
    out = dict(planner_env(target) if env is None else env)
    for key, value in out.items():
        if value.startswith(FILES_MOUNT):
            name = value.removeprefix(FILES_MOUNT)
            assert name in files, f"{key}={value}: no such key in the ConfigMap slaplanner-files"
            out[key] = str(files[name])
    return out


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pod_templates(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield doc, doc["spec"]["template"]["spec"]


def containers(pod: Doc) -> list[Doc]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def workload(service: str, docs: list[Doc] | None = None) -> Doc:
    """The service's Deployment (the forecaster's StatefulSet), in the base unless ``docs``."""
    return find(resources(BASE) if docs is None else docs, WORKLOAD_KINDS[service],
                f"slaplanner-{service}")


def main_container(service: str, docs: list[Doc] | None = None) -> Doc:
    [container] = workload(service, docs)["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


# --- manifests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_is_a_valid_kubernetes_object(path: Path, version: str) -> None:
    docs = documents(path)
    assert docs, f"{path} holds no object"
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


# Manifests to copy from, on purpose in no kustomization: the actuator's rights in a workload
# namespace (overlays apply subsets) and the opt-in right to patch pods for pod-deletion-cost.
REFERENCES = {(BASE / "actuator-workload-role.yaml").resolve(),
              (OVERLAYS["scale"] / "pod-deletion-cost.yaml").resolve()}


def test_every_manifest_belongs_to_a_kustomization() -> None:
    used = {path for directory in (*TARGETS.values(), *EXTRA_KUSTOMIZATIONS)
            for path in resource_files(directory)}
    assert [p for p in manifest_files(include_custom=True)
            if p.resolve() not in used | REFERENCES] == []


@pytest.mark.parametrize("path", sorted(REFERENCES), ids=lambda p: p.name)
def test_the_reference_manifests_are_valid_for_kubernetes(path: Path) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_every_file_a_kustomization_names_exists(target: str) -> None:
    missing = [p for p in referenced_paths(TARGETS[target]) if not p.exists()]
    assert missing == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlays_build_on_the_base(overlay: str) -> None:
    assert [(OVERLAYS[overlay] / r).resolve() for r in kustomization(OVERLAYS[overlay])["resources"]
            if (OVERLAYS[overlay] / r).is_dir()] == [BASE]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_what_an_overlay_merges_or_patches_exists_in_the_base(overlay: str) -> None:
    k, base = kustomization(OVERLAYS[overlay]), kustomization(BASE)
    for kind in GENERATORS:
        for entry in k.get(kind, []):
            if entry.get("behavior") in ("merge", "replace"):
                assert entry["name"] in {e["name"] for e in base.get(kind, [])}, entry
                # a merge finds its generator by name and namespace
                assert entry.get("namespace") == base["namespace"], entry
    base_objects = {(d["kind"], d["metadata"]["name"]) for d in resources(BASE)}
    for patch in k.get("patches", []):
        if "target" in patch:
            wanted = (patch["target"]["kind"], patch["target"]["name"])
        else:
            [doc] = documents((OVERLAYS[overlay] / patch["path"]).resolve())
            wanted = (doc["kind"], doc["metadata"]["name"])
        assert wanted in base_objects, patch


# --- the pods ----------------------------------------------------------------------------------

@pytest.mark.parametrize("service", SERVICES)
def test_one_deployment_per_service_runs_that_service(service: str) -> None:
    container = main_container(service)
    assert container["image"] == "slaplanner"  # the kustomization sets the tag
    assert container["args"] == [service]
    assert container["envFrom"] == [{"configMapRef": {"name": "slaplanner-config"}}]
    env = env_of(container)
    assert env["SLAPLANNER_NATS_USER"]["value"] == service
    assert env["SLAPLANNER_NATS_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "slaplanner-nats-users", "key": service}}


@pytest.mark.parametrize("service", SERVICES)
def test_the_services_are_probed_for_life_and_readiness_at_the_named_http_port(
    service: str,
) -> None:
    container = main_container(service)
    [port] = container["ports"]
    assert port["name"] == "http"
    assert port["containerPort"] == int(planner_env("base")["SLAPLANNER_HTTP_PORT"])
    # alive while the event loop runs; ready while the bus (and, for the actuator, the
    # Kubernetes API) lets it make progress
    for probe, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe


def test_every_pod_is_locked_down_and_sized() -> None:
    templates = list(pod_templates(resources(BASE)))
    assert len(templates) == len(SERVICES) + 2  # NATS and Prometheus
    for workload, pod in templates:
        where = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] > 0, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in containers(pod):
            what = f"{where}/{container['name']}"
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }, what
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), what
            assert "memory" in container["resources"]["limits"], what
            image = container["image"]
            assert image == "slaplanner" or IMAGE_REFERENCE.fullmatch(image), what
            assert ":latest" not in image, what


def test_the_image_tag_is_the_project_version() -> None:
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert version is not None
    assert kustomization(BASE)["images"] == [{"name": "slaplanner", "newTag": version.group(1)}]


def test_the_actuator_runs_as_its_account_with_its_pod_name_and_one_leader() -> None:
    [account] = [d for d in documents(BASE / "actuator-rbac.yaml")
                 if d["kind"] == "ServiceAccount"]
    actuator = workload("actuator")
    pod = actuator["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"] == "slaplanner-actuator"
    assert env_of(main_container("actuator"))["POD_NAME"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.name"}}
    assert actuator["spec"]["replicas"] >= 2
    assert planner_env("base")["SLAPLANNER_LEADER_ELECTION"] == "on"
    # the other services need no Kubernetes credentials at all
    for service in ("collector", "forecaster", "decider"):
        assert workload(service)["spec"]["template"]["spec"][
            "automountServiceAccountToken"] is False


@pytest.mark.parametrize("service", ("collector",))
def test_stateful_services_never_run_twice(service: str) -> None:
    spec = workload(service)["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


def forecaster_durables_the_nats_user_may_ack(service: str = "forecaster") -> set[str]:
    auth = (BASE / "nats" / "auth.conf").read_text()
    return set(re.findall(rf'"\$JS\.ACK\.SLAPLANNER\.({service}(?:-\d+)?)\.>"', auth))


def check_forecaster_replicas(statefulset: Doc,
                              settings: type[ForecasterSettings | DeciderSettings]
                              = ForecasterSettings) -> int:
    """The replicas agree on their count, each reads its index from its pod name, and each
    replica's durable is one the NATS user may use; the count."""
    spec = statefulset["spec"]
    # a StatefulSet runs one pod per ordinal at most: never two with one durable
    assert statefulset["kind"] == "StatefulSet"
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["updateStrategy"] == {"type": "RollingUpdate"}
    [container] = spec["template"]["spec"]["containers"]
    env = env_of(container)
    count = spec["replicas"]
    assert env["SLAPLANNER_REPLICA_COUNT"]["value"] == str(count)
    assert env["SLAPLANNER_REPLICA_INDEX"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.name"}}
    durables = {
        settings(replica_count=count,
                 replica_index=f"{statefulset['metadata']['name']}-{i}").durable_name()
        for i in range(count)
    }
    service = statefulset["metadata"]["name"].removeprefix("slaplanner-")
    assert len(durables) == count
    assert durables <= forecaster_durables_the_nats_user_may_ack(service), durables
    return int(count)


def test_the_forecaster_is_one_replica_that_can_be_scaled_with_its_count() -> None:
    assert check_forecaster_replicas(workload("forecaster")) == 1
    # auth.conf names a durable for each of up to 8 replicas, and the historic lone one
    assert forecaster_durables_the_nats_user_may_ack() == {
        "forecaster", *(f"forecaster-{i}" for i in range(8))}
    [statefulset] = [d for d in documents(BASE / "forecaster.yaml") if d["kind"] == "StatefulSet"]
    [service] = [d for d in documents(BASE / "forecaster.yaml") if d["kind"] == "Service"]
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"]


def test_the_nats_server_gets_every_password_the_config_names() -> None:
    statefulset = find(resources(BASE), "StatefulSet", "slaplanner-nats")
    auth = (BASE / "nats" / "auth.conf").read_text()
    users = re.findall(r"^\s*user: (\w+)\s*\n\s*password: \$(\w+)", auth, re.M)
    assert sorted(u for u, _ in users) == sorted([*SERVICES, "admin"])
    secret = generated(BASE, "secretGenerator", "slaplanner-nats-users")
    assert sorted(secret) == sorted(u for u, _ in users)
    pod = statefulset["spec"]["template"]["spec"]
    for container in pod["initContainers"] + [c for c in pod["containers"] if c["name"] == "nats"]:
        env = env_of(container)
        for user, variable in users:
            assert env[variable]["valueFrom"] == {
                "secretKeyRef": {"name": "slaplanner-nats-users", "key": user}}, container["name"]
    # the bus-admin beside it logs in as the admin, and gets no other password
    [admin] = [c for c in pod["containers"] if c["name"] == "bus-admin"]
    assert admin["args"][:2] == ["bus", "setup"]
    assert env_of(admin)["SLAPLANNER_NATS_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "slaplanner-nats-users", "key": "admin"}}
    assert not {variable for _, variable in users} & set(env_of(admin))
    assert planner_env("base")["SLAPLANNER_BUS_SETUP"] == "admin"


def test_the_shipped_passwords_are_obvious_placeholders_the_server_refuses() -> None:
    secret = generated(BASE, "secretGenerator", "slaplanner-nats-users")
    assert all(value.startswith("CHANGE-ME") for value in secret.values())
    statefulset = find(resources(BASE), "StatefulSet", "slaplanner-nats")
    [guard] = statefulset["spec"]["template"]["spec"]["initContainers"]
    script = guard["command"][-1]
    assert "CHANGE-ME*" in script and "exit 1" in script


@pytest.mark.parametrize(("password", "accepted"), [
    pytest.param("CHANGE-ME-admin", False, id="the shipped placeholder"),
    pytest.param("", False, id="nothing"),
    pytest.param("password", False, id="the word password"),
    pytest.param("correct-horse-battery-staple", False, id="a phrase under 32 characters"),
    pytest.param("0123456789abcdef" * 3, True, id="48 hex characters, as the install makes"),
])
def test_the_nats_pod_refuses_to_start_with_a_weak_password(password: str,
                                                            accepted: bool) -> None:
    statefulset = find(resources(BASE), "StatefulSet", "slaplanner-nats")
    [guard] = statefulset["spec"]["template"]["spec"]["initContainers"]
    strong = "f" * 48
    env = {"PATH": os.environ["PATH"], "NATS_COLLECTOR_PASSWORD": strong,
           "NATS_FORECASTER_PASSWORD": strong, "NATS_DECIDER_PASSWORD": password,
           "NATS_ACTUATOR_PASSWORD": strong, "NATS_ADMIN_PASSWORD": strong}
    ran = subprocess.run(guard["command"], env=env, capture_output=True, text=True, timeout=10)
    assert (ran.returncode == 0) == accepted, ran.stderr
    assert accepted or "generate them" in ran.stderr


def test_the_nats_image_is_the_server_version_the_permission_tests_run() -> None:
    out = subprocess.run([embedded_nats.nats_server_binary(), "--version"], capture_output=True,
                         text=True, check=True).stdout
    match = re.search(r"v(\d+\.\d+\.\d+)", out)
    assert match is not None, out
    statefulset = find(resources(BASE), "StatefulSet", "slaplanner-nats")
    for container in containers(statefulset["spec"]["template"]["spec"]):
        if container["name"] != "bus-admin":  # the planner's own image
            reference = IMAGE_REFERENCE.fullmatch(container["image"])
            assert reference is not None, container["image"]
            assert (reference["name"], reference["tag"]) == ("nats", f"{match.group(1)}-alpine")


def rule_grants(role: Doc) -> set[tuple[str, str, str, str]]:
    return {(group, resource, verb, ",".join(rule.get("resourceNames", [])))
            for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_an_overlay_grants_the_actuator_only_what_the_base_role_grants(overlay: str) -> None:
    base_role = find(list(documents(BASE / "actuator-workload-role.yaml")), "Role",
                     "slaplanner-actuator")
    docs = list(documents(OVERLAYS[overlay] / "workload-rbac.yaml"))
    role = find(docs, "Role", "slaplanner-actuator")
    binding = find(docs, "RoleBinding", "slaplanner-actuator")
    # the same rights or narrower ones (pinned to names)
    assert {g[:3] for g in rule_grants(role)} <= {g[:3] for g in rule_grants(base_role)}
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "slaplanner-actuator",
                                    "namespace": kustomization(BASE)["namespace"]}]
    # the Role lives where the workloads the mapping names live
    mapping = generated(OVERLAYS[overlay], "configMapGenerator", "slaplanner-files")
    namespaces = set(re.findall(r'^namespace = "([^"]+)"', mapping["actuator.toml"], re.M))
    assert namespaces == {role["metadata"]["namespace"]} == {binding["metadata"]["namespace"]}
    assert "namespace" not in kustomization(OVERLAYS[overlay])


# --- rendered with kustomize -------------------------------------------------------------------

def kustomize(directory: Path) -> tuple[Doc, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomizations are checked file by file only")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(load_yaml_documents(out.stdout))


@cache
def rendered(target: str) -> tuple[Doc, ...]:
    return kustomize(TARGETS[target])


def test_the_forecaster_replicas_component_scales_the_base_with_its_count() -> None:
    """What an operator's overlay renders with the component: valid, and n replicas told n."""
    docs = render_with_components(FORECASTER_REPLICAS)
    for doc in docs:
        if not is_custom(doc):
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    count = check_forecaster_replicas(workload("forecaster", docs))
    assert 1 < count <= len(forecaster_durables_the_nats_user_may_ack()) - 1
    # what the base holds besides is left as it was
    assert main_container("forecaster", docs)["resources"] == main_container("forecaster")[
        "resources"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main_container("forecaster", docs)[probe] == main_container("forecaster")[probe]
    assert env_of(main_container("forecaster", docs))["SLAPLANNER_NATS_USER"]["value"] == (
        "forecaster")


def test_the_decider_is_one_replica_that_can_be_scaled_with_its_count() -> None:
    assert check_forecaster_replicas(workload("decider"), DeciderSettings) == 1
    assert forecaster_durables_the_nats_user_may_ack("decider") == {
        "decider", *(f"decider-{i}" for i in range(8))}
    auth = (BASE / "nats" / "auth.conf").read_text()
    for name in ("decider", *(f"decider-{i}" for i in range(8))):  # its history readers too
        assert f'"$JS.API.CONSUMER.RESET.SLAPLANNER.{name}-history"' in auth


def test_the_decider_replicas_component_scales_the_base_and_the_admins_durables() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        overlay = Path(tmp)

        def relative(path: Path) -> str:
            return str(Path(*[".."] * len(overlay.resolve().parts[1:])) / path.relative_to("/"))

        (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
            "resources": [relative(BASE)], "components": [relative(DECIDER_REPLICAS)]}))
        docs = list(kustomize(overlay))
    for doc in docs:
        if not is_custom(doc):  # cert-manager's: tests/test_deploy_monitoring.py
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    count = check_forecaster_replicas(workload("decider", docs), DeciderSettings)
    assert count == 2
    nats = find(docs, "StatefulSet", "slaplanner-nats")
    [admin] = [c for c in nats["spec"]["template"]["spec"]["containers"]
               if c["name"] == "bus-admin"]
    assert env_of(admin)["SLAPLANNER_DECIDER_REPLICAS"]["value"] == str(count)


@pytest.mark.parametrize("target", TARGETS)
def test_the_rendered_kustomization_is_valid_for_kubernetes(target: str) -> None:
    docs = rendered(target)
    for doc in docs:
        if not is_custom(doc):  # cert-manager's: tests/test_deploy_monitoring.py
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    for kind, name in (("Namespace", "slaplanner"), ("StatefulSet", "slaplanner-nats"),
                       ("Role", "slaplanner-actuator-leader-election"),
                       ("ServiceAccount", "slaplanner-actuator"),
                       *((WORKLOAD_KINDS[s], f"slaplanner-{s}") for s in SERVICES)):
        assert [d for d in docs if (d["kind"], d["metadata"]["name"]) == (kind, name)], name


@pytest.mark.parametrize("target", TARGETS)
def test_what_the_pods_refer_to_exists_in_the_rendered_objects(target: str) -> None:
    docs = list(rendered(target))
    present = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs}
    # the Secrets cert-manager makes from the Certificates
    present |= {("Secret", d["metadata"].get("namespace"), d["spec"]["secretName"])
                for d in docs if d["kind"] == "Certificate"}
    for workload, pod in pod_templates(docs):
        namespace = workload["metadata"]["namespace"]
        wanted: set[tuple[str, str]] = set()
        if "serviceAccountName" in pod:
            wanted.add(("ServiceAccount", pod["serviceAccountName"]))
        for volume in pod.get("volumes", []):
            if "configMap" in volume and not volume["configMap"].get("optional"):
                wanted.add(("ConfigMap", volume["configMap"]["name"]))
            if "secret" in volume and not volume["secret"].get("optional"):
                wanted.add(("Secret", volume["secret"]["secretName"]))
        for container in containers(pod):
            for source in container.get("envFrom", []):
                wanted.add(("ConfigMap", source["configMapRef"]["name"]))
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    wanted.add(("Secret", ref["name"]))
        missing = {w for w in wanted if (w[0], namespace, w[1]) not in present}
        assert missing == set(), workload["metadata"]["name"]


@pytest.mark.parametrize("target", TARGETS)
def test_the_rendered_configuration_is_what_the_config_tests_check(target: str) -> None:
    docs = rendered(target)
    [config] = [d for d in docs if d["kind"] == "ConfigMap"
                and d["metadata"]["name"].startswith("slaplanner-config-")]
    assert config["data"] == planner_env(target)
    [files] = [d for d in docs if d["kind"] == "ConfigMap"
               and d["metadata"]["name"].startswith("slaplanner-files-")]
    assert files["data"] == {key: path.read_text()
                             for key, path in generated_files(TARGETS[target],
                                                              "slaplanner-files").items()}


# --- TLS for NATS ------------------------------------------------------------------------------

NATS_TLS_SECRET = "slaplanner-nats-tls"


def nats_clients(docs: list[Doc]) -> Iterator[tuple[str, Doc, Doc]]:
    """(where, pod, container) of every container that connects to NATS: the four services and
    the bus-admin beside the server."""
    for workload, pod in pod_templates(docs):
        for container in pod["containers"]:
            if container["image"] == "slaplanner":  # the planner's image: a service or bus-admin
                yield f"{workload['metadata']['name']}/{container['name']}", pod, container


def mounted_file(pod: Doc, container: Doc, path: str) -> tuple[Doc, str]:
    """The volume and the key of the mounted file at ``path``."""
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            return volume, path.removeprefix(prefix)
    raise AssertionError(f"nothing is mounted at {path}")


def test_every_nats_client_speaks_tls_and_verifies_the_server_against_the_ca() -> None:
    docs = resources(BASE)
    clients = list(nats_clients(docs))
    assert len(clients) == len(SERVICES) + 1  # and the bus-admin
    for where, pod, container in clients:
        env = {**planner_env("base"), **{k: v["value"] for k, v in env_of(container).items()
                                          if "value" in v}}
        urls = env["SLAPLANNER_NATS_URL"].split(",")
        assert all(url.startswith("tls://") for url in urls), where
        volume, key = mounted_file(pod, container, env["SLAPLANNER_NATS_TLS_CA_FILE"])
        assert volume["secret"]["secretName"] == NATS_TLS_SECRET, where
        # no client gets the server's private key (the bus-admin also gets its certificate)
        items = volume["secret"]["items"]
        assert {"key": "ca.crt", "path": key} in items, where
        assert {item["key"] for item in items} <= {"ca.crt", "tls.crt"}, where


def test_the_server_serves_the_certificate_of_the_secret_cert_manager_keeps() -> None:
    conf = (BASE / "nats" / "nats.conf").read_text()
    tls = re.search(r"^tls \{\n(.*?)^\}", conf, re.M | re.S)
    assert tls is not None, "nats.conf has no tls block"
    files = dict(re.findall(r"^\s*(cert_file|key_file):\s*(\S+)", tls.group(1), re.M))
    assert "allow_non_tls" not in conf
    statefulset = find(resources(BASE), "StatefulSet", "slaplanner-nats")
    pod = statefulset["spec"]["template"]["spec"]
    [server] = [c for c in pod["containers"] if c["name"] == "nats"]
    for field, key in (("cert_file", "tls.crt"), ("key_file", "tls.key")):
        volume, found = mounted_file(pod, server, files[field])
        assert (volume["secret"]["secretName"], found) == (NATS_TLS_SECRET, key), field


def test_the_bus_admin_can_tell_the_server_to_reload_a_renewed_certificate() -> None:
    """It compares the Secret's tls.crt with what the server serves, and signals the process in
    nats.conf's pid_file: a file of a volume both containers mount, a process it can see (one
    process namespace) and may signal (the same user)."""
    conf = (BASE / "nats" / "nats.conf").read_text()
    [pid_file] = re.findall(r"^pid_file:\s*(\S+)", conf, re.M)
    statefulset = find(resources(BASE), "StatefulSet", "slaplanner-nats")
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["shareProcessNamespace"] is True
    [server] = [c for c in pod["containers"] if c["name"] == "nats"]
    [admin] = [c for c in pod["containers"] if c["name"] == "bus-admin"]
    args = admin["args"]
    assert args[:2] == ["bus", "setup"] and "--keep-interval-s" in args
    option = dict(zip(args[2::2], args[3::2], strict=True))
    assert option["--server-pid-file"] == pid_file
    server_side, name = mounted_file(pod, server, pid_file)
    admin_side, admin_name = mounted_file(pod, admin, pid_file)
    assert server_side is admin_side and "emptyDir" in server_side and name == admin_name
    volume, key = mounted_file(pod, admin, option["--served-cert-file"])
    assert volume["secret"]["secretName"] == NATS_TLS_SECRET
    assert {"key": "tls.crt", "path": key} in volume["secret"]["items"]
    for container in (server, admin):
        assert "runAsUser" not in container.get("securityContext", {}), container["name"]
    assert pod["securityContext"]["runAsUser"] != 0


def test_the_certificate_names_every_address_the_clients_use() -> None:
    docs = resources(BASE)
    certificate = find(docs, "Certificate", NATS_TLS_SECRET)
    spec = certificate["spec"]
    assert spec["secretName"] == NATS_TLS_SECRET
    assert "server auth" in spec["usages"]
    namespace = kustomization(BASE)["namespace"]
    for where, _, container in nats_clients(docs):
        env = {**planner_env("base"), **{k: v["value"] for k, v in env_of(container).items()
                                          if "value" in v}}
        for url in env["SLAPLANNER_NATS_URL"].split(","):
            host = str(urlparse(url).hostname)
            assert host in spec["dnsNames"] + spec.get("ipAddresses", []), (where, host)
    assert f"slaplanner-nats.{namespace}.svc.cluster.local" in spec["dnsNames"]
    # issued by the planner's own CA, which the self-signed root made
    issuer = find(docs, "Issuer", spec["issuerRef"]["name"])
    ca = find(docs, "Certificate", "slaplanner-ca")
    assert issuer["spec"]["ca"]["secretName"] == ca["spec"]["secretName"]
    assert ca["spec"]["isCA"] is True
    assert "selfSigned" in find(docs, "Issuer", ca["spec"]["issuerRef"]["name"])["spec"]


def render_with_components(*components: Path) -> list[Doc]:
    """The base with components, as an operator's overlay renders it."""
    with tempfile.TemporaryDirectory() as tmp:
        overlay = Path(tmp)

        def relative(path: Path) -> str:
            return str(Path(*[".."] * len(overlay.resolve().parts[1:])) / path.relative_to("/"))

        (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
            "resources": [relative(BASE)], "components": [relative(c) for c in components]}))
        return list(kustomize(overlay))


def test_without_cert_manager_the_base_keeps_tls_and_loses_only_the_issuers() -> None:
    with_cert_manager = list(rendered("base"))
    without = render_with_components(NO_CERT_MANAGER)
    removed = {(d["kind"], d["metadata"]["name"]) for d in with_cert_manager} - {
        (d["kind"], d["metadata"]["name"]) for d in without}
    assert removed == {("Issuer", "slaplanner-selfsigned"), ("Issuer", "slaplanner-ca"),
                       ("Certificate", "slaplanner-ca"), ("Certificate", NATS_TLS_SECRET)}
    assert not [d for d in without if is_custom(d)]
    # everything else as it was: the pods still mount the Secret the operator now makes
    assert [d for d in without] == [d for d in with_cert_manager if not is_custom(d)]


# --- images by digest --------------------------------------------------------------------------

# The planner's own image: the base names it by tag (it is built by the operator); a release pins
# it by digest in its overlay (docs/operations.md, Images).
OWN_IMAGE = "slaplanner"
# No digest found for it: no registry answers from the machines that build this project, and no
# published record of nats:2.15.1-alpine's index digest was found (docs/operations.md, Images).
# Strict: pinning it makes this fail until the mark goes.
UNPINNED = {"nats:2.15.1-alpine": "no digest of nats:2.15.1-alpine could be looked up"}


def rendered_images(docs: list[Doc] | tuple[Doc, ...]) -> set[str]:
    return {container["image"] for _, pod in pod_templates(list(docs))
            for container in containers(pod)}


def third_party_images() -> list[Any]:
    """Every image of the base but the planner's own, as the manifests name it."""
    images = sorted(rendered_images(resources(BASE)) - {OWN_IMAGE})
    return [pytest.param(image, marks=pytest.mark.xfail(strict=True, reason=UNPINNED[image]))
            if image in UNPINNED else image for image in images]


@pytest.mark.parametrize("image", third_party_images())
def test_every_third_party_image_is_pinned_by_tag_and_digest(image: str) -> None:
    reference = IMAGE_REFERENCE.fullmatch(image)
    assert reference is not None, image
    assert reference["digest"] is not None, f"{image}: by tag only"


def test_a_release_pins_the_planners_image_by_the_digest_it_pushed() -> None:
    """The release step of docs/operations.md: the overlay's images: entry with the digest."""
    digest = "sha256:" + "0123456789abcdef" * 4
    with tempfile.TemporaryDirectory() as tmp:
        overlay = Path(tmp)
        base = str(Path(*[".."] * len(overlay.resolve().parts[1:])) / BASE.relative_to("/"))
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
            "resources": [base],
            "images": [{"name": OWN_IMAGE, "newName": "registry.example.com/slaplanner",
                        "newTag": kustomization(BASE)["images"][0]["newTag"],
                        "digest": digest}]}))
        docs = kustomize(overlay)
    own = {image for image in rendered_images(docs) if "slaplanner" in image}
    assert own == {f"registry.example.com/slaplanner:0.1.0@{digest}"}
    # the third-party images keep their own digests through the overlay
    assert rendered_images(docs) - own == rendered_images(resources(BASE)) - {OWN_IMAGE}
    # and every image of what the release applies is pinned, but for the one named above
    by_tag_only = set()
    for image in rendered_images(docs):
        reference = IMAGE_REFERENCE.fullmatch(image)
        assert reference is not None, image
        if reference["digest"] is None:
            by_tag_only.add(image)
    assert by_tag_only == set(UNPINNED)
