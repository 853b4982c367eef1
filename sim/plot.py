"""A PNG of a closed-loop run: load and forecast, replicas, TTFT and ITL against their targets.

Read at a glance: time on the run's clock (``mm:ss``, ``h:mm`` past an hour), latencies in
milliseconds without powers of ten, whole replicas, legends beside the panels rather than over
the lines, attainment as a percentage as everywhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shared.conditions import percent
from sim.loop import LoopResult

# Tick spacings for the time axis, seconds: the smallest that gives at most MAX_TICKS ticks.
TICK_STEPS_S = (15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
MAX_TICKS = 10


def time_tick_step_s(span_s: float) -> float:
    return next((float(step) for step in TICK_STEPS_S if span_s / step <= MAX_TICKS),
                float(TICK_STEPS_S[-1]))


def clock_label(seconds: float, span_s: float) -> str:
    """``mm:ss`` for runs under an hour, ``h:mm`` beyond."""
    whole = round(seconds)
    if span_s < 3600:
        return f"{whole // 60:02d}:{whole % 60:02d}"
    return f"{whole // 3600}:{whole % 3600 // 60:02d}"


def milliseconds_label(value: float) -> str:
    """A log axis tick in ms as a plain number: ``0.5``, ``20``, ``2000``."""
    return f"{value:g}" if value < 1e6 else f"{value:.0f}"


def write_plot(
    run: LoopResult,
    path: str | Path,
    title: str,
    ttft_target_s: float,
    itl_target_s: float,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import (
        FuncFormatter,
        LogLocator,
        MaxNLocator,
        MultipleLocator,
        NullFormatter,
    )

    records = run.records
    interval = records[0].stats.window_s if records else 1.0
    start = np.asarray([r.stats.start_s for r in records])
    end = np.asarray([r.stats.end_s for r in records])
    rate = np.asarray([r.stats.num_requests for r in records]) / interval
    span = float(end[-1]) if end.size else interval

    def series(values: list[float | None]) -> np.ndarray:
        return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)

    fig, (load_ax, replica_ax, ttft_ax, itl_ax) = plt.subplots(
        4, 1, figsize=(13, 12), sharex=True, layout="constrained")
    load_ax.step(start, rate, where="post", label="observed")
    forecast = series([r.forecast_requests for r in records]) / interval
    upper = series([r.forecast_requests_upper for r in records]) / interval
    if np.isfinite(forecast).any():
        # The forecast made at the end of a window is for the next one.
        load_ax.step(end, forecast, where="post", linestyle="--", label="forecast (point)")
        load_ax.step(end, upper, where="post", linestyle=":", label="forecast (upper)")
    load_ax.set_ylabel("requests / s")

    timeline = run.replica_timeline()
    t = [e["t_s"] for e in timeline] + [end[-1] if end.size else 0.0]
    for role in ("prefill", "decode"):
        asked = [e[role] for e in timeline]
        serving = [e[f"{role}_serving"] for e in timeline]
        replica_ax.step(t, asked + asked[-1:], where="post", label=f"{role} asked")
        replica_ax.step(t, serving + serving[-1:], where="post", linestyle=":",
                        label=f"{role} serving")
    needs = run.needs
    k = np.arange(needs.prefill.size) * needs.interval_s
    replica_ax.step(k, needs.prefill, where="post", linestyle="--", alpha=0.6,
                    label="prefill lower bound")
    replica_ax.step(k, needs.decode, where="post", linestyle="--", alpha=0.6,
                    label="decode lower bound")
    replica_ax.set_ylabel("workers")
    replica_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    replica_ax.set_ylim(bottom=0)

    ms_ticks = FuncFormatter(lambda value, _: milliseconds_label(value))
    for ax, name, target in ((ttft_ax, "ttft", ttft_target_s), (itl_ax, "itl", itl_target_s)):
        avg = series([getattr(r.stats, f"{name}_avg_s") for r in records]) * 1000.0
        p99 = series([getattr(r.stats, f"{name}_p99_s") for r in records]) * 1000.0
        ax.step(start, avg, where="post", label="mean")
        ax.step(start, p99, where="post", label="p99")
        ax.axhline(target * 1000.0, color="red", linestyle="--",
                   label=f"target {milliseconds_label(target * 1000.0)} ms")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ms_ticks)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel(f"{name.upper()}, ms")

    for ax in (load_ax, replica_ax, ttft_ax, itl_ax):
        # Beside the panel, never over the lines.
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  fontsize="small")
        ax.grid(True, alpha=0.3)
    itl_ax.xaxis.set_major_locator(MultipleLocator(time_tick_step_s(span)))
    itl_ax.xaxis.set_major_formatter(FuncFormatter(lambda s, _: clock_label(s, span)))
    itl_ax.set_xlabel("time since the start, " + ("mm:ss" if span < 3600 else "h:mm"))
    itl_ax.set_xlim(0, span)
    fig.suptitle(f"{title}\n{_scores_text(run)}")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _scores_text(run: LoopResult) -> str:
    scores: dict[str, Any] = run.scores
    ratio = scores.get("gpu_hours_over_lower_bound")
    return (f"SLA attainment {percent(scores['sla_attainment'])}, "
            f"{scores['gpu_hours']:.2f} GPU-hours"
            + (f" ({ratio:.2f} x lower bound)" if ratio is not None else "")
            + f", {run.scaling_actions} scaling actions")
