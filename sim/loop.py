"""The closed planning loop in one process, in virtual time.

Every interval the simulated cluster reports the ``MetricSnapshot`` a collector would have
published for that window; a planner turns it into replica counts, which the cluster applies (new
workers serve after the startup delay). Planners:

- ``ServicePlanner``: the real forecaster, decider and actuator cores, through their public
  classes and settings (the decider's knobs as typed by the knob model, the others from the
  ``SLAPLANNER_*`` variables the services read), with every message passed through its JSON
  form as on the bus. This is the code the services run,
  so ``slaplanner replay`` (the services over NATS) must decide exactly the same;
- ``StaticPlanner``: fixed counts (the trace's peak);
- ``ReactivePlanner``: a plain Kubernetes HPA on queue length, prefill busy time and KV usage.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from services.actuator import wiring
from services.actuator.settings import ActuatorSettings
from services.decider import knobs as knob_model
from services.decider.core import Decider
from services.decider.knobs import DeploymentKnobs
from services.decider.settings import DeciderSettings
from services.forecaster.core import Forecaster
from services.forecaster.settings import ForecasterSettings
from shared import settings as settings_mod
from shared import window_stats
from shared.messages import (
    DeploymentKey,
    LoadForecast,
    MetricSnapshot,
    Outcome,
    ReplicaTarget,
    ScaleEvent,
)
from shared.perf_model import Profile
from shared.traces import Trace
from sim import metrics
from sim.cluster import Cluster, ClusterConfig, SimResult, WindowStats

DEPLOYMENT = DeploymentKey(namespace="sim", name="trace")
EPOCH_S = 1_700_000_000.0  # virtual time 0 is placed at an arbitrary real date
# Outcomes after which the cluster has (or, in a dry run, would have) the event's counts.
APPLIED_OUTCOMES = frozenset({Outcome.APPLIED, Outcome.DRY_RUN, Outcome.UNCHANGED})
BASELINES = ("static", "reactive")


DEFAULT_PREDICTOR = str(ForecasterSettings.model_fields["predictor"].default)


@dataclass(frozen=True)
class PlanningSetup:
    """How the services are configured for a run: the decider's knobs (typed, from the knob
    model), the forecaster's predictor, and the planner (a decider policy, the knobs' own by
    default, or a simulator baseline)."""

    knobs: DeploymentKnobs = field(default_factory=DeploymentKnobs)
    predictor: str = DEFAULT_PREDICTOR
    planner: str | None = None  # None: knobs.policy
    forecaster_env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        predictor: str = DEFAULT_PREDICTOR,
        forecaster_env: Mapping[str, str] | None = None,
        **knobs: Any,
    ) -> PlanningSetup:
        """A setup from knob names (``PlanningSetup.build(policy="dynamo", ttft_target_s=0.3)``);
        raises ``ValueError`` on an unknown knob, ``ValidationError`` on a bad value."""
        return cls(knob_model.from_names(knobs), predictor, None, dict(forecaster_env or {}))

    def with_knobs(self, **updates: Any) -> PlanningSetup:
        return replace(self, knobs=knob_model.from_names(updates, base=self.knobs))

    @property
    def policy(self) -> str:
        return self.planner or self.knobs.policy

    @property
    def interval_s(self) -> float:
        return self.knobs.adjustment_interval_s

    @property
    def ttft_target_s(self) -> float:
        return self.knobs.ttft_target_s

    @property
    def itl_target_s(self) -> float:
        return self.knobs.itl_target_s

    def service_env(self) -> dict[str, dict[str, str]]:
        """The ``SLAPLANNER_*`` variables of each service (the replay starts them with these)."""
        knobs = self.knobs
        forecaster = {"SLAPLANNER_PREDICTOR": self.predictor, **self.forecaster_env}
        most = max(knobs.max_total_gpus, 1)
        actuator = {
            # The virtual backend is the actuator's own for orchestrators outside Kubernetes, as
            # the simulator is one: its ScaleEvents say "applied" (so that a policy learns from
            # them); readiness shows in the snapshots' worker counts.
            "SLAPLANNER_BACKEND": "virtual",
            "SLAPLANNER_LEADER_ELECTION": "off",
            "SLAPLANNER_MAX_TOTAL_GPUS": str(knobs.max_total_gpus),
            "SLAPLANNER_PREFILL_ENGINE_NUM_GPU": str(knobs.prefill_engine_num_gpu),
            "SLAPLANNER_DECODE_ENGINE_NUM_GPU": str(knobs.decode_engine_num_gpu),
            "SLAPLANNER_MIN_PREFILL_REPLICAS": str(min(1, knobs.min_endpoint)),
            "SLAPLANNER_MIN_DECODE_REPLICAS": str(min(1, knobs.min_endpoint)),
            "SLAPLANNER_MAX_PREFILL_REPLICAS": str(most),
            "SLAPLANNER_MAX_DECODE_REPLICAS": str(most),
        }
        decider = knob_model.knob_environment(knobs)
        return {"forecaster": forecaster, "decider": decider, "actuator": actuator}


_GAPS = {
    "isl_avg": "no requests in window",
    "osl_avg": "no requests in window",
    "isl_p90": "no requests in window",
    "osl_p90": "no requests in window",
    "ttft_avg_s": "no first token in window",
    "ttft_p90_s": "no first token in window",
    "ttft_p99_s": "no first token in window",
    "itl_avg_s": "no request finished in window",
    "itl_p90_s": "no request finished in window",
    "itl_p99_s": "no request finished in window",
    "request_duration_avg_s": "no request finished in window",
    "kv_cache_usage": "no decode worker serving",
}


_GAPS_V2 = {
    "isl_p50": "no requests in window",
    "isl_p99": "no requests in window",
    "queue_time_avg_s": "no first token in window",
    "queue_time_p90_s": "no first token in window",
    "prefill_time_avg_s": "no first token in window",
    "prefill_time_p90_s": "no first token in window",
    "decode_time_avg_s": "no request finished in window",
    "ttft_under_target_share": "no first token in window",
    "itl_under_target_share": "no request finished in window",
}


def _v2_values(stats: WindowStats, ttft_target_s: float | None,
               itl_target_s: float | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The version 2 fields of the window's snapshot, and why some are null. The simulator
    knows every request, so the shares under target are exact (``per_request``)."""
    values: dict[str, Any] = {
        "isl_p50": stats.isl_p50,
        "isl_p99": stats.isl_p99,
        "queue_time_avg_s": stats.queue_time_avg_s,
        "queue_time_p90_s": stats.queue_time_p90_s,
        "prefill_time_avg_s": stats.prefill_time_avg_s,
        "prefill_time_p90_s": stats.prefill_time_p90_s,
        "decode_time_avg_s": stats.decode_time_avg_s,
        "requests_before_first_token": float(stats.requests_before_first_token),
        "prefill_tokens_pending": stats.prefill_tokens_pending,
        "requests_failed": 0.0,  # the simulated engines never fail a request
    }
    gaps = {name: _GAPS_V2[name] for name, value in values.items() if value is None}
    if stats.arrivals is not None:
        values.update(stats.arrivals.fields())
        gaps.update(stats.arrivals.gaps)
    for role, target, samples in (("ttft", ttft_target_s, stats.ttft_samples_s),
                                  ("itl", itl_target_s, stats.itl_samples_s)):
        if target is None:
            continue
        share = window_stats.share_per_request(samples, target)
        values[f"{role}_target_s"] = target
        values[f"{role}_under_target_share"] = share.share
        values[f"{role}_share_method"] = share.method
        if share.share is None:
            gaps[f"{role}_under_target_share"] = _GAPS_V2[f"{role}_under_target_share"]
    return values, gaps


