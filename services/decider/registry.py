"""Sizing policies by name; the ``policy`` knob picks one per deployment.

Every policy answers a forecast (``POLICIES``). A policy may also react to snapshots between
planning intervals (``FAST_PATHS``) and learn from what the actuator did (``SCALE_EVENT_HOOKS``);
``dynamo`` does neither, as Dynamo's planner.
"""

from __future__ import annotations

from services.decider import knobs
from services.decider.policies import dynamo, slaplanner
from services.decider.policies.contract import FastPath, Policy, ScaleEventHook

POLICIES: dict[str, Policy] = {
    dynamo.NAME: dynamo.decide,
    slaplanner.NAME: slaplanner.decide,
}
FAST_PATHS: dict[str, FastPath] = {slaplanner.NAME: slaplanner.fast_path}
SCALE_EVENT_HOOKS: dict[str, ScaleEventHook] = {
    slaplanner.NAME: slaplanner.observe_scale_event,
}
# The policy of every deployment without one.
DEFAULT_POLICY = knobs.DEFAULT_POLICY


def policy_names() -> list[str]:
    return sorted(POLICIES)


def get(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(policy_names())}") from None
