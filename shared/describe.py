"""What ``slaplanner watch`` and ``slaplanner status`` print, from bus messages; no I/O.

``Watch`` takes one deployment's messages in stream order and gives one line per decision: the
load of the window, the forecast, the counts (running -> desired), the rule that bound each role,
the latency p99s, the shares of the window's requests within the targets (the observed
attainment) and what the actuator did. ``describe`` gives ``kubectl describe hpa``'s view of one
deployment from its latest snapshot, forecast, target and ScaleEvent.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from shared import conditions
from shared.messages import (
    DeploymentKey,
    Envelope,
    LoadForecast,
    MetricSnapshot,
    Outcome,
    ReplicaTarget,
    ScaleEvent,
    ShareMethod,
)

# Windows of snapshots and forecasts kept per deployment to match a target with its inputs.
KEPT_WINDOWS = 8
# Outcomes a watcher must see even for a target already shown.
NOTABLE = (Outcome.REFUSED, Outcome.FAILED)


@dataclass
class Latest:
    """The newest message of each kind of one deployment."""

    snapshot: MetricSnapshot | None = None
    forecast: LoadForecast | None = None
    target: ReplicaTarget | None = None
    event: ScaleEvent | None = None

    def add(self, message: Envelope) -> None:
        if isinstance(message, MetricSnapshot):
            self.snapshot = _newer(self.snapshot, message)
        elif isinstance(message, LoadForecast):
            self.forecast = _newer(self.forecast, message)
        elif isinstance(message, ReplicaTarget):
            self.target = _newer(self.target, message)
        elif isinstance(message, ScaleEvent):
            self.event = _newer(self.event, message)


M = TypeVar("M", bound=Envelope)
K = TypeVar("K")
V = TypeVar("V")


def _newer(current: M | None, candidate: M) -> M:
    # Stream order is arrival order; a window earlier than the one held is a late redelivery.
    return candidate if current is None or candidate.window_end >= current.window_end else current


# --- watch -------------------------------------------------------------------------------------

@dataclass
class _Deployment:
    snapshots: OrderedDict[float, MetricSnapshot] = field(default_factory=OrderedDict)
    forecasts: OrderedDict[float, LoadForecast] = field(default_factory=OrderedDict)
    # targets not shown yet, in stream order, with their ScaleEvent once it came
    pending: OrderedDict[str, tuple[ReplicaTarget, ScaleEvent | None]] = field(
        default_factory=OrderedDict)
    shown: OrderedDict[str, ReplicaTarget] = field(default_factory=OrderedDict)


def _keep(entries: OrderedDict[K, V], key: K, value: V) -> None:
    entries[key] = value
    while len(entries) > KEPT_WINDOWS:
        entries.popitem(last=False)


class Watch:
    """Messages in (any deployments, stream order), lines out, one per target in target order.

    A target's line waits for its ScaleEvent, so that it can say what the actuator did (and the
    lines of later targets wait for it); it is shown without one when the deployment's next
    window starts or ``flush`` is called (the shell calls it when the bus has been quiet for a
    moment)."""

    def __init__(self) -> None:
        self._deployments: dict[DeploymentKey, _Deployment] = {}

    def add(self, message: Envelope) -> list[str]:
        state = self._deployments.setdefault(message.deployment, _Deployment())
        if isinstance(message, MetricSnapshot):
            lines = self._release(state, everything=True)
            _keep(state.snapshots, message.window_end, message)
            return lines
        if isinstance(message, LoadForecast):
            _keep(state.forecasts, message.window_end, message)
        elif isinstance(message, ReplicaTarget):
            state.pending[message.id] = (message, None)
        elif isinstance(message, ScaleEvent):
            if message.target_id in state.pending:
                state.pending[message.target_id] = (state.pending[message.target_id][0], message)
                return self._release(state, everything=False)
            if message.target_id in state.shown and message.outcome in NOTABLE:
                return [event_line(message)]
        return []

    def flush(self) -> list[str]:
        return [line for state in self._deployments.values()
                for line in self._release(state, everything=True)]

    def _release(self, state: _Deployment, everything: bool) -> list[str]:
        """The lines of the pending targets, in order: those whose event came, or all."""
        lines = []
        while state.pending:
            target, event = next(iter(state.pending.values()))
            if event is None and not everything:
                break
            state.pending.popitem(last=False)
            _keep(state.shown, target.id, target)
            lines.append(interval_line(target, state.snapshots.get(target.window_end),
                                       state.forecasts.get(target.window_end), event))
        return lines


def interval_line(target: ReplicaTarget, snapshot: MetricSnapshot | None,
                  forecast: LoadForecast | None, event: ScaleEvent | None) -> str:
    """One decision on one line: when, load, forecast, counts, binding rules, p99s, outcome."""
    parts = [f"{clock(target.window_end)} {target.deployment}"]
    parts.append(f"load {_rate(snapshot.num_requests, snapshot.window_s)}"
                 if snapshot is not None else "load -")
    if target.forecast_id is None:
        parts.append("fast path")
    elif forecast is not None and forecast.steps:
        step = forecast.steps[0]
        parts.append(f"forecast {_rate(step.num_requests, forecast.window_s)} "
                     f"(upper {_rate(step.num_requests_upper, forecast.window_s)})")
    else:
        parts.append("forecast -")
    running = _running(snapshot, event)
    parts.append(f"P {_count(running[0])}->{target.prefill_replicas} "
                 f"D {_count(running[1])}->{target.decode_replicas}")
    rules = conditions.bound_by(target)
    parts.append(f"bound by P {rules['prefill'] or '-'}, D {rules['decode'] or '-'}")
    if snapshot is not None:
        parts.append(f"TTFT p99 {latency(snapshot.ttft_p99_s)}, "
                     f"ITL p99 {latency(snapshot.itl_p99_s)}")
        within = _within_text(snapshot, *_targets(target))
        if within:
            parts.append(within)
    parts.append(_outcome(event))
    return "  ".join(parts)


def _within_text(snapshot: MetricSnapshot, ttft_target: float | None,
                 itl_target: float | None) -> str | None:
    """``within target TTFT 97.61 %, ITL 100.00 %``: the window's observed attainment."""
    ttft = observed_within(snapshot, "ttft", ttft_target)
    itl = observed_within(snapshot, "itl", itl_target)
    if ttft is None and itl is None:
        return None
    return (f"within target TTFT {ttft.bracket.text() if ttft else '-'}, "
            f"ITL {itl.bracket.text() if itl else '-'}")


