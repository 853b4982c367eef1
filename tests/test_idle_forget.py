"""Deployments idle for ``idle_forget_s`` are forgotten by the decider and the actuator, as by the
forecaster, and the memory they held is given back (issue 18, item 8: +22 KB per deployment in
the decider, +1 KB in the actuator, never freed)."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from services.actuator import core as actuator_core
from services.decider.gauges import DeciderGauges
from shared.messages import DeploymentKey, ReplicaTarget
from tests.test_actuator_core import LIMITS, RULES
from tests.test_slaplanner_policy_support import T0, WINDOW_S, forecast, make_decider, snapshot

DEPLOYMENTS = 100
IDLE_S = 3600.0


def key(d: int) -> DeploymentKey:
    return DeploymentKey(namespace="prod", name=f"model-{d}")


def held_then_left(fill: Callable[[], None], forget: Callable[[], None]) -> tuple[int, int]:
    """Bytes Python holds after ``fill`` and after ``forget``, above what it held before."""
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        fill()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        forget()
        gc.collect()
        left = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return held, left


def test_the_decider_forgets_idle_deployments_and_gives_their_memory_back() -> None:
    decider = make_decider()
    registry = CollectorRegistry()
    gauges = DeciderGauges(registry)
    forgotten: list[DeploymentKey] = []

    def fill() -> None:
        for d in range(DEPLOYMENTS):
            for i in range(3):
                observed = snapshot(i * WINDOW_S).model_copy(update={"deployment": key(d)})
                decider.on_snapshot(observed)
                target = decider.decide(forecast(i * WINDOW_S, observed=observed).model_copy(
                    update={"deployment": key(d)}))
                gauges.record(target, observed)

    def forget() -> None:
        forgotten.extend(decider.forget_idle(T0 + 2 * WINDOW_S + IDLE_S, IDLE_S))
        for deployment in forgotten:
            gauges.forget(deployment)

    held, left = held_then_left(fill, forget)
    assert decider.deployment_count() == 0
    assert sorted(forgotten, key=str) == sorted((key(d) for d in range(DEPLOYMENTS)), key=str)
    assert held > DEPLOYMENTS * 5_000, f"{held / DEPLOYMENTS:.0f} bytes per deployment held"
    assert left < 0.1 * held, f"{left / DEPLOYMENTS:.0f} bytes per deployment left"
    assert not any(sample.labels for metric in registry.collect() for sample in metric.samples)


def test_the_decider_forgets_only_deployments_idle_that_long() -> None:
    decider = make_decider()
    busy, quiet = key(1), key(2)
    for i in range(3):
        decider.decide(forecast(i * WINDOW_S).model_copy(update={"deployment": quiet}))
    last_quiet = T0 + 2 * WINDOW_S
    for t in (last_quiet + IDLE_S - WINDOW_S, last_quiet + IDLE_S):
        decider.decide(forecast(t - T0).model_copy(update={"deployment": busy}))
        newest = decider.newest_seen_s()
        assert newest == t
        # t0 + 2 windows + idle - 1 window -> quiet kept (59 min idle); at idle -> forgotten
        gone = decider.forget_idle(newest, IDLE_S)
        assert gone == ([] if t < last_quiet + IDLE_S else [quiet])
    assert decider.state_of(busy) is not None and decider.state_of(quiet) is None


def a_target(d: int, window_end: float) -> ReplicaTarget:
    return ReplicaTarget(id=f"t-{d}-{window_end:.0f}", deployment=key(d), window_end=window_end,
                         policy="slaplanner", prefill_replicas=2, decode_replicas=3)


async def test_the_actuator_forgets_idle_deployments_and_gives_their_memory_back() -> None:
    dry = actuator_core.DryRunWorkerSets()
    actuator = actuator_core.Actuator(actuator_core.StaticRouter(dry, LIMITS), RULES)
    targets = [a_target(d, T0 + i * WINDOW_S) for d in range(DEPLOYMENTS) for i in range(3)]
    for target in targets[:3]:  # warm up what every deployment shares (imports, caches)
        await actuator.handle(target, target.window_end)
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for target in targets[3:]:
            await actuator.handle(target, target.window_end)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        newest = actuator.newest_seen_s()
        assert newest == T0 + 2 * WINDOW_S
        assert actuator.forget_idle(newest + IDLE_S - 1.0, IDLE_S) == []  # not idle yet
        gone = actuator.forget_idle(newest + IDLE_S, IDLE_S)
        gc.collect()
        left = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(gone) == DEPLOYMENTS and actuator.memory == {}
    assert await dry.read(key(0)) is None  # the dry run's numbers went too
    assert held > (DEPLOYMENTS - 1) * 500, f"{held / DEPLOYMENTS:.0f} bytes per deployment held"
    # What stays is the bounded record of target ids handled (remembered_targets, 4,096).
    assert left < 0.5 * held, f"{left / DEPLOYMENTS:.0f} bytes per deployment left"
