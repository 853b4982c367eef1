"""Turning window values into the MetricSnapshot on the bus (pure), the same for every source."""

from __future__ import annotations

from collections.abc import Mapping

from services.collector.window import WindowValues
from shared.messages import DeploymentKey, MetricSnapshot, derived_id

# MetricSnapshot allows at most 64 gaps of at most 512 characters each.
MAX_REASON_CHARS = 512


def _reason(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def window_id(source: str, key: DeploymentKey, window_end: float) -> str:
    """One id per source, deployment and window of real time, so that the stream drops a window
    published twice (a new process started before the old one is gone, two collectors)."""
    return derived_id(f"snapshot:{source}", f"{key}@{window_end:.3f}")


def stale(key: DeploymentKey, window_end: float, window_s: float, source: str,
          reason: str) -> MetricSnapshot:
    """The source could not be read for this window: every value null, ``stale`` set."""
    return MetricSnapshot(
        deployment=key, window_end=window_end, window_s=window_s, source=source, stale=True,
        gaps={"all": _reason(reason)},
    )


def observed(key: DeploymentKey, window_end: float, window_s: float, source: str,
             values: WindowValues, extra_gaps: Mapping[str, str] | None = None) -> MetricSnapshot:
    """What was read; every null field keeps its reason in ``gaps``."""
    gaps = {field: _reason(reason) for field, reason in values.gaps.items()}
    for field, reason in (extra_gaps or {}).items():
        gaps.setdefault(field, _reason(reason))
    return MetricSnapshot(
        deployment=key, window_end=window_end, window_s=window_s, source=source,
        gaps=gaps, **values.values,
    )
