"""Load: one set of services planning many deployments at a short interval, measured end to end.

Starts an embedded nats-server with JetStream, then the forecaster (one or more replicas), the
decider and the actuator as real subprocesses (``slaplanner <service>``, the actuator on the
``virtual`` or ``dry-run`` backend), and plays the collector: at every interval tick it publishes
one MetricSnapshot per deployment through JetStream, as the collector does. Every message on the
bus is matched to its snapshot through the derived ids (forecast = derived_id("forecast",
snapshot), target = derived_id("target", forecast), ScaleEvent = derived_id("scaled", target)), so
each decision's latency is measured from the snapshot's publication to its ScaleEvent's arrival.
RSS and CPU of every process are sampled from /proc once a second.

Usage: ``python -m bench.load [--deployments 1000] [--interval-s 10] [--intervals 8]
[--forecaster-replicas 1] [--decider-replicas 1] [--actuator-replicas 1] [--json out.json]``;
exit code 1 if a decision is missing or late.
``--forecasting-only`` runs only the forecasters on the whole backlog at once (their throughput),
``--profile decider`` runs a service under cProfile. Results: docs/benchmarks.md, Load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.forecaster.settings import ForecasterSettings
from shared import bus, embedded_nats
from shared.messages import DeploymentKey, MetricSnapshot, derived_id
from shared.service_settings import ServiceSettings

REPO = Path(__file__).resolve().parent.parent
NAMESPACE = "load"
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- the load


@dataclass(frozen=True)
class DeploymentLoad:
    """A deployment's plausible traffic: a base rate with its own daily-like swing."""

    key: DeploymentKey
    rate_rps: float
    isl_avg: float
    osl_avg: float
    swing: float
    phase: float


def deployment_loads(count: int, seed: int = 7) -> list[DeploymentLoad]:
    """``count`` deployments from a few requests a minute to ~80 requests/s, chat to RAG shapes."""
    rng = random.Random(seed)
    loads = []
    for index in range(count):
        loads.append(DeploymentLoad(
            key=DeploymentKey(namespace=NAMESPACE, name=f"llm-{index:04d}"),
            rate_rps=min(80.0, rng.lognormvariate(math.log(4.0), 1.2)),
            isl_avg=rng.choice((600.0, 1500.0, 3000.0, 6000.0)) * rng.uniform(0.8, 1.2),
            osl_avg=rng.choice((100.0, 300.0, 600.0)) * rng.uniform(0.8, 1.2),
            swing=rng.uniform(0.0, 0.5),
            phase=rng.uniform(0.0, 2 * math.pi),
        ))
    return loads


def snapshot(load: DeploymentLoad, window_end: float, window_s: float, step: int,
             rng: random.Random) -> MetricSnapshot:
    rate = load.rate_rps * (1.0 + load.swing * math.sin(load.phase + step / 6.0))
    requests = float(max(0, round(rate * window_s * rng.uniform(0.9, 1.1))))
    busy = min(1.0, rate / 40.0)
    return MetricSnapshot(
        id=f"load-{load.key.name}-{window_end:.0f}",
        deployment=load.key, window_end=window_end, window_s=window_s, source="bench",
        num_requests=requests,
        isl_avg=load.isl_avg * rng.uniform(0.95, 1.05),
        osl_avg=load.osl_avg * rng.uniform(0.95, 1.05),
        ttft_avg_s=0.08 + 0.3 * busy, itl_avg_s=0.008 + 0.01 * busy,
        request_duration_avg_s=2.0 + 3.0 * busy,
        ttft_p99_s=0.25 + 0.8 * busy, itl_p99_s=0.015 + 0.02 * busy,
        requests_running=rate * 2.5, requests_waiting=0.0, kv_cache_usage=0.2 + 0.6 * busy,
        prefill_workers=max(1, math.ceil(rate / 20.0)),
        decode_workers=max(1, math.ceil(rate / 10.0)),
    )


# ----------------------------------------------------------------------------- the processes


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def replica_env(index: int, count: int) -> dict[str, str]:
    """The sharding settings of replica ``index`` of ``count`` (any service)."""
    return {"SLAPLANNER_REPLICA_COUNT": str(count), "SLAPLANNER_REPLICA_INDEX": str(index)}


