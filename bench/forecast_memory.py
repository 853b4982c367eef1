"""Memory of the forecaster: a restart's rebuild from the stream, and memory per deployment.

Both parts run the code of two checkouts side by side, this one and ``--baseline`` (a checkout
of the code before, e.g. ``git worktree add /tmp/before main``), each in its own process, with
this interpreter.

Rebuild: a real nats-server with JetStream and real ``python -m services.forecaster``
processes. The stream is filled once with ``--deployments`` deployments x ``--windows``
snapshots (default 130 x 1,440: a day of 60 s windows, 187,200 snapshots, what issue 18 names),
then each checkout's forecaster is started, rebuilds from the stream (``rebuild_max_age_s``
1 day, its default) and is stopped once it consumes. Reported: the snapshots it read, the
seconds from start to consuming, and the peak and final resident memory (``VmHWM``, ``VmRSS``
from ``/proc``).

Per deployment: one process per checkout creates a ``Forecaster`` with default settings and
forecasts ``--per-deployment`` snapshots of each of ``--many`` deployments (each seen for a few
minutes, then never again), and reports the memory Python holds (``tracemalloc``) and the
resident memory per deployment. Then ``--waves`` - 1 more waves of as many new deployment names
follow, each starting ``idle_forget_s`` (6 h of window time) after the one before, with
``forget_idle`` called at the start of each (a checkout without it keeps every name), and it
reports the memory per deployment name ever seen.

Run from the repository root:
``python -m bench.forecast_memory --baseline /tmp/before``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nats
import orjson

from shared import bus, embedded_nats
from shared.service_settings import ServiceSettings

REPO = Path(__file__).resolve().parent.parent
T0 = 1_732_345_200.0

PER_DEPLOYMENT = r"""
import gc, json, sys, tracemalloc
from services.forecaster.core import Forecaster
from services.forecaster.settings import ForecasterSettings
from shared.messages import DeploymentKey, MetricSnapshot

many, per, waves = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
T0 = 1_732_345_200.0


def rss_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024


forecaster = Forecaster(ForecasterSettings())
forget = getattr(forecaster, "forget_idle", None)
# A wave of deployments lives for ``per`` windows; the next wave starts idle_forget_s later.
wave_s = 60 * per + 6 * 3600
key = DeploymentKey(namespace="bench", name="warm-up")
for i in range(per):  # imports, caches and the first fits outside the measurement
    forecaster.forecast(MetricSnapshot(deployment=key, window_end=T0 - wave_s + 60 * i,
                                       window_s=60.0, num_requests=100.0 + i, isl_avg=3000.0,
                                       osl_avg=300.0))
gc.collect()
tracemalloc.start()
traced_before, rss_before = tracemalloc.get_traced_memory()[0], rss_bytes()
for wave in range(waves):
    start = T0 + wave * wave_s
    if forget is not None:
        forget(start)
    for d in range(many):
        key = DeploymentKey(namespace="bench", name=f"wave-{wave}-model-{d}")
        for i in range(per):
            forecaster.forecast(MetricSnapshot(
                deployment=key, window_end=start + 60 * i, window_s=60.0,
                num_requests=100.0 + (d * 7 + i * 13) % 50, isl_avg=3000.0 + i,
                osl_avg=300.0 + d % 9,
            ))
    gc.collect()
    if wave == 0:
        traced_one, rss_one = tracemalloc.get_traced_memory()[0], rss_bytes()
