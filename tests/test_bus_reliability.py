"""Faults and attacks on the bus, each against the services as real processes on a real
nats-server: a window from the future, a lost JetStream store, two deployments whose bodies
share an id, a stream configured by someone else, a flood of junk, a redelivery that comes back
behind newer windows, and a server that refuses, is not there, or has no JetStream.

Every test here failed on the code before the change that made it pass (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from shared import bus, embedded_nats
from shared.messages import LoadForecast, Rejected, ScaleEvent
from shared.service_settings import ServiceSettings
from tests.conftest import REPO, NatsEndpoint, ServiceProcess

STREAM = ServiceSettings().stream_name
DECISIONS = ServiceSettings().decisions_stream_name
WINDOW_S = 60.0
# Windows in the past, as a collector publishes them: the last one ended a minute ago.
NOW = time.time()


def window(index: int, count: int = 40) -> float:
    """The end of window ``index`` of ``count`` recent windows, the last one a minute ago."""
    return round(NOW - WINDOW_S * (count - index), 0)


def snapshot_body(window_end: float, num_requests: float, name: str = "llama",
                  **extra: object) -> bytes:
    return orjson.dumps({
        "schema_version": 1, "deployment": {"namespace": "prod", "name": name},
        "window_end": window_end, "window_s": WINDOW_S, "num_requests": num_requests,
        "isl_avg": 3000.0, "osl_avg": 300.0, **extra,
    })


def target_body(window_end: float, replicas: int, name: str = "llama") -> bytes:
    return orjson.dumps({
        "schema_version": 1, "deployment": {"namespace": "prod", "name": name},
        "window_end": window_end, "window_s": WINDOW_S, "policy": "test",
        "prefill_replicas": replicas, "decode_replicas": replicas,
    })


class Seen:
    """Every message on slaplanner.>, by family, as a core-NATS subscriber sees them."""

    def __init__(self) -> None:
        self.bodies: dict[str, list[Msg]] = {}
        self.arrived = asyncio.Event()

    async def on_message(self, msg: Msg) -> None:
        self.bodies.setdefault(msg.subject.split(".")[1], []).append(msg)
        self.arrived.set()

    def of(self, family: str) -> list[Msg]:
        return self.bodies.get(family, [])

    async def until(self, condition: object, timeout_s: float, what: str) -> None:
        assert callable(condition)
        deadline = time.monotonic() + timeout_s
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"not within {timeout_s} s: {what}")
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), min(remaining, 0.5))

    def forecasts(self) -> list[LoadForecast]:
        return [LoadForecast.from_json(m.data) for m in self.of("forecast")]

    def events(self) -> list[ScaleEvent]:
        return [ScaleEvent.from_json(m.data) for m in self.of("scaled")]

    def rejected(self, stage: str) -> list[Rejected]:
        found = [Rejected.model_validate_json(m.data) for m in self.of("rejected")]
        return [r for r in found if r.stage == stage]


@pytest.fixture
async def seen(nc: NATS) -> AsyncIterator[Seen]:
    sink = Seen()
    sub = await nc.subscribe("slaplanner.>", cb=sink.on_message)
    yield sink
    with contextlib.suppress(Exception):
        await sub.unsubscribe()


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except urllib.error.URLError as error:  # not listening yet
        return 0, str(error.reason)


def with_http_port(proc: ServiceProcess) -> int:
    port = embedded_nats.free_port()
    proc.env["SLAPLANNER_HTTP_PORT"] = str(port)
    return port


async def wait_for_consumers(nc: NATS, names: set[str], procs: list[ServiceProcess]) -> None:
    js = nc.jetstream()
    for _ in range(600):
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            if names <= {c.name for c in await js.consumers_info(STREAM)}:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("services not ready:\n" + logs(procs))


def logs(procs: list[ServiceProcess]) -> str:
    return "\n".join(f"--- {p.name}\n{p.log()[-4000:]}" for p in procs)


# --------------------------------------------------------------------------- the clock guard


async def test_a_window_from_the_future_is_refused_and_never_freezes_the_forecasts(
    nc: NATS, services: dict[str, ServiceProcess], seen: Seen
) -> None:
    """A snapshot at 9e9 (valid by the model) froze the forecaster's history on main: every
    later snapshot was "not after the last recorded one", and so after a restart, whose rebuild
    replayed it. A collector whose clock stepped an hour ahead did the same."""
    forecaster = services["forecaster"]
    forecaster.env["SLAPLANNER_PREDICTOR"] = "constant"
    forecaster.start()
    await wait_for_consumers(nc, {"forecaster"}, [forecaster])
    js = nc.jetstream()
    for index in range(10):
        await js.publish("slaplanner.metrics.prod.llama", snapshot_body(window(index), 600.0))
    await seen.until(lambda: len(seen.forecasts()) == 10, 30, "forecasts of the first windows")
    # a collector whose clock stepped an hour ahead, and a forged far-future window
    for future in (NOW + 3600.0, 9e9):
        await js.publish("slaplanner.metrics.prod.llama", snapshot_body(future, 600.0))
    await seen.until(lambda: len(seen.rejected("forecaster")) == 2, 30, "two rejections")
    reasons = [r.reason for r in seen.rejected("forecaster")]
    assert all("ahead of this service's clock" in r for r in reasons), reasons
    # the load rises; the forecasts follow it
    for index in range(10, 20):
        await js.publish("slaplanner.metrics.prod.llama", snapshot_body(window(index), 7000.0))
    await seen.until(lambda: len(seen.forecasts()) == 20, 30, "forecasts of the rising load")
    assert seen.forecasts()[-1].steps[0].num_requests == pytest.approx(7000.0)
    # after a kill -9 the rebuild skips the future windows too, and forecasts keep following
    forecaster.kill()
    forecaster.start()
    await js.publish("slaplanner.metrics.prod.llama", snapshot_body(window(20), 7100.0))
    await seen.until(lambda: len(seen.forecasts()) == 21, 60, "a forecast after the restart")
    assert seen.forecasts()[-1].steps[0].num_requests == pytest.approx(7100.0)
    assert "skipped a stored body" in forecaster.log(), forecaster.log()
    assert forecaster.stop() == 0, forecaster.log()


async def test_a_future_target_neither_applies_nor_hides_later_targets_from_the_actuator(
    nc: NATS, services: dict[str, ServiceProcess], seen: Seen
) -> None:
    """On main a target at 9e9 became the actuator's "last applied" (and, from its ScaleEvent
    in the stream, the restarted actuator's too): every later target was ignored as older."""
    js = nc.jetstream()
    await bus.ensure_stream(js, ServiceSettings())
    # what an actuator of main left in the stream after applying a far-future target
    await js.publish("slaplanner.scaled.prod.llama", orjson.dumps({
        "schema_version": 1, "id": "from-the-future", "target_id": "t-future",
        "deployment": {"namespace": "prod", "name": "llama"}, "window_end": 9e9,
        "window_s": WINDOW_S, "outcome": "dry-run", "backend": "dry-run",
        "prefill": {"from": None, "to": 9}, "decode": {"from": None, "to": 9}}))
    actuator = services["actuator"]
    actuator.env["SLAPLANNER_LEADER_ELECTION"] = "off"
    actuator.start()
    await wait_for_consumers(nc, {"actuator"}, [actuator])
    await js.publish("slaplanner.target.prod.llama", target_body(NOW + 3600.0, 9))
    await seen.until(lambda: seen.rejected("actuator"), 30, "the future target's rejection")
    assert "ahead of this service's clock" in seen.rejected("actuator")[0].reason
    await js.publish("slaplanner.target.prod.llama", target_body(window(39), 3))
    await seen.until(lambda: len(seen.events()) == 2, 30, "a ScaleEvent for the next target")
    event = seen.events()[-1]
    assert event.outcome == "dry-run" and event.prefill.to == 3, event
    assert "older than the last applied" not in (event.reason or "")
    assert actuator.stop() == 0, actuator.log()


