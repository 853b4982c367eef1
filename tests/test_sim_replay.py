"""The replay through the real services on a real nats-server decides exactly as the cores do
when called in process."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.decider import registry
from shared.messages import ReplicaTarget
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
    setup = PlanningSetup(
        policy=policy, predictor="kalman", ttft_target_s=0.3, itl_target_s=0.02,
        interval_s=30.0, max_gpu_budget=16, worker_startup_s=60.0,
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
    if policy == "dynamo":
        # Every target with every number it used, to the last bit.
        assert [comparable(t) for t in replay.targets] == [
            comparable(t) for t in in_process_targets
        ]
    else:
        # The slaplanner decider reads ScaleEvents on a consumer of its own, so over NATS the
        # moment it notes a start in flight can differ from the in-process order; its
        # explanation of starts in flight may differ, every number it decided must not.
        assert [(t.id, t.window_end, t.prefill_replicas, t.decode_replicas)
                for t in replay.targets] == [
            (t.id, t.window_end, t.prefill_replicas, t.decode_replicas)
            for t in in_process_targets
        ]
    assert replay.run.scores == in_process.scores
    assert rejected == []


def comparable(target: ReplicaTarget) -> dict[str, Any]:
    """A target as a dict, without one detail whose order is a race between two services.

    When the fast path scales up, its ScaleEvent and the window's forecast travel to the decider
    through different services (actuator, forecaster); whichever arrives first, the decision is
    the same, but a start asked for in this very window (waiting 0 s, so it cannot change the
    startup estimate) may or may not be listed yet in the explanation's ``pending_starts``.
    """
    data = target.model_dump()
    startup = data["explanation"].get("startup")
    if isinstance(startup, dict) and isinstance(startup.get("pending_starts"), list):
        startup["pending_starts"] = [
            start for start in startup["pending_starts"] if start.get("waiting_s") != 0.0
        ]
    return data
