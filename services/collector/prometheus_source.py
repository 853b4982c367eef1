"""Prometheus source: each window, for each deployment, query Prometheus at the window's end.

The queries and the meaning of their answers are in ``promql`` (pure); this module asks them
(prometheus-api-client, through the small ``Reader`` protocol), remembers what it must between
windows (the dialect, the deployments seen, whether Prometheus is failing) and publishes. On
start it reads from the stream the last window it published for each deployment and reads the
windows missed since then first (``ticks.resume``): Prometheus still holds their samples.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from nats.js.api import DeliverPolicy
from prometheus_api_client.exceptions import PrometheusApiClientException
from prometheus_api_client.prometheus_connect import PrometheusConnect
from urllib3.util.retry import Retry

from services.collector import metrics, promql, snapshot, ticks, window
from services.collector.query_config import QueryConfig, StaticDeployment
from services.collector.settings import CollectorSettings
from shared import window_stats
from shared.messages import METRICS_SUBJECT, DeploymentKey, MetricSnapshot
from shared.service import Runtime

log = logging.getLogger("slaplanner.collector")
SOURCE = "prometheus"
METRICS = METRICS_SUBJECT.format(namespace="*", name="*")
Group = tuple[str, ...]


class Unavailable(Exception):
    """Prometheus could not be read (refused, unreachable, too slow, 5xx): the window is stale."""


class Rejected(Exception):
    """Prometheus refused one query (4xx): a configuration problem, not an outage."""


class Reader(Protocol):
    def query(self, text: str, at: float) -> list[promql.Sample]:
        """An instant query evaluated at ``at`` (epoch seconds); raises Unavailable/Rejected."""
        ...

    def query_range(self, text: str, start: float, end: float, step: float
                    ) -> list[promql.Series]:
        """A range query from ``start`` to ``end`` every ``step`` seconds; raises likewise."""
        ...


def _short_reason(exc: BaseException, timeout_s: float) -> str:
    text = str(exc)
    if "timeout" in type(exc).__name__.lower() or "timed out" in text:
        return f"no answer within {timeout_s:g} s"
    for marker in ("Connection refused", "Name or service not known", "No route to host"):
        if marker in text:
            return marker.lower()
    return text[:300]


class HttpReader:
    """The Prometheus HTTP API through prometheus-api-client; no retries inside a window."""

    def __init__(self, settings: CollectorSettings) -> None:
        self.url = settings.prometheus_url
        self.timeout_s = settings.prometheus_timeout_s
        self.token_file = settings.prometheus_bearer_token_file
        self.token_mtime = -1.0
        # retries would stretch a window past its deadline; the next window is the retry
        self.client = PrometheusConnect(
            url=self.url, retry=Retry(total=0),
            timeout=self.timeout_s,  # type: ignore[arg-type]  # requests takes float seconds
        )
        if settings.prometheus_ca_file:
            self.client._session.verify = settings.prometheus_ca_file

    def _refresh_token(self) -> None:
        """Re-read the bearer token when its file changes (Kubernetes rotates them)."""
        if not self.token_file:
            return
        try:
            path = Path(self.token_file)
            mtime = path.stat().st_mtime
            if mtime != self.token_mtime:
                token = path.read_text(encoding="utf-8").strip()
                self.client.headers = {"Authorization": f"Bearer {token}"}
                self.token_mtime = mtime
        except OSError as exc:
            raise Unavailable(f"cannot read {self.token_file}: {exc.strerror}") from None

    def _ask(self, ask: Callable[[], Any]) -> Any:
        self._refresh_token()
        started = time.monotonic()
        try:
            return ask()
        except OSError as exc:  # requests' errors are OSErrors: refused, unreachable, timeout
            metrics.QUERY_ERRORS.labels("unavailable").inc()
            raise Unavailable(_short_reason(exc, self.timeout_s)) from None
        except PrometheusApiClientException as exc:
            match = re.search(r"HTTP Status Code (\d+)", str(exc))
            status = int(match.group(1)) if match else 0
            if 400 <= status < 500 and status not in (408, 429):
                metrics.QUERY_ERRORS.labels("refused").inc()
                raise Rejected(_api_error(str(exc))) from None
            metrics.QUERY_ERRORS.labels("unavailable").inc()
            raise Unavailable(f"HTTP {status}: {_api_error(str(exc))}") from None
        finally:
            metrics.QUERY_SECONDS.observe(time.monotonic() - started)

    def query(self, text: str, at: float) -> list[promql.Sample]:
        params = {"time": f"{at:.3f}", "timeout": promql.duration(self.timeout_s)}
        result = self._ask(lambda: self.client.custom_query(query=text, params=params))
        try:
            return promql.parse_result(result)
        except ValueError as exc:
            raise Rejected(str(exc)) from None

    def query_range(self, text: str, start: float, end: float, step: float
                    ) -> list[promql.Series]:
        # the client rounds start and end to whole seconds; windows need not end on one
        params = {"timeout": promql.duration(self.timeout_s), "start": f"{start:.3f}",
                  "end": f"{end:.3f}"}
        result = self._ask(lambda: self.client.custom_query_range(
            query=text, start_time=datetime.fromtimestamp(start, UTC),
            end_time=datetime.fromtimestamp(end, UTC), step=promql.duration(step),
            params=params))
        try:
            return promql.parse_range(result)
        except ValueError as exc:
            raise Rejected(str(exc)) from None


def _api_error(text: str) -> str:
    match = re.search(r'"error":\s*"((?:[^"\\]|\\.)*)"', text)
    return (match.group(1) if match else text)[:300]


@dataclass
class Target:
    """One set of queries: a static deployment, or every deployment discovered by labels."""

    scope: promql.Scope
    members: dict[Group, DeploymentKey] = field(default_factory=dict)


class Collector:
    """What the Prometheus source remembers between windows; reads through a ``Reader``."""

    def __init__(self, settings: CollectorSettings, config: QueryConfig, reader: Reader) -> None:
        self.settings = settings
        self.overrides = config.overrides
        self.reader = reader
        self.dialect = None if settings.dialect == "auto" else promql.DIALECTS[settings.dialect]
        self.discover = tuple(settings.discover_labels)
        self.static: tuple[StaticDeployment, ...] = config.deployments or (
            () if self.discover else (StaticDeployment(
                DeploymentKey(namespace=settings.namespace, name=settings.deployment),
                settings.selector),))
        self.discovered = Target(self._scope(settings.selector, self.discover))
        self.last_seen: dict[DeploymentKey, float] = {}
        self.checked: set[DeploymentKey] = set()
        self.rechecked: set[DeploymentKey] = set()  # checked once, with problems
        self.printed = False
        self.failing: str | None = None
        self.no_dialect_logged = False
        self.rejections_logged: set[tuple[str, str]] = set()
        self.skipped_logged: set[Group] = set()
        self.pool = ThreadPoolExecutor(settings.prometheus_concurrency,
                                       thread_name_prefix="prometheus")

    def _scope(self, selector: str, by: tuple[str, ...]) -> promql.Scope:
        s = self.settings
        return promql.Scope(promql.caseless(selector), by, s.prefill_selector, s.decode_selector,
                            s.interval_s, promql.Method(s.window_method),
                            s.prefill_fallback_selector, s.decode_fallback_selector)

    def targets(self) -> dict[str, float]:
        return {"ttft_under_target_share": self.settings.ttft_target_s,
                "itl_under_target_share": self.settings.itl_target_s}

    def known(self) -> list[DeploymentKey]:
        return [d.key for d in self.static] + list(self.last_seen)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # --- one window ----------------------------------------------------------------------

    def window(self, end: float) -> list[MetricSnapshot]:
        """Every deployment's snapshot for the window that ends at ``end``."""
        try:
            snapshots = self._read(end)
        except Unavailable as exc:
            self._failed(exc)
            return self.stale(end, f"Prometheus cannot be read: {exc}")
        except Rejected as exc:  # the detection or discovery query: Prometheus answered
            if ("discovery", str(exc)) not in self.rejections_logged:
                self.rejections_logged.add(("discovery", str(exc)))
                log.error("Prometheus refused the dialect detection or discovery query: %s", exc)
            snapshots = [snapshot.observed(key, end, self.settings.interval_s, SOURCE, _nothing(),
                                           {"all": f"Prometheus refused a query: {exc}"})
                         for key in self.known()]
        if self.failing is not None:
            log.info("Prometheus answers again; snapshots are fresh from window %s", _utc(end))
            self.failing = None
        return snapshots

    def _failed(self, exc: Unavailable) -> None:
        if self.failing is None:  # once per outage, not every interval
            log.warning("Prometheus at %s cannot be read (%s); publishing stale snapshots "
                        "until it answers", self.settings.prometheus_url, exc)
        self.failing = str(exc)

    def start(self, now: float) -> None:
        """At start: the dialect, the queries in use, and the check of every deployment."""
        if self.dialect is not None:  # known without asking Prometheus: print it now
            targets = self._targets()
            self._print(self.dialect, targets,
                        [promql.plan(self.dialect, self.overrides, t.scope) for t in targets])
        try:
            self._prepare(now)
        except Unavailable as exc:
            self._failed(exc)
        except Rejected as exc:
            log.error("Prometheus refused the dialect detection or discovery query: %s", exc)

    def stale(self, end: float, reason: str) -> list[MetricSnapshot]:
        return [snapshot.stale(key, end, self.settings.interval_s, SOURCE, reason)
                for key in self.known()]

    def _read(self, end: float) -> list[MetricSnapshot]:
        prepared = self._prepare(end)
        if prepared is None:
            looked_for = ", ".join(sorted(promql.detection_names()))
            reason = (f"no known metric dialect in Prometheus (looked for {looked_for}); set "
                      "--dialect and check the scrape targets")
            return [snapshot.observed(key, end, self.settings.interval_s, SOURCE,
                                      _nothing(), {"all": reason}) for key in self.known()]
        return self._collect(*prepared, end)

    def _prepare(self, end: float) -> tuple[list[Target], list[promql.Plan]] | None:
        """The dialect, the deployments and their queries; checks deployments seen first."""
        dialect = self._dialect(end)
        if dialect is None:
            return None
        if self.discover:
            self._discovery(dialect, end)
        targets = self._targets()
        plans = [promql.plan(dialect, self.overrides, t.scope) for t in targets]
        if not self.printed:
            self._print(dialect, targets, plans)
        for target, plan in zip(targets, plans, strict=True):
            fresh = {g: k for g, k in target.members.items() if k not in self.checked}
            if fresh:
                self._check(target, plan, fresh, end)
        return targets, plans

    def _targets(self) -> list[Target]:
        targets = [Target(self._scope(d.selector, ()), {(): d.key}) for d in self.static]
        return [*targets, self.discovered] if self.discover else targets

    def _dialect(self, end: float) -> promql.Dialect | None:
        if self.dialect is not None:
            return self.dialect
        names = {s.labels.get("__name__", "") for s in
                 self.reader.query(promql.detection_query(), end)}
        self.dialect = promql.detect(names)
        if self.dialect is None:
            if not self.no_dialect_logged:
                log.warning("no known metric dialect in Prometheus yet (looked for %s); "
                            "trying again every window",
                            ", ".join(sorted(promql.detection_names())))
                self.no_dialect_logged = True
        else:
            log.info("dialect %s auto-detected: %s", self.dialect.name, self.dialect.about)
        return self.dialect

    def _discovery(self, dialect: promql.Dialect, end: float) -> None:
        target = self.discovered
        samples = self.reader.query(promql.discovery_query(dialect, self.overrides,
                                                           target.scope), end)
        for group in promql.split(samples, self.discover):
            if "" in group:
                continue  # a series without one of the labels names no deployment
            try:
                key = promql.discovered_key(group, self.discover, self.settings.namespace)
            except ValueError as exc:  # a label value names nothing; the others still count
                reason = str(exc).rsplit(": ", 1)[-1]
                metrics.LABEL_VALUES_SKIPPED.labels(reason).inc()
                if group not in self.skipped_logged:
                    self.skipped_logged.add(group)
                    log.warning("label values skipped, they name no deployment: %s", exc)
                continue
            if group not in target.members:
                log.info("deployment %s appeared (%s)", key,
                         promql.group_selector(target.scope, group))
            target.members[group] = key
            self.last_seen[key] = end
        for group, key in list(target.members.items()):
            if end - self.last_seen[key] > self.settings.forget_after_s:
                log.info("deployment %s not seen since %s; no longer published", key,
                         _utc(self.last_seen[key]))
                del target.members[group]
                del self.last_seen[key]
                self.checked.discard(key)

    def _queries(self, texts: Iterable[str], end: float
                 ) -> dict[str, list[promql.Sample] | Rejected]:
        """Run queries in parallel; a rejected one is returned, an outage aborts them all."""
        futures: dict[Future[list[promql.Sample]], str] = {
            self.pool.submit(self.reader.query, text, end): text for text in set(texts)}
        answers: dict[str, list[promql.Sample] | Rejected] = {}
        try:
            for future in as_completed(futures):
                try:
                    answers[futures[future]] = future.result()
                except Rejected as exc:
                    answers[futures[future]] = exc
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return answers

    def _collect(self, targets: Sequence[Target], plans: Sequence[promql.Plan],
                 end: float) -> list[MetricSnapshot]:
        answers = self._queries((q.promql for p in plans for q in p.queries), end)
        kinds = promql.FIELD_KINDS
        snapshots = []
        for target, plan in zip(targets, plans, strict=True):
            grouped: dict[str, dict[Group, list[promql.Sample]]] = {}
            refused: dict[str, str] = {}
            for query in plan.queries:
                answer = answers[query.promql]
                if isinstance(answer, Rejected):
                    refused[query.field] = f"Prometheus refused the query ({query.origin}): " \
                                           f"{answer}"
                    if (query.field, query.origin) not in self.rejections_logged:
                        self.rejections_logged.add((query.field, query.origin))
                        log.error("Prometheus refused the %s query from %s: %s\n  %s",
                                  query.field, query.origin, answer, query.promql)
                    continue
                grouped[query.field] = promql.split(answer, target.scope.by)
            arrivals = self._arrivals(target, end)
            for group, key in target.members.items():
                values = promql.values_for(grouped, kinds, group, self.targets())
                stats, reason = arrivals.get(group, (None, arrivals.get((), (None, ""))[1]))
                if stats is not None:
                    values.values.update(stats.fields())
                    values.gaps.update(stats.gaps)
                elif reason:
                    values.gaps["arrival_dispersion"] = reason
                snapshots.append(snapshot.observed(key, end, self.settings.interval_s, SOURCE,
                                                   values, {**refused, **plan.unobserved}))
        return snapshots

    def _arrivals(self, target: Target, end: float
                  ) -> dict[Group, tuple[window_stats.ArrivalStats | None, str]]:
        """Each group's arrival statistics, from the truest arrival counter it has: the counter
        read at every bin's edge (a range query), in the finest bins its scrapes allow."""
        assert self.dialect is not None
        names = {**self.dialect.metrics, **self.overrides.metrics}
        window_s, finest = self.settings.interval_s, self.settings.arrival_bin_s
        scope = target.scope
        found: dict[Group, tuple[window_stats.ArrivalStats | None, str]] = {}
        for counter in self.dialect.arrivals:
            metric = names[counter.metric]
            try:
                density = promql.split(self.reader.query(
                    promql.arrival_samples_query(counter, metric, scope), end), scope.by)
            except Rejected as exc:
                return {(): (None, f"Prometheus refused the arrivals query: {exc}")}
            by_bin: dict[float, list[Group]] = {}
            for group, samples in density.items():
                if group in found:
                    continue
                most = int(max(s.value for s in samples))
                bin_s = window_stats.arrival_bin(window_s, finest, most)
                if bin_s is None:
                    found[group] = (None, f"--arrival-bin-s {finest:g} does not divide the "
                                    f"window of {window_s:g} s" if most else
                                    promql.NO_SERIES[promql.Kind.COUNT])
                else:
                    by_bin.setdefault(bin_s, []).append(group)
            for bin_s, groups in by_bin.items():
                bins, start = round(window_s / bin_s), end - window_s
                try:
                    series = self.reader.query_range(
                        promql.arrival_counter_query(counter, metric, scope), start, end, bin_s)
                except Rejected as exc:
                    return {(): (None, f"Prometheus refused the arrivals query: {exc}")}
                counts = promql.counts_by_group(series, scope.by, start, bin_s, bins)
                for group in groups:
                    if group in counts:
                        found[group] = (window_stats.arrival_stats(counts[group], bin_s,
                                                                   counter.signal), "")
        found.setdefault((), (None, promql.NO_SERIES[promql.Kind.COUNT]))
        return found

    # --- what the operator sees at start ----------------------------------------------------

    def _print(self, dialect: promql.Dialect, targets: Sequence[Target],
               plans: Sequence[promql.Plan]) -> None:
        self.printed = True
        s = self.settings
        log.info("Prometheus %s, dialect %s, window %s (%s), read %g s after each window's end",
                 s.prometheus_url, dialect.name, promql.duration(s.interval_s), s.window_method,
                 s.prometheus_query_delay_s)
        for target, plan in zip(targets, plans, strict=True):
            who = (f"deployments discovered by ({', '.join(target.scope.by)})"
                   if target.scope.by else ", ".join(str(k) for k in target.members.values()))
            lines = [f"  {q.field} [{q.origin}]: {q.promql}" for q in plan.queries]
            lines += [f"  {f}: none ({why})" for f, why in plan.unobserved.items()]
            log.info("queries for %s:\n%s", who, "\n".join(lines))

    def _check(self, target: Target, plan: promql.Plan, fresh: dict[Group, DeploymentKey],
               end: float) -> None:
        """Say, for deployments seen for the first time, which queries will return nothing."""
        scope = target.scope
        texts: list[str] = ["count(up == 0)"]
        for query in plan.queries:
            if not query.reads:
                texts.append(query.promql)
            for read in query.reads:
                texts += [promql.presence_query(read, scope), promql.anywhere_query(read)]
                if read.role is not promql.Role.ALL:
                    texts.append(promql.presence_query(read, scope, promql.Role.ALL))
                    texts += [promql.presence_query(read, scope, role_matcher=m)
                              for m in scope.role_matchers(read.role)]
        answers = self._queries(texts, end)

        def groups(text: str) -> dict[Group, list[promql.Sample]]:
            answer = answers[text]
            return {} if isinstance(answer, Rejected) else promql.split(answer, scope.by)

        down_answer = answers["count(up == 0)"]
        down = 0 if isinstance(down_answer, Rejected) or not down_answer else int(
            down_answer[0].value)
        for group, key in fresh.items():
            problems = []
            matched: list[str] = []
            for query in plan.queries:
                if not query.reads and group not in groups(query.promql):
                    problems.append(f"{query.field}: the query from {query.origin} returns no "
                                    f"series: {query.promql}")
                present = [r for r in query.reads
                           if group in groups(promql.presence_query(r, scope))]
                if query.kind is promql.Kind.WORKERS and present:
                    by = _matched_by(present[0], scope, group, groups)
                    matched.append(f"{query.field} by {by}")
                if present or not query.reads:
                    continue
                read = query.reads[0]
                without_role = group in groups(
                    promql.presence_query(read, scope, promql.Role.ALL))
                anywhere = bool(groups(promql.anywhere_query(read)))
                problems.append(promql.diagnose(query, read, scope, group, without_role,
                                                anywhere, down))
            if matched:
                log.info("%s: workers counted: %s", key, "; ".join(matched))
            if problems and key not in self.rechecked:
                # Prometheus may have just started (or not scraped a new pod yet): look again
                # at the next window before warning
                self.rechecked.add(key)
                log.info("%s: %d of %d queries find no series yet; checking again at the "
                         "next window before warning", key, len(problems), len(plan.queries))
                continue
            if problems:
                log.warning("%s: %d of %d queries have no series to read, so their fields will "
                            "be null:\n  %s", key, len(problems), len(plan.queries),
                            "\n  ".join(problems))
            else:
                log.info("%s: every query has series to read", key)
            self.checked.add(key)