# ------------------------------------------------------------------------ a lost store


async def test_after_a_lost_store_readyz_fails_until_the_admin_lays_the_bus_out_again(
    nats_server: NatsEndpoint, nc: NATS, services: dict[str, ServiceProcess], seen: Seen
) -> None:
    """nats-server back with an empty store: on main the services never made their consumers
    again and /healthz answered 200 while nothing moved."""
    if nats_server.server is None:
        pytest.skip("needs the embedded server, whose store can be wiped")
    server = nats_server.server
    procs = [services[name] for name in ("forecaster", "decider", "actuator")]
    ports = {}
    for proc in procs:
        ports[proc.name] = with_http_port(proc)
        proc.env.update({"SLAPLANNER_BUS_SETUP": "admin",
                         "SLAPLANNER_BUS_CHECK_INTERVAL_S": "500ms",
                         "SLAPLANNER_LEADER_ELECTION": "off"})
    admin = bus_setup_command(nats_server.url)
    assert subprocess.run(admin, capture_output=True, timeout=60).returncode == 0
    for proc in procs:
        proc.start()
    await wait_for_consumers(nc, {"forecaster", "decider", "actuator"}, procs)
    await ready(ports, True, procs)
    js = nc.jetstream()
    await js.publish("slaplanner.metrics.prod.llama", snapshot_body(window(30), 600.0))
    await seen.until(lambda: len(seen.events()) == 1, 60, "a ScaleEvent before the loss")

    server.stop()
    shutil.rmtree(server.store_dir / "js")
    server.start_again()
    answers = await ready(ports, False, procs, saying=f"stream {STREAM} is missing")
    for name, (status, text) in answers.items():
        assert status == 503 and "slaplanner bus setup" in text, (name, text)
        assert http_get(ports[name], "/healthz")[0] == 200, name  # alive: no restart helps
    assert subprocess.run(admin, capture_output=True, timeout=60).returncode == 0
    await ready(ports, True, procs)
    await nc.jetstream().publish("slaplanner.metrics.prod.llama",
                                 snapshot_body(window(31), 700.0))
    await seen.until(lambda: len(seen.events()) == 2, 60, "a ScaleEvent after the store returned")
    for proc in procs:
        assert proc.stop() == 0, proc.log()


