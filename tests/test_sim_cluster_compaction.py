"""Decode slots forgotten after a scale-down (compaction) leave no stale slot numbers behind:
a day with a deep scale-down once crashed the next admission that waited for room."""

from __future__ import annotations

import numpy as np

from shared.perf_model import default_profile_path, load_profile
from shared.traces import Trace
from sim.cluster import Cluster, ClusterConfig, _SlicedDecode


def test_where_room_appeared_is_renumbered_with_the_slots_it_refers_to() -> None:
    profile = load_profile(default_profile_path())
    rng = np.random.default_rng(0)
    n = 6000
    trace = Trace(np.sort(rng.uniform(0, 600, n)), rng.integers(8000, 14000, n),
                  rng.integers(100, 400, n))
    cluster = Cluster(trace, profile, ClusterConfig(start_prefill=30, start_decode=20,
                                                    startup_delay_s=0.0))
    compacted = False
    for k in range(1, 41):
        cluster.advance(k * 15.0)
        if k == 4:
            cluster.scale(30, 2)  # 18 of 20 decode engines drain and are forgotten
        decode = cluster.decode
        assert isinstance(decode, _SlicedDecode)
        compacted = compacted or len(decode.slots) == 2
        last = decode._last_slice
        if last is not None and last[1].size:
            assert last[1].max() < len(decode.slots), k
    assert compacted
    result = cluster.finish_run(600.0)
    assert np.isfinite(result.finish_s).all()