def start_service(command: str, label: str, env: dict[str, str], log_dir: Path,
                  profile_dir: Path | None = None) -> Service:
    log_path = log_dir / f"{label}.log"
    python = [sys.executable]
    if profile_dir is not None:  # the stats are written when the service drains on SIGTERM
        python += ["-m", "cProfile", "-o", str(profile_dir / f"{label}.prof")]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*python, "-m", "services.cli", command], cwd=REPO, env=env,
            stdout=log, stderr=subprocess.STDOUT,
        )
    return Service(label, process, log_path)


def stop_services(services: Sequence[Service], timeout_s: float = 15.0) -> None:
    for svc in services:
        if svc.process.poll() is None:
            svc.process.terminate()
    for svc in services:
        try:
            svc.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            svc.process.kill()
            svc.process.wait()


def base_env(nats_url: str, interval_s: float) -> dict[str, str]:
    return {
        **os.environ,
        "SLAPLANNER_NATS_URL": nats_url,
        "SLAPLANNER_HTTP_PORT": "0",
        "SLAPLANNER_HTTP_HOST": "127.0.0.1",
        "SLAPLANNER_ADJUSTMENT_INTERVAL_S": f"{interval_s}s",
        "PYTHONUNBUFFERED": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }


def start_pipeline(nats_url: str, args: argparse.Namespace, log_dir: Path) -> list[Service]:
    env = base_env(nats_url, args.interval_s)
    profiled = set(args.profile or ())
    profile_dir = Path(args.profile_dir) if profiled else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)

    def where(command: str) -> Path | None:
        return profile_dir if command in profiled else None

    services = [
        start_service("forecaster", f"forecaster-{i}",
                      {**env, **replica_env(i, args.forecaster_replicas)}, log_dir,
                      where("forecaster"))
        for i in range(args.forecaster_replicas)
    ]
    if args.forecasting_only:
        return services
    services += [
        start_service("decider", replica_label("decider", i, args.decider_replicas),
                      {**env, **replica_env(i, args.decider_replicas)}, log_dir, where("decider"))
        for i in range(args.decider_replicas)
    ]
    # The virtual backend needs no allowlist (it touches no Kubernetes object), and every
    # deployment the mapping file does not list goes to the default backend: all admitted.
    services += [
        start_service(
            "actuator", replica_label("actuator", i, args.actuator_replicas),
            {**env, **replica_env(i, args.actuator_replicas), "SLAPLANNER_BACKEND": args.backend,
             "SLAPLANNER_MAX_TOTAL_GPUS": "100000", "SLAPLANNER_MAX_PREFILL_REPLICAS": "1000",
             "SLAPLANNER_MAX_DECODE_REPLICAS": "1000"},
            log_dir, where("actuator"))
        for i in range(args.actuator_replicas)
    ]
    return services


def replica_label(service: str, index: int, count: int) -> str:
    return service if count == 1 else f"{service}-{index}"


def durable_names(args: argparse.Namespace) -> set[str]:
    """The durable consumers of a running pipeline (one per replica)."""
    forecasters = {ForecasterSettings(replica_count=args.forecaster_replicas, replica_index=i)
                   .durable_name() for i in range(args.forecaster_replicas)}
    if args.forecasting_only:
        return forecasters
    return forecasters | set(bus.replica_durables("decider", args.decider_replicas)) | set(
        bus.replica_durables("actuator", args.actuator_replicas))


