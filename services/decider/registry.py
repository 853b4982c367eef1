"""Sizing policies by name; the ``policy`` setting picks one per deployment."""

from __future__ import annotations

from services.decider import dynamo_policy
from services.decider.policy import Policy

POLICIES: dict[str, Policy] = {
    dynamo_policy.NAME: dynamo_policy.decide,
}


def policy_names() -> list[str]:
    return sorted(POLICIES)


def get(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(policy_names())}") from None