def snapshot_of(
    stats: WindowStats, deployment: DeploymentKey = DEPLOYMENT, epoch_s: float = EPOCH_S,
    ttft_target_s: float | None = None, itl_target_s: float | None = None,
) -> MetricSnapshot:
    """The snapshot a collector would have published for the window (serving workers only:
    a worker still starting exports no metrics). With the targets, the shares under them."""
    window_end = epoch_s + stats.end_s
    values: dict[str, Any] = {
        "num_requests": float(stats.num_requests),
        "isl_avg": stats.isl_avg,
        "osl_avg": stats.osl_avg,
        "isl_p90": stats.isl_p90,
        "osl_p90": stats.osl_p90,
        "ttft_avg_s": stats.ttft_avg_s,
        "ttft_p90_s": stats.ttft_p90_s,
        "ttft_p99_s": stats.ttft_p99_s,
        "itl_avg_s": stats.itl_avg_s,
        "itl_p90_s": stats.itl_p90_s,
        "itl_p99_s": stats.itl_p99_s,
        "request_duration_avg_s": stats.request_duration_avg_s,
        "kv_cache_usage": None
        if stats.kv_cache_usage is None
        else min(1.0, stats.kv_cache_usage),
    }
    v2_values, v2_gaps = _v2_values(stats, ttft_target_s, itl_target_s)
    return MetricSnapshot(
        id=f"sim-{deployment.namespace}-{deployment.name}-{round(window_end * 1000)}",
        deployment=deployment,
        window_end=window_end,
        window_s=stats.window_s,
        source="simulator",
        requests_running=float(stats.prefill_running + stats.decode_running),
        # the engines' queues: waiting for a prefill worker, and for KV room on a decode one
        requests_waiting=float(stats.prefill_waiting + stats.decode_waiting),
        prefill_workers=stats.prefill_serving,
        decode_workers=stats.decode_serving,
        gaps={**{name: _GAPS[name] for name, value in values.items() if value is None},
              **v2_gaps},
        **values,
        **v2_values,
    )


