"""The decider's core: a forecast in, a replica target with its explanation out.

Pure apart from its in-memory state per deployment (correction factors, last target, the
stabilisation window, learnt startup time): no bus, no clock, no cluster; time is the messages'
``window_end``. Profiles are loaded and validated once, when the decider is built, so a bad
profile stops the service at start rather than at its first decision.

Three entry points, one per input the shell (or the simulator, in process) feeds it:

- ``decide(forecast)`` -> ``ReplicaTarget``: the planning decision, once per forecast;
- ``on_snapshot(snapshot)`` -> ``ReplicaTarget | None``: the fast path between planning
  intervals, for policies that have one (a target only when it scales up);
- ``on_scale_event(event)``: what the actuator did, for policies that learn from it.

The order in which one deployment's inputs reach the core is part of its result. The reference
is the order of the simulator in process (``sim/loop.py``), which is also the stream's: snapshot
k (fast path), forecast k (planning), then the ScaleEvents of interval k. Over the bus, two of
these are made by different services in parallel: the ScaleEvent of a fast-path target of
interval k (by the actuator) and forecast k (by the forecaster) may reach the decider either way
round. So a ScaleEvent is learnt only once the planning decision of its interval has been made:
one that arrives earlier waits in the deployment's memory until forecast k is decided (or, if no
forecast comes, until a later snapshot or forecast). Nothing is lost by waiting: the fast path's
target already counts its replicas as requested, and a start asked for in this interval has
waited 0 s, so it cannot have told anything yet about how long a start takes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from services.decider import registry
from services.decider.knobs import DeploymentKnobs
from services.decider.policies.contract import PlannedLoad, PolicyDecision, PolicyState
from services.decider.settings import DeciderSettings
from shared.explanation import Explanation
from shared.messages import (
    DeploymentKey,
    LoadForecast,
    MetricSnapshot,
    ReplicaTarget,
    ScaleEvent,
    derived_id,
)
from shared.perf_model import Profile, load_profile


@dataclass(frozen=True)
class _Memory:
    state: PolicyState
    forecast_id: str | None = None  # the last forecast answered, and its answer
    target: ReplicaTarget | None = None
    snapshot_id: str | None = None  # the last snapshot seen by the fast path, and its answer
    snapshot_target: ReplicaTarget | None = None
    event_id: str | None = None  # the last ScaleEvent learnt from
    # ScaleEvents that arrived before the planning decision of their interval, in arrival order
    deferred_events: tuple[ScaleEvent, ...] = ()
    # the newest window_end of any input, to forget a deployment that went idle
    last_seen_s: float | None = None

    def decided_through(self) -> float | None:
        """The ``window_end`` of the last planning decision, ``None`` before the first."""
        return None if self.target is None else self.target.window_end


# A deployment whose forecasts stop (and snapshots too) keeps at most this many ScaleEvents
# waiting; older ones are learnt at once rather than dropped.
MAX_DEFERRED_EVENTS = 64


class Decider:
    def __init__(
        self, settings: DeciderSettings, profiles: Mapping[str, Profile] | None = None
    ) -> None:
        """``profiles``: already loaded profiles by path (the dry run and tests reuse one);
        every other configured profile is loaded and validated here."""
        self.settings = settings
        self.config = settings.deployment_config()
        self._profiles: dict[str, Profile] = dict(profiles or {})
        for knobs in self.config.all_knobs():
            self.profile_for(knobs)  # raises ProfileError now, not at the first forecast
        self._memory: dict[str, _Memory] = {}

    def profile_for(self, knobs: DeploymentKnobs) -> Profile:
        profile = self._profiles.get(knobs.profile_path)
        if profile is None:
            profile = load_profile(knobs.profile_path)
            self._profiles[knobs.profile_path] = profile
        return profile

    def describe(self) -> list[str]:
        """What this decider plans with, one line per set of knobs, for the start log."""
        lines = []
        for who, knobs in self.config.describe():
            profile = self.profile_for(knobs)
            origin = profile.provenance
            model = ", ".join(
                str(v) for v in (origin.model, origin.gpu) if v
            ) or "model not recorded"
            lines.append(
                f"{who}: policy {knobs.policy}, TTFT target {knobs.ttft_target_s:g} s, ITL "
                f"target {knobs.itl_target_s:g} s, at most {knobs.max_total_gpus} GPUs, "
                f"interval {knobs.adjustment_interval_s:g} s; profile {knobs.profile_path} "
                f"({model})"
            )
        return lines

    def has_fast_path(self) -> bool:
        """Whether any configured deployment's policy reacts to snapshots between intervals."""
        return any(k.policy in registry.FAST_PATHS for k in self.config.all_knobs())

    def learns_from_scale_events(self) -> bool:
        return any(k.policy in registry.SCALE_EVENT_HOOKS for k in self.config.all_knobs())

    def deployment_count(self) -> int:
        """Deployments this decider remembers."""
        return len(self._memory)

    def newest_seen_s(self) -> float | None:
        """The newest ``window_end`` of any input of any deployment; ``None`` before the
        first."""
        return max((m.last_seen_s for m in self._memory.values() if m.last_seen_s is not None),
                   default=None)

    def forget_idle(self, now_s: float, idle_s: float) -> list[DeploymentKey]:
        """Forget every deployment whose newest input is ``idle_s`` or more behind ``now_s``
        (window time); the ones forgotten. One that comes back starts afresh, as a new one."""
        idle = [key for key, memory in self._memory.items()
                if memory.last_seen_s is not None and now_s - memory.last_seen_s >= idle_s]
        forgotten = []
        for key in idle:
            namespace, name = key.split("/", 1)
            forgotten.append(DeploymentKey(namespace=namespace, name=name))
            del self._memory[key]
        return forgotten

    def _seen(self, key: str, window_end: float) -> None:
        memory = self._memory.get(key)
        if memory is not None and (memory.last_seen_s is None or window_end > memory.last_seen_s):
            self._memory[key] = replace(memory, last_seen_s=window_end)

    def state_of(self, deployment: DeploymentKey) -> PolicyState | None:
        memory = self._memory.get(str(deployment))
        return None if memory is None else memory.state

    def decide(self, forecast: LoadForecast) -> ReplicaTarget:
        """The target for the forecast's next step; a redelivered forecast gets the same target."""
        key = str(forecast.deployment)
        memory = self._memory.get(key)
        if memory is not None and memory.forecast_id == forecast.id and memory.target is not None:
            return memory.target
        self._learn_deferred(key, before=forecast.window_end)
        memory = self._memory.get(key)
        knobs = self.config.for_deployment(key)
        profile = self.profile_for(knobs)
        step = forecast.steps[0]
        load = PlannedLoad(
            num_requests=step.num_requests,
            isl_avg_tokens=step.isl_avg,
            osl_avg_tokens=step.osl_avg,
            window_s=forecast.window_s,
            forecast=forecast,
        )
        decision = registry.get(knobs.policy)(
            load,
            forecast.observed,
            profile,
            knobs,
            memory.state if memory is not None else PolicyState(),
        )
        context: dict[str, Any] = {
            "forecast": {
                "id": forecast.id,
                "model": forecast.model,
                "fallback": forecast.fallback,
                "window_end": forecast.window_end,
                "window_s": forecast.window_s,
                "step_window_end": step.window_end,
                "num_requests": step.num_requests,
                "num_requests_upper": step.num_requests_upper,
                "isl_avg": step.isl_avg,
                "isl_avg_upper": step.isl_avg_upper,
                "osl_avg": step.osl_avg,
                "osl_avg_upper": step.osl_avg_upper,
            },
            "adjustment_interval_s": knobs.adjustment_interval_s,
            "profile": profile.origin,
        }
        target = _target(
            derived_id("target", forecast.id), forecast, knobs, decision, context,
            forecast_id=forecast.id,
        )
        self._memory[key] = replace(
            memory or _Memory(decision.state),
            state=decision.state,
            forecast_id=forecast.id,
            target=target,
        )
        self._learn_deferred(key, through=forecast.window_end)
        self._seen(key, forecast.window_end)
        return target

    def on_snapshot(self, snapshot: MetricSnapshot) -> ReplicaTarget | None:
        """The fast path: a target if the deployment's policy scales up on this snapshot now,
        ``None`` otherwise (also for policies without a fast path). A redelivered snapshot gets
        the same answer and changes nothing."""
        key = str(snapshot.deployment)
        knobs = self.config.for_deployment(key)
        fast_path = registry.FAST_PATHS.get(knobs.policy)
        if fast_path is None:
            return None
        memory = self._memory.get(key)
        if memory is not None and memory.snapshot_id == snapshot.id:
            return memory.snapshot_target
        self._learn_deferred(key, before=snapshot.window_end)
        memory = self._memory.get(key)
        state = memory.state if memory is not None else PolicyState()
        result = fast_path(snapshot, self.profile_for(knobs), knobs, state)
        target = (
            None
            if result.decision is None
            else _target(
                derived_id("fast-path", snapshot.id), snapshot, knobs, result.decision,
                {"snapshot_id": snapshot.id, "adjustment_interval_s": knobs.adjustment_interval_s},
            )
        )
        self._memory[key] = replace(
            memory or _Memory(result.state),
            state=result.state,
            snapshot_id=snapshot.id,
            snapshot_target=target,
        )
        self._seen(key, snapshot.window_end)
        return target

    def on_scale_event(self, event: ScaleEvent) -> None:
        """Let the deployment's policy learn from what the actuator did (idempotent per id),
        after the planning decision of the event's interval (see the module's docstring)."""
        key = str(event.deployment)
        knobs = self.config.for_deployment(key)
        if knobs.policy not in registry.SCALE_EVENT_HOOKS:
            return
        memory = self._memory.get(key)
        if memory is not None and (
            memory.event_id == event.id or any(e.id == event.id for e in memory.deferred_events)
        ):
            return
        decided = None if memory is None else memory.decided_through()
        if decided is not None and event.window_end <= decided:
            self._learn(key, event)
            self._seen(key, event.window_end)
            return
        waiting = (*(memory.deferred_events if memory is not None else ()), event)
        self._memory[key] = replace(
            memory or _Memory(PolicyState()), deferred_events=waiting[-MAX_DEFERRED_EVENTS:]
        )
        for overflow in waiting[:-MAX_DEFERRED_EVENTS]:
            self._learn(key, overflow)
        self._seen(key, event.window_end)

    def deferred_events(self, deployment: DeploymentKey) -> tuple[ScaleEvent, ...]:
        """The deployment's ScaleEvents waiting for the planning decision of their interval."""
        memory = self._memory.get(str(deployment))
        return () if memory is None else memory.deferred_events

    def _learn_deferred(
        self, key: str, before: float | None = None, through: float | None = None
    ) -> None:
        """Learn, in arrival order, the waiting events of intervals before ``before`` or up to
        and including ``through``; the others keep waiting."""
        memory = self._memory.get(key)
        if memory is None or not memory.deferred_events:
            return

        def due(event: ScaleEvent) -> bool:
            return (before is not None and event.window_end < before) or (
                through is not None and event.window_end <= through
            )

        self._memory[key] = replace(
            memory, deferred_events=tuple(e for e in memory.deferred_events if not due(e))
        )
        for event in memory.deferred_events:
            if due(event):
                self._learn(key, event)

    def _learn(self, key: str, event: ScaleEvent) -> None:
        knobs = self.config.for_deployment(key)
        hook = registry.SCALE_EVENT_HOOKS[knobs.policy]
        memory = self._memory.get(key)
        state = memory.state if memory is not None else PolicyState()
        new_state = hook(event, knobs, state)
        self._memory[key] = replace(
            memory or _Memory(new_state), state=new_state, event_id=event.id
        )


