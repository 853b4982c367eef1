"""The planning benchmark's table, its verdict lines and its run times, as Markdown.

Per scenario and engines, one row per policy: SLA attainment (and TTFT, ITL alone), GPU-hours,
GPU-hours over the clairvoyant's and over the best fixed fleet's, goodput (requests meeting
both targets) per GPU-hour, scaling actions, TTFT and ITL p99; then the lower bound. Under each
scenario, a verdict per engines for ``slaplanner``: attainment against the goal, cost against
1.10 x the clairvoyant, against the best fixed fleet, and against ``dynamo-tuned``.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.planning_benchmark import Bench

CLAIRVOYANT_MARGIN = 1.10  # slaplanner's cost target, over the clairvoyant's
Rows = dict[tuple[str, float, str], dict[str, Any]]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _num(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def _ratio(row: dict[str, Any], other: dict[str, Any] | None) -> float | None:
    if other is None or "gpu_hours" not in other or not other["gpu_hours"]:
        return None
    return float(row["gpu_hours"]) / float(other["gpu_hours"])


def goodput_per_gpu_hour(row: dict[str, Any]) -> float | None:
    """Requests meeting both targets per GPU-hour."""
    if not row.get("gpu_hours") or row.get("sla_attainment") is None:
        return None
    return float(row["sla_attainment"]) * float(row["requests"]) / float(row["gpu_hours"])


def engines_label(skew: float) -> str:
    return "as profiled" if skew == 1.0 else f"{100 * (skew - 1):.0f} % slower"


def progress(row: dict[str, Any]) -> str:
    status = row.get("skipped") or (
        f"SLA {_pct(row['sla_attainment'])}, {row['gpu_hours']:.3f} GPU-h, "
        f"{row['scaling_actions']} actions, {row.get('wall_s', 0.0):.1f} s"
        + (" (cached)" if row.get("cached") else "")
    )
    return f"{row['scenario']} skew {row['perf_skew']:g} {row['policy']}: {status}"


def _by_planner(bench: Bench, rows: Rows, scenario: str, skew: float,
                planner: str) -> dict[str, Any] | None:
    policy = next((p for p in bench.policies if p.planner == planner), None)
    if policy is None:
        return None
    row = rows.get((scenario, skew, policy.name))
    return None if row is None or "skipped" in row else row


def render(bench: Bench, rows: list[dict[str, Any]], wall_s: float, jobs: int) -> str:
    by: Rows = {(r["scenario"], r["perf_skew"], r["policy"]): r for r in rows}
    lines: list[str] = []
    for scenario in bench.scenarios:
        lines += [f"#### {scenario.name}", "", scenario.describe() + ".", ""]
        lines += [
            "| engines | policy | SLA attainment | TTFT met | ITL met | GPU-hours | "
            "x clairvoyant | x best fixed | goodput / GPU-h | scaling actions | TTFT p99 | "
            "ITL p99 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        verdicts: list[str] = []
        found: list[str] = []
        for skew in bench.skews:
            engines = engines_label(skew)
            cv = _by_planner(bench, by, scenario.name, skew, "clairvoyant")
            fixed = _by_planner(bench, by, scenario.name, skew, "best-fixed")
            lower = None
            for policy in bench.policies:
                row = by.get((scenario.name, skew, policy.name))
                if row is None:
                    continue
                if "skipped" in row:
                    lines.append(f"| {engines} | {policy.name} | not run: {row['skipped']} "
                                 "| | | | | | | | | |")
                    continue
                lower = row["lower_bound_gpu_hours"]
                lines.append(
                    f"| {engines} | {policy.name} | {_pct(row['sla_attainment'])} | "
                    f"{_pct(row['ttft_attainment'])} | {_pct(row['itl_attainment'])} | "
                    f"{row['gpu_hours']:.3f} | {_num(_ratio(row, cv), '.2f')} | "
                    f"{_num(_ratio(row, fixed), '.2f')} | "
                    f"{_num(goodput_per_gpu_hour(row), ',.0f')} | {row['scaling_actions']} | "
                    f"{_num(row['ttft_p99_s'], '.3f')} s | {_num(row['itl_p99_s'], '.4f')} s |"
                )
            if lower is not None:
                low = {"gpu_hours": lower}
                lines.append(
                    f"| {engines} | lower bound (no queueing, instant startup) | | | | "
                    f"{lower:.3f} | {_num(_ratio(low, cv), '.2f')} | "
                    f"{_num(_ratio(low, fixed), '.2f')} | | | | |"
                )
            verdicts += verdict(bench, by, scenario.name, skew)
            found += references_found(bench, by, scenario.name, skew)
        lines += ["", *verdicts, "", *found, ""]
    lines += [run_times(bench, rows, wall_s, jobs)]
    return "\n".join(lines)


def verdict(bench: Bench, rows: Rows, scenario: str, skew: float) -> list[str]:
    """``slaplanner`` against the goal, the clairvoyant, the best fixed fleet and the tuned
    Dynamo, in one line; honest where it misses."""
    ours = _by_planner(bench, rows, scenario, skew, "slaplanner")
    engines = engines_label(skew)
    if ours is None:
        return [f"- **Verdict, engines {engines}:** `slaplanner` not run."]
    goal = bench.goal
    attainment = float(ours["sla_attainment"])
    parts = [
        f"attainment {_pct(attainment)} ({'meets' if attainment >= goal else 'misses'} "
        f"{100 * goal:g} %)"
    ]
    cv = _by_planner(bench, rows, scenario, skew, "clairvoyant")
    ratio = _ratio(ours, cv)
    if ratio is not None:
        parts.append(
            f"{ratio:.2f} x the clairvoyant ({'within' if ratio <= CLAIRVOYANT_MARGIN else 'over'}"
            f" {CLAIRVOYANT_MARGIN:.2f} x)"
        )
    fixed = _by_planner(bench, rows, scenario, skew, "best-fixed")
    ratio = _ratio(ours, fixed)
    if ratio is not None and fixed is not None:
        cheaper = "cheaper than" if ratio < 1 else "no cheaper than"
        parts.append(f"{ratio:.2f} x the best fixed fleet ({cheaper} it"
                     + ("" if attainment >= float(fixed["sla_attainment"]) else
                        ", at lower attainment") + ")")
    tuned = _by_planner(bench, rows, scenario, skew, "dynamo-tuned")
    if tuned is not None:
        theirs = float(tuned["sla_attainment"])
        ratio = _ratio(ours, tuned)
        if attainment >= theirs and ratio is not None and ratio <= 1:
            how = f"beats `dynamo-tuned` ({_pct(theirs)} at {ratio:.2f} x its cost)"
        elif attainment >= theirs:
            how = (f"as good as `dynamo-tuned` ({_pct(theirs)}) but {_num(ratio, '.2f')} x its "
                   "cost")
        else:
            how = (f"below `dynamo-tuned`'s attainment ({_pct(theirs)}, at "
                   f"{_num(ratio, '.2f')} x its cost)")
        parts.append(how)
    return [f"- **Verdict, engines {engines}:** `slaplanner` " + "; ".join(parts) + "."]


def references_found(bench: Bench, rows: Rows, scenario: str, skew: float) -> list[str]:
    """What the searched references settled on."""
    out = []
    fixed = _by_planner(bench, rows, scenario, skew, "best-fixed")
    tuned = _by_planner(bench, rows, scenario, skew, "dynamo-tuned")
    cv = _by_planner(bench, rows, scenario, skew, "clairvoyant")
    parts = []
    if cv is not None and "detail" in cv:
        d = cv["detail"]
        seconds = d.get("cpu_seconds", {})
        parts.append(
            f"clairvoyant starts with {cv['start_replicas'][0]} P + {cv['start_replicas'][1]} D"
            + ("" if d.get("reached_goal", True) else ", goal not reached")
            + f" ({_rounds(len(d.get('rounds', [])))}, CPU s: tables "
            f"{seconds.get('tables', 0.0):.1f}, plans {seconds.get('plan', 0.0):.1f}, "
            f"simulations {seconds.get('simulate', 0.0):.1f})"
        )
    if fixed is not None and "detail" in fixed:
        d = fixed["detail"]
        parts.append(f"best fixed {d['prefill']} P + {d['decode']} D"
                     + ("" if d.get("reached_goal", True) else " (goal not reached)"))
    if tuned is not None and "detail" in tuned:
        d = tuned["detail"]
        parts.append(
            f"dynamo-tuned: prefill headroom {d['prefill_headroom']:g}, floors "
            f"{d['min_prefill']} P / {d['min_decode']} D, ITL planned at "
            f"{d['planned_itl_share']:g} x the target"
            + ("" if d.get("reached_goal", True) else " (no setting reached the goal)")
        )
    if parts:
        out.append(f"- References, engines {engines_label(skew)}: " + "; ".join(parts) + ".")
    return out


def _rounds(count: int) -> str:
    return f"{count} round" + ("" if count == 1 else "s")


def run_times(bench: Bench, rows: list[dict[str, Any]], wall_s: float, jobs: int) -> str:
    """CPU seconds of one run per policy and scenario (median over the engines; the machine is
    shared, so CPU time is the measure): for the searched references, of the search and its
    validating runs, marked where this regeneration read them from the cache."""
    header = "| policy | " + " | ".join(s.name for s in bench.scenarios) + " |"
    cpu = sum(r.get("cpu_s", 0.0) for r in rows)
    searched = sum(r.get("search_cpu_s", 0.0) for r in rows if r.get("cached"))
    lines = [
        f"{len(rows)} runs in {wall_s:.0f} s of wall time ({jobs} processes) and {cpu:.0f} s "
        f"of CPU time; the cached searches had cost {searched:.0f} s of CPU time more. CPU "
        "seconds of one run (median over the engines); for the searched references, of their "
        "search with its validating runs (\"cached\": read from the cache this time):",
        "",
        header,
        "|---|" + "---:|" * len(bench.scenarios),
    ]
    for policy in bench.policies:
        cells = []
        for scenario in bench.scenarios:
            mine = [r for r in rows if r["policy"] == policy.name
                    and r["scenario"] == scenario.name and "skipped" not in r]
            if not mine:
                cells.append("-")
                continue
            times = [r.get("search_cpu_s", r.get("cpu_s", 0.0)) for r in mine]
            cached = all(r.get("cached") for r in mine)
            cells.append(f"{statistics.median(times):.1f}" + (" (cached)" if cached else ""))
        lines.append(f"| {policy.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