def bus_setup_command(url: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", "bus", "setup", "--nats-url", url]


async def ready(ports: dict[str, int], wanted: bool, procs: list[ServiceProcess],
                timeout_s: float = 30.0, saying: str = "") -> dict[str, tuple[int, str]]:
    """/readyz of every service once all answer ``wanted`` (and say ``saying``); the answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        answers = {name: await asyncio.to_thread(http_get, port, "/readyz")
                   for name, port in ports.items()}
        if all((status == 200) == wanted and saying in text
               for status, text in answers.values()):
            return answers
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz not {wanted}: {answers}\n{logs(procs)}")
        await asyncio.sleep(0.2)


async def test_services_that_make_their_own_bus_make_it_again_after_a_lost_store(
    nats_server: NatsEndpoint, nc: NATS, services: dict[str, ServiceProcess], seen: Seen
) -> None:
    if nats_server.server is None:
        pytest.skip("needs the embedded server, whose store can be wiped")
    procs = [services[name] for name in ("forecaster", "decider", "actuator")]
    for proc in procs:
        proc.env.update({"SLAPLANNER_BUS_CHECK_INTERVAL_S": "500ms",
                         "SLAPLANNER_LEADER_ELECTION": "off"})
        proc.start()
    await wait_for_consumers(nc, {"forecaster", "decider", "actuator"}, procs)
    nats_server.server.stop()
    shutil.rmtree(nats_server.server.store_dir / "js")
    nats_server.server.start_again()
    await wait_for_consumers(nc, {"forecaster", "decider", "actuator"}, procs)
    await nc.jetstream().publish("slaplanner.metrics.prod.llama", snapshot_body(window(30), 600.0))
    await seen.until(lambda: len(seen.events()) == 1, 60, "a ScaleEvent on the new store")
    for proc in procs:
        assert proc.stop() == 0, proc.log()


# --------------------------------------------------------------------------- ids


async def test_two_deployments_whose_snapshots_share_an_id_both_get_their_decision(
    nc: NATS, services: dict[str, ServiceProcess], seen: Seen
) -> None:
    """Ids derived from the snapshot's id alone collided across deployments on main, and the
    stream dropped the second deployment's forecast as a duplicate."""
    procs = [services[name] for name in ("forecaster", "decider", "actuator")]
    for proc in procs:
        proc.env["SLAPLANNER_LEADER_ELECTION"] = "off"
        proc.start()
    await wait_for_consumers(nc, {"forecaster", "decider", "actuator"}, procs)
    js = nc.jetstream()
    for name in ("alpha", "beta"):
        await js.publish(f"slaplanner.metrics.prod.{name}",
                         snapshot_body(window(30), 600.0, name=name, id="window-30"))
    await seen.until(lambda: len(seen.events()) == 2, 60,
                     "a ScaleEvent for each deployment:\n" + logs(procs))
    assert sorted(e.deployment.name for e in seen.events()) == ["alpha", "beta"]
    # each its own report: neither taken for a second delivery of the other's target
    assert all("duplicate delivery" not in (e.reason or "") for e in seen.events())
    stored = await js.stream_info(STREAM, subjects_filter="slaplanner.forecast.>")
    assert stored.state.subjects == {"slaplanner.forecast.prod.alpha": 1,
                                     "slaplanner.forecast.prod.beta": 1}
    for proc in procs:
        assert proc.stop() == 0, proc.log()


# ------------------------------------------------------------------- the stream as found


@pytest.mark.parametrize(("change", "named"), [
    pytest.param({"allow_rollup_hdrs": True}, "allow_rollup_hdrs",
                 id="rollup headers, with which one message purges a subject"),
    pytest.param({"max_msg_size": 1024}, "max_msg_size",
                 id="a max_msg_size that no decision fits"),
    pytest.param({"deny_purge": False}, "deny_purge", id="purges allowed"),
])
async def test_a_service_refuses_a_stream_configured_otherwise_in_one_line(
    nc: NATS, services: dict[str, ServiceProcess], change: dict[str, Any], named: str
) -> None:
    """On main only seven settings were compared: a stream made first by another user with
    rollup headers or a tiny max_msg_size was used as found, every service healthy."""
    settings = ServiceSettings()
    # what any user that may create the stream could make first (as a service did on main)
    foreign = StreamConfig(name=STREAM, subjects=["slaplanner.>"],
                           max_age=settings.stream_max_age_s, max_bytes=settings.stream_max_bytes,
                           duplicate_window=settings.stream_duplicate_window_s)
    await nc.jetstream().add_stream(dataclasses.replace(foreign, **change))
    forecaster = services["forecaster"].start()
    assert forecaster.process is not None
    assert forecaster.process.wait(timeout=20) == 1
    errors = [line for line in forecaster.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and named in errors[0] and "slaplanner bus setup" in errors[0], (
        forecaster.log())
    assert "Traceback" not in forecaster.log()


async def test_junk_on_the_metrics_subjects_evicts_no_decision_from_the_decisions_stream(
    nc: NATS, services: dict[str, ServiceProcess], seen: Seen
) -> None:
    """On main one stream of 1 GiB held everything: about 1,100 junk bodies of 1 MB on a
    metrics subject evicted every decision. Here the pipeline's stream is 4 MiB."""
    limits = {"SLAPLANNER_STREAM_MAX_BYTES": str(4 << 20),
              "SLAPLANNER_DECISIONS_MAX_BYTES": str(4 << 20), "SLAPLANNER_LEADER_ELECTION": "off"}
    procs = [services[name] for name in ("forecaster", "decider", "actuator")]
    for proc in procs:
        proc.env.update(limits)
        proc.start()
    await wait_for_consumers(nc, {"forecaster", "decider", "actuator"}, procs)
    js = nc.jetstream()
    for index in range(5):
        await js.publish("slaplanner.metrics.prod.llama", snapshot_body(window(index), 600.0))
    await seen.until(lambda: len(seen.events()) == 5, 60, "five ScaleEvents")
    junk = b'{"junk": "' + b"x" * (900 << 10) + b'"}'
    for index in range(12):
        await js.publish(f"slaplanner.metrics.prod.junk-{index}", junk)
    with pytest.raises(nats.js.errors.APIError, match="maximum"):
        await js.publish("slaplanner.metrics.prod.junk", b"x" * (2 << 20))
    pipeline = await js.stream_info(STREAM, subjects_filter="slaplanner.target.>")
    assert not pipeline.state.subjects, "the junk evicted the pipeline's old targets"
    decisions = await js.stream_info(DECISIONS, subjects_filter=">")
    assert decisions.state.subjects == {"slaplanner.target.prod.llama": 5,
                                        "slaplanner.scaled.prod.llama": 5}
    for proc in procs:
        assert proc.stop() == 0, proc.log()


# ---------------------------------------------------------------- a stale redelivery


async def test_a_snapshot_in_flight_when_its_forecaster_died_does_not_come_back_after_newer_ones(
    nats_server: NatsEndpoint, nc: NATS, services: dict[str, ServiceProcess], seen: Seen
) -> None:
    """On main the forecast order was 7, 8, 9, 6: the unacked snapshot 6 came back after its
    ack wait, behind newer windows, and was forecast then."""
    js = nc.jetstream()
    await bus.ensure_stream(js, ServiceSettings())
    spec = bus.ConsumerSpec("forecaster", (bus.METRICS,))
    # An ack wait long enough for the forecaster to start and handle 7, 8 and 9 first (the
    # default, 60 s, would make this test a minute longer).
    ack_wait_s = 30.0
    await js.add_consumer(STREAM, dataclasses.replace(spec.config(), ack_wait=ack_wait_s))
    await js.publish("slaplanner.metrics.prod.llama", snapshot_body(window(6), 600.0))
    # a forecaster takes snapshot 6 and dies before it acks
    dying = await nats.connect(nats_server.url)
    taken = await dying.jetstream().pull_subscribe_bind(durable="forecaster", stream=STREAM)
    [in_flight] = await taken.fetch(batch=1, timeout=5)
    taken_at = time.monotonic()
    assert in_flight.subject == "slaplanner.metrics.prod.llama"
    await dying.close()
    forecaster = services["forecaster"].start()
    for _ in range(400):
        if "consuming slaplanner.metrics.>" in forecaster.log():
            break
        await asyncio.sleep(0.05)
    for index in (7, 8, 9):
        await js.publish("slaplanner.metrics.prod.llama", snapshot_body(window(index), 600.0))
    await seen.until(lambda: len(seen.forecasts()) >= 3, 30, "forecasts 7, 8 and 9")
    assert time.monotonic() - taken_at < ack_wait_s, "the machine was too slow for this test"
    for _ in range(int(2 * ack_wait_s / 0.1)):  # snapshot 6 is handed out again
        if "dropped a redelivered MetricSnapshot" in forecaster.log():
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(forecaster.log())
    assert [f.window_end for f in seen.forecasts()] == [window(i) for i in (7, 8, 9)]
    info = await js.consumer_info(STREAM, "forecaster")
    assert info.num_ack_pending == 0 and info.num_pending == 0, info
    assert forecaster.stop() == 0, forecaster.log()


# ------------------------------------------------------------- a server that says no


@pytest.fixture
def password_nats(tmp_path: Path) -> Iterator[embedded_nats.NatsServer]:
    server = embedded_nats.start(tmp_path / "auth-nats", extra_config=(
        'authorization { users: [{user: forecaster, password: "right-one"}] }\n'))
    try:
        yield server
    finally:
        server.stop()


def run_until_exit(proc: ServiceProcess, timeout_s: float = 60.0) -> tuple[int, float]:
    """The exit code, and how long the service took from its first log line (its imports
    done: 2-5 s of Python, more on a busy machine) to its last."""
    proc.start()
    assert proc.process is not None
    try:
        code = proc.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{proc.name} still running after {timeout_s} s:\n"
                             f"{proc.log()}") from None
    stamps = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
              for line in proc.log().splitlines() if line[:4].isdigit()]
    return code, (stamps[-1] - stamps[0]).total_seconds()


