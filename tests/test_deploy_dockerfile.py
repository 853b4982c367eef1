"""deploy/Dockerfile, read without a Docker engine: pinned, non-root, health-checked, complete.

No engine builds the image here, so the essentials are read from the file, and what can run
without one runs: the HEALTHCHECK command against a local /healthz, and a wheel built from
exactly the files the Dockerfile copies (it must hold the bundled profile and the entry point).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from services import cli
from shared import embedded_nats
from tests import test_deploy_manifests as deploy

DOCKERFILE = deploy.DEPLOY / "Dockerfile"
DOCKERIGNORE = deploy.DEPLOY / "Dockerfile.dockerignore"
LOCKS = deploy.REPO / "requirements"
BUILD_LOCK, RUNTIME_LOCK, DEV_LOCK = (LOCKS / f"{n}.lock" for n in ("build", "runtime", "dev"))


@dataclass(frozen=True)
class Instruction:
    command: str
    arguments: str
    stage: int


@cache
def instructions() -> tuple[Instruction, ...]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "a continuation line ends the file"
    out, stage = [], -1
    for text in logical:
        command, _, arguments = text.strip().partition(" ")
        if command.upper() == "FROM":
            stage += 1
        out.append(Instruction(command.upper(), arguments.strip(), stage))
    return tuple(out)


def final(command: str) -> list[Instruction]:
    last = instructions()[-1].stage
    return [i for i in instructions() if i.command == command and i.stage == last]


def build_args() -> dict[str, str]:
    args = {}
    for i in instructions():
        if i.command == "ARG" and "=" in i.arguments:
            name, _, value = i.arguments.partition("=")
            args[name] = value
    return args


def base_images() -> list[str]:
    images = []
    for i in instructions():
        if i.command == "FROM":
            image = i.arguments.split()[0]
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: build_args()[m.group(1)], image))
    return images


def pins(path: Path) -> dict[str, str]:
    """name -> pinned version of a lock file; every requirement must be an exact pin with at
    least one hash."""
    out: dict[str, str] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, *options = line.split(" --hash=")
        assert options and all(re.fullmatch(r"sha256:[0-9a-f]{64}", o.strip()) for o in options), (
            f"{path.name}: {requirement} has no sha256 hash")
        parsed = Requirement(requirement)
        [spec] = list(parsed.specifier)
        assert spec.operator == "==", line
        out[canonicalize_name(parsed.name)] = spec.version
    return out


def test_the_base_image_is_a_slim_python_3_11_pinned_by_tag_and_digest() -> None:
    images = base_images()
    assert images, "no FROM"
    for image in images:
        reference, _, digest = image.partition("@")
        name, _, tag = reference.partition(":")
        assert name == "python" and tag, image
        assert tag != "latest" and "latest" not in tag, image
        assert re.fullmatch(r"3\.11\.\d+-slim(-\w+)?", tag), image
        # a re-pushed tag changes nothing: the build pulls the index of this digest or fails
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), image


def test_the_image_runs_as_a_numeric_non_root_user_the_pods_agree_with() -> None:
    [user] = final("USER")
    uid, _, gid = user.arguments.partition(":")
    assert uid.isdigit() and int(uid) > 0, user
    assert gid.isdigit() and int(gid) > 0, user
    for service in deploy.SERVICES:
        pod = deploy.workload(service)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == int(uid)
        assert pod["securityContext"]["runAsGroup"] == int(gid)
    # the user is the last word: nothing runs after it
    runtime = [i for i in instructions() if i.stage == user.stage]
    assert "RUN" not in {i.command for i in runtime[runtime.index(user):]}


def test_the_command_picks_the_service() -> None:
    [entrypoint] = final("ENTRYPOINT")
    assert entrypoint.arguments == '["slaplanner"]'
    scripts = tomllib.loads((deploy.REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["slaplanner"] == "services.cli:main"
    for service in deploy.SERVICES:
        assert service in cli.COMMANDS
        assert deploy.main_container(service)["args"] == [service]


def test_every_package_is_installed_from_a_lock_with_hashes_and_the_project_fetches_none(
) -> None:
    runs = [i.arguments for i in instructions() if i.command == "RUN" and "pip install" in
            i.arguments]
    assert runs
    locks = set()
    for run in runs:
        for command in run.split("&&"):
            if "pip install" not in command:
                continue
            assert "--no-deps" in command, command
            if "/src" in command.split():
                assert "--no-build-isolation" in command, command
                assert "-e " not in command and "--editable" not in command, command
            else:
                assert "--require-hashes" in command, command
                locks.add(command.split(" -r ", 1)[1].split()[0])
    assert locks == {"requirements/build.lock", "requirements/runtime.lock"}


def test_the_locks_pin_every_dependency_within_what_the_project_allows() -> None:
    pyproject = tomllib.loads((deploy.REPO / "pyproject.toml").read_text())
    runtime, dev, build = pins(RUNTIME_LOCK), pins(DEV_LOCK), pins(BUILD_LOCK)
    for lock, lines in ((runtime, pyproject["project"]["dependencies"]),
                        (dev, pyproject["project"]["optional-dependencies"]["dev"]),
                        (build, pyproject["build-system"]["requires"])):
        for line in lines:
            requirement = Requirement(line)
            name = canonicalize_name(requirement.name)
            assert name in lock, f"{name} is not locked"
            assert requirement.specifier.contains(lock[name], prereleases=True), (
                f"{name}=={lock[name]} is outside {requirement.specifier}")
    # the image runs what the tests ran: the same version of every package it has
    assert {name: dev[name] for name in runtime} == runtime
    assert "pip" in build and not set(build) & set(dev), "pip and the backend: build.lock only"


def test_the_test_environment_is_exactly_the_lock() -> None:
    """`make install` installs dev.lock and build.lock and nothing else (pip check passes)."""
    from importlib import metadata

    wanted = {**pins(DEV_LOCK), **pins(BUILD_LOCK)}
    installed: dict[str, str] = {canonicalize_name(d.metadata["Name"]): d.version
                                 for d in metadata.distributions()}
    installed.pop("slaplanner", None)
    differing = {name: (installed.get(name), version) for name, version in wanted.items()
                 if installed.get(name) != version}
    assert not differing, f"installed vs locked: {differing}"
    extra = set(installed) - set(wanted)
    assert not extra, f"installed without a lock: {extra}"


def copied_sources() -> list[str]:
    sources = []
    for i in instructions():
        if i.command == "COPY" and "--from" not in i.arguments:
            sources += i.arguments.split()[:-1]
    return sources


def test_every_copied_file_exists_and_is_in_the_build_context() -> None:
    ignore = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the context is the repository: exclude all, then include"
    included = {line[1:] for line in ignore if line.startswith("!")}
    for source in copied_sources():
        assert (deploy.REPO / source).exists(), source
        assert source in included, f"{source} is excluded from the build context"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a non-editable install of the files the Dockerfile copies puts in site-packages.

    setuptools' build_py, which lays out the packages and their package data for the wheel,
    run on a copy of exactly those files (no download: the build backend of the environment).
    """
    context = tmp_path_factory.mktemp("context")
    for source in copied_sources():
        path = deploy.REPO / source
        if path.is_dir():
            shutil.copytree(path, context / source,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (context / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, context / source)
    out = tmp_path_factory.mktemp("site-packages")
    built = subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "--quiet",
         "build_py", "--build-lib", str(out)],
        capture_output=True, text=True, timeout=300, cwd=context)
    assert built.returncode == 0, built.stdout + built.stderr
    return out


