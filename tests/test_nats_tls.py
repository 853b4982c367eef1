"""NATS over TLS as deploy/ ships it: the server of deploy/base/nats/nats.conf (with its tls block,
its users and a throwaway CA made here) serves TLS only, a service given the CA connects, a
service without it exits with one line, and no service sends its password to a server that does
not speak TLS where TLS is wanted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
import trustme
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from shared import bus, bus_admin, embedded_nats, operator_tools
from shared.service_settings import ServiceSettings
from tests import test_deploy_manifests as deploy
from tests.conftest import REPO, ServiceProcess, async_true, until, wait_until
from tests.test_bus_reliability import error_lines, run_until_exit

NATS_DIR = deploy.BASE / "nats"
USERS = (*deploy.SERVICES, "admin")
# Where the StatefulSet mounts the Secret slaplanner-nats-tls for the server.
SERVER_TLS_MOUNT = "/etc/nats-tls/"
# nats.conf's pid_file, which the bus-admin beside the server reads to tell it to reload.
SERVER_PID_FILE = "/var/run/nats/nats.pid"


@dataclass
class Certificates:
    ca_file: Path
    server_cert: Path
    server_key: Path


def leaf_pem(certificate: trustme.LeafCert) -> bytes:
    """A leaf certificate with its chain, as cert-manager writes tls.crt."""
    return b"".join(pem.bytes() for pem in certificate.cert_chain_pems)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A throwaway CA and a server certificate for 127.0.0.1, as cert-manager's Secret holds
    them (tls.crt with its chain, tls.key, ca.crt)."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    found = Certificates(folder / "ca.crt", folder / "tls.crt", folder / "tls.key")
    ca.cert_pem.write_to_path(str(found.ca_file))
    server.private_key_pem.write_to_path(str(found.server_key))
    found.server_cert.write_bytes(leaf_pem(server))
    return found


@dataclass
class DeployNats:
    url: str  # tls://127.0.0.1:<port>
    port: int
    passwords: dict[str, str]
    process: subprocess.Popen[bytes]


def shipped_config(folder: Path, certs: Certificates, port: int, http_port: int) -> Path:
    """deploy's nats.conf and auth.conf as they are, but for the paths and ports of this
    machine: the certificate where the pod mounts it, the store, free ports."""
    text = (NATS_DIR / "nats.conf").read_text()
    for path, local in ((f"{SERVER_TLS_MOUNT}tls.crt", certs.server_cert),
                        (f"{SERVER_TLS_MOUNT}tls.key", certs.server_key)):
        assert path in text, path
        text = text.replace(path, str(local))
    for line, setting in (("port: 4222", f"listen: 127.0.0.1:{port}"),
                          ("http_port: 8222", f"http: 127.0.0.1:{http_port}"),
                          (f"pid_file: {SERVER_PID_FILE}", f'pid_file: "{folder / "nats.pid"}"'),
                          ("store_dir: /data/jetstream", f'store_dir: "{folder / "js"}"')):
        assert line in text, line
        text = text.replace(line, setting)
    (folder / "auth.conf").write_text((NATS_DIR / "auth.conf").read_text())
    config = folder / "nats.conf"
    config.write_text(text)
    return config


@pytest.fixture(scope="module")
def deploy_nats(certificates: Certificates,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployNats]:
    """nats-server from deploy's config, with the pod's environment (its passwords), and the
    bus laid out by the admin over TLS as the bus-admin container does it."""
    folder = tmp_path_factory.mktemp("deploy-nats")
    port, http_port = embedded_nats.free_port(), embedded_nats.free_port()
    config = shipped_config(folder, certificates, port, http_port)
    passwords = {user: secrets.token_hex(24) for user in USERS}
    env = {**os.environ, "POD_NAME": "slaplanner-nats-0",
           **{f"NATS_{user.upper()}_PASSWORD": p for user, p in passwords.items()}}
    process = subprocess.Popen([embedded_nats.nats_server_binary(), "-c", str(config)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        embedded_nats.wait_for_port(port)
        running = DeployNats(f"tls://127.0.0.1:{port}", port, passwords, process)
        admin_env = {**os.environ, **deploy.local_env("base"), "SLAPLANNER_NATS_URL": running.url,
                     "SLAPLANNER_NATS_TLS_CA_FILE": str(certificates.ca_file),
                     "SLAPLANNER_NATS_USER": "admin",
                     "SLAPLANNER_NATS_PASSWORD": passwords["admin"]}
        done = subprocess.run([sys.executable, "-m", "services.cli", "bus", "setup"],
                              env=admin_env, cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        yield running
    finally:
        process.terminate()
        process.wait(timeout=10)


def service(name: str, server: DeployNats, tmp_path: Path, **env: str) -> ServiceProcess:
    """The service as its Deployment runs it: the ConfigMap's settings, its user, here no
    Kubernetes (no leader election)."""
    return ServiceProcess(name, {
        **os.environ, **deploy.local_env("base"),
        "SLAPLANNER_NATS_URL": server.url, "SLAPLANNER_NATS_USER": name,
        "SLAPLANNER_NATS_PASSWORD": server.passwords[name],
        "SLAPLANNER_HTTP_HOST": "127.0.0.1", "SLAPLANNER_HTTP_PORT": "0",
        "SLAPLANNER_LEADER_ELECTION": "off", "PYTHONUNBUFFERED": "1", **env,
    }, tmp_path)


async def server_info(port: int) -> dict[str, object]:
    """The INFO line a client reads first, before any TLS."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        line = await asyncio.wait_for(reader.readline(), timeout=10)
    finally:
        writer.close()
    assert line.startswith(b"INFO "), line
    info = json.loads(line[5:])
    assert isinstance(info, dict)
    return info