traced_all, rss_all = tracemalloc.get_traced_memory()[0], rss_bytes()
print(json.dumps({
    "traced_held": (traced_one - traced_before) / many,
    "rss_held": (rss_one - rss_before) / many,
    "traced_per_name": (traced_all - traced_before) / (many * waves),
    "rss_per_name": (rss_all - rss_before) / (many * waves),
    "forgets": forget is not None,
}))
"""


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


async def fill_stream(url: str, deployments: int, windows: int) -> int:
    settings = ServiceSettings(nats_url=[url])
    client = await nats.connect(url)
    js = client.jetstream()
    await bus.ensure_stream(js, settings)
    for window in range(windows):
        # Every deployment's snapshot of one window, acked together.
        await asyncio.gather(*(
            js.publish(
                f"slaplanner.metrics.bench.model-{d}",
                orjson.dumps({
                    "schema_version": 1, "id": f"m{d}-{window}",
                    "deployment": {"namespace": "bench", "name": f"model-{d}"},
                    "window_end": T0 + 60.0 * window, "window_s": 60.0, "source": "prometheus",
                    "num_requests": 100.0 + (d * 7 + window * 13) % 50,
                    "isl_avg": 3000.0 + window % 17, "osl_avg": 300.0 + d % 9,
                    "isl_p90": 5200.0, "osl_p90": 480.0, "ttft_avg_s": 0.41,
                    "itl_avg_s": 0.019, "prefill_workers": 2, "decode_workers": 3,
                }),
                headers={"Nats-Msg-Id": f"m{d}-{window}"},
            )
            for d in range(deployments)
        ))
    stored = (await js.stream_info(settings.stream_name)).state.messages
    await client.close()
    return stored


def rebuild_once(repo: Path, url: str, log_dir: Path, timeout_s: float) -> dict[str, float]:
    log_path = log_dir / f"forecaster-{repo.name}.log"
    env = {
        **os.environ, "PYTHONPATH": str(repo), "SLAPLANNER_NATS_URL": url,
        "SLAPLANNER_HTTP_PORT": "0", "PYTHONUNBUFFERED": "1",
    }
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.forecaster"], cwd=repo, env=env,
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        while "consuming slaplanner.metrics" not in log_path.read_text(errors="replace"):
            if process.poll() is not None:
                raise SystemExit(f"{repo}: the forecaster exited ({process.returncode}); "
                                 f"see {log_path}")
            if time.monotonic() - started > timeout_s:
                raise SystemExit(f"{repo}: no rebuild within {timeout_s:g} s; see {log_path}")
            time.sleep(0.2)
        seconds = time.monotonic() - started
        peak_kib, rss_kib = status_kib(process.pid, "VmHWM"), status_kib(process.pid, "VmRSS")
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    text = log_path.read_text(errors="replace")
    read = int(text.split("rebuilt history from ")[1].split()[0])
    return {"read": read, "seconds": seconds, "peak_mib": peak_kib / 1024,
            "rss_mib": rss_kib / 1024}


def per_deployment(repo: Path, many: int, per: int, waves: int) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", PER_DEPLOYMENT, str(many), str(per), str(waves)], cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True, check=True,
    )
    values: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return values


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="checkout of the code before")
    parser.add_argument("--deployments", type=int, default=130)
    parser.add_argument("--windows", type=int, default=1440)
    parser.add_argument("--many", type=int, default=2000, help="deployments, per-deployment part")
    parser.add_argument("--per-deployment", type=int, default=5, help="snapshots of each")
    parser.add_argument("--waves", type=int, default=4, help="waves of new deployment names")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--skip-rebuild", action="store_true")
    args = parser.parse_args(argv)
    checkouts = {"before": args.baseline.resolve(), "now": REPO}

    print(f"\n| code | held per deployment (tracemalloc) | RSS per deployment "
          f"| after {args.waves} waves, held per name ever seen | RSS per name ever seen |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, repo in checkouts.items():
        figures = per_deployment(repo, args.many, args.per_deployment, args.waves)
        print(f"| {label} | {figures['traced_held'] / 1024:.1f} KiB "
              f"| {figures['rss_held'] / 1024:.1f} KiB "
              f"| {figures['traced_per_name'] / 1024:.1f} KiB "
              f"| {figures['rss_per_name'] / 1024:.1f} KiB |", flush=True)
    if args.skip_rebuild:
        return

    with tempfile.TemporaryDirectory(prefix="slaplanner-bench-memory-") as tmp:
        server = embedded_nats.start(Path(tmp) / "nats")
        try:
            started = time.monotonic()
            stored = asyncio.run(fill_stream(server.url, args.deployments, args.windows))
            print(f"\nstream: {stored} snapshots ({args.deployments} deployments x "
                  f"{args.windows} windows) in {time.monotonic() - started:.0f} s")
            print("\n| code | snapshots read | start to consuming, s | peak RSS, MiB "
                  "| RSS after, MiB |")
            print("| --- | ---: | ---: | ---: | ---: |")
            for label, repo in checkouts.items():
                figures = rebuild_once(repo, server.url, Path(tmp), args.timeout_s)
                print(f"| {label} | {figures['read']:.0f} | {figures['seconds']:.1f} "
                      f"| {figures['peak_mib']:.0f} | {figures['rss_mib']:.0f} |", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
