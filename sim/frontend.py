"""A serving frontend driven by the simulator: a /metrics endpoint that Prometheus can scrape.

It runs the simulated deployment of ``sim/cluster.py`` on a trace, in wall-clock time, and exports
what a Dynamo frontend and its vLLM workers would: the ``dynamo_frontend_*`` request counter,
histograms and gauges, and per serving worker ``vllm:num_requests_running`` and
``vllm:kv_cache_usage_perc`` with Dynamo's ``dynamo_component`` label (``prefill``, ``backend``),
the names the collector's ``dynamo`` dialect reads (``services/collector/promql.py``). The
replicas it runs are the DynamoGraphDeployment's (``spec.services.*.replicas`` of the prefill and
decode services), read from a Kubernetes API server, so what the actuator patches changes the
simulated workers; a new worker serves after the cluster's startup delay.

Simulated time runs at the wall clock's pace (one simulated second per second). Prometheus and
the collector measure windows in wall-clock seconds, so a faster simulation would multiply every
rate the planner sees; what a test compresses instead is the trace (a load that rises within
seconds) and the startup delay.

Each worker's series carries its own ``instance`` label (``prefill-3``): one process stands for
every worker pod, and a scrape job with ``honor_labels: true`` keeps that label, so Prometheus
counts one instance per serving worker as it would with one scrape target per pod.

Counting: a request is counted (``requests_total``, input and output lengths) when it arrives, as
the simulator's windows count it; its TTFT is observed at its first token; its mean ITL (once per
generated token gap, so the histogram's sum / count is the token-weighted mean) and its duration
when it finishes.

    python -m sim.frontend --trace-file load.jsonl --port 8000 \\
        --kube-api-url http://127.0.0.1:8001 --namespace dynamo --name vllm-disagg
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from shared.perf_model import Profile, default_profile_path, load_profile
from shared.traces import Trace, load_trace
from sim.cluster import Cluster, ClusterConfig, WindowStats

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

log = logging.getLogger("slaplanner.sim.frontend")

PREFIX = "dynamo_frontend"
# Dynamo's vLLM component names, the collector's default role matchers.
PREFILL_COMPONENT = "prefill"
DECODE_COMPONENT = "backend"

TOKEN_BUCKETS = (64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0)
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
DURATION_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class Histogram:
    """A cumulative histogram as Prometheus exposes it; observations may carry weights."""

    edges: tuple[float, ...]
    counts: FloatArray = field(init=False)  # per bucket, the last one is +Inf
    total: float = 0.0
    count: float = 0.0

    def __post_init__(self) -> None:
        self.counts = np.zeros(len(self.edges) + 1)

    def observe(self, values: FloatArray, weights: FloatArray | None = None) -> None:
        if values.size == 0:
            return
        weight = np.ones_like(values) if weights is None else weights
        # le buckets: a value equal to an edge belongs to that edge's bucket
        index = np.searchsorted(np.asarray(self.edges), values, side="left")
        np.add.at(self.counts, index, weight)
        self.total += float((values * weight).sum())
        self.count += float(weight.sum())

    def buckets(self) -> list[tuple[str, float]]:
        cumulative = np.cumsum(self.counts).tolist()
        names = [f"{edge:g}" for edge in self.edges] + ["+Inf"]
        return list(zip(names, cumulative, strict=True))


@dataclass(frozen=True)
class WorkerSample:
    """One serving worker's engine gauges."""

    instance: str
    component: str
    requests_running: float
    kv_cache_usage: float | None


@dataclass(frozen=True)
class Exposition:
    """Everything the endpoint shows at one moment (a copy, safe to render in another thread)."""

    now_s: float  # the simulated clock, seconds since the trace's start
    requests_total: float
    histograms: Mapping[str, Histogram]
    inflight: float
    queued: float
    workers: tuple[WorkerSample, ...]


