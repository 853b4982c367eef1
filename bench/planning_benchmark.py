"""The planning benchmark: every policy on every scenario, through the simulator's closed loop.

For each scenario of ``bench/planning_config.toml`` (the bundled real traces, sped up, and
Dynamo's sine scenario), with engines as profiled and 20 % slower, each policy runs the trace in
the simulated cluster; the table gives SLA attainment, GPU-hours, GPU-hours over the lower bound,
and scaling actions. Decider policies run through the real forecaster, decider and actuator
cores (``sim.loop.ServicePlanner``); the static and reactive baselines are the simulator's.

Usage, from the repository root::

    python -m bench.planning_benchmark            # rewrites the table in docs/benchmarks.md
    python -m bench.planning_benchmark --no-docs --json results.json --jobs 2

Results are deterministic (seeded); only the wall times vary.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import tomllib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from bench import planning_docs
from services.decider import knobs as knob_model
from services.decider import registry
from services.forecaster.settings import ForecasterSettings
from shared import traces
from shared.perf_model import Profile, default_profile_path, load_profile
from shared.settings import parse_duration_s
from sim import options, progress
from sim.cluster import ClusterConfig
from sim.loop import BASELINES, PlanningSetup, simulate
from sim.synth import DYNAMO_SINE, generate

CONFIG = Path(__file__).resolve().parent / "planning_config.toml"
SYNTHETIC = {"dynamo-sine": DYNAMO_SINE}


@dataclass(frozen=True)
class Scenario:
    name: str
    source: str  # a bundled trace file, or a synthetic scenario's name
    synthetic: bool
    speedup: float
    interval_s: float
    startup_delay_s: float
    ttft_s: float
    itl_s: float

    def describe(self) -> str:
        what = (
            "Dynamo's sine scenario (12 to 36 requests/s, period 600 s, 1,800 s, ISL 3000 / "
            "OSL 300)"
            if self.synthetic
            else f"`{self.source}` x{self.speedup:g}"
        )
        return (
            f"{what}; interval {self.interval_s:g} s, startup delay {self.startup_delay_s:g} s, "
            f"TTFT target {_duration(self.ttft_s)}, ITL target {_duration(self.itl_s)}"
        )


@dataclass(frozen=True)
class Policy:
    name: str
    planner: str
    predictor: str
    # planner knobs by name (docs/decider.md); text may name "{startup_delay_s}" and
    # "{interval_s}", the scenario's values
    knobs: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Bench:
    scenarios: tuple[Scenario, ...]
    policies: tuple[Policy, ...]
    skews: tuple[float, ...]
    max_gpu_budget: int
    decode_slice_s: float
    warm_start: str  # "sla", "lower-bound" or "none" (see planning_config.toml)
    seed: int


WARM_STARTS = ("sla", "lower-bound", "none")


def _warm_start(value: object) -> str:
    if value is True:
        return "lower-bound"
    if value is False:
        return "none"
    if value not in WARM_STARTS:
        raise ValueError(f"warm_start must be one of {', '.join(WARM_STARTS)}, got {value!r}")
    return str(value)


@lru_cache(maxsize=32)
def start_counts(bench: Bench, scenario: Scenario, skew: float) -> tuple[int, int] | None:
    """The counts every policy but the static peak starts with (None: the loop's own rule)."""
    if bench.warm_start != "sla":
        return None
    from bench import planning_feasibility  # it builds on this module

    return planning_feasibility.sla_start_counts(bench, scenario, skew)


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:g} ms" if seconds < 1 else f"{seconds:g} s"