def error_lines(proc: ServiceProcess) -> list[str]:
    return [line for line in proc.log().splitlines() if " ERROR " in line]


async def test_a_service_with_a_wrong_password_exits_at_once_with_one_line(
    password_nats: embedded_nats.NatsServer, services: dict[str, ServiceProcess]
) -> None:
    """On main it knocked for ever, "Authorization Violation" after "Authorization Violation"."""
    forecaster = services["forecaster"]
    forecaster.env.update({"SLAPLANNER_NATS_URL": password_nats.url,
                           "SLAPLANNER_NATS_USER": "forecaster",
                           "SLAPLANNER_NATS_PASSWORD": "wrong-one"})
    code, took_s = run_until_exit(forecaster)
    assert code == 1 and took_s < 10.0, (code, took_s, forecaster.log())
    [line] = error_lines(forecaster)
    assert "user 'forecaster'" in line and password_nats.url in line, line
    assert "authorization violation" in line and "wrong-one" not in forecaster.log()
    assert "Traceback" not in forecaster.log()


async def test_an_unreachable_nats_is_one_line_naming_the_url_within_ten_seconds(
    services: dict[str, ServiceProcess],
) -> None:
    url = f"nats://127.0.0.1:{embedded_nats.free_port()}"
    decider = services["decider"]
    decider.env["SLAPLANNER_NATS_URL"] = url
    code, took_s = run_until_exit(decider)
    assert code == 1 and took_s < 10.0, (code, took_s, decider.log())
    [line] = error_lines(decider)
    assert f"cannot reach NATS at {url}" in line, line
    assert "Traceback" not in decider.log()