def event_line(event: ScaleEvent) -> str:
    """A ScaleEvent for a target shown earlier, when the outcome needs attention."""
    return f"{clock(event.window_end)} {event.deployment}  actuator: {_outcome(event)}"


def _running(snapshot: MetricSnapshot | None,
             event: ScaleEvent | None) -> tuple[int | None, int | None]:
    if snapshot is not None and (snapshot.prefill_workers is not None
                                 or snapshot.decode_workers is not None):
        return snapshot.prefill_workers, snapshot.decode_workers
    if event is not None:
        return event.prefill.from_, event.decode.from_
    return None, None


def _outcome(event: ScaleEvent | None) -> str:
    if event is None:
        return "actuator: -"
    text = str(event.outcome)
    if event.outcome in NOTABLE and event.reason:
        text += f" ({event.reason})"
    return text


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def _rate(count: float | None, window_s: float) -> str:
    return "-" if count is None else f"{count / window_s:.1f}/s"


def latency(seconds: float | None) -> str:
    """``1.48 s`` or ``12.3 ms``; ``-`` where not observed."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.3g} ms"


def clock(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%H:%M:%SZ")


def timestamp(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# --- status ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bracket:
    """What a window tells of the share of its requests within a target: a measured share
    (``low == high``), or bounds."""

    low: float
    high: float
    approximate: bool = False  # interpolated inside a histogram bucket

    def text(self) -> str:
        if self.high - self.low < 5e-5:
            return ("about " if self.approximate else "") + conditions.percent(self.low)
        low, high = _bound(self.low, up=False), _bound(self.high, up=True)
        if self.high >= 1.0:
            return f"at least {low}"
        if self.low <= 0.0:
            return f"under {high}"
        return f"{low} to {high}"


def _bound(share: float, up: bool) -> str:
    """A bound as a percent, rounded away from the inside: whole where it is whole (the 90 %
    and 99 % that p90 and p99 give), to the hundredth otherwise."""
    hundredths = share * 10_000
    whole = round(hundredths)
    if abs(hundredths - whole) < 1e-6:
        value = whole / 100
        return f"{value:.0f} %" if whole % 100 == 0 else f"{value:.2f} %"
    value = (math.ceil(hundredths) if up else math.floor(hundredths)) / 100
    return f"{value:.2f} %"


def within_target(p90: float | None, p99: float | None, target: float | None) -> Bracket | None:
    """The share within ``target`` as far as p90 and p99 tell: p99 <= target means at least 99 %
    of the window's requests were within it, p90 > target fewer than 90 %."""
    if target is None:
        return None
    if p99 is not None and p99 <= target:
        return Bracket(0.99, 1.0)
    if p90 is not None and p90 <= target:
        return Bracket(0.90, 0.99 if p99 is not None else 1.0)
    if p90 is not None:
        return Bracket(0.0, 0.90)
    if p99 is not None:
        return Bracket(0.0, 0.99)
    return None


