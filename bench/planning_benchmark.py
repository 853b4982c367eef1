"""The planning benchmark: every policy on every scenario, through the simulator's closed loop.

For each scenario of ``bench/planning_config.toml`` (the bundled real traces, sped up, once and
back to back; Dynamo's sine scenario; a working day, a flash crowd and a slow ramp), with
engines as profiled and 20 % slower, each policy runs the trace in the simulated cluster. The
table (``bench.planning_report``) measures each against the clairvoyant reference (the cheapest
schedule that reaches the attainment goal knowing every request, ``sim.clairvoyant``) and the
best fixed fleet. Decider policies run through the real forecaster, decider and actuator cores
(``sim.loop.ServicePlanner``); the static and reactive baselines are the simulator's; the
references are ``sim.references``. Every run but the static peak's and the fixed fleets' starts
with the clairvoyant's fleet at time 0. The searched references are cached
(``bench.planning_cache``).

Usage, from the repository root::

    python -m bench.planning_benchmark            # rewrites the table in docs/benchmarks.md
    python -m bench.planning_benchmark --no-docs --json results.json --jobs 2 --only day

Results are deterministic (seeded); only the wall times vary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import tomllib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from bench import planning_docs, planning_report
from bench.planning_cache import CACHE as CACHE_DIR
from bench.planning_cache import Cache
from services.decider import knobs as knob_model
from services.decider import registry
from services.forecaster import predictors
from services.forecaster.settings import PREDICTOR_NAMES, ForecasterSettings
from shared import traces
from shared.perf_model import Profile, default_profile_path, load_profile
from shared.settings import parse_duration_s
from sim import clairvoyant, options, progress, references
from sim.cluster import ClusterConfig
from sim.loop import BASELINES, PlanningSetup, simulate
from sim.synth import DYNAMO_SINE, SHAPES, generate, shaped_trace

CONFIG = Path(__file__).resolve().parent / "planning_config.toml"
SYNTHETIC = ("dynamo-sine", *SHAPES)
# References whose search is cached; their rows are their validated runs.
SEARCHED = ("clairvoyant", "best-fixed", "dynamo-tuned")


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
    repeat: int = 1  # a bundled trace played this many times back to back
    rate: float | None = None  # a shaped scenario's rate (sim.synth.DEFAULT_RATES if None)
    decode_slice_s: float | None = None  # the default's, if None

    def describe(self) -> str:
        if self.source == "dynamo-sine":
            what = ("Dynamo's sine scenario (12 to 36 requests/s, period 600 s, 1,800 s, "
                    "ISL 3000 / OSL 300)")
        elif self.synthetic:
            rate = f" --rate {self.rate:g}" if self.rate is not None else ""
            what = f"`slaplanner trace synth --shape {self.source}{rate}`"
        else:
            what = f"`{self.source}` x{self.speedup:g}"
            if self.repeat > 1:
                what += f", played {self.repeat} times back to back"
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
    warm_start: str  # "clairvoyant", "lower-bound" or "none" (see planning_config.toml)
    seed: int
    goal: float = 0.99


WARM_STARTS = ("clairvoyant", "lower-bound", "none")


def _warm_start(value: object) -> str:
    if value is True:
        return "lower-bound"
    if value is False:
        return "none"
    if value not in WARM_STARTS:
        raise ValueError(f"warm_start must be one of {', '.join(WARM_STARTS)}, got {value!r}")
    return str(value)


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:g} ms" if seconds < 1 else f"{seconds:g} s"


def _check_predictor(path: Path, policy: Policy) -> None:
    """A decider policy's predictor exists and its optional extra is installed: said before
    the first run, not as a traceback from a worker process."""
    if policy.planner not in registry.POLICIES:
        return  # the baselines and references forecast nothing
    where = f"{path}: policy {policy.name!r}: predictor {policy.predictor!r}"
    if policy.predictor not in PREDICTOR_NAMES:
        raise ValueError(f"{where} is unknown; one of {', '.join(PREDICTOR_NAMES)}")
    try:
        predictors.ensure_available(policy.predictor)
    except predictors.PredictorUnavailable as exc:
        raise ValueError(f"{where}: {exc}") from None


def load_config(path: Path) -> Bench:
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    defaults = raw.get("defaults", {})
    scenarios = []
    for entry in raw["scenario"]:
        synthetic = "synthetic" in entry
        source = entry["synthetic"] if synthetic else entry["trace"]
        if synthetic and source not in SYNTHETIC:
            raise ValueError(f"{path}: unknown synthetic scenario {source!r}; known: "
                             + ", ".join(SYNTHETIC))
        scenarios.append(Scenario(
            name=entry["name"],
            source=source,
            synthetic=synthetic,
            speedup=float(entry.get("speedup", 1.0)),
            interval_s=parse_duration_s(entry["interval"]),
            startup_delay_s=parse_duration_s(entry["startup_delay"]),
            ttft_s=parse_duration_s(entry["ttft"]),
            itl_s=parse_duration_s(entry["itl"]),
            repeat=int(entry.get("repeat", 1)),
            rate=float(entry["rate"]) if "rate" in entry else None,
            decode_slice_s=parse_duration_s(entry["decode_slice"])
            if "decode_slice" in entry else None,
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
        policy = Policy(
            name=entry["name"],
            planner=entry["planner"],
            predictor=default_predictor if predictor == "default" else predictor,
            knobs=tuple(sorted(knobs.items())),
        )
        _check_predictor(path, policy)
        policies.append(policy)
    return Bench(
        scenarios=tuple(scenarios),
        policies=tuple(policies),
        skews=tuple(float(s) for s in defaults.get("perf_skews", [1.0, 1.2])),
        max_gpu_budget=int(defaults.get("max_gpu_budget", 32)),
        decode_slice_s=parse_duration_s(defaults.get("decode_slice", "250ms")),
        warm_start=_warm_start(defaults.get("warm_start", "clairvoyant")),
        seed=int(defaults.get("seed", 0)),
        goal=clairvoyant.check_goal(float(defaults.get("goal", 0.99))),
    )


def back_to_back(trace: traces.Trace, times: int, interval_s: float) -> traces.Trace:
    """``trace`` played ``times`` times, each copy starting at the first interval boundary after
    the previous one's last request."""
    if times <= 1:
        return trace
    period = (math.floor(float(trace.arrival_s[-1]) / interval_s) + 1) * interval_s
    return traces.Trace(
        np.concatenate([trace.arrival_s + i * period for i in range(times)]),
        np.tile(trace.isl_tokens, times), np.tile(trace.osl_tokens, times), trace.name,
    )