# --- the shipped server -------------------------------------------------------------------------

async def test_the_shipped_server_requires_tls_of_every_client(deploy_nats: DeployNats) -> None:
    info = await server_info(deploy_nats.port)
    assert info["tls_required"] is True
    # the planner's URLs ask for it too
    assert deploy.planner_env("base")["SLAPLANNER_NATS_URL"].startswith("tls://")


def test_a_service_with_the_ca_connects_over_tls_under_its_user(
    deploy_nats: DeployNats, certificates: Certificates, tmp_path: Path
) -> None:
    decider = service("decider", deploy_nats, tmp_path,
                      SLAPLANNER_NATS_TLS_CA_FILE=str(certificates.ca_file)).start()
    try:
        wait_until(lambda: f"connected to NATS at {deploy_nats.url}" in decider.log(),
                   timeout_s=60.0)
        assert decider.process is not None and decider.process.poll() is None, decider.log()
        assert decider.stop() == 0, decider.log()
    finally:
        decider.kill()
    assert error_lines(decider) == [], decider.log()


def test_a_service_without_the_ca_exits_with_one_line_saying_why(
    deploy_nats: DeployNats, tmp_path: Path
) -> None:
    """Without SLAPLANNER_NATS_TLS_CA_FILE the system's CAs know nothing of the planner's CA."""
    forecaster = service("forecaster", deploy_nats, tmp_path)
    code, took_s = run_until_exit(forecaster)
    assert code == 1 and took_s < 10.0, (code, took_s, forecaster.log())
    [line] = error_lines(forecaster)
    assert "TLS certificate is not trusted" in line and deploy_nats.url in line, line
    assert "SLAPLANNER_NATS_TLS_CA_FILE" in line, line
    assert "Traceback" not in forecaster.log()


def test_a_service_that_trusts_another_ca_exits_with_one_line_naming_it(
    deploy_nats: DeployNats, tmp_path: Path
) -> None:
    other_ca = tmp_path / "other-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    actuator = service("actuator", deploy_nats, tmp_path,
                       SLAPLANNER_NATS_TLS_CA_FILE=str(other_ca))
    code, took_s = run_until_exit(actuator)
    assert code == 1 and took_s < 10.0, (code, took_s, actuator.log())
    [line] = error_lines(actuator)
    assert "not trusted" in line and str(other_ca) in line, line