@dataclass(frozen=True)
class Observation:
    """What a planner is given at the end of a window."""

    stats: WindowStats
    snapshot: MetricSnapshot
    replicas: tuple[int, int]  # prefill, decode asked for so far (serving + starting)
    now_s: float  # virtual seconds since the trace start


@dataclass(frozen=True)
class Step:
    """A planner's answer; ``None`` counts keep what the cluster has."""

    prefill: int | None
    decode: int | None
    forecast: LoadForecast | None = None
    targets: tuple[ReplicaTarget, ...] = ()  # in the order the actuator handled them
    events: tuple[ScaleEvent, ...] = ()


def step_from_events(
    events: Sequence[ScaleEvent],
    targets: Sequence[ReplicaTarget] = (),
    forecast: LoadForecast | None = None,
) -> Step:
    """The counts the ScaleEvents, in order, leave the cluster with (a refusal or a failure
    leaves what was there)."""
    prefill: int | None = None
    decode: int | None = None
    for event in events:
        if event.outcome in APPLIED_OUTCOMES:
            prefill, decode = event.prefill.to, event.decode.to
    return Step(prefill, decode, forecast, tuple(targets), tuple(events))


class Planner(Protocol):
    name: str

    def plan(self, observation: Observation) -> Step: ...

    def close(self) -> None: ...


