"""The actuator's dynamo backend at scale: N DynamoGraphDeployments against the Kubernetes test
API server, one target each per interval, with the watch cache.

Each interval every deployment gets a target that changes its decode replicas, handled
``--in-flight`` at a time (as the service's ``max_in_flight``); it reports the interval's wall
time, and the API requests per target (watches aside). Run:

    python -m bench.actuator_kube --deployments 1000 --namespaces 10 --intervals 5

The test server runs in this process (its threads share the interpreter with the actuator), so
the figure is a bound for the actuator's side, not for a real API server.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from kubernetes import client

from services.actuator import config, wiring
from services.actuator.kube import Kube, RetryPolicy
from services.actuator.settings import ActuatorSettings
from shared.messages import DeploymentKey, Outcome, ReplicaTarget
from tests import k8s_api_server as srv


def dgd(name: str, namespace: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": {"components": [
        {"name": "Frontend", "type": "frontend", "replicas": 1},
        {"name": "prefill", "type": "prefill", "replicas": 1},
        {"name": "decode", "type": "decode", "replicas": 1}]}}


async def run(deployments: int, namespaces: int, intervals: int, in_flight: int) -> None:
    server = srv.KubeApiServer(bookmark_interval_s=5.0).start()
    keys = [DeploymentKey(namespace=f"team-{i % namespaces}", name=f"model-{i}")
            for i in range(deployments)]
    for key in keys:
        server.add(srv.DGDS_BETA, dgd(key.name, key.namespace))
    configuration = client.Configuration(host=server.url)
    configuration.retries = False
    configuration.connection_pool_maxsize = in_flight
    kube = Kube(client.ApiClient(configuration), RetryPolicy(3, 0.05, 0.5), timeout_s=10.0)
    mapping = config.parse({"allow": [{"namespace": k.namespace, "kind": "DynamoGraphDeployment",
                                       "name": k.name} for k in keys]}, "bench")
    settings = ActuatorSettings(backend="dynamo", leader_election="off", record_events=False,
                                max_decode_replicas=64, max_total_gpus=100_000)
    assembly = wiring.assemble(settings, None, kube_client=kube, identity="bench",
                               mapping=mapping)
    slots = asyncio.Semaphore(in_flight)

    async def one(key: DeploymentKey, interval: int) -> Outcome:
        target = ReplicaTarget(deployment=key, window_end=1e9 + 10 * interval, window_s=10.0,
                               policy="bench", prefill_replicas=1,
                               decode_replicas=1 + (interval % 2) + 1)
        async with slots:
            event = await assembly.actuator.handle(target, time.time())
        assert event is not None
        return event.outcome

    try:
        walls, per_target = [], []
        for interval in range(intervals + 1):  # interval 0 fills the caches
            server.clear_log()
            started = time.perf_counter()
            outcomes = await asyncio.gather(*(one(k, interval) for k in keys))
            wall = time.perf_counter() - started
            calls = [r for r in server.requests if r.query.get("watch") != ["true"]]
            applied = sum(1 for o in outcomes if o is Outcome.APPLIED)
            print(f"interval {interval}: {wall:.2f} s, applied {applied}/{len(keys)}, "
                  f"{len(calls) / len(keys):.2f} API requests per target "
                  f"({sum(1 for r in calls if r.method == 'GET')} GET, "
                  f"{sum(1 for r in calls if r.method == 'PATCH')} PATCH)")
            if interval > 0:
                walls.append(wall)
                per_target.append(len(calls) / len(keys))
            await asyncio.sleep(0.5)  # the watches catch up, as between real intervals
        print(f"steady state: median {statistics.median(walls):.2f} s per interval of "
              f"{len(keys)} targets (max {max(walls):.2f} s); "
              f"{statistics.median(per_target):.2f} requests per target")
    finally:
        assembly.close()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deployments", type=int, default=1000)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--intervals", type=int, default=5)
    parser.add_argument("--in-flight", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(run(args.deployments, args.namespaces, args.intervals, args.in_flight))


if __name__ == "__main__":
    main()