# How the collector measured a share, as status says it.
SHARE_SOURCES: dict[ShareMethod | None, str] = {
    ShareMethod.PER_REQUEST: "per request",
    ShareMethod.BUCKET_EDGE: "histogram bucket at the target",
    ShareMethod.INTERPOLATED: "interpolated in a histogram bucket",
    ShareMethod.BEYOND_BUCKETS: "histogram, target beyond its buckets",
    None: "measured share",
}
FROM_PERCENTILES = "from p90, p99"


@dataclass(frozen=True)
class Observed:
    """The share of a window's requests within one latency target, and where it comes from."""

    bracket: Bracket
    source: str


def observed_within(snapshot: MetricSnapshot | None, latency: str,
                    target: float | None) -> Observed | None:
    """The share within the ``latency`` (``ttft``, ``itl``) target: the collector's measured
    share where the snapshot has one for this target, else what its p90 and p99 tell."""
    if snapshot is None:
        return None
    measured = conditions.observed_share(snapshot, latency, target)
    if measured is not None:
        high = 1.0 if measured.lower_bound else measured.share
        approximate = measured.method is ShareMethod.INTERPOLATED
        return Observed(Bracket(measured.share, high, approximate), SHARE_SOURCES[measured.method])
    bracket = within_target(getattr(snapshot, f"{latency}_p90_s"),
                            getattr(snapshot, f"{latency}_p99_s"), target)
    return None if bracket is None else Observed(bracket, FROM_PERCENTILES)


def both_within(ttft: Bracket, itl: Bracket) -> Bracket:
    """Requests within both targets: at least the shares' overlap, at most the smaller."""
    return Bracket(max(0.0, ttft.low + itl.low - 1.0), min(ttft.high, itl.high),
                   ttft.approximate or itl.approximate)


def _targets(target: ReplicaTarget | None) -> tuple[float | None, float | None]:
    config = target.explanation.get("config") if target is not None else None
    if not isinstance(config, dict):
        return None, None

    def number(key: str) -> float | None:
        value = config.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else None

    return number("ttft_target_s"), number("itl_target_s")


