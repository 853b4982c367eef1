"""``slaplanner replay``: the services on a real NATS server, the simulator in place of the cluster.

The forecaster, decider and actuator (virtual backend) run as separate processes, configured with
the ``SLAPLANNER_*`` variables that ``slaplanner simulate`` gives their cores in process. The
simulator stands in for the cluster and for Prometheus: at the end of each window it publishes
the ``MetricSnapshot`` a collector would have published (JetStream, with its id as
``Nats-Msg-Id``), waits for the ``ScaleEvent`` of that window, applies it (new workers serve after
the startup delay) and simulates the next window. Before the next window it waits until every
service has handled everything on the bus (every durable consumer idle), so that the decider has
also learnt from the window's ScaleEvents, as it has in process. Time is virtual, so an hour of
trace takes as long as the services take to answer, not an hour.

The collector is not started: its job is to turn Prometheus series into snapshots, and here the
simulator is both the cluster and its metrics, so it computes the snapshot from the requests it
served (per-request latencies, queues, KV usage) and publishes it itself, exactly as the collector
would on the bus. Running the collector would mean running the simulator inside the collector's
process and shipping its per-request results back for the SLA report.

The same run with the cores called in process (``slaplanner simulate``) gives identical decisions;
``tests/test_sim_replay.py`` checks it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared import bus, embedded_nats, traces
from shared.messages import LoadForecast, ReplicaTarget, ScaleEvent
from shared.perf_model import Profile
from sim import options, simulate_cli
from sim.cluster import ClusterConfig
from sim.loop import (
    BASELINES,
    DEPLOYMENT,
    ClosedLoop,
    IntervalRecord,
    LoopResult,
    PlanningSetup,
    Step,
    cut,
    prepare,
    step_from_events,
)
from sim.progress import Progress

SERVICES = ("forecaster", "decider", "actuator")
STREAM = "SLAPLANNER"


@dataclass
class _Inbox:
    """Forecasts, targets and scale events of the replayed deployment, by window end, in the
    order they were published."""

    forecasts: dict[float, LoadForecast] = field(default_factory=dict)
    targets: dict[float, list[ReplicaTarget]] = field(default_factory=dict)
    events: dict[float, list[ScaleEvent]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_message(self, msg: Msg) -> None:
        family = msg.subject.split(".")[1]
        try:
            if family == "forecast":
                forecast = LoadForecast.from_json(msg.data)
                self.forecasts[forecast.window_end] = forecast
            elif family == "target":
                target = ReplicaTarget.from_json(msg.data)
                self.targets.setdefault(target.window_end, []).append(target)
            elif family == "scaled":
                event = ScaleEvent.from_json(msg.data)
                self.events.setdefault(event.window_end, []).append(event)
        except ValueError:
            return  # not ours to judge; the services reject bad bodies themselves
        self.arrived.set()

    def settled(self, window_end: float) -> bool:
        """The planning target of the window has been applied, and every target has its event."""
        targets = self.targets.get(window_end, [])
        events = self.events.get(window_end, [])
        planned = [t.id for t in targets if t.forecast_id is not None]
        return bool(planned) and len(events) == len(targets) and any(
            e.target_id == planned[-1] for e in events
        )

    async def wait(self, window_end: float, deadline: float) -> None:
        while not self.settled(window_end):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no ScaleEvent for the planning target of window {window_end}")
            self.arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), min(left, 0.5))


async def quiescent(js: JetStreamContext, deadline: float) -> None:
    """Every durable consumer of the stream has handled (and acknowledged) everything: the
    decider has learnt from the window's ScaleEvents before the next snapshot is published."""
    while True:
        infos = await js.consumers_info(STREAM)
        busy = [
            c.name for c in infos
            if bus.works_through(c.config) and ((c.num_pending or 0) or (c.num_ack_pending or 0))
        ]
        if not busy:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"consumers still busy: {', '.join(sorted(busy))}")
        await asyncio.sleep(0.005)


@dataclass
class ReplayRun:
    run: LoopResult
    events: list[ScaleEvent]
    targets: list[ReplicaTarget]
    wall_s: float