async def wait_ready(js: Any, services: Sequence[Service], wanted: set[str],
                     timeout_s: float = 60.0) -> None:
    """Ready when every durable consumer exists: a snapshot published now is read."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for svc in services:
            if svc.process.poll() is not None:
                raise RuntimeError(f"{svc.name} exited early:\n{svc.log_tail()}")
        with contextlib.suppress(Exception):
            names = {c.name for c in await js.consumers_info("SLAPLANNER")}
            if wanted <= names:
                return
        await asyncio.sleep(0.1)
    tails = "\n".join(f"--- {s.name}\n{s.log_tail()}" for s in services)
    raise RuntimeError(f"services not ready within {timeout_s} s:\n{tails}")


# ----------------------------------------------------------------------------- measuring


@dataclass
class ProcessUsage:
    """RSS and CPU time of one process, sampled from /proc."""

    pid: int
    rss_kib: list[int] = field(default_factory=list)
    cpu_ticks_start: int | None = None
    cpu_ticks_last: int | None = None

    def sample(self) -> None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                self.rss_kib.append(int(line.split()[1]))
        # utime and stime are fields 14 and 15; the command name may hold spaces, so split
        # after its closing parenthesis.
        fields = stat.rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        if self.cpu_ticks_start is None:
            self.cpu_ticks_start = ticks
        self.cpu_ticks_last = ticks

    def cpu_s(self) -> float:
        if self.cpu_ticks_start is None or self.cpu_ticks_last is None:
            return 0.0
        return (self.cpu_ticks_last - self.cpu_ticks_start) / CLOCK_TICKS_PER_S


@dataclass
class Tracking:
    """Which snapshot every forecast, target and ScaleEvent id comes from, and when each came."""

    published_at: dict[str, float] = field(default_factory=dict)  # snapshot id -> wall time
    interval_of: dict[str, int] = field(default_factory=dict)     # snapshot id -> interval
    origin: dict[str, tuple[str, str]] = field(default_factory=dict)  # derived id -> stage, snap
    arrived: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> snap -> time
    duplicates: dict[str, int] = field(default_factory=dict)
    fast_path_events: int = 0

    def expect(self, snapshot_id: str, interval: int) -> None:
        self.interval_of[snapshot_id] = interval
        forecast = derived_id("forecast", snapshot_id)
        target = derived_id("target", forecast)
        self.origin[forecast] = ("forecast", snapshot_id)
        self.origin[target] = ("target", snapshot_id)
        self.origin[derived_id("scaled", target)] = ("scaled", snapshot_id)
        fast_target = derived_id("fast-path", snapshot_id)
        self.origin[derived_id("scaled", fast_target)] = ("fast-path", snapshot_id)

    async def on_message(self, msg: Msg) -> None:
        now = time.time()
        # The body's id (the Nats-Msg-Id header is a keyed digest of subject and id).
        msg_id = orjson.loads(msg.data).get("id", "")
        found = self.origin.get(msg_id)
        if found is None:
            return
        stage, snapshot_id = found
        if stage == "fast-path":
            self.fast_path_events += 1
            return
        seen = self.arrived.setdefault(stage, {})
        if snapshot_id in seen:
            self.duplicates[stage] = self.duplicates.get(stage, 0) + 1
            return
        seen[snapshot_id] = now


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def latencies(tracking: Tracking, stage: str, intervals: set[int]) -> list[float]:
    arrived = tracking.arrived.get(stage, {})
    return [arrived[s] - tracking.published_at[s] for s in arrived
            if tracking.interval_of[s] in intervals]


def stage_drain_s(tracking: Tracking, stage: str, interval: int) -> float:
    """From the interval's first snapshot published to its last message of ``stage``."""
    ids = [s for s, i in tracking.interval_of.items() if i == interval]
    arrived = tracking.arrived.get(stage, {})
    times = [arrived[s] for s in ids if s in arrived]
    if not times:
        return math.nan
    return max(times) - min(tracking.published_at[s] for s in ids)


# ----------------------------------------------------------------------------- the run


async def publish_interval(js: Any, loads: Sequence[DeploymentLoad], tracking: Tracking,
                           window_end: float, window_s: float, interval: int,
                           rng: random.Random) -> float:
    """Publish one snapshot per deployment as the collector does; returns the seconds taken."""
    started = time.time()
    snapshots = [snapshot(load, window_end, window_s, interval, rng) for load in loads]
    for snap in snapshots:
        tracking.expect(snap.id, interval)

    async def one(snap: MetricSnapshot) -> None:
        tracking.published_at[snap.id] = time.time()
        await bus.publish(js, snap)

    # Concurrent, as the collector's per-deployment publications are independent; bounded so
    # the bench's own burst does not become the bottleneck it measures.
    chunk = 200
    for start in range(0, len(snapshots), chunk):
        await asyncio.gather(*(one(s) for s in snapshots[start:start + chunk]))
    return time.time() - started