def describe(key: DeploymentKey, latest: Latest, now: float) -> str:
    """``kubectl describe hpa`` for one deployment."""
    snapshot, forecast = latest.snapshot, latest.forecast
    target, event = latest.target, latest.event
    ttft_target, itl_target = _targets(target)
    rows: list[tuple[str, str]] = [("Name", str(key))]
    if target is not None:
        kind = "planning" if target.forecast_id is not None else "fast path"
        rows.append(("Policy", target.policy))
        profile = target.explanation.get("profile")
        if isinstance(profile, str):
            # The bundled profile describes one model on one GPU: worth seeing at a glance.
            rows.append(("Profile", profile))
        rows.append(("Last decision", f"{timestamp(target.window_end)} ({kind}, window "
                                      f"{target.window_s:g} s)"))
    else:
        rows.append(("Last decision", "- (no ReplicaTarget on the bus)"))
    rows.append(("Replicas", "running / desired / applied"))
    running = _running(snapshot, None)
    for index, role in enumerate(conditions.ROLES):
        desired = None if target is None else conditions.replicas_of(target, role)
        change = None if event is None else getattr(event, role)
        applied = "-" if change is None else f"{change.to} ({event.outcome if event else '-'})"
        rule = conditions.bound_by(target)[role] if target is not None else None
        rows.append((f"  {role}", f"{_count(running[index])} / {_count(desired)} / {applied}"
                                  + (f"  bound by {rule}" if rule else "")))
    rows.append(("Load", _load_text(snapshot, forecast)))
    rows.append(("Latency p99", f"TTFT {latency(snapshot.ttft_p99_s if snapshot else None)} "
                                f"(target {latency(ttft_target)}), ITL "
                                f"{latency(snapshot.itl_p99_s if snapshot else None)} "
                                f"(target {latency(itl_target)})"))
    rows.append(("Predicted attainment", _predicted_text(target)))
    rows.append(("Observed attainment", _observed_text(snapshot, ttft_target, itl_target)))
    if event is not None:
        rows.append(("Last scale event", f"{timestamp(event.window_end)} {event.outcome} by "
                                         f"{event.backend}" + (f": {event.reason}"
                                                               if event.reason else "")))
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{name + ':':<{width}}{value}" for name, value in rows]
    lines.append("Conditions:")
    found = conditions.conditions(target, event, snapshot, now)
    columns = [("Type", [str(c.type) for c in found]), ("Status", [str(c.status) for c in found]),
               ("Reason", [c.reason for c in found])]
    widths = [max(len(head), *(len(v) for v in values)) + 2 for head, values in columns]
    header = "".join(f"{head:<{w}}" for (head, _), w in zip(columns, widths, strict=True))
    lines.append("  " + header + "Message")
    lines.append("  " + "".join(f"{'-' * len(head):<{w}}" for (head, _), w
                                in zip(columns, widths, strict=True)) + "-------")
    for c in found:
        cells = (str(c.type), str(c.status), c.reason)
        lines.append("  " + "".join(f"{v:<{w}}" for v, w in zip(cells, widths, strict=True))
                     + c.message)
    return "\n".join(lines)


def _load_text(snapshot: MetricSnapshot | None, forecast: LoadForecast | None) -> str:
    text = "-"
    if snapshot is not None and snapshot.num_requests is not None:
        text = (f"{_rate(snapshot.num_requests, snapshot.window_s)} observed "
                f"({snapshot.num_requests:.0f} requests in {snapshot.window_s:g} s, window "
                f"{clock(snapshot.window_end)})")
    if forecast is not None and forecast.steps:
        step = forecast.steps[0]
        text += (f"; forecast {_rate(step.num_requests, forecast.window_s)} (upper "
                 f"{_rate(step.num_requests_upper, forecast.window_s)}, model {forecast.model})")
    return text


def _predicted_text(target: ReplicaTarget | None) -> str:
    if target is None:
        return "-"
    share = conditions.predicted_attainment(target)
    if share is not None:
        return conditions.percent(share)
    if target.explanation.get("held"):
        return "- (held: nothing was sized)"
    return "- (not predicted: the GPU budget does not bind, both roles are sized for the targets)"


def _observed_text(snapshot: MetricSnapshot | None, ttft_target: float | None,
                   itl_target: float | None) -> str:
    if snapshot is None:
        return "- (no snapshot)"
    ttft = observed_within(snapshot, "ttft", ttft_target)
    itl = observed_within(snapshot, "itl", itl_target)
    if ttft is None and itl is None:
        return "- (the last snapshot has no share within a target and no TTFT or ITL percentiles)"
    parts = [f"TTFT {ttft.bracket.text() if ttft else '-'}",
             f"ITL {itl.bracket.text() if itl else '-'}"]
    if ttft is not None and itl is not None:
        parts.append(f"both {both_within(ttft.bracket, itl.bracket).text()}")
    sources = {found.source for found in (ttft, itl) if found is not None}
    how = (sources.pop() if len(sources) == 1 else
           f"TTFT {ttft.source if ttft else '-'}, ITL {itl.source if itl else '-'}")
    return ", ".join(parts) + f" of the requests of {clock(snapshot.window_end)} ({how})"