def _spread(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal integers (the simulator reports a role's sum)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class FrontendCore:
    """The simulated deployment and its metrics; time and replica counts are arguments."""

    def __init__(self, trace: Trace, profile: Profile, config: ClusterConfig) -> None:
        self.cluster = Cluster(trace, profile, config)
        n = self.cluster.arrival.size
        self._first_seen: BoolArray = np.zeros(n, dtype=np.bool_)
        self._finish_seen: BoolArray = np.zeros(n, dtype=np.bool_)
        self._arrived = 0
        self.requests_total = 0.0
        self.histograms = {
            "input_sequence_tokens": Histogram(TOKEN_BUCKETS),
            "output_sequence_tokens": Histogram(TOKEN_BUCKETS),
            "time_to_first_token_seconds": Histogram(TTFT_BUCKETS_S),
            "inter_token_latency_seconds": Histogram(ITL_BUCKETS_S),
            "request_duration_seconds": Histogram(DURATION_BUCKETS_S),
        }
        self._gauges = (0.0, 0.0)
        self._workers: tuple[WorkerSample, ...] = ()
        self._refresh_gauges(self.cluster.advance(0.0))

    @property
    def now_s(self) -> float:
        return self.cluster.now

    def apply(self, prefill: int, decode: int) -> bool:
        """Run ``prefill`` and ``decode`` workers from now on; whether anything changed."""
        if (prefill, decode) == self.cluster.replicas():
            return False
        self.cluster.scale(prefill, decode)
        return True

    def advance(self, until_s: float) -> WindowStats:
        """Simulate up to ``until_s``, record what it produced, and return the simulator's own
        summary of the step."""
        stats = self.cluster.advance(until_s)
        c = self.cluster
        hi = int(np.searchsorted(c.arrival, until_s, side="left"))
        arrived = slice(self._arrived, hi)
        self._arrived = hi
        self.requests_total += hi - arrived.start
        self.histograms["input_sequence_tokens"].observe(c.isl[arrived].astype(np.float64))
        self.histograms["output_sequence_tokens"].observe(c.osl[arrived].astype(np.float64))

        first_token = c.prefill.end
        with np.errstate(invalid="ignore"):
            first = ~self._first_seen & (first_token <= until_s)
        self._first_seen |= first
        self.histograms["time_to_first_token_seconds"].observe(
            first_token[first] - c.arrival[first])

        with np.errstate(invalid="ignore"):
            done = ~self._finish_seen & (c.finish <= until_s)
        self._finish_seen |= done
        gaps = c.decode_tokens[done]
        with_gaps = gaps > 0
        per_request_itl = ((c.finish[done] - first_token[done])[with_gaps] / gaps[with_gaps])
        self.histograms["inter_token_latency_seconds"].observe(per_request_itl, gaps[with_gaps])
        self.histograms["request_duration_seconds"].observe(c.finish[done] - c.arrival[done])
        self._refresh_gauges(stats)
        return stats

    def _refresh_gauges(self, stats: WindowStats) -> None:
        queued = stats.prefill_waiting + stats.decode_waiting
        self._gauges = (float(queued + stats.prefill_running + stats.decode_running),
                        float(queued))
        workers: list[WorkerSample] = []
        for role, component, serving, running, kv in (
            ("prefill", PREFILL_COMPONENT, stats.prefill_serving, stats.prefill_running, None),
            ("decode", DECODE_COMPONENT, stats.decode_serving, stats.decode_running,
             stats.kv_cache_usage),
        ):
            if serving:
                for i, share in enumerate(_spread(running, serving)):
                    workers.append(WorkerSample(f"{role}-{i}", component, float(share), kv))
        self._workers = tuple(workers)

    def exposition(self) -> Exposition:
        copies = {}
        for name, hist in self.histograms.items():
            clone = Histogram(hist.edges, total=hist.total, count=hist.count)
            clone.counts = hist.counts.copy()
            copies[name] = clone
        inflight, queued = self._gauges
        return Exposition(self.cluster.now, self.requests_total, copies, inflight, queued,
                          self._workers)


def metric_families(view: Exposition) -> Iterator[Metric]:
    """The exposition as prometheus-client metric families (Dynamo's and vLLM's names)."""
    # not a serving metric: lets a test line its observations up with the trace
    yield GaugeMetricFamily("slaplanner_sim_time_seconds", "Simulated seconds since the trace's "
                            "start", value=view.now_s)
    yield CounterMetricFamily(f"{PREFIX}_requests", "Requests received by the frontend",
                              value=view.requests_total)
    for name, hist in view.histograms.items():
        yield HistogramMetricFamily(f"{PREFIX}_{name}", f"Simulated {name.replace('_', ' ')}",
                                    buckets=hist.buckets(), sum_value=hist.total)
    yield GaugeMetricFamily(f"{PREFIX}_inflight_requests", "Requests in flight",
                            value=view.inflight)
    yield GaugeMetricFamily(f"{PREFIX}_queued_requests", "Requests waiting for a worker",
                            value=view.queued)
    running = GaugeMetricFamily("vllm:num_requests_running", "Requests running on the engine",
                                labels=["instance", "dynamo_component"])
    kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage (0..1)",
                           labels=["instance", "dynamo_component"])
    for worker in view.workers:
        running.add_metric([worker.instance, worker.component], worker.requests_running)
        if worker.kv_cache_usage is not None:
            kv.add_metric([worker.instance, worker.component], worker.kv_cache_usage)
    yield running
    yield kv


def dgd_replicas(dgd: Mapping[str, Any]) -> tuple[int, int] | None:
    """(prefill, decode) replicas of a DynamoGraphDeployment's services, found by their
    ``subComponentType``; ``None`` when either is missing."""
    found: dict[str, int] = {}
    services = (dgd.get("spec") or {}).get("services") or {}
    for service in services.values():
        role = service.get("subComponentType")
        if role in ("prefill", "decode") and isinstance(service.get("replicas"), int):
            found[role] = service["replicas"]
    if "prefill" in found and "decode" in found:
        return found["prefill"], found["decode"]
    return None


def step_trace(rates: Sequence[tuple[float, float]], until_s: float, isl_tokens: int,
               osl_tokens: int, seed: int = 0) -> Trace:
    """Poisson arrivals whose rate steps: ``rates`` is (from time, requests per second), sorted."""
    rng = np.random.default_rng(seed)
    arrivals: list[FloatArray] = []
    bounds = [start for start, _ in rates[1:]] + [until_s]
    for (start, rate), end in zip(rates, bounds, strict=True):
        if rate > 0 and end > start:
            count = rng.poisson(rate * (end - start))
            arrivals.append(np.sort(rng.uniform(start, end, count)))
    arrival = np.concatenate(arrivals) if arrivals else np.zeros(0)
    n = arrival.size
    return Trace(arrival, np.full(n, isl_tokens, dtype=np.int64),
                 np.full(n, osl_tokens, dtype=np.int64), "step")


# ---------------------------------------------------------------------------------------------
# The shell: the HTTP endpoint, the clock and the Kubernetes reads


class _CoreCollector(Collector):
    def __init__(self, core: FrontendCore, lock: threading.Lock) -> None:
        self._core = core
        self._lock = lock

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            view = self._core.exposition()
        return list(metric_families(view))


def _read_dgd(api: client.CustomObjectsApi, namespace: str, name: str,
              timeout_s: float) -> tuple[int, int] | None:
    try:
        obj = api.get_namespaced_custom_object("nvidia.com", "v1alpha1", namespace,
                                               "dynamographdeployments", name,
                                               _request_timeout=timeout_s)
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        # keep serving the current workers: an API server that does not answer changes nothing
        log.warning("cannot read dynamographdeployment %s/%s: %s", namespace, name, exc)
        return None
    return dgd_replicas(obj) if isinstance(obj, dict) else None


def serve(args: argparse.Namespace) -> None:
    trace = load_trace(args.trace_file)
    profile = load_profile(args.profile or default_profile_path())
    config = ClusterConfig(startup_delay_s=args.startup_delay_s, start_prefill=args.prefill,
                           start_decode=args.decode, seed=args.seed)
    core = FrontendCore(trace, profile, config)
    lock = threading.Lock()
    registry = CollectorRegistry()
    registry.register(_CoreCollector(core, lock))
    configuration = client.Configuration(host=args.kube_api_url)
    configuration.retries = False
    api = client.CustomObjectsApi(client.ApiClient(configuration))

    start_http_server(args.port, addr=args.host, registry=registry)
    started = time.monotonic()
    log.info("serving /metrics on %s:%d; %d requests over %.0f s", args.host, args.port,
             len(trace), trace.span_s)
    next_poll = started
    while True:
        now = time.monotonic()
        if now >= next_poll:
            wanted = _read_dgd(api, args.namespace, args.name, timeout_s=args.poll_s * 4)
            next_poll = now + args.poll_s
            if wanted is not None:
                with lock:
                    if core.apply(*wanted):
                        log.info("t=%.1f s: now running %d prefill and %d decode workers",
                                 core.now_s, *wanted)
        with lock:
            core.advance(max(core.now_s, time.monotonic() - started))
        time.sleep(args.tick_s)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sim.frontend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace-file", required=True, help="Mooncake JSONL or Azure CSV trace")
    parser.add_argument("--profile", default=None, help="profile (default: the bundled H200)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--kube-api-url", required=True,
                        help="Kubernetes API URL without credentials (kubectl proxy, tests)")
    parser.add_argument("--namespace", required=True, help="namespace of the DGD")
    parser.add_argument("--name", required=True, help="name of the DynamoGraphDeployment")
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers at the start")
    parser.add_argument("--decode", type=int, default=1, help="decode workers at the start")
    parser.add_argument("--startup-delay-s", type=float, default=3.0,
                        help="seconds from a worker's request to its serving")
    parser.add_argument("--poll-s", type=float, default=0.5,
                        help="how often the DGD's replicas are read, seconds")
    parser.add_argument("--tick-s", type=float, default=0.1,
                        help="simulation step, seconds (metrics are at most this old)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve(args)


if __name__ == "__main__":
    main()
