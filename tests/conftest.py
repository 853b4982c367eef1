"""Fixtures for real servers: nats-server with JetStream, and services as real subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import nats
import pytest
from hypothesis import settings as hypothesis_settings
from nats.aio.client import Client as NATS

from shared import embedded_nats

REPO = Path(__file__).resolve().parent.parent

# The same examples on every run and machine: a property failure is then reproducible, and CI
# never passes or fails by the luck of the draw. Explore with --hypothesis-seed=N locally.
hypothesis_settings.register_profile("deterministic", derandomize=True, database=None)
hypothesis_settings.load_profile("deterministic")
# Big enough for the 10 MB hostile body to reach the services, which must refuse it themselves.
TEST_MAX_PAYLOAD = 16 << 20


def docker_engine_answers(timeout_s: float = 0.3) -> bool:
    """A Docker engine that answers /_ping on its socket (the CLI alone does not count)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return False
    path = host[len("unix://"):]
    if not os.path.exists(path):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b"OK" in sock.recv(1024)
    except OSError:
        return False


@dataclass
class NatsEndpoint:
    url: str
    server: embedded_nats.NatsServer | None  # None when it runs in a container

    def restart(self) -> None:
        if self.server is None:
            pytest.skip("restarting a containerised server is not supported by this fixture")
        self.server.start_again()


@contextlib.contextmanager
def _container_nats(tmp: Path) -> Iterator[NatsEndpoint]:
    from testcontainers.core.container import DockerContainer

    (tmp / "nats.conf").write_text(
        f'max_payload: {TEST_MAX_PAYLOAD}\njetstream {{ store_dir: "/data" }}\n'
    )
    container = (
        DockerContainer("nats:2.15.1-alpine")  # consumer reset needs >= 2.14
        .with_volume_mapping(str(tmp), "/config", "ro")
        .with_command("-c /config/nats.conf")
        .with_exposed_ports(4222)
    )
    with container:
        port = int(container.get_exposed_port(4222))
        embedded_nats.wait_for_port(port)
        yield NatsEndpoint(f"nats://{container.get_container_host_ip()}:{port}", None)


@pytest.fixture
def nats_server() -> Iterator[NatsEndpoint]:
    """A real nats-server with JetStream on a free port, stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="slaplanner-test-nats-") as tmp:
        if docker_engine_answers():
            with _container_nats(Path(tmp)) as endpoint:
                yield endpoint
            return
        server = embedded_nats.start(Path(tmp), max_payload_bytes=TEST_MAX_PAYLOAD)
        try:
            yield NatsEndpoint(server.url, server)
        finally:
            server.stop()


@pytest.fixture
async def nc(nats_server: NatsEndpoint) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_server.url, max_reconnect_attempts=-1,
                                reconnect_time_wait=0.2)
    yield client
    with contextlib.suppress(Exception):
        await client.close()


class ServiceProcess:
    """One service as a real subprocess (``python -m services.<name>``)."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"], cwd=REPO, env=self.env,
            stdout=log, stderr=subprocess.STDOUT,
        )
        return self

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, and the exit code; the service must drain and exit within the timeout (the
        pods' terminationGracePeriodSeconds: on a busy machine a drain takes seconds)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"{self.name} did not stop within {timeout_s} s") from None
        return int(self.process.returncode)

    def kill(self) -> None:
        """SIGKILL if still running (a test's cleanup; ``stop`` is the clean way out)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def services(nats_server: NatsEndpoint, tmp_path: Path) -> Iterator[dict[str, ServiceProcess]]:
    """Services by name, not started; each test starts the ones it needs."""
    env = {
        **os.environ,
        "SLAPLANNER_NATS_URL": nats_server.url,
        "SLAPLANNER_HTTP_PORT": "0",
        "SLAPLANNER_HTTP_HOST": "127.0.0.1",
        "SLAPLANNER_NATS_RECONNECT_WAIT_S": "200ms",
        "PYTHONUNBUFFERED": "1",
    }
    procs = {n: ServiceProcess(n, dict(env), tmp_path)
             for n in ("collector", "forecaster", "decider", "actuator")}
    yield procs
    for proc in procs.values():
        proc.kill()


def wait_until(predicate: object, timeout_s: float = 20.0, interval_s: float = 0.05) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError("condition not met in time")


def async_true(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """A plain predicate as the async condition ``until`` waits for."""
    async def check() -> bool:
        return predicate()
    return check


async def until(condition: object, timeout_s: float, what: str,
                interval_s: float = 0.05) -> None:
    """Wait for an async ``condition()`` to hold, failing after ``timeout_s`` with ``what``."""
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(interval_s)


@pytest.fixture(autouse=True)
def _stop_actuator_watches() -> Iterator[None]:
    """Stop the watch threads of the actuators a test assembled (tests/conftest_k8s.py)."""
    yield
    helpers = sys.modules.get("tests.conftest_k8s")
    if helpers is not None:
        helpers.close_all()


async def wait_for_consumers(nc: NATS, names: set[str], timeout_s: float = 30.0) -> None:
    """Until the stream has the durable consumers ``names`` (the services create them)."""
    js = nc.jetstream()
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                present = {c.name for c in await js.consumers_info("SLAPLANNER")}
            except Exception:
                present = set()
            if names <= present:
                return
            await asyncio.sleep(0.05)


def serve_exposition(body: Callable[[], bytes]) -> ThreadingHTTPServer:
    """A /metrics endpoint on a free loopback port serving ``body()`` at each scrape (text
    format 0.0.4), in a daemon thread; ``shutdown()`` it after use."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            text = body()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# --- markers: `make test-fast` runs the tests that need no server ---------------------------------
# A test needs servers when it uses a fixture that starts one (a nats-server, Prometheus, the
# Kubernetes API test server, metrics endpoints, the services) or its module starts processes
# itself (kustomize, promtool, nats-server config checks, the replay). `-m "not servers"` runs
# with every process start refused, so a test missing from these lists fails, naming what it
# started, instead of slowing the fast suite down.
SERVER_FIXTURES = frozenset({
    "nats_server", "nc", "services", "k8s", "kube", "server", "api", "workers", "stack",
    "shell", "servers", "replicas", "prometheus", "password_server", "deploy_bus", "collected",
    "targets", "installed",
})
SERVER_MODULES = frozenset({
    "test_bench_load", "test_cli_output", "test_collector_arrivals", "test_collector_prometheus",
    "test_collector_recorded", "test_demo", "test_deploy_dashboard", "test_deploy_dockerfile",
    "test_deploy_manifests", "test_deploy_monitoring", "test_deploy_nats",
    "test_deploy_prometheus", "test_docs_commands", "test_faults", "test_full_loop",
    "test_forecaster_resources_shell", "test_nats_tls", "test_operator_tools", "test_security",
    "test_sim_replay",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = Path(str(item.path)).stem
        if module in SERVER_MODULES or SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)


def pytest_configure(config: pytest.Config) -> None:
    if config.option.markexpr.replace(" ", "") != "notservers":
        return

    def refuse(self: subprocess.Popen[bytes], args: object, *rest: object, **kw: object) -> None:
        raise AssertionError(
            f"a test of the server-free suite starts a process ({args!r}): add its fixture to "
            "SERVER_FIXTURES or its module to SERVER_MODULES in tests/conftest.py"
        )

    subprocess.Popen.__init__ = refuse  # type: ignore[assignment, method-assign]
