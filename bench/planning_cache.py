"""A cache of the planning benchmark's searched references (clairvoyant, best fixed, tuned Dynamo).

Their searches cost far more than a policy's run (a day: a minute or two each), and their
result depends only on the trace, the profile, the scenario's settings and the code that
simulates and searches, so each is kept as JSON under ``.cache/planning-benchmark/`` (ignored by
git), keyed by a hash of all of those: the trace's requests, the profile's files, the
scenario's settings and the source of the simulator and of the references. Change any of them
and the entry is not found, so a stale result is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from shared.traces import Trace

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "planning-benchmark"
# The code a reference's result depends on: the simulator, the references, and the policies
# and forecaster the tuned Dynamo runs.
SOURCES = (
    "sim/cluster.py", "sim/loop.py", "sim/metrics.py", "sim/fcfs.py", "sim/fluid.py",
    "sim/frontier.py", "sim/clairvoyant.py", "sim/references.py",
    "services/decider/policies/dynamo.py", "services/decider/policies/contract.py",
    "services/decider/knobs.py", "services/forecaster/core.py",
    "shared/perf_model.py",
)


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def trace_key(trace: Trace) -> str:
    return _digest(np.ascontiguousarray(a).tobytes()
                   for a in (trace.arrival_s, trace.isl_tokens, trace.osl_tokens))


@lru_cache(maxsize=8)
def _profile_key(path: Path) -> str:
    return files_key([path])


def files_key(paths: Iterable[Path]) -> str:
    files = sorted(p for path in paths for p in ([path] if path.is_file() else path.rglob("*"))
                   if p.is_file())
    return _digest(p.read_bytes() for p in files)


@lru_cache(maxsize=1)
def simulator_version() -> str:
    return files_key(ROOT / name for name in SOURCES)


class Cache:
    """Entries by key; ``enabled=False`` reads nothing (and still writes)."""

    def __init__(self, directory: Path = CACHE, enabled: bool = True) -> None:
        self.directory, self.enabled = directory, enabled

    @staticmethod
    def key(what: str, trace: Trace, profile_path: Path, settings: Mapping[str, Any]) -> str:
        text = json.dumps({"what": what, **settings}, sort_keys=True).encode()
        return _digest([text, trace_key(trace).encode(), _profile_key(profile_path).encode(),
                        simulator_version().encode()])

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.directory / f"{key}.json"
        if not self.enabled or not path.is_file():
            return None
        entry: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return entry

    def put(self, key: str, entry: Mapping[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{key}.json"
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(entry) + "\n", encoding="utf-8")
        partial.replace(path)  # whole or absent, even with two processes writing
