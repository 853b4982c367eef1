"""A PNG of a closed-loop run: load and forecast, replicas, TTFT and ITL against their targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sim.loop import LoopResult


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

    records = run.records
    interval = records[0].stats.window_s if records else 1.0
    start = np.asarray([r.stats.start_s for r in records])
    end = np.asarray([r.stats.end_s for r in records])
    rate = np.asarray([r.stats.num_requests for r in records]) / interval

    def series(values: list[float | None]) -> np.ndarray:
        return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)

    fig, (load_ax, replica_ax, ttft_ax, itl_ax) = plt.subplots(4, 1, figsize=(11, 12), sharex=True)
    load_ax.step(start, rate, where="post", label="requests/s (observed)")
    forecast = series([r.forecast_requests for r in records]) / interval
    upper = series([r.forecast_requests_upper for r in records]) / interval
    if np.isfinite(forecast).any():
        # The forecast made at the end of a window is for the next one.
        load_ax.step(end, forecast, where="post", linestyle="--", label="forecast (point)")
        load_ax.step(end, upper, where="post", linestyle=":", label="forecast (upper)")
    load_ax.set_ylabel("requests / s")
    load_ax.legend(loc="upper right")

    timeline = run.replica_timeline()
    t = [e["t_s"] for e in timeline] + [end[-1] if end.size else 0.0]
    for role, style in (("prefill", "-"), ("decode", "-")):
        asked = [e[role] for e in timeline]
        serving = [e[f"{role}_serving"] for e in timeline]
        replica_ax.step(t, asked + asked[-1:], where="post", linestyle=style,
                        label=f"{role} asked")
        replica_ax.step(t, serving + serving[-1:], where="post", linestyle=":",
                        label=f"{role} serving")
    needs = run.needs
    k = np.arange(needs.prefill.size) * needs.interval_s
    replica_ax.step(k, needs.prefill, where="post", linestyle="--", alpha=0.6,
                    label="prefill lower bound")
    replica_ax.step(k, needs.decode, where="post", linestyle="--", alpha=0.6,
                    label="decode lower bound")
    replica_ax.set_ylabel("workers")
    replica_ax.legend(loc="upper right", ncol=3, fontsize="small")

    for ax, name, target in ((ttft_ax, "ttft", ttft_target_s), (itl_ax, "itl", itl_target_s)):
        avg = series([getattr(r.stats, f"{name}_avg_s") for r in records])
        p99 = series([getattr(r.stats, f"{name}_p99_s") for r in records])
        ax.step(start, avg, where="post", label=f"{name.upper()} mean")
        ax.step(start, p99, where="post", label=f"{name.upper()} p99")
        ax.axhline(target, color="red", linestyle="--", label="target")
        ax.set_yscale("log")
        ax.set_ylabel("seconds")
        ax.legend(loc="upper right")
    itl_ax.set_xlabel("time, seconds")
    scores = run.scores
    fig.suptitle(
        f"{title}\nSLA attainment {scores['sla_attainment']:.4f}, "
        f"{scores['gpu_hours']:.2f} GPU-hours "
        f"({scores['gpu_hours_over_lower_bound'] or float('nan'):.2f} x lower bound), "
        f"{run.scaling_actions} scaling actions"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
