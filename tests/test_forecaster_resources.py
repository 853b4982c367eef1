"""The forecaster fits its pod: every forecast fits the bus's payload, a restart's rebuild holds
numbers rather than snapshots, and deployments that went quiet are forgotten."""

from __future__ import annotations

import gc
import random
import tracemalloc
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from services.forecaster.core import Forecaster
from services.forecaster.history import SeriesName
from services.forecaster.settings import MAX_FORECAST_STEPS, ForecasterSettings
from shared.messages import DeploymentKey, MetricSnapshot

T0 = 1_732_345_200.0
LLAMA = DeploymentKey(namespace="prod", name="llama")
ONE_MIB = 1 << 20


def snapshot(
    i: int, key: DeploymentKey = LLAMA, window_s: float = 60.0, seed: int | None = None
) -> MetricSnapshot:
    rng = random.Random(i if seed is None else seed * 1_000_003 + i)
    return MetricSnapshot.model_validate({
        "id": f"{key.name}-{i}", "deployment": key, "window_end": T0 + i * window_s,
        "window_s": window_s, "num_requests": float(rng.randint(50, 150)),
        "isl_avg": 3000.0 + rng.random() * 300, "osl_avg": 300.0 + rng.random() * 30,
        "isl_p90": 5000.0 + rng.random() * 500, "osl_p90": 500.0 + rng.random() * 50,
    })


def forecaster(**settings: object) -> Forecaster:
    return Forecaster(ForecasterSettings.model_validate(settings))