def _target(
    target_id: str,
    source: LoadForecast | MetricSnapshot,
    knobs: DeploymentKnobs,
    decision: PolicyDecision,
    context: dict[str, Any],
    forecast_id: str | None = None,
) -> ReplicaTarget:
    """The target for ``source``'s deployment and window; ``forecast_id`` None: the fast path.
    ``context`` (what the decision answered: forecast, snapshot, profile) leads the policy's
    own sections in the explanation."""
    why = decision.explained
    explained = replace(why, sections={**context, **why.sections})
    return ReplicaTarget(
        id=target_id,
        deployment=source.deployment,
        window_end=source.window_end,
        window_s=source.window_s,
        policy=knobs.policy,
        prefill_replicas=decision.prefill_replicas,
        decode_replicas=decision.decode_replicas,
        forecast_id=forecast_id,
        explanation=explained.to_dict(),
    )


def decision_line(target: ReplicaTarget) -> str:
    """The log line of one decision: the deployment, each role from -> to with the rule that set
    it, and the predicted attainment where the policy has one."""
    kind = "planned" if target.forecast_id is not None else "fast path"
    why = Explanation.from_dict(
        target.explanation, target.prefill_replicas, target.decode_replicas
    )
    return f"{target.deployment} {kind} ({target.policy}): {why.summary()}"


