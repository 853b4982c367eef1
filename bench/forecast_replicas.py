"""Forecasts per second of one forecaster process against two replicas, on the same load.

A real nats-server and real ``python -m services.forecaster`` processes. The load is
``--deployments`` deployments with ``--rounds`` snapshots each (a different count per window,
ISL and OSL around 3,000 and 300 tokens), published round after round as fast as the bus takes
them. A run empties the stream, publishes ``--history-rounds`` earlier snapshots of every
deployment (the history the processes rebuild on start, so that the predictor fits real series
rather than falling back on a few points), starts the processes, waits until their consumers
exist, publishes the load and stops the clock at the last forecast (seen on a core
subscription); forecasts per second is snapshots / that time. The first forecast of each
deployment fits its models, as after a restart. One process and two replicas alternate, run
after run, and each figure is the median of ``--repeats`` runs. Run from the repository root:
``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python -m bench.forecast_replicas``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nats
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared import bus, embedded_nats
from shared.service_settings import ServiceSettings

T0 = 1_732_345_200.0
STREAM = "SLAPLANNER"


def snapshot_body(deployment: int, i: int) -> bytes:
    return orjson.dumps({
        "schema_version": 1, "id": f"bench-{deployment}-{i}",
        "deployment": {"namespace": "bench", "name": f"model-{deployment}"},
        "window_end": T0 + 60 * i, "window_s": 60.0,
        "num_requests": 100.0 + (7 * deployment + 13 * i) % 50,
        "isl_avg": 3000.0 + (i % 7), "osl_avg": 300.0 + (i % 3),
    })


def start_replicas(url: str, replicas: int, predictor: str, log_dir: Path
                   ) -> list[subprocess.Popen[bytes]]:
    processes = []
    for index in range(replicas):
        env = {**os.environ, "SLAPLANNER_NATS_URL": url, "SLAPLANNER_HTTP_PORT": "0",
               "SLAPLANNER_HTTP_HOST": "127.0.0.1", "SLAPLANNER_PREDICTOR": predictor,
               "SLAPLANNER_REPLICA_COUNT": str(replicas), "SLAPLANNER_REPLICA_INDEX": str(index),
               "SLAPLANNER_LOG_LEVEL": "WARNING"}
        log = (log_dir / f"replicas-{replicas}-{index}.log").open("ab")
        processes.append(subprocess.Popen([sys.executable, "-m", "services.forecaster"],
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
    return processes


async def reset_stream(nc: NATS, url: str) -> None:
    """A new, empty stream: no consumers, messages or duplicate-window state of earlier runs."""
    js = nc.jetstream()
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_stream(STREAM)
    await bus.ensure_stream(js, ServiceSettings(nats_url=[url]))


async def publish_rounds(nc: NATS, deployments: int, rounds: range) -> None:
    """Core publishes (the stream captures them), so that the publisher is never the limit."""
    for i in rounds:
        for deployment in range(deployments):
            await nc.publish(f"slaplanner.metrics.bench.model-{deployment}",
                             snapshot_body(deployment, i))
    await nc.flush()


async def one_run(nc: NATS, url: str, replicas: int, args: argparse.Namespace,
                  log_dir: Path) -> float:
    """Forecasts per second of ``replicas`` processes on the whole load."""
    deployments, rounds = args.deployments, args.rounds
    await reset_stream(nc, url)
    await publish_rounds(nc, deployments, range(args.history_rounds))
    js = nc.jetstream()
    while (await js.stream_info(STREAM)).state.messages < deployments * args.history_rounds:
        await asyncio.sleep(0.05)
    seen = 0
    done = asyncio.Event()
    total = deployments * rounds

    async def on_forecast(msg: Msg) -> None:
        nonlocal seen
        seen += 1
        if seen >= total:
            done.set()

    sub = await nc.subscribe("slaplanner.forecast.bench.>", cb=on_forecast)
    processes = start_replicas(url, replicas, args.predictor, log_dir)
    try:
        wanted = {"forecaster"} if replicas == 1 else {f"forecaster-{i}" for i in range(replicas)}
        while True:
            with contextlib.suppress(Exception):
                if wanted <= {c.name for c in await js.consumers_info(STREAM)}:
                    break
            await asyncio.sleep(0.05)
        started = time.perf_counter()
        await publish_rounds(nc, deployments,
                             range(args.history_rounds, args.history_rounds + rounds))
        await asyncio.wait_for(done.wait(), timeout=600.0)
        return total / (time.perf_counter() - started)
    finally:
        await sub.unsubscribe()
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


async def measure(args: argparse.Namespace) -> dict[int, list[float]]:
    rates: dict[int, list[float]] = {1: [], 2: []}
    with embedded_nats.running() as server, tempfile.TemporaryDirectory() as tmp:
        nc = await nats.connect(server.url)
        for _ in range(args.repeats):
            for replicas in (1, 2):
                rate = await one_run(nc, server.url, replicas, args, Path(tmp))
                rates[replicas].append(rate)
                print(f"  {replicas} process(es): {rate_text(rate)} forecasts/s", file=sys.stderr,
                      flush=True)
        await nc.close()
    return rates


def rate_text(rate: float) -> str:
    return f"{rate:.1f}" if rate < 100 else f"{rate:.0f}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deployments", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--history-rounds", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--predictor", default="horizon-smoothing")
    args = parser.parse_args(argv)
    rates = asyncio.run(measure(args))
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"\n{args.deployments} deployments x {args.rounds} snapshots after "
          f"{args.history_rounds} of history, predictor {args.predictor}, {os.cpu_count()} CPUs "
          f"(load average {os.getloadavg()[1]:.1f} over the last 5 min), median of "
          f"{args.repeats} runs\n")
    print("| forecasters | forecasts/s | ratio to one process |")
    print("| --- | ---: | ---: |")
    print(f"| one process | {rate_text(one)} | 1.00 |")
    print(f"| two replicas | {rate_text(two)} | {two / one:.2f} |")


if __name__ == "__main__":
    main()