def peak_traced_bytes(action: Callable[[], object]) -> int:
    """The most memory Python held at once while ``action`` ran, above what it held before."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        action()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


# --- every forecast fits the payload (issue 18, item 7) -----------------------------------------


def test_a_forecast_at_the_shortest_window_fits_the_payload():
    # 300 s at 0.1 s windows is 3,000 windows: one step each was 1.06 MB, over NATS's 1 MiB.
    core = forecaster()
    core.rebuild(snapshot(i, window_s=0.1) for i in range(200))
    forecast = core.forecast(snapshot(200, window_s=0.1))
    assert len(forecast.to_json()) < ONE_MIB / 2
    assert len(forecast.steps) == 600  # ceil(3000 / 600) = 5 windows a step
    assert forecast.step_s == pytest.approx(0.5)
    assert forecast.steps[-1].window_end == pytest.approx(forecast.window_end + 300.0)


def test_the_largest_forecast_the_settings_allow_fits_the_payload():
    core = forecaster(max_forecast_steps=MAX_FORECAST_STEPS, horizon_s=3600.0)
    huge = 9.9e11  # just under the largest value a snapshot may carry
    for i in range(30):
        core.observe(snapshot(i, window_s=0.1).model_copy(update={
            "num_requests": huge * (1 + (i % 3)) / 3, "isl_avg": huge, "osl_avg": huge / 7,
            "isl_p90": huge, "osl_p90": huge / 3,
        }))
    forecast = core.forecast(snapshot(30, window_s=0.1))
    assert len(forecast.steps) == MAX_FORECAST_STEPS
    assert len(forecast.to_json()) < ONE_MIB


@pytest.mark.parametrize(
    ("horizon_s", "window_s", "max_steps", "per_step", "steps"),
    [
        (300.0, 60.0, 600, 1, 5),  # 5 windows, one a step
        (300.0, 0.5, 600, 1, 600),  # exactly 600 windows
        (300.0, 0.1, 600, 5, 600),  # 3,000 windows: ceil(3000 / 600) = 5 a step
        (300.0, 0.7, 100, 5, 86),  # ceil(300 / 0.7) = 429 windows; ceil(429 / 100) = 5
        (300.0, 60.0, 2, 3, 2),  # 5 windows in steps of 3: windows 1-3, then 4-5
    ],
    ids=[
        "a horizon of few windows has a step per window",
        "exactly the limit still has a step per window",
        "the shortest window gets five windows a step",
        "windows that do not divide evenly leave a shorter last step",
        "a last step may cover fewer windows than the others",
    ],
)
def test_windows_per_step(horizon_s, window_s, max_steps, per_step, steps):
    settings = ForecasterSettings(horizon_s=horizon_s, max_forecast_steps=max_steps)
    assert settings.windows_per_step(window_s) == per_step
    windows = settings.horizon_steps(window_s)
    assert -(-windows // per_step) == steps


def test_a_step_of_several_windows_carries_the_largest_of_its_windows():
    fine, coarse = forecaster(max_forecast_steps=5), forecaster(max_forecast_steps=2)
    for core in (fine, coarse):
        core.rebuild(snapshot(i) for i in range(40))
    by_window = fine.forecast(snapshot(40)).steps
    by_step = coarse.forecast(snapshot(40))
    assert by_step.step_s == 180.0
    assert [s.window_end for s in by_step.steps] == [by_window[2].window_end,
                                                       by_window[4].window_end]
    for step, windows in zip(by_step.steps, (by_window[0:3], by_window[3:5]), strict=True):
        for field in ("num_requests", "num_requests_upper", "isl_avg_upper", "osl_p90_upper"):
            assert getattr(step, field) == max(getattr(w, field) for w in windows)


# --- the restart's rebuild fits the pod (issue 18, item 4) --------------------------------------


def many_snapshots(deployments: int, per_deployment: int) -> Iterator[MetricSnapshot]:
    """Snapshots built one at a time, as the stream hands them over, round after round."""
    keys = [DeploymentKey(namespace="prod", name=f"model-{d}") for d in range(deployments)]
    for i in range(per_deployment):
        for d, key in enumerate(keys):
            yield snapshot(i, key, seed=d)


def test_a_rebuild_of_many_snapshots_holds_numbers_not_snapshots():
    # 4 deployments x 1,500 windows, 200 kept each. As models, 6,000 snapshots held at once
    # are over 10 MB; as rows of numbers cut to the history, a few hundred kB.
    core = forecaster(history_points=200)
    peak = peak_traced_bytes(lambda: core.rebuild(many_snapshots(4, 1500)))
    assert peak < 2_000_000, f"{peak / 1e6:.1f} MB at the peak of the rebuild"
    series = core.series(DeploymentKey(namespace="prod", name="model-3"), SeriesName.ISL_P90)
    assert len(series) == 200
    assert series.times[-1] == T0 + 1499 * 60.0


def test_a_rebuild_restores_the_same_history_whatever_the_order():
    in_order = list(many_snapshots(2, 300))
    shuffled = in_order.copy()
    random.Random(1).shuffle(shuffled)
    expected, rebuilt = forecaster(history_points=120), forecaster(history_points=120)
    for s in in_order:
        expected.observe(s)
    rebuilt.rebuild(shuffled + in_order[:50])  # duplicates change nothing
    for name in ("model-0", "model-1"):
        key = DeploymentKey(namespace="prod", name=name)
        for series in SeriesName:
            want, got = expected.series(key, series), rebuilt.series(key, series)
            np.testing.assert_array_equal(got.times, want.times)
            np.testing.assert_array_equal(got.values, want.values)


def test_a_rebuild_skips_stale_snapshots_and_keeps_a_new_window_length():
    core = forecaster()
    stale = snapshot(5).model_copy(update={"stale": True, "num_requests": 1e9})
    shorter = [snapshot(600 + i, window_s=30.0) for i in range(3)]  # after a window change
    core.rebuild([*(snapshot(i) for i in range(5)), stale, *shorter])
    counts = core.series(LLAMA, SeriesName.NUM_REQUESTS)
    assert list(counts.times) == [s.window_end for s in shorter]
    assert counts.window_s == 30.0


# --- deployments that went quiet are forgotten (issue 18, item 8) -------------------------------


def test_a_deployment_idle_for_idle_forget_s_is_forgotten_and_starts_afresh_if_it_returns():
    core = forecaster(idle_forget_s=3600.0)
    quiet, busy = LLAMA, DeploymentKey(namespace="prod", name="busy")
    core.forecast(snapshot(0, quiet))  # last seen at T0
    for i in range(61):
        core.forecast(snapshot(i, busy))  # up to T0 + 3600
    assert core.forget_idle(T0 + 3599.0) == 0  # t0 + 3599 -> kept (idle 3599 s)
    assert core.forget_idle(T0 + 3600.0) == 1  # t0 + 3600 -> forgotten (idle 3600 s)
    assert core.deployment_count() == 1
    assert len(core.series(quiet, SeriesName.NUM_REQUESTS)) == 0
    back = core.forecast(snapshot(100, quiet))
    assert back.fallback is not None and "1 points" in back.fallback, "it starts afresh"
    assert core.newest_seen_s() == T0 + 100 * 60.0


def test_idle_forget_s_of_zero_never_forgets():
    core = forecaster(idle_forget_s=0.0)
    core.forecast(snapshot(0))
    assert core.forget_idle(T0 + 10 * 86_400.0) == 0
    assert core.deployment_count() == 1


def test_a_deployment_warm_started_but_not_seen_yet_is_kept():
    core = forecaster(idle_forget_s=60.0)
    core.warm_start(LLAMA, np.arange(0.0, 600.0, 0.5), np.full(1200, 3000), np.full(1200, 300))
    core.forecast(snapshot(0, DeploymentKey(namespace="prod", name="other")))
    assert core.forget_idle(T0 + 86_400.0) == 1  # only the one that was seen, a day ago
    assert len(core.series(LLAMA, SeriesName.NUM_REQUESTS)) > 0


def test_the_memory_of_forgotten_deployments_is_freed():
    core = forecaster(idle_forget_s=3600.0)
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for d in range(100):
            key = DeploymentKey(namespace="prod", name=f"model-{d}")
            for i in range(19):
                core.observe(snapshot(i, key, seed=d))
            core.forecast(snapshot(19, key, seed=d))  # the models, fitted
        held = tracemalloc.get_traced_memory()[0] - before
        core.forget_idle(T0 + 20 * 60.0 + 3600.0)
        gc.collect()
        left = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert core.deployment_count() == 0
    assert held > 100 * 5_000, f"{held / 100:.0f} bytes per deployment while held"
    assert left < 0.1 * held, f"{left / 100:.0f} bytes per deployment left after forgetting"
