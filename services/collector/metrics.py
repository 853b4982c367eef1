"""The collector's own Prometheus metrics, served on its ``/metrics`` (docs/metrics.md).

Deployments are two labels, ``namespace`` and ``deployment``, as everywhere in slaplanner's
metrics. The pure parts of the collector return numbers; the shells record them here.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from shared.messages import MetricSnapshot

PREFIX = "slaplanner_collector_"

WINDOWS_PUBLISHED = Counter(
    PREFIX + "windows_published",
    "Snapshots published, per deployment; freshness is fresh (read) or stale (source unreadable)",
    ["namespace", "deployment", "source", "freshness"],
)
FIELDS_MISSING = Gauge(
    PREFIX + "fields_missing",
    "Snapshot fields that were null in the deployment's last window because their series were "
    "missing (not because the window was idle)",
    ["namespace", "deployment"],
)
QUERY_ERRORS = Counter(
    PREFIX + "query_errors",
    "Queries that failed: refused (Prometheus answered 4xx: a query or configuration problem) or "
    "unavailable (refused connection, timeout, 5xx)",
    ["kind"],
)
QUERY_SECONDS = Histogram(
    PREFIX + "query_seconds",
    "Duration of one Prometheus query, seconds",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
WINDOWS_BACKFILLED = Counter(
    PREFIX + "windows_backfilled",
    "Windows read after a restart that came due while the collector was down",
)
WINDOWS_GIVEN_UP = Counter(
    PREFIX + "windows_given_up",
    "Windows never read: missed beyond --max-backlog-windows (after a restart, or fallen behind)",
)
LABEL_VALUES_SKIPPED = Counter(
    PREFIX + "label_values_skipped",
    "Discovery label values that name no deployment (empty, control characters, too long), "
    "skipped",
    ["reason"],
)

# A gap that says the series was not there, as opposed to an idle window or an outage.
_MISSING_PREFIXES = ("no data", "series ", "histogram ", "gauge ")


def record_published(snapshots: Iterable[MetricSnapshot]) -> None:
    for snapshot in snapshots:
        key = snapshot.deployment
        WINDOWS_PUBLISHED.labels(key.namespace, key.name, snapshot.source,
                                 "stale" if snapshot.stale else "fresh").inc()
        missing = sum(1 for reason in snapshot.gaps.values()
                      if reason.startswith(_MISSING_PREFIXES))
        FIELDS_MISSING.labels(key.namespace, key.name).set(missing)
