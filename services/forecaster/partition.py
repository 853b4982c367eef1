"""Which forecaster replica owns a deployment: rendezvous hashing of its key. Pure.

Every replica computes the same answer from the subject alone, with no coordination: the
deployment's ``namespace/name`` is scored against each replica index with a stable hash
(BLAKE2b, not Python's per-process ``hash``) and the highest score wins. Compared with
``hash % count``, growing from n to n + 1 replicas moves only the deployments the new replica
wins (about 1 / (n + 1) of them) instead of nearly all.
"""

from __future__ import annotations

import hashlib

from shared.messages import deployment_from_subject


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
