"""Requests in flight per worker pod, read from the pod's own Prometheus ``/metrics``.

Used before a Deployment is scaled down: the least busy pods get the lowest
``controller.kubernetes.io/pod-deletion-cost`` so that the ReplicaSet removes them first.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Sequence
from typing import Any, Protocol

from prometheus_client.parser import text_string_to_metric_families

PORT_ANNOTATION = "prometheus.io/port"


class InflightProbe(Protocol):
    async def inflight(self, pod: dict[str, Any], port: int | None, path: str) -> float | None:
        """Requests in flight on ``pod`` (running plus waiting), or None if it cannot be read."""
        ...


def metrics_url(pod: dict[str, Any], port: int | None, default_port: int, path: str) -> str | None:
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    annotated = ((pod.get("metadata") or {}).get("annotations") or {}).get(PORT_ANNOTATION)
    if port is None and annotated and str(annotated).isdigit():
        port = int(annotated)
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port or default_port}{path}"


def sum_metrics(text: str, names: Sequence[str]) -> float | None:
    """The sum over all series of the named metrics; None if none of them is exposed."""
    wanted = set(names)
    total, seen = 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                total += float(sample.value)
                seen = True
    return total if seen else None


class HttpInflightProbe:
    def __init__(self, metric_names: Sequence[str], default_port: int, timeout_s: float) -> None:
        self.metric_names = list(metric_names)
        self.default_port = default_port
        self.timeout_s = timeout_s

    def _read(self, url: str) -> float | None:
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                text = response.read(4 << 20).decode("utf-8", "replace")
        except (OSError, ValueError):
            return None
        try:
            return sum_metrics(text, self.metric_names)
        except ValueError:
            return None

    async def inflight(self, pod: dict[str, Any], port: int | None, path: str) -> float | None:
        url = metrics_url(pod, port, self.default_port, path)
        if url is None:
            return None
        return await asyncio.to_thread(self._read, url)
