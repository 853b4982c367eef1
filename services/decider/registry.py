"""Sizing policies by name; the ``policy`` setting picks one per deployment.

Every policy answers a forecast (``POLICIES``). A policy may also react to snapshots between
planning intervals (``FAST_PATHS``) and learn from what the actuator did (``SCALE_EVENT_HOOKS``);
``dynamo`` does neither, as Dynamo's planner.
"""

from __future__ import annotations

from services.decider import dynamo_policy, slaplanner_policy
from services.decider.policy import FastPath, Policy, ScaleEventHook

POLICIES: dict[str, Policy] = {
    dynamo_policy.NAME: dynamo_policy.decide,
    slaplanner_policy.NAME: slaplanner_policy.decide,
}
FAST_PATHS: dict[str, FastPath] = {slaplanner_policy.NAME: slaplanner_policy.fast_path}
SCALE_EVENT_HOOKS: dict[str, ScaleEventHook] = {
    slaplanner_policy.NAME: slaplanner_policy.observe_scale_event,
}
# The policy of the decider service when none is configured.
DEFAULT_POLICY = slaplanner_policy.NAME


def policy_names() -> list[str]:
    return sorted(POLICIES)


def get(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(policy_names())}") from None
