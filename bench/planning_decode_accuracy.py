"""The simulator's sliced decode against the per-iteration (per-token) model it approximates.

Each trace runs with fixed worker counts (so that both models see exactly the same prefill and
routing input) under the per-iteration model (one event per engine iteration: every request in
the batch gets one token, new requests join at the next iteration) and under the sliced model at
several slice lengths. Reported: mean, p50 and p99 of the per-request mean ITL, the share of
requests meeting an ITL target near the middle of the distribution (the worst case for a
threshold), the per-request relative error, and the wall time. TTFT is the same in both (prefill
is event-exact in both).

Usage: ``python -m bench.planning_decode_accuracy``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench import planning_docs
from shared import traces
from shared.perf_model import Profile, default_profile_path, load_profile
from sim.cluster import Cluster, ClusterConfig, DecodeModel
from sim.synth import DYNAMO_SINE, generate

SLICES_S = (0.25, 0.5, 1.0)


@dataclass(frozen=True)
class Case:
    name: str
    trace: traces.Trace
    prefill: int
    decode: int
    itl_target_s: float


def run(profile: Profile, case: Case, model: DecodeModel, slice_s: float) -> tuple[
    np.ndarray, float
]:
    config = ClusterConfig(start_prefill=case.prefill, start_decode=case.decode,
                           decode_model=model, decode_slice_s=slice_s, startup_delay_s=0.0)
    started = time.perf_counter()
    cluster = Cluster(case.trace, profile, config)
    windows = int(np.ceil(case.trace.arrival_s[-1] / 60.0))
    for k in range(1, windows + 1):
        cluster.advance(60.0 * k)
    result = cluster.finish_run(60.0 * windows)
    return result.itl_s, time.perf_counter() - started


def row(
    case: Case, has_gaps: np.ndarray, label: str, itl: np.ndarray, wall: float, error: str
) -> str:
    """One table row; ``has_gaps``: the requests with an inter-token gap (output > 1 token)."""
    met = np.mean(np.where(np.isfinite(itl), itl, 0.0) <= case.itl_target_s)
    values = itl[has_gaps]
    return (
        f"| {case.name} | {label} | {values.mean() * 1000:.2f} ms | "
        f"{np.percentile(values, 50) * 1000:.2f} ms | "
        f"{np.percentile(values, 99) * 1000:.2f} ms | {100 * met:.2f} % "
        f"({case.itl_target_s * 1000:g} ms) | {error} | {wall:.1f} s |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.planning_decode_accuracy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    profile = load_profile(default_profile_path())
    azure = traces.load_trace(traces.bundled_trace_path("azure_llm_2023_code.csv"))
    mooncake = traces.load_trace(traces.bundled_trace_path("mooncake_conversation.jsonl"))
    cases = [
        Case("Dynamo sine, 3P 2D", generate(DYNAMO_SINE), 3, 2, 0.010),
        Case("Azure code x10, 5P 1D", azure.sped_up(10), 5, 1, 0.008),
        Case("Mooncake x5, 4P 2D", mooncake.sped_up(5), 4, 2, 0.030),
    ]
    lines = [
        "| trace, workers | decode model | ITL mean | ITL p50 | ITL p99 | ITL met (target) | "
        "per-request error, mean / p99 | wall time |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        reference, ref_wall = run(profile, case, DecodeModel.TOKEN, 1.0)
        has_gaps = np.isfinite(reference)
        ref = reference[has_gaps]
        lines.append(row(case, has_gaps, "per iteration (reference)", reference, ref_wall, "-"))
        for slice_s in SLICES_S:
            itl, wall = run(profile, case, DecodeModel.SLICED, slice_s)
            relative = np.abs(itl[has_gaps] - ref) / ref
            error = f"{100 * relative.mean():.1f} % / {100 * np.percentile(relative, 99):.1f} %"
            lines.append(row(case, has_gaps, f"sliced, {slice_s * 1000:g} ms", itl, wall, error))
        print("\n".join(lines[-1 - len(SLICES_S):]), flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_docs:
        planning_docs.replace_block("planning-decode-accuracy", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
