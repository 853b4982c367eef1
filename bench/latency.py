"""Snapshot -> ScaleEvent latency on an idle bus, for one deployment, through the four services.

The collector replays a synthetic trace (``--source trace``): it publishes a window's snapshot,
waits for that window's ScaleEvent, then publishes the next, so exactly one decision is on its
way at any time. The forecaster (default predictor), the decider (default policy) and the
actuator (dry run) run as processes on a real nats-server with JetStream, as in production. The
latency of a window is the time between the two messages' arrival in the stream (the server's
timestamps: the collector's publication and the actuator's ScaleEvent), so no two clocks meet.
The first ``--history`` windows fill the forecaster's history and are not counted.

    python -m bench.latency                      # 1,440 windows of history, 300 measured
    python -m bench.latency --profile forecaster # the same, that service under cProfile

Results and the exact command: docs/benchmarks.md, Latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import nats
import numpy as np
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared import embedded_nats
from shared.messages import MetricSnapshot, ScaleEvent
from sim.synth import SineLoad, generate, write_mooncake

REPO = Path(__file__).resolve().parent.parent
SERVICES = ("forecaster", "decider", "actuator")
INTERVAL_S = 60.0
# Windows end in the past (the services refuse windows from the future): the trace starts
# this long before now.
BACK_S = 10 * 86_400.0


@dataclass(frozen=True)
class Result:
    windows: int
    latencies_s: np.ndarray

    def line(self) -> str:
        ms = self.latencies_s * 1000.0
        return (f"{len(ms)} windows after {self.windows - len(ms)} of history: "
                f"p50 {np.percentile(ms, 50):.1f} ms, p90 {np.percentile(ms, 90):.1f} ms, "
                f"p99 {np.percentile(ms, 99):.1f} ms, max {ms.max():.1f} ms")


def write_trace(path: Path, windows: int) -> None:
    """A sine-shaped Poisson load over ``windows`` minutes, 2 to 8 requests/s, period 6 h."""
    load = SineLoad(duration_s=windows * INTERVAL_S, rate_min_per_s=2.0, rate_max_per_s=8.0,
                    period_s=6 * 3600.0, isl_tokens=3000, osl_tokens=300, isl_cv=0.3,
                    osl_cv=0.3, seed=7)
    write_mooncake(generate(load, None, name=path.name), str(path))


@contextlib.contextmanager
def processes(url: str, folder: Path, trace: Path, windows: int,
              profiled: str | None) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    env = {
        **os.environ, "SLAPLANNER_NATS_URL": url, "SLAPLANNER_HTTP_HOST": "127.0.0.1",
        "SLAPLANNER_HTTP_PORT": "0", "SLAPLANNER_LOG_LEVEL": "WARNING",
        "SLAPLANNER_LEADER_ELECTION": "off", "PYTHONUNBUFFERED": "1",
        # the collector's replay
        "SLAPLANNER_SOURCE": "trace", "SLAPLANNER_TRACE_FILE": str(trace),
        "SLAPLANNER_INTERVAL_S": f"{INTERVAL_S:g}s", "SLAPLANNER_TRACE_MAX_INTERVALS": str(windows),
        "SLAPLANNER_TRACE_START_EPOCH_S": str(time.time() - BACK_S),
        "SLAPLANNER_NAMESPACE": "bench", "SLAPLANNER_DEPLOYMENT": "latency",
    }
    started: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str) -> None:
        command = [sys.executable]
        if name == profiled:
            command += ["-m", "cProfile", "-o", str(folder / f"{name}.prof")]
        command += ["-m", f"services.{name}"]
        log = (folder / f"{name}.log").open("ab")
        started[name] = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)

    try:
        for name in SERVICES:
            start(name)
        asyncio.run(wait_for_consumers(url, {"forecaster", "decider", "actuator"}))
        start("collector")
        yield started
    finally:
        for proc in started.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in started.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


async def wait_for_consumers(url: str, names: set[str], timeout_s: float = 60.0) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if names <= {c.name for c in await js.consumers_info("SLAPLANNER")}:
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"consumers {names} not there after {timeout_s} s")
    finally:
        await nc.close()


async def stored_times(url: str, subject: str, model: type[MetricSnapshot] | type[ScaleEvent]
                       ) -> dict[float, datetime]:
    """window_end -> when the stream stored the first message of that window on ``subject``."""
    nc = await nats.connect(url)
    found: dict[float, datetime] = {}
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(subject, stream="SLAPLANNER", config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0))
        pending = (await sub.consumer_info()).num_pending or 0
        while pending > 0:
            for msg in await sub.fetch(batch=min(pending, 512), timeout=5):
                pending -= 1
                window_end = model.from_json(msg.data).window_end
                found.setdefault(window_end, msg.metadata.timestamp)
    finally:
        await nc.close()
    return found


def measure(windows: int, history: int, profiled: str | None, keep: Path | None) -> Result:
    with tempfile.TemporaryDirectory(prefix="slaplanner-latency-") as tmp:
        folder = keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        trace = folder / "trace.jsonl"
        write_trace(trace, windows)
        with embedded_nats.running() as server, \
                processes(server.url, folder, trace, windows, profiled) as started:
            collector = started["collector"]
            deadline = time.monotonic() + 30.0 + windows * 2.0
            while collector.poll() is None and time.monotonic() < deadline:
                if "trace finished" in (folder / "collector.log").read_text(errors="replace"):
                    break
                time.sleep(0.5)
            published = asyncio.run(stored_times(server.url, "slaplanner.metrics.>",
                                                 MetricSnapshot))
            scaled = asyncio.run(stored_times(server.url, "slaplanner.scaled.>", ScaleEvent))
        if profiled:
            stats = pstats.Stats(str(folder / f"{profiled}.prof"))
            stats.sort_stats("cumulative").print_stats(40)
    ends = sorted(published)
    measured = [end for end in ends[history:] if end in scaled]
    if len(ends) < windows or len(measured) < len(ends) - history:
        raise RuntimeError(f"{len(ends)} snapshots and {len(scaled)} ScaleEvents for "
                           f"{windows} windows; see the logs (--keep FOLDER)")
    latencies = np.array([(scaled[end] - published[end]).total_seconds() for end in measured])
    return Result(len(ends), latencies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", type=int, default=1440,
                        help="windows that fill the history first, not measured (1,440)")
    parser.add_argument("--measure", type=int, default=300, help="windows measured (300)")
    parser.add_argument("--profile", choices=("collector", *SERVICES), default=None,
                        help="run this service under cProfile and print its top functions")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the trace, logs and profile in this folder")
    args = parser.parse_args(argv)
    started = time.monotonic()
    result = measure(args.history + args.measure, args.history, args.profile, args.keep)
    print(result.line())
    print(f"took {time.monotonic() - started:.0f} s; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