class _Captured:
    """The virtual backend's way out, in process: what it would have published on NATS."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def __call__(self, subject: str, body: bytes, msg_id: str) -> None:
        self.published.append((subject, body))


class ServicePlanner:
    """The forecaster, decider and actuator cores, fed as the services feed them.

    Per snapshot, in the order the services handle the messages: the decider's fast path (if the
    policy has one) and the actuator on its target; the forecast, the planning decision and the
    actuator on its target; then the decider learns from the window's ScaleEvents (if the policy
    learns from them). This is the reference order: over the bus the decider reads all three in
    stream order through one consumer, and a fast-path ScaleEvent that overtakes the window's
    forecast waits for its planning decision (``services/decider/core.py``).
    """

    def __init__(self, setup: PlanningSetup) -> None:
        env = setup.service_env()
        self.name = f"{setup.policy}/{setup.predictor}"
        self.forecaster = Forecaster(
            settings_mod.settings_from(ForecasterSettings, {}, env["forecaster"])
        )
        # The knobs as they are (no round trip through text): the replay hands the decider
        # process the same knobs as variables (knob_environment), which read back exactly.
        self.decider = Decider(DeciderSettings.model_validate(setup.knobs.model_dump()))
        actuator_settings = settings_mod.settings_from(ActuatorSettings, {}, env["actuator"])
        self.virtual = _Captured()
        self.actuator = wiring.assemble(actuator_settings, self.virtual).actuator
        self._fast_path = self.decider.has_fast_path()
        self._learns = self.decider.learns_from_scale_events()
        self._runner = asyncio.Runner()

    def _actuate(self, target: ReplicaTarget, now: float) -> ScaleEvent:
        event = self._runner.run(self.actuator.handle(target, now))
        assert event is not None  # no leader election in the simulator
        return ScaleEvent.from_json(event.to_json())

    def plan(self, observation: Observation) -> Step:
        # Through JSON, as each message crosses the bus between two services.
        snapshot = MetricSnapshot.from_json(observation.snapshot.to_json())
        now = snapshot.window_end
        targets: list[ReplicaTarget] = []
        events: list[ScaleEvent] = []
        if self._fast_path:
            fast = self.decider.on_snapshot(snapshot)
            if fast is not None:
                targets.append(ReplicaTarget.from_json(fast.to_json()))
                events.append(self._actuate(targets[-1], now))
        self.forecaster.observe(snapshot)
        forecast = LoadForecast.from_json(self.forecaster.forecast(snapshot).to_json())
        targets.append(ReplicaTarget.from_json(self.decider.decide(forecast).to_json()))
        events.append(self._actuate(targets[-1], now))
        if self._learns:
            for event in events:
                self.decider.on_scale_event(event)
        return step_from_events(events, targets, forecast)

    def close(self) -> None:
        self._runner.close()


class StaticPlanner:
    """The same counts all the time."""

    def __init__(self, prefill: int, decode: int, name: str = "static") -> None:
        self.name = name
        self.prefill, self.decode = prefill, decode

    def plan(self, observation: Observation) -> Step:
        return Step(self.prefill, self.decode)

    def close(self) -> None:
        return None


@dataclass(frozen=True)
class ReactiveSettings:
    """A plain HPA per worker set (``AverageValue`` targets, the HPA's defaults otherwise)."""

    prefill_busy_target: float = 0.7  # busy fraction of a prefill worker over the window
    prefill_waiting_target: float = 2.0  # queued prefill requests per worker
    decode_kv_target: float | None = None  # KV-cache usage per decode worker; None: see below
    decode_waiting_target: float = 2.0  # requests waiting for decode admission per worker
    tolerance: float = 0.1  # HPA: no change while the ratio is within 10 % of 1
    scale_down_window_s: float = 300.0  # HPA: the highest recommendation of the last 5 min
    min_replicas: int = 1
    max_replicas: int = 64

    def with_kv_target(self, profile: Profile, itl_target_s: float, context_tokens: float,
                       headroom: float = 0.8) -> ReactiveSettings:
        """The KV usage an operator would pick from the profile: ``headroom`` times the usage
        at which the ITL reaches its target at the workload's mean context."""
        if self.decode_kv_target is not None:
            return self
        point = profile.decode.best_thpt_per_gpu(itl_target_s, context_tokens)
        usage = max(point.grid_kv_usage_fraction, profile.decode.kv_axis[1])
        return replace(self, decode_kv_target=headroom * usage)


class ReactivePlanner:
    """Kubernetes HPA arithmetic on the serving metrics, without a forecast.

    For each metric, ``desired = ceil(replicas * total / (target * replicas))``, with workers
    still starting counted as idle (as the HPA does on scale-up); no change while the ratio is
    within the tolerance; the largest desire over the metrics wins; a scale-up is limited to the
    HPA's default policy (double, or 4 more, whichever is more); a scale-down takes the highest
    recommendation of the stabilisation window.
    """

    def __init__(self, settings: ReactiveSettings | None = None, name: str = "reactive") -> None:
        self.name = name
        self.settings = settings or ReactiveSettings()
        if self.settings.decode_kv_target is None:
            raise ValueError("decode_kv_target: set it, or derive it with with_kv_target()")
        self._history: dict[str, deque[tuple[float, int]]] = {
            "prefill": deque(),
            "decode": deque(),
        }

    def _desired(self, current: int, totals: list[tuple[float, float]]) -> int:
        desired = 0
        for total, target in totals:
            if current == 0:
                want = math.ceil(total / target) if total > 0 else 0
            else:
                ratio = total / (target * current)
                want = current if abs(ratio - 1.0) <= self.settings.tolerance else math.ceil(
                    current * ratio - 1e-9
                )
            desired = max(desired, want)
        desired = min(desired, max(2 * current, current + 4))
        return min(max(desired, self.settings.min_replicas), self.settings.max_replicas)

    def _stabilised(self, role: str, now_s: float, desired: int) -> int:
        history = self._history[role]
        history.append((now_s, desired))
        while history and history[0][0] <= now_s - self.settings.scale_down_window_s:
            history.popleft()
        return max(value for _, value in history)

    def plan(self, observation: Observation) -> Step:
        stats, s = observation.stats, self.settings
        assert s.decode_kv_target is not None
        prefill_now, decode_now = observation.replicas
        busy = (stats.prefill_busy_fraction or 0.0) * stats.prefill_serving
        kv = (stats.kv_cache_usage or 0.0) * stats.decode_serving
        prefill = self._desired(
            prefill_now,
            [(busy, s.prefill_busy_target), (stats.prefill_waiting, s.prefill_waiting_target)],
        )
        decode = self._desired(
            decode_now,
            [(kv, s.decode_kv_target), (stats.decode_waiting, s.decode_waiting_target)],
        )
        now = observation.now_s
        return Step(
            self._stabilised("prefill", now, prefill), self._stabilised("decode", now, decode)
        )

    def close(self) -> None:
        return None


@dataclass(frozen=True)
class IntervalRecord:
    """One window and the decision taken at its end."""

    stats: WindowStats
    prefill: int  # replicas asked for from the end of the window on
    decode: int
    forecast_requests: float | None = None  # forecast for the next window
    forecast_requests_upper: float | None = None
    outcome: str | None = None
    prefill_bound_by: str | None = None
    decode_bound_by: str | None = None
    fast_path: bool = False  # a target came from the decider's fast path in this window
    targets: tuple[ReplicaTarget, ...] = field(default=(), repr=False)

    def as_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "t_s": s.end_s,
            "num_requests": s.num_requests,
            "isl_avg": s.isl_avg,
            "osl_avg": s.osl_avg,
            "forecast_num_requests": self.forecast_requests,
            "forecast_num_requests_upper": self.forecast_requests_upper,
            "ttft_avg_s": s.ttft_avg_s,
            "ttft_p99_s": s.ttft_p99_s,
            "itl_avg_s": s.itl_avg_s,
            "itl_p99_s": s.itl_p99_s,
            "waiting": s.prefill_waiting + s.decode_waiting,
            "prefill_serving": s.prefill_serving,
            "decode_serving": s.decode_serving,
            "prefill": self.prefill,
            "decode": self.decode,
            "outcome": self.outcome,
            "prefill_bound_by": self.prefill_bound_by,
            "decode_bound_by": self.decode_bound_by,
            "fast_path": self.fast_path,
        }