def load_config(path: Path) -> Bench:
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    defaults = raw.get("defaults", {})
    scenarios = []
    for entry in raw["scenario"]:
        synthetic = "synthetic" in entry
        source = entry["synthetic"] if synthetic else entry["trace"]
        if synthetic and source not in SYNTHETIC:
            raise ValueError(f"{path}: unknown synthetic scenario {source!r}")
        scenarios.append(Scenario(
            name=entry["name"],
            source=source,
            synthetic=synthetic,
            speedup=float(entry.get("speedup", 1.0)),
            interval_s=parse_duration_s(entry["interval"]),
            startup_delay_s=parse_duration_s(entry["startup_delay"]),
            ttft_s=parse_duration_s(entry["ttft"]),
            itl_s=parse_duration_s(entry["itl"]),
        ))
    default_predictor = str(ForecasterSettings.model_fields["predictor"].default)
    policies = []
    for entry in raw["policy"]:
        predictor = entry.get("predictor", "constant")
        knobs = dict(entry.get("knobs", {}))
        # the former spelling: SLAPLANNER_* variables, each a knob's
        knobs.update(options.knob_assignments(
            [f"{name}={value}" for name, value in entry.get("decider_env", {}).items()]
        ))
        unknown = sorted(set(knobs) - set(knob_model.KNOB_SPECS))
        if unknown:
            raise ValueError(f"{path}: policy {entry['name']!r}: unknown knob {unknown[0]!r}")
        policies.append(Policy(
            name=entry["name"],
            planner=entry["planner"],
            predictor=default_predictor if predictor == "default" else predictor,
            knobs=tuple(sorted(knobs.items())),
        ))
    return Bench(
        scenarios=tuple(scenarios),
        policies=tuple(policies),
        skews=tuple(float(s) for s in defaults.get("perf_skews", [1.0, 1.2])),
        max_gpu_budget=int(defaults.get("max_gpu_budget", 32)),
        decode_slice_s=parse_duration_s(defaults.get("decode_slice", "250ms")),
        warm_start=_warm_start(defaults.get("warm_start", "sla")),
        seed=int(defaults.get("seed", 0)),
    )


@lru_cache(maxsize=8)
def _trace(scenario: Scenario) -> traces.Trace:
    if scenario.synthetic:
        return generate(SYNTHETIC[scenario.source], name=scenario.source)
    return traces.load_trace(traces.bundled_trace_path(scenario.source)).sped_up(scenario.speedup)


@lru_cache(maxsize=1)
def _profile() -> Profile:
    return load_profile(default_profile_path())


def run_one(bench: Bench, scenario: Scenario, skew: float, policy: Policy) -> dict[str, Any]:
    """One cell of the table; a policy the decider does not know is reported, not run."""
    row: dict[str, Any] = {
        "scenario": scenario.name, "perf_skew": skew, "policy": policy.name,
        "planner": policy.planner, "predictor": policy.predictor,
    }
    if policy.planner not in BASELINES and policy.planner not in registry.POLICIES:
        row["skipped"] = (
            f"policy {policy.planner!r} is not registered in services/decider/registry.py"
        )
        return row
    own = {
        key: value.format(startup_delay_s=scenario.startup_delay_s,
                          interval_s=scenario.interval_s) if isinstance(value, str) else value
        for key, value in policy.knobs
    }
    knobs: dict[str, Any] = {
        "policy": "dynamo" if policy.planner in BASELINES else policy.planner,
        "ttft_target_s": scenario.ttft_s,
        "itl_target_s": scenario.itl_s,
        "adjustment_interval_s": scenario.interval_s,
        "max_total_gpus": bench.max_gpu_budget,
        # An operator tells the policy how long its workers take to start (dynamo ignores it).
        "worker_startup_s": scenario.startup_delay_s,
    }
    setup = PlanningSetup.build(predictor=policy.predictor, **(knobs | own))
    config = ClusterConfig(
        startup_delay_s=scenario.startup_delay_s,
        perf_skew=skew,
        seed=bench.seed,
        decode_slice_s=bench.decode_slice_s,
    )
    start = start_counts(bench, scenario, skew)
    started = time.perf_counter()
    run = simulate(_trace(scenario), _profile(), setup, config, policy.planner,
                   warm_start=bench.warm_start != "none", start=start)
    row.update(run.scores)
    row["scaling_actions"] = run.scaling_actions
    row["start_replicas"] = list(run.start)
    row["peak_lower_bound"] = list(run.needs.peak())
    row["wall_s"] = time.perf_counter() - started
    return row


