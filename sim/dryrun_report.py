"""The dry run's report: the interval table with its marks, and the plot of load, forecast and
replicas (``slaplanner dry-run``, ``sim/dryrun.py``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sim.dryrun import DryRunResult


def budget_mark(explanation: dict[str, Any] | None) -> str:
    """'!' where the counts exceed the GPU budget (Dynamo's own cut, kept exactly), '~' where the
    budget guard changed Dynamo's counts to stay within it, '' otherwise."""
    budget = explanation.get("gpu_budget") if explanation else None
    if not isinstance(budget, dict) or not budget.get("dynamo_cut_exceeds_budget"):
        return ""
    return "!" if budget.get("final_gpus", 0) > budget.get("max_gpus", 0) else "~"


STABILISED = "scale_down_stabilised"


def _policy_marks(result: DryRunResult) -> list[str]:
    """'S' where stabilisation held a role above its need, 'F' where the fast path scaled up
    during the interval."""
    fired = [t for t, _, _ in result.fast_path]
    marks = []
    for i, start in enumerate(result.time):
        end = result.time[i + 1] if i + 1 < len(result.time) else math.inf
        mark = ""
        if STABILISED in (result.prefill_bound_by[i], result.decode_bound_by[i]):
            mark += "S"
        if any(start < t <= end for t in fired):
            mark += "F"
        marks.append(mark)
    return marks


def format_table(result: DryRunResult) -> str:
    header = (
        f"{'time_s':>9} {'rr':>7} {'est_rr':>8} {'isl':>9} {'est_isl':>9} "
        f"{'osl':>7} {'est_osl':>8} {'num_p':>6} {'num_d':>6}"
    )
    lines = [header]
    marks = [budget_mark(e) for e in result.explanations]
    policy_marks = _policy_marks(result)
    for i in range(len(result.time)):
        mark = (marks[i] + policy_marks[i]).strip()
        lines.append(
            f"{result.time[i]:>9.1f} {result.rr[i]:>7.0f} {result.est_rr[i]:>8.1f} "
            f"{result.isl[i]:>9.1f} {result.est_isl[i]:>9.1f} {result.osl[i]:>7.1f} "
            f"{result.est_osl[i]:>8.1f} {result.num_p[i]:>6d} {result.num_d[i]:>6d}"
            + (f" {mark}" if mark else "")
        )
    replica_intervals = sum(p + d for p, d in zip(result.num_p, result.num_d, strict=True))
    lines.append(
        f"{len(result.time)} intervals; replica-intervals (prefill + decode): {replica_intervals}"
    )
    if "!" in marks:
        lines.append("! over the GPU budget: Dynamo's own cut (its min_endpoint floor binds)")
    if "~" in marks:
        lines.append("~ Dynamo's cut exceeded the GPU budget; the guard removed replicas")
    lines.append("rr / est_rr: requests in the interval, observed / forecast (Dynamo's names); "
                 "isl, osl: mean input, output tokens; num_p, num_d: prefill, decode replicas")
    if any("S" in m for m in policy_marks):
        lines.append("S scale-down held by the stabilisation window (the need was lower)")
    if result.fast_path:
        lines.append(
            f"F the fast path scaled up during the interval ({len(result.fast_path)} times in all)"
        )
    return "\n".join(lines)


def write_plot(result: DryRunResult, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (load_ax, length_ax, replica_ax) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    load_ax.plot(result.time, result.rr, label="requests (observed)", drawstyle="steps-post")
    load_ax.plot(
        result.time,
        result.est_rr,
        label="requests (forecast)",
        drawstyle="steps-post",
        linestyle="--",
    )
    load_ax.set_ylabel("requests per interval")
    load_ax.legend(loc="upper right")
    length_ax.plot(result.time, result.isl, label="ISL (observed)", drawstyle="steps-post")
    length_ax.plot(
        result.time, result.est_isl, label="ISL (forecast)", drawstyle="steps-post", linestyle="--"
    )
    length_ax.plot(result.time, result.osl, label="OSL (observed)", drawstyle="steps-post")
    length_ax.plot(
        result.time, result.est_osl, label="OSL (forecast)", drawstyle="steps-post", linestyle="--"
    )
    length_ax.set_ylabel("mean tokens per request")
    length_ax.legend(loc="upper right")
    _plot_replicas(replica_ax, result)
    replica_ax.set_ylabel("replicas")
    replica_ax.set_xlabel("time, seconds")
    replica_ax.legend(loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _timeline(
    result: DryRunResult, planned: list[int], role: int
) -> tuple[list[float], list[int]]:
    """Replicas over time: the planned count of each interval, raised by the fast path."""
    events = sorted([(t, n, 0) for t, n in zip(result.time, planned, strict=True)]
                    + [(t, (p, d)[role], 1) for t, p, d in result.fast_path])
    return [t for t, _, _ in events], [n for _, n, _ in events]


def _plot_replicas(axis: Any, result: DryRunResult) -> None:
    for role, (name, planned, need, colour) in enumerate(
        (("prefill", result.num_p, result.need_p, "tab:blue"),
         ("decode", result.num_d, result.need_d, "tab:orange"))
    ):
        times, counts = _timeline(result, planned, role)
        axis.plot(times, counts, label=f"{name} replicas", drawstyle="steps-post", color=colour)
        if any(n is not None for n in need):
            axis.plot(result.time, [math.nan if n is None else n for n in need],
                      label=f"{name} needed (before stabilisation)", drawstyle="steps-post",
                      linestyle=":", color=colour)
    held = [
        i for i in range(len(result.time))
        if STABILISED in (result.prefill_bound_by[i], result.decode_bound_by[i])
    ]
    for n, i in enumerate(held):
        end = result.time[i + 1] if i + 1 < len(result.time) else result.time[i] + 1.0
        axis.axvspan(result.time[i], end, color="grey", alpha=0.15, linewidth=0,
                     label="scale-down stabilised" if n == 0 else None)
    if result.fast_path:
        axis.scatter(
            [t for t, _, _ in result.fast_path],
            [max(p, d) for _, p, d in result.fast_path],
            marker="^", color="tab:red", zorder=3, label="fast path scale-up",
        )