def spawn(name: str, env: dict[str, str], log_dir: Path) -> subprocess.Popen[bytes]:
    log = (log_dir / f"{name}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", f"services.{name}"], env=env, stdout=log,
        stderr=subprocess.STDOUT,
    )


async def wait_for_consumers(nc: NATS, names: set[str], timeout_s: float = 60.0) -> None:
    js = nc.jetstream()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if names <= {c.name for c in await js.consumers_info(STREAM)}:
                return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"services {sorted(names)} did not become ready in {timeout_s:g} s")


def stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run_replay(
    trace: traces.Trace,
    profile: Profile,
    setup: PlanningSetup,
    config: ClusterConfig,
    nats_url: str,
    log_dir: Path,
    warm_start: bool = False,
    max_intervals: int | None = None,
    timeout_s: float = 120.0,
    on_interval: Callable[[IntervalRecord], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayRun:
    """Replay ``trace`` through the services on ``nats_url`` (which must have JetStream)."""
    if setup.policy in BASELINES:
        raise ValueError(f"{setup.policy} is a simulator baseline, not a decider policy")
    trace = cut(trace, setup.interval_s, max_intervals)
    config, needs = prepare(trace, profile, setup, config, setup.policy, warm_start)
    started = time.monotonic()
    base = {
        **os.environ,
        "SLAPLANNER_NATS_URL": nats_url,
        "SLAPLANNER_HTTP_PORT": "0",
        "SLAPLANNER_HTTP_HOST": "127.0.0.1",
        "SLAPLANNER_LOG_LEVEL": os.environ.get("SLAPLANNER_LOG_LEVEL", "WARNING"),
        "PYTHONUNBUFFERED": "1",
    }
    env = setup.service_env()
    procs = {name: spawn(name, {**base, **env[name]}, log_dir) for name in SERVICES}
    nc = await nats.connect(nats_url)
    inbox = _Inbox()
    try:
        await wait_for_consumers(nc, set(SERVICES))
        key = DEPLOYMENT
        for family in ("forecast", "target", "scaled"):
            await nc.subscribe(f"slaplanner.{family}.{key.namespace}.{key.name}",
                               cb=inbox.on_message)
        js = nc.jetstream()
        loop = ClosedLoop(
            trace, profile, config, setup.interval_s, setup.ttft_target_s, setup.itl_target_s,
            max_intervals=max_intervals, needs=needs,
        )
        events: list[ScaleEvent] = []
        targets: list[ReplicaTarget] = []
        while (observation := loop.next_window()) is not None:
            if loop.last_window:
                loop.apply(Step(None, None))
            else:
                snapshot = observation.snapshot
                await bus.publish(js, snapshot)
                deadline = time.monotonic() + timeout_s
                wait = asyncio.ensure_future(inbox.wait(snapshot.window_end, deadline))
                while not wait.done():
                    await asyncio.wait({wait}, timeout=1.0)
                    for proc_name, proc in procs.items():
                        if proc.poll() is not None:
                            wait.cancel()
                            raise RuntimeError(f"the {proc_name} exited ({proc.returncode})")
                await wait
                await quiescent(js, deadline)
                window_targets = inbox.targets[snapshot.window_end]
                window_events = inbox.events[snapshot.window_end]
                targets += window_targets
                events += window_events
                loop.apply(step_from_events(
                    window_events, window_targets, inbox.forecasts.get(snapshot.window_end)
                ))
            if on_interval is not None:
                on_interval(loop.records[-1])
            if progress is not None:
                progress(len(loop.records), loop.windows)
        run = loop.finish(f"{setup.policy}/{setup.predictor} (replay)")
        return ReplayRun(run, events, targets, time.monotonic() - started)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
        stop(procs)


@contextlib.contextmanager
def nats_url(given: str | None, tmp: Path) -> Iterator[str]:
    """``given``, or an embedded nats-server with JetStream for the duration."""
    if given:
        yield given
        return
    server = embedded_nats.start(tmp / "nats")
    try:
        yield server.url
    finally:
        server.stop()


def server_line(given: str | None, url: str) -> str:
    """Which NATS server the replay uses, and what that means."""
    if given is None:
        return (f"forecaster -> decider -> actuator on an embedded nats-server at {url} "
                "(--nats-url to use another)")
    return (f"forecaster -> decider -> actuator on the NATS server at {url} (--nats-url or "
            "SLAPLANNER_NATS_URL): services already reading its stream share the work, and the "
            "numbers then differ")


def print_row(record: IntervalRecord) -> None:
    """One row of the interval table, what the actuator did, and a line per fast-path target the
    decider sent during the window (a target not made from a forecast)."""
    print(f"{simulate_cli.format_row(record)}  {record.outcome or '-'}", flush=True)
    for target in record.targets:
        if target.forecast_id is None:
            print(f"{'':>8} fast path: P {target.prefill_replicas}, D {target.decode_replicas}",
                  flush=True)


HEADER = f"{simulate_cli.HEADER}  actuator"


def add_arguments(parser: argparse.ArgumentParser, trace_default: str | None = None,
                  nats_url_from_env: bool = True) -> None:
    """``simulate``'s options, and where the bus is."""
    simulate_cli.add_arguments(parser, trace_default)
    if nats_url_from_env:
        parser.add_argument(
            "--nats-url", default=os.environ.get("SLAPLANNER_NATS_URL"),
            help="NATS server with JetStream (default: $SLAPLANNER_NATS_URL, else an embedded "
            "nats-server)",
        )
    else:
        parser.add_argument(
            "--nats-url", default=None,
            help="NATS server with JetStream (default: an embedded nats-server of its own; "
            "$SLAPLANNER_NATS_URL is not read)",
        )
    options.add_duration(
        parser, "timeout", "120s", "how long to wait for each interval's ScaleEvent"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="slaplanner replay",
        description="Replay a request trace through the forecaster, decider and actuator "
        "services on NATS, with the simulator as the cluster, in virtual time.",
    )
    add_arguments(parser)
    return run_command(parser.parse_args(argv), parser.prog)


def run_command(
    args: argparse.Namespace, prog: str,
    epilogue: Callable[[argparse.Namespace, simulate_cli.Parsed, LoopResult], None] | None = None,
) -> int:
    """Run the replay the options ask for: the table as it goes, then the report and outputs,
    then ``epilogue`` (given the options, what they parsed to and the run), if any."""
    if args.policy in BASELINES:
        print(f"{prog}: --policy {args.policy} is a simulator baseline; replay drives the "
              "decider's policies (use slaplanner simulate for the baselines)", file=sys.stderr)
        return 2
    try:
        parsed = simulate_cli.parse(args)
        timeout_s = options.seconds(args, "timeout") or 120.0
    except (ValueError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="slaplanner-replay-") as tmp:
        log_dir = Path(tmp)
        with nats_url(args.nats_url, log_dir) as url:
            print(server_line(args.nats_url, url), flush=True)
            if not args.quiet:
                print(f"replaying {simulate_cli.title(args, parsed.setup, parsed.config)}\n"
                      f"{HEADER}", flush=True)
            # The table shows the progress when it goes to the terminal; else a line on stderr.
            progress = Progress(prog)
            progress.enabled &= args.quiet or not sys.stdout.isatty()
            try:
                replay = asyncio.run(run_replay(
                    parsed.trace, parsed.profile, parsed.setup, parsed.config, url, log_dir,
                    warm_start=args.warm_start, max_intervals=args.max_intervals or None,
                    timeout_s=timeout_s, on_interval=None if args.quiet else print_row,
                    progress=progress,
                ))
            except (TimeoutError, RuntimeError) as exc:
                progress.close()
                print(f"{prog}: {exc}; service logs follow", file=sys.stderr)
                for name in SERVICES:
                    log = log_dir / f"{name}.log"
                    text = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                    print(f"--- {name}\n{text}", file=sys.stderr)
                return 1
            progress.close()
        if not args.quiet:
            print(f"{simulate_cli.LEGEND};\nactuator: what it did with the window's target\n")
        args.quiet = True  # the table was printed as the run went
        simulate_cli.write_outputs(args, parsed, replay.run)
        fast_path = sum(target.forecast_id is None for target in replay.targets)
        print(f"{len(replay.events)} decisions over the bus ({fast_path} from the fast path) in "
              f"{replay.wall_s:.1f} s")
    if epilogue is not None:
        epilogue(args, parsed, replay.run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
