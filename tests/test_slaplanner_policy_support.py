"""Builders shared by the slaplanner policy tests (no tests here): a deployment, its messages,
and a decider on the bundled profile, loaded once."""

from __future__ import annotations

from typing import Any

from services.decider.core import Decider
from services.decider.knobs import DeploymentKnobs
from services.decider.settings import DeciderSettings
from shared.messages import (
    DeploymentKey,
    ForecastStep,
    LoadForecast,
    MetricSnapshot,
    Outcome,
    RoleChange,
    ScaleEvent,
)
from shared.perf_model import default_profile_path, load_profile

PROFILE = load_profile(default_profile_path())
LLAMA = DeploymentKey(namespace="prod", name="llama")
T0 = 1_700_000_000.0
WINDOW_S = 60.0
ISL, OSL = 3000.0, 300.0

# Knobs of most scenarios: Dynamo's published worked example (TTFT 100 ms, ITL 10 ms on the H200
# profile), a budget that does not bind, one-minute windows, and a 3-minute startup.
BASE_KNOBS: dict[str, Any] = {
    "policy": "slaplanner",
    "ttft_target_s": 0.1,
    "itl_target_s": 0.01,
    "max_total_gpus": 256,
    "adjustment_interval_s": WINDOW_S,
}


def settings(**knobs: Any) -> DeciderSettings:
    return DeciderSettings(**{**BASE_KNOBS, **knobs})


def config(**knobs: Any) -> DeploymentKnobs:
    return settings(**knobs).knobs()


def make_decider(**knobs: Any) -> Decider:
    return Decider(settings(**knobs), {str(default_profile_path()): PROFILE})


def snapshot(
    t: float,
    requests: float | None = 1800.0,
    prefill: int | None = None,
    decode: int | None = None,
    window_s: float = WINDOW_S,
    isl: float | None = ISL,
    osl: float | None = OSL,
    **fields: Any,
) -> MetricSnapshot:
    """What the collector saw in the window ending at ``T0 + t``."""
    return MetricSnapshot(
        id=f"snap-{t:g}-{window_s:g}",
        deployment=LLAMA,
        window_end=T0 + t,
        window_s=window_s,
        num_requests=requests,
        isl_avg=isl if requests else None,
        osl_avg=osl if requests else None,
        prefill_workers=prefill,
        decode_workers=decode,
        **fields,
    )


def forecast(
    t: float,
    requests: float | list[float] = 1800.0,
    upper: float | list[float] | None = None,
    observed: MetricSnapshot | None = None,
    steps: int = 5,
    window_s: float = WINDOW_S,
    isl: float = ISL,
    osl: float = OSL,
) -> LoadForecast:
    """A forecast made at ``T0 + t``: ``requests`` per window for each step (one value: flat),
    its upper quantile (default: the point), and the snapshot it was made from."""
    points = requests if isinstance(requests, list) else [requests] * steps
    uppers = upper if isinstance(upper, list) else [upper or p for p in points]
    return LoadForecast(
        id=f"fc-{t:g}",
        deployment=LLAMA,
        window_end=T0 + t,
        window_s=window_s,
        model="test",
        steps=[
            ForecastStep(
                window_end=T0 + t + (k + 1) * window_s,
                num_requests=p,
                num_requests_upper=max(u, p),
                isl_avg=isl,
                isl_avg_upper=isl,
                osl_avg=osl,
                osl_avg_upper=osl,
            )
            for k, (p, u) in enumerate(zip(points, uppers, strict=True))
        ],
        observed=observed if observed is not None else snapshot(t, points[0]),
    )


def scale_event(
    t: float,
    prefill: tuple[int | None, int, int | None],
    decode: tuple[int | None, int, int | None],
    outcome: Outcome = Outcome.APPLIED,
) -> ScaleEvent:
    """What the actuator did at ``T0 + t``: ``(from, to, ready)`` per role."""
    return ScaleEvent(
        id=f"ev-{t:g}",
        deployment=LLAMA,
        window_end=T0 + t,
        target_id=f"target-{t:g}",
        outcome=outcome,
        backend="test",
        prefill=RoleChange.model_validate({"from": prefill[0], "to": prefill[1],
                                           "ready": prefill[2]}),
        decode=RoleChange.model_validate({"from": decode[0], "to": decode[1],
                                          "ready": decode[2]}),
    )