async def sample_usage(usages: dict[str, ProcessUsage], stop: asyncio.Event) -> None:
    while not stop.is_set():
        for usage in usages.values():
            usage.sample()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    loads = deployment_loads(args.deployments)
    rng = random.Random(11)
    tracking = Tracking()
    with tempfile.TemporaryDirectory(prefix="slaplanner-load-") as tmp:
        log_dir = Path(tmp) / "logs"
        log_dir.mkdir()
        server = embedded_nats.start(Path(tmp) / "nats")
        services: list[Service] = []
        nc: NATS | None = None
        try:
            nc = await nats.connect(server.url, max_reconnect_attempts=-1)
            js = nc.jetstream()
            await bus.ensure_stream(js, ServiceSettings(nats_url=[server.url]))
            services = start_pipeline(server.url, args, log_dir)
            await wait_ready(js, services, durable_names(args))
            await nc.subscribe("slaplanner.forecast.>", cb=tracking.on_message)
            await nc.subscribe("slaplanner.target.>", cb=tracking.on_message)
            await nc.subscribe("slaplanner.scaled.>", cb=tracking.on_message)

            usages = {s.name: ProcessUsage(s.process.pid) for s in services}
            usages["nats-server"] = ProcessUsage(server.process.pid)
            usages["bench"] = ProcessUsage(os.getpid())
            stop_sampling = asyncio.Event()
            sampler = asyncio.create_task(sample_usage(usages, stop_sampling))
            load_started = time.monotonic()
            publish_s = []
            # Window ends on the interval grid, as the collector's ticks align to it.
            first_window_end = math.floor(time.time() / args.interval_s) * args.interval_s
            for interval in range(args.intervals):
                if not args.forecasting_only:  # there, the whole backlog at once
                    tick = load_started + interval * args.interval_s
                    await asyncio.sleep(max(0.0, tick - time.monotonic()))
                publish_s.append(await publish_interval(
                    js, loads, tracking, first_window_end + interval * args.interval_s,
                    args.interval_s, interval, rng))
            expected = args.deployments * args.intervals
            last_stage = "forecast" if args.forecasting_only else "scaled"
            deadline = time.monotonic() + args.interval_s + args.grace_s
            while (len(tracking.arrived.get(last_stage, {})) < expected
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)  # late duplicates, if any, are counted too
            stop_sampling.set()
            await sampler
            wall_s = time.monotonic() - load_started
            for svc in services:
                if svc.process.poll() is not None:
                    print(f"--- {svc.name} exited:\n{svc.log_tail()}", file=sys.stderr)
            return summarise(args, tracking, usages, publish_s, wall_s)
        finally:
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()
            stop_services(services)
            server.stop()
            if args.keep_logs:
                target = Path(args.keep_logs)
                target.mkdir(parents=True, exist_ok=True)
                for log in log_dir.iterdir():
                    (target / log.name).write_bytes(log.read_bytes())


def summarise(args: argparse.Namespace, tracking: Tracking, usages: dict[str, ProcessUsage],
              publish_s: list[float], wall_s: float) -> dict[str, Any]:
    all_intervals = set(range(args.intervals))
    steady = all_intervals - {0} if args.intervals > 1 else all_intervals
    expected = args.deployments * args.intervals
    result: dict[str, Any] = {
        "deployments": args.deployments, "interval_s": args.interval_s,
        "intervals": args.intervals, "forecaster_replicas": args.forecaster_replicas,
        "decider_replicas": args.decider_replicas, "actuator_replicas": args.actuator_replicas,
        "backend": args.backend, "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
        "wall_s": wall_s, "publish_s_median": statistics.median(publish_s),
        "expected": expected, "duplicates": tracking.duplicates,
        "fast_path_events": tracking.fast_path_events, "stages": {}, "processes": {},
    }
    for stage in ("forecast", "target", "scaled"):
        every = latencies(tracking, stage, all_intervals)
        after_first = latencies(tracking, stage, steady)
        result["stages"][stage] = {
            "received": len(every),
            "median_s": percentile(after_first, 0.5), "p99_s": percentile(after_first, 0.99),
            "max_s": max(every, default=math.nan),
            "first_interval_max_s": max(latencies(tracking, stage, {0}), default=math.nan),
            "drain_s_per_interval": [stage_drain_s(tracking, stage, i) for i in sorted(
                all_intervals)],
        }
    scaled = latencies(tracking, "scaled", all_intervals)
    result["within_interval"] = sum(1 for v in scaled if v <= args.interval_s)
    result["all_within_interval"] = (
        result["within_interval"] == expected and not tracking.duplicates.get("scaled"))
    result["forecasting_only"] = args.forecasting_only
    forecasts = tracking.arrived.get("forecast", {})
    if forecasts:
        # From the first snapshot published to the last forecast received: the forecasters'
        # throughput when the whole backlog waits for them (--forecasting-only), else the pace
        # of the load itself.
        span_s = max(forecasts.values()) - min(tracking.published_at.values())
        result["forecasts_per_s"] = len(forecasts) / span_s
    else:
        result["forecasts_per_s"] = math.nan
    for name, usage in usages.items():
        result["processes"][name] = {
            "rss_mib_max": max(usage.rss_kib, default=0) / 1024,
            "rss_mib_last": (usage.rss_kib[-1] if usage.rss_kib else 0) / 1024,
            "cpu_s": usage.cpu_s(),
            "cpu_percent": 100.0 * usage.cpu_s() / wall_s,
        }
    return result


