"""Direct-scrape source: read /metrics endpoints directly, publish one snapshot per window.

The endpoints are the deployment's frontends (``--scrape-urls``), prefill workers
(``--scrape-prefill-urls``) and decode workers (``--scrape-decode-urls``); a ``dns+http://``
URL stands for one endpoint per address its name resolves to (a Kubernetes headless Service:
one per ready pod; the ``dns+`` prefix as Thanos and Cortex write it). At every window's end
all of them are scraped, and the window's fields are the dialect's recipes evaluated over the
scrapes at its start and end (``exposition``). Between window ends, the endpoints that count
arrivals (the frontends, or without them the decode workers) are scraped every
``--arrival-bin-s`` for the burstiness fields.

``ScrapeCollector`` is the pure core (time and the scrapes are arguments); ``run`` fetches and
publishes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from services.collector import exposition, metrics, promql, snapshot
from services.collector.exposition import Endpoint, Exposition
from services.collector.settings import CollectorSettings
from services.collector.ticks import next_boundary
from services.collector.window import WindowValues, bin_increases
from shared import window_stats
from shared.messages import DeploymentKey, MetricSnapshot
from shared.service import Runtime

__all__ = ["ScrapeCollector", "expand", "fetch", "next_boundary", "run"]

log = logging.getLogger("slaplanner.collector")
SOURCE = "scrape"
DNS_PREFIX = "dns+"

Resolver = Callable[[str, int], Sequence[str]]


def resolve(host: str, port: int) -> list[str]:
    """The addresses a name resolves to: IPv4 if it has any, else IPv6 (a dual-stack pod has
    both, and must count once)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = sorted({str(info[4][0]) for info in infos if info[0] == socket.AF_INET})
    v6 = sorted({str(info[4][0]) for info in infos if info[0] == socket.AF_INET6})
    return v4 or v6


def expand(urls: Sequence[str], resolver: Resolver = resolve) -> tuple[list[str], list[str]]:
    """The endpoints the URLs stand for, and why a ``dns+`` URL stands for none at the moment
    (a name that does not resolve: no pod is ready, or a typo)."""
    out: list[str] = []
    problems: list[str] = []
    for url in urls:
        if not url.startswith(DNS_PREFIX):
            out.append(url)
            continue
        parts = urlsplit(url[len(DNS_PREFIX):])
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = resolver(host, port)
        except OSError as exc:
            problems.append(f"{url}: {exc.strerror or exc}")
            continue
        for address in addresses:
            ip = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
            out.append(urlunsplit(parts._replace(netloc=f"{ip}:{port}")))
    return list(dict.fromkeys(out)), problems