async def test_a_nats_without_jetstream_is_one_line_saying_so(
    services: dict[str, ServiceProcess], tmp_path: Path
) -> None:
    port = embedded_nats.free_port()
    plain = subprocess.Popen([embedded_nats.nats_server_binary(), "-a", "127.0.0.1", "-p",
                              str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        embedded_nats.wait_for_port(port)
        actuator = services["actuator"]
        actuator.env["SLAPLANNER_NATS_URL"] = f"nats://127.0.0.1:{port}"
        code, took_s = run_until_exit(actuator)
    finally:
        plain.terminate()
        plain.wait(timeout=10)
    assert code == 1 and took_s < 10.0, (code, took_s, actuator.log())
    [line] = error_lines(actuator)
    assert "has no JetStream" in line and f"nats://127.0.0.1:{port}" in line, line
    assert "Traceback" not in actuator.log()


async def test_a_clean_stop_logs_no_disconnection_and_no_parse_result(
    nc: NATS, services: dict[str, ServiceProcess]
) -> None:
    decider = services["decider"].start()
    await wait_for_consumers(nc, {"decider"}, [decider])
    assert decider.stop() == 0
    text = decider.log()
    assert "ParseResult" not in text and "disconnected" not in text.lower(), text
    assert "connected to NATS at nats://127.0.0.1:" in text, text


def test_the_admin_command_lays_the_bus_out_and_reports_what_differs(
    nats_server: NatsEndpoint,
) -> None:
    def bus_command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "services.cli", "bus", *args,
                               "--nats-url", nats_server.url], cwd=REPO, capture_output=True,
                              text=True, timeout=60)

    missing = bus_command("check")
    assert missing.returncode == 1 and f"stream {STREAM} is missing" in missing.stdout
    assert bus_command("setup").returncode == 0
    checked = bus_command("check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    again = bus_command("setup")
    assert "already as configured" in again.stdout