def beats(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """Higher attainment at no more GPU-hours, or fewer GPU-hours at no lower attainment."""
    a, b = ours["sla_attainment"], theirs["sla_attainment"]
    g, h = ours["gpu_hours"], theirs["gpu_hours"]
    return (a > b and g <= h) or (g < h and a >= b)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(
        value, fmt
    )


def render(bench: Bench, rows: list[dict[str, Any]], wall_s: float, jobs: int) -> str:
    lines: list[str] = []
    by = {(r["scenario"], r["perf_skew"], r["policy"]): r for r in rows}
    verdicts: list[str] = []
    for scenario in bench.scenarios:
        lines += [f"#### {scenario.name}", "", scenario.describe() + ".", ""]
        lines += [
            "| engines | policy | SLA attainment | TTFT met | ITL met | GPU-hours | "
            "/ lower bound | scaling actions | TTFT p99 | ITL p99 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for skew in bench.skews:
            engines = "as profiled" if skew == 1.0 else f"{100 * (skew - 1):.0f} % slower"
            lower = None
            for policy in bench.policies:
                row = by[(scenario.name, skew, policy.name)]
                if "skipped" in row:
                    lines.append(f"| {engines} | {policy.name} | not run: {row['skipped']} "
                                 "| | | | | | | |")
                    continue
                lower = row["lower_bound_gpu_hours"]
                lines.append(
                    f"| {engines} | {policy.name} | {_pct(row['sla_attainment'])} | "
                    f"{_pct(row['ttft_attainment'])} | {_pct(row['itl_attainment'])} | "
                    f"{row['gpu_hours']:.3f} | {_num(row['gpu_hours_over_lower_bound'], '.2f')} | "
                    f"{row['scaling_actions']} | {_num(row['ttft_p99_s'], '.3f')} s | "
                    f"{_num(row['itl_p99_s'], '.4f')} s |"
                )
            if lower is not None:
                lines.append(f"| {engines} | lower bound | | | | {lower:.3f} | 1.00 | | | |")
            verdicts += _verdicts(bench, scenario.name, skew, engines, by)
        lines.append("")
    if verdicts:
        lines += ["#### `slaplanner` against the targets of the issue", "", *verdicts, ""]
    walls = [r["wall_s"] for r in rows if "wall_s" in r]
    per_policy = []
    for policy in bench.policies:
        times = [r["wall_s"] for r in rows if r["policy"] == policy.name and "wall_s" in r]
        if times:
            per_policy.append(f"{policy.name} {statistics.median(times):.1f} s")
    lines.append(
        f"{len(walls)} runs in {wall_s:.0f} s ({jobs} processes); median wall time of one run: "
        + ", ".join(per_policy) + "."
    )
    return "\n".join(lines)


def _verdicts(
    bench: Bench, scenario: str, skew: float, engines: str,
    by: dict[tuple[str, float, str], dict[str, Any]],
) -> list[str]:
    ours_policy = next((p for p in bench.policies if p.planner == "slaplanner"), None)
    if ours_policy is None:
        return []
    ours = by[(scenario, skew, ours_policy.name)]
    if "skipped" in ours:
        return [f"- {scenario}, engines {engines}: not run ({ours['skipped']})."]
    attain = ours["sla_attainment"] >= 0.99
    ratio = ours["gpu_hours_over_lower_bound"]
    cheap = ratio is not None and ratio <= 1.3
    dynamos = [p for p in bench.policies if p.planner == "dynamo"]
    beaten = [p.name for p in dynamos if beats(ours, by[(scenario, skew, p.name)])]
    return [
        f"- {scenario}, engines {engines}: attainment {_pct(ours['sla_attainment'])} "
        f"({'meets' if attain else 'misses'} 99 %), {_num(ratio, '.2f')} x the lower bound "
        f"({'meets' if cheap else 'misses'} 1.3 x), beats "
        f"{', '.join(beaten) if beaten else 'none'} of {len(dynamos)} Dynamo rows."
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.planning_benchmark",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--jobs", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--json", dest="json_out", help="write every row here")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument("--only", action="append", default=[], help="scenario name (repeatable)")
    args = parser.parse_args(argv)
    bench = load_config(Path(args.config))
    if args.only:
        unknown = set(args.only) - {s.name for s in bench.scenarios}
        if unknown:
            print(f"unknown scenario(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        bench = replace(bench, scenarios=tuple(s for s in bench.scenarios if s.name in args.only))
    cells = [(s, k, p) for s in bench.scenarios for k in bench.skews for p in bench.policies]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, bench, s, k, p) for s, k, p in cells]
        rows = []
        for done, future in enumerate(futures, 1):
            row = future.result()
            rows.append(row)
            status = row.get("skipped") or (
                f"SLA {_pct(row['sla_attainment'])}, {row['gpu_hours']:.3f} GPU-h "
                f"({_num(row['gpu_hours_over_lower_bound'], '.2f')} x), "
                f"{row['scaling_actions']} actions, {row['wall_s']:.1f} s"
            )
            so_far = progress.eta_text(done, len(cells), time.perf_counter() - started, "runs")
            print(f"[{so_far}] {row['scenario']} skew {row['perf_skew']:g} {row['policy']}: "
                  f"{status}",
                  flush=True)
    wall = time.perf_counter() - started
    text = render(bench, rows, wall, args.jobs)
    print("\n" + text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    if not args.no_docs:
        planning_docs.replace_block("planning-benchmark", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