@lru_cache(maxsize=4)
def _trace(scenario: Scenario) -> traces.Trace:
    if scenario.source == "dynamo-sine":
        return generate(DYNAMO_SINE, name=scenario.source)
    if scenario.synthetic:
        return shaped_trace(scenario.source, scenario.rate)
    trace = traces.load_trace(traces.bundled_trace_path(scenario.source)).sped_up(scenario.speedup)
    return back_to_back(trace, scenario.repeat, scenario.interval_s)


@lru_cache(maxsize=1)
def _profile() -> Profile:
    return load_profile(default_profile_path())


def _setup(bench: Bench, scenario: Scenario, policy: Policy) -> PlanningSetup:
    own = {
        key: value.format(startup_delay_s=scenario.startup_delay_s,
                          interval_s=scenario.interval_s) if isinstance(value, str) else value
        for key, value in policy.knobs
    }
    knobs: dict[str, Any] = {
        "policy": policy.planner if policy.planner in registry.POLICIES else "dynamo",
        "ttft_target_s": scenario.ttft_s,
        "itl_target_s": scenario.itl_s,
        "adjustment_interval_s": scenario.interval_s,
        "max_total_gpus": bench.max_gpu_budget,
        # An operator tells the policy how long its workers take to start (dynamo ignores it).
        "worker_startup_s": scenario.startup_delay_s,
    }
    return PlanningSetup.build(predictor=policy.predictor, **(knobs | own))


def _config(bench: Bench, scenario: Scenario, skew: float) -> ClusterConfig:
    return ClusterConfig(
        startup_delay_s=scenario.startup_delay_s,
        perf_skew=skew,
        seed=bench.seed,
        decode_slice_s=scenario.decode_slice_s or bench.decode_slice_s,
    )


def _scored(run: Any, row: dict[str, Any]) -> dict[str, Any]:
    row.update(run.scores)
    row["scaling_actions"] = run.scaling_actions
    row["start_replicas"] = list(run.start)
    row["peak_lower_bound"] = list(run.needs.peak())
    return row


def searched(
    bench: Bench, scenario: Scenario, skew: float, planner: str, start: tuple[int, int] | None,
    cache: Cache,
) -> dict[str, Any]:
    """A searched reference's row: from the cache, or searched, validated and cached."""
    policy = Policy(planner, planner, "constant")
    setup, config = _setup(bench, scenario, policy), _config(bench, scenario, skew)
    settings = {"setup": repr(setup), "config": repr(config), "goal": bench.goal,
                "start": list(start) if start else None}
    key = cache.key(planner, _trace(scenario), Path(setup.knobs.profile_path), settings)
    entry = cache.get(key)
    if entry is not None:
        return {**entry, "cached": True}
    started, cpu = time.perf_counter(), time.process_time()
    found = references.run(planner, _trace(scenario), _profile(), setup, config, goal=bench.goal,
                           start=start)
    entry = _scored(found.run, {"detail": found.detail})
    entry["search_wall_s"] = time.perf_counter() - started
    entry["search_cpu_s"] = time.process_time() - cpu
    cache.put(key, entry)
    return {**entry, "cached": False}


