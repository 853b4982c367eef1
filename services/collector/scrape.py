"""Direct-scrape source: read frontend /metrics endpoints each interval, publish a snapshot."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request

from services.collector import snapshot as snapshot_mod
from services.collector import window
from services.collector.settings import CollectorSettings
from services.collector.ticks import next_boundary
from shared.messages import DeploymentKey, MetricSnapshot
from shared.service import Runtime

__all__ = ["fetch", "next_boundary", "run", "snapshot"]

log = logging.getLogger("slaplanner.collector")


def fetch(urls: list[str], timeout_s: float) -> str:
    texts = []
    for url in urls:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            texts.append(response.read().decode("utf-8"))
    return "\n".join(texts)


def snapshot(key: DeploymentKey, window_end: float, window_s: float,
             values: window.WindowValues | None, stale_reason: str | None) -> MetricSnapshot:
    if values is None:
        return snapshot_mod.stale(key, window_end, window_s, "scrape", stale_reason or "no data")
    return snapshot_mod.observed(
        key, window_end, window_s, "scrape", values,
        extra_gaps={"prefill_workers": "not exposed by the frontend /metrics",
                    "decode_workers": "not exposed by the frontend /metrics"},
    )


async def run(runtime: Runtime, settings: CollectorSettings) -> None:
    key = DeploymentKey(namespace=settings.namespace, name=settings.deployment)
    labels = settings.label_filter()
    previous: window.Scrape | None = None
    failing = False
    log.info("scraping %s every %.0f s for %s", settings.scrape_urls, settings.interval_s, key)
    while not runtime.stop.is_set():
        tick = next_boundary(time.time(), settings.interval_s)
        try:
            await asyncio.wait_for(runtime.stop.wait(), timeout=max(tick - time.time(), 0.0))
            return
        except TimeoutError:
            pass
        try:
            text = await asyncio.to_thread(fetch, settings.scrape_urls, settings.scrape_timeout_s)
            current = window.parse_exposition(text, labels)
        except Exception as exc:
            if not failing:  # log once per outage, not every interval
                log.warning("scrape failed (%s); publishing stale snapshots until it recovers",
                            exc)
            failing = True
            previous = None
            await runtime.publish(snapshot(key, tick, settings.interval_s, None,
                                           f"scrape failed: {exc}"))
            continue
        if failing:
            log.info("scrape recovered")
            failing = False
        if previous is None:
            missing = window.missing_series(current)
            if missing:
                log.warning("these metrics are missing from %s: %s (check the metric names, "
                            "the label filter %s and that the frontend is up)",
                            settings.scrape_urls, ", ".join(missing), labels)
            # The first scrape after start or an outage only sets the baseline: an increase
            # over an unknown span would be a number we did not see.
            await runtime.publish(snapshot(key, tick, settings.interval_s, None,
                                           "first scrape: baseline for the next window"))
        else:
            await runtime.publish(snapshot(key, tick, settings.interval_s,
                                           window.window_values(previous, current), None))
        previous = current