def _number(source: Any, *path: str) -> float | None:
    """``source[path[0]][path[1]]...`` as a finite float, or ``None``."""
    value = source
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def gauge_values(target: ReplicaTarget) -> dict[str, float | None]:
    """What an operator watches, read from a target's explanation; ``None`` where not known.

    Pure: the shell hands these to ``services.decider.gauges``; nothing is recorded here.
    """
    why = target.explanation
    observed_count = _number(why, "observed", "num_requests")
    observed_window = _number(why, "observed", "window_s")
    observed_rate = (
        observed_count / observed_window if observed_count is not None and observed_window else None
    )
    return {
        "observed_ttft_seconds": _number(why, "observed", "ttft_avg_s"),
        "observed_itl_seconds": _number(why, "observed", "itl_avg_s"),
        "ttft_target_seconds": _number(why, "config", "ttft_target_s"),
        "itl_target_seconds": _number(why, "config", "itl_target_s"),
        "observed_request_rate_per_second": observed_rate,
        "forecast_request_rate_per_second": _number(why, "load", "request_rate_per_s"),
        "forecast_isl_tokens": _number(why, "load", "isl_avg_tokens"),
        "forecast_osl_tokens": _number(why, "load", "osl_avg_tokens"),
        "prefill_correction_factor": _number(why, "correction", "prefill_factor"),
        "decode_correction_factor": _number(why, "correction", "decode_factor"),
        "observed_prefill_workers": _number(why, "observed", "prefill_workers"),
        "observed_decode_workers": _number(why, "observed", "decode_workers"),
        "prefill_target_replicas": float(target.prefill_replicas),
        "decode_target_replicas": float(target.decode_replicas),
        "target_held": 1.0 if why.get("held") else 0.0,
    }
