"""The two worker sets of a disaggregated deployment, named once for every service and tool."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


ROLES = (Role.PREFILL, Role.DECODE)
ROLE_NAMES: tuple[str, ...] = tuple(role.value for role in ROLES)