def test_the_image_holds_the_bundled_profile_and_every_service(installed: Path) -> None:
    profile = deploy.REPO / "shared" / "profiles"
    files = [p for p in profile.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert files
    for path in files:
        assert (installed / path.relative_to(deploy.REPO)).is_file(), path
    for service in deploy.SERVICES:
        assert (installed / "services" / service / "__main__.py").is_file()
    assert (installed / "services" / "cli.py").is_file()


class Healthz(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


@contextlib.contextmanager
def serving(status: int) -> Iterator[int]:
    handler = type("Handler", (Healthz,), {"status": status})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def healthcheck(port: int) -> int:
    [check] = final("HEALTHCHECK")
    command = check.arguments.split(" CMD ", 1)[1]
    assert not command.startswith("["), "shell form expected"
    tokens = shlex.split(command)
    assert tokens[0] == "python"
    env = {**os.environ, "SLAPLANNER_HTTP_PORT": str(port)}
    done = subprocess.run([sys.executable, *tokens[1:]], env=env, capture_output=True,
                          timeout=30)
    return done.returncode


def test_the_healthcheck_asks_healthz_on_the_configured_port() -> None:
    [check] = final("HEALTHCHECK")
    assert "/healthz" in check.arguments
    with serving(200) as port:
        assert healthcheck(port) == 0
    with serving(503) as port:
        assert healthcheck(port) == 1
    assert healthcheck(embedded_nats.free_port()) == 1  # nothing listens


def test_the_image_defaults_to_the_port_the_pods_declare() -> None:
    [env] = [i for i in final("ENV") if "SLAPLANNER_HTTP_PORT" in i.arguments]
    port = re.search(r"SLAPLANNER_HTTP_PORT=(\d+)", env.arguments)
    assert port is not None
    [expose] = final("EXPOSE")
    assert expose.arguments == port.group(1) == deploy.planner_env("base")["SLAPLANNER_HTTP_PORT"]
