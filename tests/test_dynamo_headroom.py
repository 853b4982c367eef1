"""The prefill headroom an operator may add to Dynamo's policy: it multiplies the prefill demand
before the ceil, and at its default Dynamo's arithmetic is untouched."""

from __future__ import annotations

import pytest

from services.decider.knobs import DeploymentKnobs
from services.decider.policies import contract, dynamo
from services.decider.policies.contract import PlannedLoad
from services.decider.settings import DeciderSettings
from shared import settings as settings_mod
from shared.perf_model import Profile, default_profile_path, load_profile


@pytest.fixture(scope="module")
def profile() -> Profile:
    return load_profile(default_profile_path())


LOAD = PlannedLoad(num_requests=1800.0, isl_avg_tokens=3000.0, osl_avg_tokens=300.0,
                   window_s=60.0)


@pytest.mark.parametrize(
    ("headroom", "expected_raw_over_plain"),
    [
        (1.0, 1.0),  # Dynamo's own number, bit for bit
        (1.5, 1.5),  # 1.5 x the demand, then the ceil
        (2.0, 2.0),
    ],
    ids=["default-is-dynamo", "one-and-a-half", "double"],
)
def test_the_headroom_multiplies_the_prefill_demand_before_the_ceil(
    profile: Profile, headroom: float, expected_raw_over_plain: float
) -> None:
    plain = dynamo.size_prefill(LOAD, profile, DeploymentKnobs(), 1.0)
    sized = dynamo.size_prefill(LOAD, profile, DeploymentKnobs(prefill_headroom=headroom), 1.0)
    assert sized.raw_replicas == pytest.approx(plain.raw_replicas * expected_raw_over_plain)
    assert sized.replicas == contract.ceil_replicas(sized.raw_replicas)
    if headroom == 1.0:
        assert sized.raw_replicas == plain.raw_replicas  # exactly, not approximately


def test_the_headroom_is_a_decider_knob_from_its_environment_variable() -> None:
    settings = settings_mod.settings_from(DeciderSettings, {},
                                          {"SLAPLANNER_PREFILL_HEADROOM": "1.5"})
    assert settings.prefill_headroom == 1.5


def test_a_headroom_under_one_is_refused() -> None:
    with pytest.raises(ValueError, match="prefill_headroom"):
        settings_mod.settings_from(DeciderSettings, {}, {"SLAPLANNER_PREFILL_HEADROOM": "0.5"})