async def test_a_reload_serves_a_renewed_certificate_without_a_restart(
    certificates: Certificates, tmp_path: Path
) -> None:
    """What a reload (SIGHUP) does: the server serves the certificate now in its files, to the
    clients it has and to new ones, without a restart. The new certificate comes from another CA
    here, so that which one is served shows."""
    served = Certificates(tmp_path / "ca.crt", tmp_path / "tls.crt", tmp_path / "tls.key")
    for source, target in zip(vars(certificates).values(), vars(served).values(), strict=True):
        target.write_bytes(source.read_bytes())
    port = embedded_nats.free_port()
    config = shipped_config(tmp_path, served, port, embedded_nats.free_port())
    env = {**os.environ, "POD_NAME": "slaplanner-nats-0",
           **{f"NATS_{user.upper()}_PASSWORD": "x" * 48 for user in USERS}}
    process = subprocess.Popen([embedded_nats.nats_server_binary(), "-c", str(config)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        embedded_nats.wait_for_port(port)
        renewed_ca = trustme.CA()
        renewed_ca_file = tmp_path / "renewed-ca.crt"
        renewed_ca.cert_pem.write_to_path(str(renewed_ca_file))
        trusting_renewed = ServiceSettings(
            nats_url=[f"tls://127.0.0.1:{port}"], nats_user="admin", nats_password="x" * 48,
            nats_tls_ca_file=str(renewed_ca_file), connect_deadline_s=3.0)
        with pytest.raises(bus.BusError, match="not trusted"):
            await bus.connect(trusting_renewed, "test")
        # the kubelet updates the mounted Secret's files; then the reload
        leaf = renewed_ca.issue_cert("127.0.0.1")
        leaf.private_key_pem.write_to_path(str(served.server_key))
        served.server_cert.write_bytes(leaf_pem(leaf))
        process.send_signal(signal.SIGHUP)
        deadline = asyncio.get_running_loop().time() + 30.0
        while True:
            try:
                nc = await bus.connect(trusting_renewed, "test")
                break
            except bus.BusError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert process.poll() is None  # the same process: reloaded, not restarted
        await nc.close()
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_the_bus_admin_reloads_the_server_once_its_mounted_certificate_is_renewed(
    tmp_path: Path,
) -> None:
    """cert-manager renews the server's certificate in the Secret and the kubelet updates the
    files, the bus-admin's volume and the server's each on its own schedule (here the
    bus-admin's first); nats-server reads its files only when it starts or reloads. The
    bus-admin tells it to reload while it serves another certificate than the Secret's, and
    stops once it serves the renewed one."""
    ca = trustme.CA()
    first = ca.issue_cert("127.0.0.1")
    served = Certificates(tmp_path / "ca.crt", tmp_path / "tls.crt", tmp_path / "tls.key")
    ca.cert_pem.write_to_path(str(served.ca_file))
    first.private_key_pem.write_to_path(str(served.server_key))
    served.server_cert.write_bytes(leaf_pem(first))
    admin_mount = tmp_path / "bus-admin"
    admin_mount.mkdir()
    (admin_mount / "tls.crt").write_bytes(leaf_pem(first))
    port = embedded_nats.free_port()
    config = shipped_config(tmp_path, served, port, embedded_nats.free_port())
    password = secrets.token_hex(24)
    env = {**os.environ, "POD_NAME": "slaplanner-nats-0",
           **{f"NATS_{user.upper()}_PASSWORD": password for user in USERS}}
    server = subprocess.Popen([embedded_nats.nats_server_binary(), "-c", str(config)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"tls://127.0.0.1:{port}"
    as_admin = ServiceSettings(nats_url=[url], nats_user="admin", nats_password=password,
                               nats_tls_ca_file=str(served.ca_file), connect_deadline_s=5.0)
    admin = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "bus", "setup", "--keep-interval-s", "1s",
         "--served-cert-file", str(admin_mount / "tls.crt"),
         "--server-pid-file", str(tmp_path / "nats.pid")],
        env={**os.environ, **deploy.local_env("base"), "SLAPLANNER_NATS_URL": url,
             "SLAPLANNER_NATS_TLS_CA_FILE": str(served.ca_file), "SLAPLANNER_NATS_USER": "admin",
             "SLAPLANNER_NATS_PASSWORD": password},
        cwd=REPO, stdout=(tmp_path / "bus-admin.log").open("wb"), stderr=subprocess.STDOUT)

    def reloads() -> list[str]:
        return [line for line in (tmp_path / "bus-admin.log").read_text().splitlines()
                if "told it to reload" in line]

    def der(certificate: trustme.LeafCert) -> bytes:
        return ssl.PEM_cert_to_DER_cert(certificate.cert_chain_pems[0].bytes().decode())

    try:
        embedded_nats.wait_for_port(port)
        # the bus laid out, then two more rounds: the same certificate, no reload
        await until(wait_for_layout(as_admin), 60.0, "the bus layout")
        await asyncio.sleep(2.5)
        assert not reloads(), (tmp_path / "bus-admin.log").read_text()
        assert await bus_admin.served_certificate(url) == der(first)

        renewed = ca.issue_cert("127.0.0.1")
        (admin_mount / "tls.crt").write_bytes(leaf_pem(renewed))
        # the server's files are not updated yet: a reload changes nothing, so it comes again
        await until(async_true(lambda: len(reloads()) >= 2), 60.0, "the reloads")
        renewed.private_key_pem.write_to_path(str(served.server_key))
        served.server_cert.write_bytes(leaf_pem(renewed))

        async def serves_the_renewed() -> bool:
            return await bus_admin.served_certificate(url) == der(renewed)

        await until(serves_the_renewed, 60.0, "the renewed certificate served")
        assert server.poll() is None  # the same process: reloaded, not restarted
        # and it stops: the server serves what the Secret holds
        settled = len(reloads())
        await asyncio.sleep(3.0)
        assert len(reloads()) <= settled + 1, reloads()
        assert admin.poll() is None, (tmp_path / "bus-admin.log").read_text()
        await (await bus.connect(as_admin, "test")).close()
    finally:
        for process in (admin, server):
            process.terminate()
            process.wait(timeout=30)


def wait_for_layout(settings: ServiceSettings) -> Callable[[], Awaitable[bool]]:
    """Whether the bus-admin has made the stream (its first round done)."""

    async def laid_out() -> bool:
        nc = await bus.connect(settings, "test")
        try:
            await nc.jetstream().stream_info(settings.stream_name)
            return True
        except NotFoundError:
            return False
        finally:
            await nc.close()
    return laid_out


def test_a_certificate_reload_needs_both_files_and_the_keep_loop() -> None:
    for args, says in ((["--served-cert-file", "/x/tls.crt", "--keep-interval-s", "10s"],
                        "go together"),
                       (["--served-cert-file", "/x/tls.crt", "--server-pid-file", "/x/pid"],
                        "KEEP_INTERVAL_S")):
        done = subprocess.run([sys.executable, "-m", "services.cli", "bus", "setup", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "SLAPLANNER_NATS_URL": "nats://127.0.0.1:1"})
        assert done.returncode == 2, done.stdout + done.stderr
        assert says in done.stderr, done.stderr


# --- no password in plaintext where TLS is wanted -----------------------------------------------

@dataclass
class Impostor:
    """Whatever answers at a tls:// address without TLS: a NATS INFO line that does not ask for
    TLS, then it keeps what the client sends."""

    port: int
    received: bytearray

    async def wait_for_bytes(self, timeout_s: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self.received and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def impostor() -> AsyncIterator[Impostor]:
    received = bytearray()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'INFO {"server_id":"x","version":"2.15.1","proto":1,"max_payload":1048576,'
                     b'"auth_required":true,"headers":true}\r\n')
        await writer.drain()
        with contextlib.suppress(Exception):
            while chunk := await reader.read(4096):
                received.extend(chunk)
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Impostor(port, received)
    finally:
        server.close()
        await server.wait_closed()


async def test_nats_py_alone_sends_the_password_in_plaintext_to_a_tls_url() -> None:
    """The hole the bus's client closes: nats-py upgrades only when the server asks."""
    async with impostor() as fake:
        with contextlib.suppress(Exception):
            nc = await nats.connect(f"tls://127.0.0.1:{fake.port}", user="decider",
                                    password="s3cret-sent-in-clear", connect_timeout=3,
                                    allow_reconnect=False, max_reconnect_attempts=0)
            await nc.close()
        await fake.wait_for_bytes(timeout_s=10.0)
    assert b"s3cret-sent-in-clear" in fake.received


@pytest.mark.parametrize("tls", [
    pytest.param({"url": "tls"}, id="a tls:// URL"),
    pytest.param({"url": "nats", "ca": True}, id="a nats:// URL with a CA file"),
])
async def test_the_bus_never_sends_credentials_to_a_server_without_tls(
    tls: dict[str, object], certificates: Certificates
) -> None:
    async with impostor() as fake:
        settings = ServiceSettings(
            nats_url=[f"{tls['url']}://127.0.0.1:{fake.port}"], nats_user="decider",
            nats_password="s3cret-kept", connect_deadline_s=3.0,
            nats_tls_ca_file=str(certificates.ca_file) if tls.get("ca") else None)
        with pytest.raises(bus.BusError) as refused:
            await bus.connect(settings, "decider")
        await asyncio.sleep(0.2)  # anything sent after the INFO has arrived by now
    line = str(refused.value)
    assert "does not require TLS" in line and f"127.0.0.1:{fake.port}" in line, line
    assert "\n" not in line
    assert bytes(fake.received) == b""


def test_a_url_list_that_mixes_tls_and_plaintext_is_refused() -> None:
    with pytest.raises(ValidationError, match="mixes tls://"):
        ServiceSettings(nats_url=["tls://a:4222", "nats://b:4222"])
    assert ServiceSettings(nats_url=["tls://a:4222", "tls://b:4222"]).wants_tls()
    assert not ServiceSettings(nats_url=["nats://a:4222"]).wants_tls()


async def test_the_operator_tools_keep_the_same_rule() -> None:
    async with impostor() as fake:
        settings = ServiceSettings(nats_url=[f"tls://127.0.0.1:{fake.port}"],
                                   nats_user="admin", nats_password="s3cret-admin")
        with pytest.raises(operator_tools.ToolError, match="does not require TLS"):
            await operator_tools.connect(settings, "status")
        await asyncio.sleep(0.2)
    assert b"s3cret-admin" not in fake.received