def report(result: dict[str, Any]) -> str:
    only = result["forecasting_only"]
    lines = [
        f"{result['deployments']} deployments x {result['intervals']} intervals of "
        f"{result['interval_s']:g} s, replicas: {result['forecaster_replicas']} forecaster, "
        f"{result.get('decider_replicas', 1)} decider, {result.get('actuator_replicas', 1)} "
        "actuator, "
        + ("forecasters only" if only else f"actuator backend {result['backend']}")
        + f"; {result['cpus']} CPUs, load average "
        + " ".join(f"{v:.2f}" for v in result["load_avg"]),
        f"snapshots published in {result['publish_s_median']:.2f} s per interval (median)",
        "",
        "| stage | received | median (s) | p99 (s) | max (s) | first interval max (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for stage, s in result["stages"].items():
        if only and stage != "forecast":
            continue
        lines.append(f"| snapshot -> {stage} | {s['received']} / {result['expected']} | "
                     f"{s['median_s']:.2f} | {s['p99_s']:.2f} | {s['max_s']:.2f} | "
                     f"{s['first_interval_max_s']:.2f} |")
    lines += ["", "median and p99 leave out the first interval (cold start); max includes it"]
    if not only:
        lines += [
            f"decisions within the interval: {result['within_interval']} / {result['expected']}"
            f" ({'all' if result['all_within_interval'] else 'NOT all'}); duplicates: "
            f"{result['duplicates'] or 'none'}; fast-path ScaleEvents: "
            f"{result['fast_path_events']}",
            "per-interval time from first snapshot to last ScaleEvent (s): " + ", ".join(
                f"{d:.1f}" for d in result["stages"]["scaled"]["drain_s_per_interval"]),
        ]
    lines += [
        f"forecasting throughput: {result['forecasts_per_s']:.0f} forecasts/s (forecasts / "
        "time from the first snapshot to the last forecast"
        + (", the whole backlog published at once)" if only else ")"),
        "",
        "| process | RSS max (MiB) | RSS at end (MiB) | CPU (s) | CPU (% of one core) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, p in result["processes"].items():
        lines.append(f"| {name} | {p['rss_mib_max']:.0f} | {p['rss_mib_last']:.0f} | "
                     f"{p['cpu_s']:.1f} | {p['cpu_percent']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--deployments", type=int, default=1000)
    parser.add_argument("--interval-s", type=float, default=10.0)
    parser.add_argument("--intervals", type=int, default=8)
    parser.add_argument("--forecaster-replicas", type=int, default=1)
    parser.add_argument("--decider-replicas", type=int, default=1)
    parser.add_argument("--actuator-replicas", type=int, default=1)
    parser.add_argument("--forecasting-only", action="store_true",
                        help="start only the forecaster replicas and publish every interval's "
                        "snapshots at once: measures forecasting throughput")
    parser.add_argument("--backend", choices=("virtual", "dry-run"), default="virtual")
    parser.add_argument("--grace-s", type=float, default=20.0,
                        help="extra wait for late ScaleEvents after the last interval")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--profile", action="append", choices=("forecaster", "decider",
                                                                "actuator"),
                        help="run this service under cProfile (repeatable)")
    parser.add_argument("--profile-dir", default="load-profiles",
                        help="where the .prof files of --profile go")
    parser.add_argument("--keep-logs", help="copy the services' logs into this directory")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    print(report(result))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2
                                                 | orjson.OPT_SERIALIZE_NUMPY))
    if args.forecasting_only:
        return 0 if result["stages"]["forecast"]["received"] == result["expected"] else 1
    return 0 if result["all_within_interval"] else 1


if __name__ == "__main__":
    sys.exit(main())
