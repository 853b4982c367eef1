"""Forecaster core (minimal constant predictor; the predictor work replaces the internals)."""

from __future__ import annotations

from services.forecaster.settings import ForecasterSettings
from shared.messages import DeploymentKey, ForecastStep, LoadForecast, MetricSnapshot, derived_id


class Forecaster:
    def __init__(self, settings: ForecasterSettings) -> None:
        self.settings = settings
        self._last: dict[DeploymentKey, tuple[float, float, float]] = {}

    def observe(self, snapshot: MetricSnapshot) -> None:
        if snapshot.stale or snapshot.num_requests is None:
            return
        last = self._last.get(snapshot.deployment, (0.0, 0.0, 0.0))
        self._last[snapshot.deployment] = (
            snapshot.num_requests,
            snapshot.isl_avg if snapshot.isl_avg is not None else last[1],
            snapshot.osl_avg if snapshot.osl_avg is not None else last[2],
        )

    def forecast(self, snapshot: MetricSnapshot) -> LoadForecast:
        n, isl, osl = self._last.get(snapshot.deployment, (0.0, 0.0, 0.0))
        steps = [
            ForecastStep(window_end=snapshot.window_end + k * snapshot.window_s,
                         num_requests=n, num_requests_upper=n, isl_avg=isl, isl_avg_upper=isl,
                         osl_avg=osl, osl_avg_upper=osl)
            for k in range(1, self.settings.horizon_steps + 1)
        ]
        return LoadForecast(id=derived_id("forecast", snapshot.id), deployment=snapshot.deployment,
                            window_end=snapshot.window_end, window_s=snapshot.window_s,
                            model="constant", steps=steps, observed=snapshot)
