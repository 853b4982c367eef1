"""Which replica of a service owns a deployment: rendezvous hashing of its key. Pure.

The forecaster's and the actuator's replicas share deployments this way, so one deployment has
exactly one owner in each service.

Every replica computes the same answer from the subject alone, with no coordination: the
deployment's ``namespace/name`` is scored against each replica index with a stable hash
(BLAKE2b, not Python's per-process ``hash``) and the highest score wins. Compared with
``hash % count``, growing from n to n + 1 replicas moves only the deployments the new replica
wins (about 1 / (n + 1) of them) instead of nearly all.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from shared.messages import deployment_from_subject

_TRAILING_ORDINAL = re.compile(r"^.*-([0-9]+)$")


def _ordinal(value: Any) -> Any:
    """A StatefulSet pod name (``slaplanner-forecaster-2``) stands for its ordinal (2)."""
    if isinstance(value, str) and (match := _TRAILING_ORDINAL.match(value.strip())):
        return match.group(1)
    return value


# A replica's index in settings: a number, or a StatefulSet pod's name.
ReplicaIndex = Annotated[int, BeforeValidator(_ordinal), Field(ge=0)]


def _score(token: str, replica_index: int) -> int:
    digest = hashlib.blake2b(f"{replica_index}/{token}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner_of_subject(subject: str, replica_count: int) -> int:
    """The replica index (0-based) that handles a subject's messages.

    A well-formed stage subject is owned by its deployment's replica; any other subject (a body
    that will be rejected) still has exactly one owner, by the subject itself.
    """
    if replica_count < 1:
        raise ValueError(f"replica_count must be at least 1, got {replica_count}")
    key = deployment_from_subject(subject)
    token = str(key) if key is not None else subject
    return max(range(replica_count), key=lambda index: _score(token, index))


def owns(subject: str, replica_count: int, replica_index: int) -> bool:
    """Whether replica ``replica_index`` of ``replica_count`` handles the subject's messages."""
    return owner_of_subject(subject, replica_count) == replica_index