@dataclass
class LoopResult:
    planner: str
    records: list[IntervalRecord]
    result: SimResult
    needs: metrics.IntervalNeeds
    start: tuple[int, int]
    scores: dict[str, Any]

    @property
    def scaling_actions(self) -> int:
        """Changes of a role's replica count (a change of both roles at once counts two)."""
        actions = 0
        previous = self.start
        for record in self.records:
            actions += (record.prefill != previous[0]) + (record.decode != previous[1])
            previous = (record.prefill, record.decode)
        return actions

    def replica_timeline(self) -> list[dict[str, Any]]:
        """Replicas asked for (and serving) from each time on, one entry per change."""
        timeline = [
            {"t_s": 0.0, "prefill": self.start[0], "decode": self.start[1],
             "prefill_serving": self.start[0], "decode_serving": self.start[1]}
        ]
        for record in self.records:
            entry = {
                "t_s": record.stats.end_s,
                "prefill": record.prefill,
                "decode": record.decode,
                "prefill_serving": record.stats.prefill_serving,
                "decode_serving": record.stats.decode_serving,
            }
            last = timeline[-1]
            if any(entry[k] != last[k] for k in ("prefill", "decode", "prefill_serving",
                                                   "decode_serving")):
                timeline.append(entry)
        return timeline

    def report(self) -> dict[str, Any]:
        return {
            "planner": self.planner,
            **self.scores,
            "scaling_actions": self.scaling_actions,
            "start_replicas": {"prefill": self.start[0], "decode": self.start[1]},
            "replica_timeline": self.replica_timeline(),
            "intervals": [record.as_dict() for record in self.records],
        }