def run_one(
    bench: Bench, scenario: Scenario, skew: float, policy: Policy,
    start: tuple[int, int] | None = None, cache: Cache | None = None,
) -> dict[str, Any]:
    """One cell of the table; a policy the decider does not know is reported, not run.

    ``start``: the clairvoyant's fleet at time 0, which every run but the static peak's and the
    fixed fleets' starts with (``warm_start = "clairvoyant"``)."""
    row: dict[str, Any] = {
        "scenario": scenario.name, "perf_skew": skew, "policy": policy.name,
        "planner": policy.planner, "predictor": policy.predictor,
    }
    known = (*BASELINES, *references.NAMES)
    if policy.planner not in known and policy.planner not in registry.POLICIES:
        row["skipped"] = (
            f"policy {policy.planner!r} is not registered in services/decider/registry.py"
        )
        return row
    started, cpu = time.perf_counter(), time.process_time()
    if policy.planner in SEARCHED:
        row.update(searched(bench, scenario, skew, policy.planner,
                            None if policy.planner == "best-fixed" else start,
                            cache or Cache()))
    elif policy.planner in references.NAMES:
        found = references.run(
            policy.planner, _trace(scenario), _profile(), _setup(bench, scenario, policy),
            _config(bench, scenario, skew), goal=bench.goal, start=start,
        )
        _scored(found.run, row)
        row["detail"] = found.detail
    else:
        run = simulate(_trace(scenario), _profile(), _setup(bench, scenario, policy),
                       _config(bench, scenario, skew), policy.planner,
                       warm_start=bench.warm_start != "none", start=start)
        _scored(run, row)
    row["wall_s"] = time.perf_counter() - started
    row["cpu_s"] = time.process_time() - cpu
    return row


def clairvoyant_start(
    bench: Bench, scenario: Scenario, skew: float, cache: Cache
) -> tuple[tuple[int, int], dict[str, Any]]:
    """The clairvoyant's row, and its fleet at time 0 (where the others start)."""
    row = run_one(bench, scenario, skew, Policy("clairvoyant", "clairvoyant", "constant"),
                  cache=cache)
    start = row["start_replicas"]
    return (int(start[0]), int(start[1])), row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.planning_benchmark",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--jobs", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--json", dest="json_out", help="write every row here")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument("--only", action="append", default=[], help="scenario name (repeatable)")
    parser.add_argument("--no-cache", action="store_true",
                        help="search the references again (and cache the results)")
    parser.add_argument("--cache-dir", default=str(CACHE_DIR),
                        help="where the searched references are cached (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        bench = load_config(Path(args.config))
    except (ValueError, OSError) as exc:  # TOMLDecodeError is a ValueError
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"{parser.prog}: {args.config}: a scenario or policy lacks the key {exc}",
              file=sys.stderr)
        return 2
    if args.only:
        unknown = set(args.only) - {s.name for s in bench.scenarios}
        if unknown:
            print(f"unknown scenario(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        bench = replace(bench, scenarios=tuple(s for s in bench.scenarios if s.name in args.only))
    cache = Cache(Path(args.cache_dir), enabled=not args.no_cache)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        # The clairvoyant first: every other run starts with its fleet. The longest scenarios
        # go first so that the short ones fill the other process meanwhile.
        cells = sorted(((s, k) for s in bench.scenarios for k in bench.skews),
                       key=lambda cell: -len(_trace(cell[0])))
        starts = {(s.name, k): pool.submit(clairvoyant_start, bench, s, k, cache)
                  for s, k in cells}
        futures: list[Any] = []
        for scenario, skew in cells:
            start, row = starts[scenario.name, skew].result()
            for policy in bench.policies:
                if policy.planner == "clairvoyant":
                    futures.append(_done({**row, "policy": policy.name, "wall_s": 0.0}))
                    continue
                use = start if bench.warm_start == "clairvoyant" else None
                futures.append(pool.submit(run_one, bench, scenario, skew, policy, use, cache))
        total = len(cells) * len(bench.policies)
        # Each run's result as it comes (the log of a long run); on a terminal, a progress line
        # under them.
        bar = progress.Progress(parser.prog, unit="runs")
        bar(0, total)
        try:
            for done, future in enumerate(futures, 1):
                row = future.result()
                rows.append(row)
                bar.above(planning_report.progress(row))
                bar(done, total)
        finally:
            bar.close()
    wall = time.perf_counter() - started
    text = planning_report.render(bench, rows, wall, args.jobs)
    print("\n" + text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    if not args.no_docs:
        planning_docs.replace_block("planning-benchmark", text)
    return 0


class _done:
    """A result already in hand, with a future's ``result``."""

    def __init__(self, value: dict[str, Any]) -> None:
        self.value = value

    def result(self) -> dict[str, Any]:
        return self.value


if __name__ == "__main__":
    sys.exit(main())
