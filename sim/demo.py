"""``slaplanner demo``: the four services on a real NATS server, replaying a real trace.

Starts an embedded nats-server with JetStream (unless ``SLAPLANNER_NATS_URL`` names one), starts
the collector (replaying a bundled trace in virtual time), forecaster, decider and actuator
(dry-run) as separate processes, and prints one line per interval as the decisions come back over
the bus.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.msg import Msg

from shared import embedded_nats, traces
from shared.messages import Envelope, LoadForecast, MetricSnapshot, ReplicaTarget, ScaleEvent

SERVICES = ("forecaster", "decider", "actuator")


@dataclass
class Row:
    snapshot: MetricSnapshot | None = None
    forecast: LoadForecast | None = None
    target: ReplicaTarget | None = None
    event: ScaleEvent | None = None


@dataclass
class Board:
    start_epoch_s: float
    rows: dict[float, Row] = field(default_factory=dict)
    targets: dict[str, ReplicaTarget] = field(default_factory=dict)
    fast_path_actions: int = 0
    printed: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    last_window_end: float | None = None

    HEADER = (f"{'t (s)':>7} {'req':>6} {'ISL':>7} {'OSL':>5} {'TTFT s':>7} {'ITL ms':>7} "
              f"{'next fc':>7} {'forecast model':>18} {'P':>3} {'D':>3}  actuator")

    async def on_message(self, msg: Msg) -> None:
        family = msg.subject.split(".")[1]
        parsers: dict[str, type[Envelope]] = {
            "metrics": MetricSnapshot, "forecast": LoadForecast, "target": ReplicaTarget,
            "scaled": ScaleEvent}
        if family not in parsers:
            return
        message = parsers[family].from_json(msg.data)
        row = self.rows.setdefault(message.window_end, Row())
        if isinstance(message, MetricSnapshot):
            row.snapshot = message
        elif isinstance(message, LoadForecast):
            row.forecast = message
        elif isinstance(message, ReplicaTarget):
            self.targets[message.id] = message
            if message.forecast_id is not None:
                row.target = message
        elif isinstance(message, ScaleEvent):
            target = self.targets.get(message.target_id)
            if target is not None and target.forecast_id is None:
                # A fast-path target between planning intervals (from a snapshot, not a
                # forecast): shown on its own line, not as the window's planned decision.
                self.fast_path_actions += 1
                print(f"{'':>7} fast path: P {message.prefill.to}, D {message.decode.to} "
                      f"({message.outcome})", flush=True)
                return
            row.event = message
            self.print_row(message.window_end, row)
            if message.window_end == self.last_window_end:
                self.done.set()

    def print_row(self, window_end: float, row: Row) -> None:
        if self.printed % 20 == 0:
            print(self.HEADER)
        self.printed += 1
        s, f, e = row.snapshot, row.forecast, row.event
        assert e is not None

        def num(value: float | None, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        t = window_end - self.start_epoch_s
        itl_ms = None if s is None or s.itl_avg_s is None else s.itl_avg_s * 1000
        requests, isl, osl, ttft = ((s.num_requests, s.isl_avg, s.osl_avg, s.ttft_avg_s)
                                    if s is not None else (None, None, None, None))
        next_requests = f.steps[0].num_requests if f is not None else None
        print(
            f"{t:>7.0f} {num(requests, '.0f'):>6} {num(isl, '.0f'):>7} "
            f"{num(osl, '.0f'):>5} {num(ttft, '.3f'):>7} "
            f"{num(itl_ms, '.2f'):>7} {num(next_requests, '.0f'):>7} "
            f"{(f.model if f else '-')[:18]:>18} {e.prefill.to:>3} {e.decode.to:>3}  "
            f"{e.outcome}",
            flush=True,
        )


@contextlib.contextmanager
def nats_url(tmp: Path) -> Iterator[str]:
    given = os.environ.get("SLAPLANNER_NATS_URL")
    if given:
        yield given
        return
    server = embedded_nats.start(tmp / "nats")
    try:
        yield server.url
    finally:
        server.stop()


def spawn(name: str, env: dict[str, str], log_dir: Path) -> subprocess.Popen[bytes]:
    log = (log_dir / f"{name}.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)


async def wait_for_consumers(url: str, names: set[str], timeout_s: float = 30.0) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if names <= {c.name for c in await js.consumers_info("SLAPLANNER")}:
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"services {sorted(names)} did not become ready in {timeout_s} s")
    finally:
        await nc.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="slaplanner demo", description=__doc__)
    parser.add_argument("--trace", default=str(traces.bundled_trace_path(
        "azure_llm_2023_code.csv")), help="trace to replay (Mooncake .jsonl or Azure .csv)")
    parser.add_argument("--speedup", type=float, default=10.0, help="divide arrival times by K")
    parser.add_argument("--interval", default="15s", help="planning interval, with its unit")
    parser.add_argument("--max-intervals", type=int, default=0, help="stop after N (0: all)")
    parser.add_argument("--ttft", default="500ms", help="TTFT target, with its unit")
    parser.add_argument("--itl", default="50ms", help="ITL target, with its unit")
    parser.add_argument("--max-gpu-budget", type=int, default=16, help="GPUs at most")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace, url: str, log_dir: Path) -> int:
    start_epoch = 1_700_000_000.0
    base_env = {**os.environ, "SLAPLANNER_NATS_URL": url, "SLAPLANNER_HTTP_PORT": "0",
                "SLAPLANNER_HTTP_HOST": "127.0.0.1", "SLAPLANNER_LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1"}
    envs = {
        "forecaster": {},
        "decider": {"SLAPLANNER_ADJUSTMENT_INTERVAL_S": args.interval,
                    "SLAPLANNER_TTFT_TARGET_S": args.ttft, "SLAPLANNER_ITL_TARGET_S": args.itl,
                    "SLAPLANNER_MAX_GPU_BUDGET": str(args.max_gpu_budget)},
        "actuator": {"SLAPLANNER_MAX_TOTAL_GPUS": str(args.max_gpu_budget)},
        "collector": {"SLAPLANNER_SOURCE": "trace", "SLAPLANNER_TRACE_FILE": args.trace,
                      "SLAPLANNER_TRACE_SPEEDUP": str(args.speedup),
                      "SLAPLANNER_INTERVAL_S": args.interval, "SLAPLANNER_NAMESPACE": "demo",
                      "SLAPLANNER_DEPLOYMENT": "llama-8b",
                      "SLAPLANNER_TRACE_MAX_INTERVALS": str(args.max_intervals),
                      "SLAPLANNER_TRACE_START_EPOCH_S": str(start_epoch)},
    }
    procs = {name: spawn(name, {**base_env, **envs[name]}, log_dir) for name in SERVICES}
    try:
        await wait_for_consumers(url, set(SERVICES))
        trace = traces.load_trace(args.trace).sped_up(args.speedup)
        from services.collector.trace_source import trace_windows
        from shared.settings import parse_duration_s

        interval_s = parse_duration_s(args.interval)
        windows = trace_windows(trace, interval_s)
        if args.max_intervals:
            windows = windows[: args.max_intervals]
        board = Board(start_epoch)
        board.last_window_end = start_epoch + (windows[-1].index + 1) * interval_s
        print(f"replaying {len(windows)} intervals of {interval_s:g} s from {Path(args.trace).name}"
              f" (x{args.speedup:g}) through collector -> forecaster -> decider -> actuator"
              f" on {url}\n")
        nc = await nats.connect(url)
        await nc.subscribe("slaplanner.>", cb=board.on_message)
        procs["collector"] = spawn("collector", {**base_env, **envs["collector"]}, log_dir)
        await asyncio.wait_for(board.done.wait(), timeout=120.0)
        await nc.close()
        summarise(board, interval_s)
        return 0
    except TimeoutError:
        print("the demo did not finish in time; service logs follow", file=sys.stderr)
        for name in procs:
            print(f"--- {name}\n{(log_dir / f'{name}.log').read_text()[-3000:]}", file=sys.stderr)
        return 1
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def summarise(board: Board, interval_s: float) -> None:
    events = [r.event for _, r in sorted(board.rows.items()) if r.event is not None]
    gpu_hours = sum((e.prefill.to + e.decode.to) * interval_s for e in events) / 3600.0
    changes = sum(1 for a, b in itertools.pairwise(events)
                  if (a.prefill.to, a.decode.to) != (b.prefill.to, b.decode.to))
    print(f"\n{len(events)} intervals, {changes} scaling changes "
          f"(+{board.fast_path_actions} fast-path actions), "
          f"peak {max(e.prefill.to for e in events)} prefill / "
          f"{max(e.decode.to for e in events)} decode, {gpu_hours:.2f} GPU-hours planned "
          f"(1 GPU per engine).")
    print("Latencies above are looked up in the profile for the planned replicas; the closed-loop"
          " simulator (SLA attainment against real queueing) comes with `slaplanner simulate`.")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="slaplanner-demo-") as tmp, nats_url(Path(tmp)) as url:
        log_dir = Path(tmp)
        return asyncio.run(run(args, url, log_dir))


if __name__ == "__main__":
    sys.exit(main())
