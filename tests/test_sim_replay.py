"""The replay through the real services on a real nats-server decides exactly as the cores do
when called in process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.decider import registry
from shared.perf_model import default_profile_path, load_profile
from sim.cluster import ClusterConfig
from sim.loop import LoopResult, PlanningSetup, simulate
from sim.replay import run_replay
from sim.synth import SineLoad, generate
from tests.conftest import NatsEndpoint


@pytest.mark.filterwarnings("ignore::Warning:statsmodels")
@pytest.mark.parametrize("policy", ["dynamo", "slaplanner"])
async def test_the_services_over_nats_decide_what_the_cores_decide_in_process(
    nats_server: NatsEndpoint, nc: NATS, tmp_path: Path, policy: str
) -> None:
    if policy not in registry.POLICIES:
        pytest.skip(f"policy {policy} is not registered")
    profile = load_profile(default_profile_path())
    # A rising and falling load with spread lengths, slower and noisy engines (so that the
    # correction factors move), a 30 s interval and a 60 s startup: the decisions change often.
    trace = generate(SineLoad(600, 4, 24, 300, 3000, 300, isl_cv=0.5, osl_cv=0.5, seed=3))
    setup = PlanningSetup.build(
        policy=policy, predictor="kalman", ttft_target_s=0.3, itl_target_s=0.02,
        adjustment_interval_s=30.0, max_total_gpus=16, worker_startup_s=60.0,
    )
    config = ClusterConfig(startup_delay_s=60.0, perf_skew=1.2, noise_cv=0.1, seed=5)
    rejected: list[bytes] = []

    async def on_rejected(msg: Msg) -> None:
        rejected.append(msg.data)

    await nc.subscribe("slaplanner.rejected.>", cb=on_rejected)

    in_process = await asyncio.to_thread(simulate, trace, profile, setup, config)
    replay = await run_replay(trace, profile, setup, config, nats_server.url, tmp_path)

    def decisions(run: LoopResult) -> list[tuple[int, int, str | None]]:
        return [(r.prefill, r.decode, r.outcome) for r in run.records]

    assert len(replay.run.records) == len(in_process.records) == 20
    assert decisions(replay.run) == decisions(in_process)
    assert len({(p, d) for p, d, _ in decisions(in_process)}) > 2  # it did scale
    in_process_targets = [t for r in in_process.records for t in r.targets]
    # Every target with every number it used and its explanation, to the last bit, for both
    # policies: the decider reads a deployment's snapshots, forecasts and ScaleEvents through one
    # consumer in stream order, and a ScaleEvent that overtakes the forecast of its interval
    # waits for that decision (services/decider/core.py), as in process.
    assert [t.model_dump() for t in replay.targets] == [
        t.model_dump() for t in in_process_targets
    ]
    if policy == "slaplanner":
        assert any(t.forecast_id is None for t in replay.targets)  # the fast path took part
    assert replay.run.scores == in_process.scores
    assert rejected == []