def fetch(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return str(response.read().decode("utf-8"))


Scrapes = Mapping[str, Exposition | str]  # URL -> its exposition, or why it could not be read


@dataclass
class _Edge:
    at: float
    readings: dict[str, Exposition]  # the arrival endpoints that answered
    failed: list[str] = field(default_factory=list)


class ScrapeCollector:
    """What the scrape source remembers between scrapes; each method takes the scrapes."""

    def __init__(self, settings: CollectorSettings) -> None:
        self.settings = settings
        self.key = DeploymentKey(namespace=settings.namespace, name=settings.deployment)
        self.selector = settings.scrape_selector()
        self.dialect = (None if settings.dialect == "auto"
                        else promql.DIALECTS[settings.dialect])
        self.previous: dict[str, Exposition] | None = None  # the last window end's scrapes
        self.seen: set[str] = set()  # every endpoint that ever answered
        self.edges: list[_Edge] = []  # arrival scrapes since the window's start
        self.latency_targets = {"ttft_under_target_share": settings.ttft_target_s,
                                "itl_under_target_share": settings.itl_target_s}

    @property
    def bin_s(self) -> float | None:
        """How often arrivals are scraped, if that divides the window into several bins."""
        bin_s, window_s = self.settings.arrival_bin_s, self.settings.interval_s
        bins = window_s / bin_s
        return bin_s if bins >= 2 and abs(bins - round(bins)) < 1e-6 else None

    def arrival_endpoint(self, endpoints: Mapping[str, Endpoint]) -> Endpoint:
        """The endpoints whose counters count arrivals: the frontends, else decode workers."""
        return (Endpoint.FRONTEND if Endpoint.FRONTEND in endpoints.values()
                else Endpoint.DECODE)

    def arrival_scrape(self, at: float, scrapes: Scrapes) -> None:
        """The arrival endpoints' scrapes at a bin's edge inside the window."""
        if self.previous is not None:
            self.edges.append(_edge(at, scrapes))

    def window(self, end: float, scrapes: Scrapes, endpoints: Mapping[str, Endpoint],
               unresolved: Mapping[Endpoint, str] | None = None) -> MetricSnapshot:
        """The window that ends with these scrapes of every endpoint; ``unresolved``: the
        kinds of endpoint a ``dns+`` URL stood for none of, and why."""
        unresolved = dict(unresolved or {})
        answered = {url: e for url, e in scrapes.items() if isinstance(e, Exposition)}
        failed = {url: why for url, why in scrapes.items() if isinstance(why, str)}
        previous, self.previous = self.previous, answered or None
        edges = [*self.edges, _edge(end, {u: s for u, s in scrapes.items()
                                          if endpoints[u] is self.arrival_endpoint(endpoints)})]
        self.edges = [edges[-1]]
        new = set(answered) - self.seen
        self.seen |= set(answered)
        if not answered:
            self.edges = []
            reasons = [*(f"{u}: {w}" for u, w in failed.items()), *unresolved.values()]
            return self._stale(end, "scrape failed: " + ("; ".join(reasons) or "no endpoint"))
        frontend_failed = [f"{u}: {w}" for u, w in failed.items()
                           if endpoints[u] is Endpoint.FRONTEND]
        frontend_failed += [w for k, w in unresolved.items() if k is Endpoint.FRONTEND]
        if frontend_failed:
            return self._stale(end, "scrape of the frontend failed: " + frontend_failed[0])
        if previous is None:
            # The first window only sets the baseline: an increase over an unknown span would
            # be a number we did not see.
            return self._stale(end, "first scrape: baseline for the next window")
        dialect = self._dialect(answered, endpoints)
        targets = [exposition.Target(url, endpoints[url], scraped,
                                     Exposition() if url in new else previous.get(url))
                   for url, scraped in answered.items()]
        unanswered = _unanswered(failed, endpoints, unresolved)
        values = exposition.window_values(dialect, targets, self.selector,
                                          self.latency_targets, unanswered)
        self._arrivals(dialect, edges, endpoints, values)
        return snapshot.observed(self.key, end, self.settings.interval_s, SOURCE, values)

    def _dialect(self, answered: Mapping[str, Exposition],
                 endpoints: Mapping[str, Endpoint]) -> promql.Dialect:
        """The dialect set, or the one the endpoints' metric names show. Dynamo and vLLM
        create a labelled series with its first request: until one came, a frontend's
        endpoints are read as Dynamo's, workers alone as vLLM's."""
        if self.dialect is not None:
            return self.dialect
        self.dialect = promql.detect(set().union(*(e.names() for e in answered.values())))
        if self.dialect is not None:
            log.info("dialect %s detected: %s", self.dialect.name, self.dialect.about)
            return self.dialect
        return promql.DYNAMO if Endpoint.FRONTEND in endpoints.values() else promql.VLLM

    def _stale(self, end: float, reason: str) -> MetricSnapshot:
        return snapshot.stale(self.key, end, self.settings.interval_s, SOURCE, reason)

    def _arrivals(self, dialect: promql.Dialect, edges: Sequence[_Edge],
                  endpoints: Mapping[str, Endpoint], values: WindowValues) -> None:
        """The burstiness fields from the arrival counter read at every bin's edge."""
        bin_s = self.bin_s
        window_s = self.settings.interval_s
        reason = ""
        if bin_s is None:
            reason = (f"--arrival-bin-s {self.settings.arrival_bin_s:g} does not divide the "
                      f"window of {window_s:g} s into bins")
        elif len(edges) != round(window_s / bin_s) + 1:
            reason = (f"{round(window_s / bin_s) + 1 - len(edges)} of the window's arrival "
                      "scrapes were missed (the collector was late)")
        elif any(edge.failed for edge in edges):
            failed = next(edge for edge in edges if edge.failed)
            reason = f"an arrival scrape failed at {failed.at:.0f}: {failed.failed[0]}"
        if reason:
            values.gaps["arrival_dispersion"] = reason
            return
        assert bin_s is not None
        endpoint = self.arrival_endpoint(endpoints)
        for counter in dialect.arrivals:
            names = dialect.metrics[counter.metric]
            readings: dict[tuple[str, exposition.Labels], list[float | None]] = {}
            for index, edge in enumerate(edges):
                for url, scraped in edge.readings.items():
                    series = exposition.counter_readings(scraped, counter, names, self.selector,
                                                         endpoint)
                    for labels, value in series.items():
                        readings.setdefault((url, labels), [None] * len(edges))[index] = value
            if not readings:
                continue
            counts = [sum(c) for c in zip(*(bin_increases(r) for r in readings.values()),
                                          strict=True)]
            stats = window_stats.arrival_stats(counts, bin_s, counter.signal)
            values.values.update(stats.fields())
            values.gaps.update(stats.gaps)
            return
        values.gaps["arrival_dispersion"] = promql.NO_SERIES[promql.Kind.COUNT]


def _edge(at: float, scrapes: Scrapes) -> _Edge:
    return _Edge(at, {u: s for u, s in scrapes.items() if isinstance(s, Exposition)},
                 [f"{u}: {s}" for u, s in scrapes.items() if isinstance(s, str)])


def _unanswered(failed: Mapping[str, str], endpoints: Mapping[str, Endpoint],
                unresolved: Mapping[Endpoint, str]) -> dict[Endpoint, str]:
    """Per kind of endpoint, why some of them did not answer at the window's end."""
    out: dict[Endpoint, str] = {}
    for url, why in failed.items():
        kind = endpoints[url]
        of = sum(1 for e in endpoints.values() if e is kind)
        failed_of_kind = sum(1 for u in failed if endpoints[u] is kind)
        out.setdefault(kind, f"{failed_of_kind} of {of} {kind} endpoints did not answer "
                             f"({url}: {why})")
    for kind, why in unresolved.items():
        out.setdefault(kind, why)
    return out


# --- the shell -------------------------------------------------------------------------------


def _endpoints(settings: CollectorSettings
               ) -> tuple[dict[str, Endpoint], dict[Endpoint, str]]:
    """Every endpoint of the deployment now (``dns+`` URLs resolved), and per kind what did
    not resolve."""
    endpoints: dict[str, Endpoint] = {}
    problems: dict[Endpoint, str] = {}
    for urls, kind in ((settings.scrape_urls, Endpoint.FRONTEND),
                       (settings.scrape_prefill_urls, Endpoint.PREFILL),
                       (settings.scrape_decode_urls, Endpoint.DECODE)):
        found, unresolved = expand(urls)
        endpoints.update({url: kind for url in found if url not in endpoints})
        if unresolved:
            problems[kind] = f"{kind} URL not resolved: {unresolved[0]}"
    return endpoints, problems


async def _scrape(urls: Sequence[str], timeout_s: float) -> dict[str, Exposition | str]:
    async def one(url: str) -> Exposition | str:
        try:
            return exposition.parse(await asyncio.to_thread(fetch, url, timeout_s))
        except Exception as exc:  # refused, timed out, 5xx, not an exposition: one reason
            return str(exc)[:300] or type(exc).__name__

    results = await asyncio.gather(*(one(u) for u in urls))
    return dict(zip(urls, results, strict=True))


async def run(runtime: Runtime, settings: CollectorSettings) -> None:
    collector = ScrapeCollector(settings)
    interval = settings.interval_s
    step = collector.bin_s or interval
    endpoints, unresolved = await asyncio.to_thread(_endpoints, settings)
    log.info("scraping %s every %s (arrivals every %s) for %s",
             ", ".join(f"{u} ({k})" for u, k in endpoints.items()) or "no endpoint yet",
             promql.duration(interval), promql.duration(step), collector.key)
    failing = False
    while not runtime.stop.is_set():
        tick = next_boundary(time.time(), step)
        try:
            await asyncio.wait_for(runtime.stop.wait(), timeout=max(tick - time.time(), 0.0))
            return
        except TimeoutError:
            pass
        if round(tick / step) % round(interval / step):  # a bin's edge inside the window
            arrival = collector.arrival_endpoint(endpoints)
            urls = [u for u, k in endpoints.items() if k is arrival]
            collector.arrival_scrape(tick, await _scrape(urls, settings.scrape_timeout_s))
            continue
        endpoints, unresolved = await asyncio.to_thread(_endpoints, settings)
        scrapes = await _scrape(list(endpoints), settings.scrape_timeout_s)
        message = collector.window(tick, scrapes, endpoints, unresolved)
        failed = [f"{u}: {why}" for u, why in scrapes.items() if isinstance(why, str)]
        if (failed or unresolved) and not failing:  # once per outage, not every window
            log.warning("scrape failed (%s); the fields it feeds are null until it recovers",
                        "; ".join([*failed, *unresolved.values()]))
        elif failing and not (failed or unresolved):
            log.info("scrape recovered")
        failing = bool(failed or unresolved)
        await runtime.publish(message.model_copy(update={"id": snapshot.window_id(
            SOURCE, message.deployment, message.window_end)}))
        metrics.record_published([message])