def _matched_by(read: promql.Read, scope: promql.Scope, group: Group,
                groups: Callable[[str], dict[Group, list[promql.Sample]]]) -> str:
    """Which of a role's matchers (or the router's registry) a deployment's workers carry."""
    if read.role is not promql.Role.ALL:
        for matcher in scope.role_matchers(read.role):
            if group in groups(promql.presence_query(read, scope, role_matcher=matcher)):
                return f"{promql.metric_list(read)}{{{matcher}}}"
    return promql.metric_list(read) + (f"{{{read.extra}}}" if read.extra else "")


def _nothing() -> window.WindowValues:
    return window.WindowValues(values={}, gaps={})


def _utc(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds")


async def last_published(runtime: Runtime, collector: Collector) -> dict[DeploymentKey, float]:
    """The end of the last window of each deployment this collector publishes that the stream
    holds (same source, same window length); empty if the stream cannot be read."""
    interval = collector.settings.interval_s
    known = None if collector.discover else set(collector.known())
    ends: dict[DeploymentKey, float] = {}
    try:
        async for msg in runtime.read_stream(METRICS, DeliverPolicy.LAST_PER_SUBJECT):
            last = runtime.stored(MetricSnapshot, msg.subject, msg.data)
            if (last is not None and last.source == SOURCE
                    and math.isclose(last.window_s, interval)
                    and (known is None or last.deployment in known)):
                ends[last.deployment] = last.window_end
    except Exception as exc:  # NATS errors and timeouts alike: start afresh rather than not at all
        log.warning("cannot read the last published windows from the stream (%s); starting "
                    "with the first window not yet due", exc)
    return ends


async def run(runtime: Runtime, settings: CollectorSettings, config: QueryConfig) -> None:
    collector = Collector(settings, config, HttpReader(settings))
    interval, delay = settings.interval_s, settings.prometheus_query_delay_s
    log.info("reading Prometheus at %s every %s for %s", settings.prometheus_url,
             promql.duration(interval),
             ", ".join(str(k) for k in collector.known()) or
             f"deployments discovered by ({', '.join(collector.discover)})")
    published = await last_published(runtime, collector)

    async def publish(messages: Iterable[MetricSnapshot]) -> None:
        # A window a deployment already has in the stream is not published again: after a
        # restart, the windows read again for the deployments behind are new only to them.
        for message in messages:
            if message.window_end > published.get(message.deployment, -math.inf):
                await runtime.publish(message.model_copy(update={"id": snapshot.window_id(
                    SOURCE, message.deployment, message.window_end)}))
                published[message.deployment] = message.window_end
                metrics.record_published([message])

    await asyncio.to_thread(collector.start, time.time())
    start = ticks.resume(min(published.values(), default=None), time.time(), interval, delay,
                         settings.max_backlog_windows)
    metrics.WINDOWS_BACKFILLED.inc(start.missed)
    metrics.WINDOWS_GIVEN_UP.inc(start.given_up)
    if start.given_up:
        log.warning("%d windows came due since the last one published (%s); the oldest %d are "
                    "beyond --max-backlog-windows and not published", start.missed +
                    start.given_up, _utc(min(published.values())), start.given_up)
    if start.missed:
        log.info("back-filling %d windows missed since the last one published, from %s",
                 start.missed, _utc(ticks.end_of(start.index, interval)))
    index = start.index
    try:
        while not runtime.stop.is_set():
            wait = ticks.due_at(index, interval, delay) - time.time()
            if wait > 0:
                try:
                    await asyncio.wait_for(runtime.stop.wait(), timeout=wait)
                    return
                except TimeoutError:
                    pass
            step = ticks.catch_up(index, time.time(), interval, delay,
                                  settings.max_backlog_windows)
            if step.skipped:
                metrics.WINDOWS_GIVEN_UP.inc(len(step.skipped))
                log.warning("fell %d windows behind; publishing them stale", len(step.skipped))
                for skipped in step.skipped:
                    await publish(collector.stale(ticks.end_of(skipped, interval),
                                                  "the collector fell behind; window not read"))
            end = ticks.end_of(step.index, interval)
            await publish(await asyncio.to_thread(collector.window, end))
            index = step.index + 1
    finally:
        collector.close()