class ClosedLoop:
    """A cluster stepped one window at a time; the caller plans between windows.

    ``slaplanner simulate`` plans in process; ``slaplanner replay`` plans over the bus. Both step
    the same way, so the same inputs reach the planner in both.
    """

    def __init__(
        self,
        trace: Trace,
        profile: Profile,
        config: ClusterConfig,
        interval_s: float,
        ttft_target_s: float,
        itl_target_s: float,
        deployment: DeploymentKey = DEPLOYMENT,
        epoch_s: float = EPOCH_S,
        max_intervals: int | None = None,
        needs: metrics.IntervalNeeds | None = None,
    ) -> None:
        if len(trace) == 0:
            raise ValueError("the trace has no requests")
        if not interval_s > 0:
            raise ValueError(f"interval must be positive, got {interval_s!r}")
        self.cluster = Cluster(trace, profile, config)
        self.interval_s = interval_s
        self.ttft_target_s, self.itl_target_s = ttft_target_s, itl_target_s
        self.deployment, self.epoch_s = deployment, epoch_s
        last = float(self.cluster.arrival[-1])
        self.windows = math.floor(last / interval_s) + 1
        if max_intervals:
            self.windows = min(self.windows, max_intervals)
        self.records: list[IntervalRecord] = []
        self.start = (config.start_prefill, config.start_decode)
        self.needs = needs or metrics.interval_needs(
            self.cluster.arrival,
            self.cluster.isl,
            self.cluster.osl,
            profile,
            interval_s,
            itl_target_s,
            perf_skew=config.perf_skew,
            max_context_tokens=self.cluster.max_context_tokens,
            decode_engine_gpus=config.decode_engine_gpus,
        )
        self._pending: WindowStats | None = None

    def next_window(self) -> Observation | None:
        """Simulate the next window; ``None`` once every window has been simulated."""
        done = len(self.records)
        if done >= self.windows:
            return None
        stats = self.cluster.advance((done + 1) * self.interval_s)
        self._pending = stats
        return Observation(
            stats,
            snapshot_of(stats, self.deployment, self.epoch_s, self.ttft_target_s,
                        self.itl_target_s),
            self.cluster.replicas(),
            stats.end_s,
        )

    @property
    def last_window(self) -> bool:
        return len(self.records) == self.windows - 1

    def apply(self, step: Step) -> None:
        """Apply the planner's answer for the window just simulated."""
        assert self._pending is not None, "next_window() first"
        stats, self._pending = self._pending, None
        prefill, decode = self.cluster.replicas()
        prefill = prefill if step.prefill is None else step.prefill
        decode = decode if step.decode is None else step.decode
        self.cluster.scale(prefill, decode)
        first = step.forecast.steps[0] if step.forecast is not None else None
        why = step.targets[-1].explanation if step.targets else {}
        self.records.append(
            IntervalRecord(
                stats,
                prefill,
                decode,
                forecast_requests=None if first is None else first.num_requests,
                forecast_requests_upper=None if first is None else first.num_requests_upper,
                outcome=str(step.events[-1].outcome) if step.events else None,
                prefill_bound_by=_text(why.get("prefill_bound_by")),
                decode_bound_by=_text(why.get("decode_bound_by")),
                fast_path=any(t.forecast_id is None for t in step.targets),
                targets=step.targets,
            )
        )

    def finish(self, planner_name: str) -> LoopResult:
        horizon = self.windows * self.interval_s
        result = self.cluster.finish_run(horizon)
        config = self.cluster.config
        lower = self.needs.gpu_hours(config.prefill_engine_gpus, config.decode_engine_gpus)
        scores = metrics.summary(result, self.ttft_target_s, self.itl_target_s, lower)
        return LoopResult(planner_name, self.records, result, self.needs, self.start, scores)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def run_closed_loop(
    trace: Trace,
    profile: Profile,
    config: ClusterConfig,
    planner: Planner,
    interval_s: float,
    ttft_target_s: float,
    itl_target_s: float,
    max_intervals: int | None = None,
    needs: metrics.IntervalNeeds | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LoopResult:
    """Simulate ``trace`` with ``planner`` deciding at the end of every window but the last;
    ``progress(done, total)`` is told each window done."""
    loop = ClosedLoop(
        trace, profile, config, interval_s, ttft_target_s, itl_target_s,
        max_intervals=max_intervals, needs=needs,
    )
    try:
        while (observation := loop.next_window()) is not None:
            if loop.last_window:
                loop.apply(Step(None, None))  # no decision after the last window
            else:
                loop.apply(planner.plan(observation))
            if progress is not None:
                progress(len(loop.records), loop.windows)
    finally:
        planner.close()
    return loop.finish(planner.name)


def trace_needs(
    trace: Trace, profile: Profile, setup: PlanningSetup, config: ClusterConfig
) -> metrics.IntervalNeeds:
    """The lower bound's engines per interval of ``trace`` on the simulated engines."""
    return metrics.interval_needs(
        trace.arrival_s,
        trace.isl_tokens,
        trace.osl_tokens,
        profile,
        setup.interval_s,
        setup.itl_target_s,
        perf_skew=config.perf_skew,
        max_context_tokens=config.max_context_tokens,
        decode_engine_gpus=config.decode_engine_gpus,
    )


def make_planner(
    name: str,
    setup: PlanningSetup,
    needs: metrics.IntervalNeeds | None = None,
    reactive: ReactiveSettings | None = None,
) -> Planner:
    """``static`` (the lower bound's peak), ``reactive``, or a decider policy's name."""
    if name == "static":
        if needs is None:
            raise ValueError("the static planner needs the trace's interval needs")
        prefill, decode = needs.peak()
        return StaticPlanner(prefill, decode)
    if name == "reactive":
        return ReactivePlanner(reactive)
    knobs = setup.knobs if name == setup.knobs.policy else setup.with_knobs(policy=name).knobs
    return ServicePlanner(replace(setup, knobs=knobs, planner=None))


def reactive_for(
    trace: Trace,
    profile: Profile,
    setup: PlanningSetup,
    base: ReactiveSettings | None = None,
) -> ReactiveSettings:
    """The HPA as an operator would set it up for this deployment: replicas up to the GPU
    budget, and the KV usage target read from the profile at the ITL target."""
    settings = base or ReactiveSettings(
        max_replicas=max(1, setup.knobs.max_total_gpus - 1),
    )
    context = float((trace.isl_tokens + trace.osl_tokens / 2.0).mean()) if len(trace) else 0.0
    return settings.with_kv_target(profile, setup.itl_target_s, context)


def cut(trace: Trace, interval_s: float, max_intervals: int | None) -> Trace:
    """The requests of the first ``max_intervals`` windows (all of them if ``None``)."""
    if not max_intervals:
        return trace
    return trace.between(0.0, max_intervals * interval_s)


def prepare(
    trace: Trace,
    profile: Profile,
    setup: PlanningSetup,
    config: ClusterConfig,
    planner_name: str,
    warm_start: bool = False,
    start: tuple[int, int] | None = None,
) -> tuple[ClusterConfig, metrics.IntervalNeeds]:
    """The cluster's start counts for a run, and the lower bound's needs.

    ``warm_start`` starts with what an oracle would have running at time 0 (the lower bound's
    most over the first startup delay), so that no policy pays for a cold start it could not
    have avoided; ``start`` gives those counts instead (a caller's oracle that also keeps the
    SLA, which the lower bound, without queueing, does not); the static planner always starts
    at its peak.
    """
    needs = trace_needs(trace, profile, setup, config)
    if planner_name == "static":
        prefill, decode = needs.peak()
        config = replace(config, start_prefill=prefill, start_decode=decode)
    elif start is not None:
        config = replace(config, start_prefill=start[0], start_decode=start[1])
    elif warm_start:
        prefill, decode = needs.start_counts(config.startup_delay_s)
        config = replace(config, start_prefill=prefill, start_decode=decode)
    return config, needs


def simulate(
    trace: Trace,
    profile: Profile,
    setup: PlanningSetup,
    config: ClusterConfig,
    planner_name: str | None = None,
    warm_start: bool = False,
    reactive: ReactiveSettings | None = None,
    max_intervals: int | None = None,
    start: tuple[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LoopResult:
    """One run of ``planner_name`` (default: the setup's policy) on ``trace``."""
    name = planner_name or setup.policy
    trace = cut(trace, setup.interval_s, max_intervals)
    config, needs = prepare(trace, profile, setup, config, name, warm_start, start)
    if name == "reactive":
        reactive = reactive_for(trace, profile, setup, reactive)
    planner = make_planner(name, setup, needs, reactive)
    return run_closed_loop(
        trace, profile, config, planner, setup.interval_s, setup.ttft_target_s,
        setup.itl_target_s, max_intervals=max_intervals, needs=needs, progress=progress,
    )
