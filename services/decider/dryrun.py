"""``slaplanner dry-run``: replay a trace through a load predictor and the decider, offline.

Dynamo's planner ships the same tool (``planner_sla_dryrun``); operators use it before trusting a
planner with a cluster. Semantics follow Dynamo's ``Planner.dryrun_run`` (ai-dynamo/dynamo,
Apache-2.0): requests are bucketed by ``arrival // interval`` with empty intervals skipped; the
first interval keeps the start counts and its "estimate" repeats its observation; interval ``i``
is decided from a prediction made from the observations of intervals ``0 .. i-1``; ``time`` is
the position of the interval times the interval (Dynamo's convention, also where empty intervals
were skipped). A trace has no latencies, so correction factors stay at 1, as in Dynamo's dry run.

The decision for each interval goes through the same ``Decider`` the service runs, fed with the
same ``LoadForecast`` messages the forecaster would publish. For a policy with a fast path
(``slaplanner``), each interval is also replayed as short snapshots (``--fast-path-interval``,
5 s by default) of the requests that arrived in it, fed to ``Decider.on_snapshot`` as the
service's second consumer would: a burst inside an interval that the planned replicas cannot
serve raises them at once, and the short counts measure how bursty arrivals are.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from services.decider import registry
from services.decider.core import Decider
from services.decider.settings import DeciderSettings, DeploymentKnobs
from shared import cli_checks, traces
from shared.messages import DeploymentKey, ForecastStep, LoadForecast, MetricSnapshot
from shared.perf_model import Profile, ProfileError
from shared.settings import parse_duration_s

DRY_RUN_DEPLOYMENT = DeploymentKey(namespace="dry-run", name="trace")


class Predictor(Protocol):
    """A one-series, one-step-ahead load predictor."""

    def add(self, value: float) -> None: ...

    def predict_next(self) -> float: ...


class ConstantPredictor:
    """The next value is the last one (Dynamo's ``constant``; 0 before any data)."""

    def __init__(self) -> None:
        self._last = 0.0

    def add(self, value: float) -> None:
        # Dynamo records a NaN observation as 0.
        self._last = 0.0 if math.isnan(value) else value

    def predict_next(self) -> float:
        return self._last


PREDICTORS: dict[str, Callable[[], Predictor]] = {"constant": ConstantPredictor}


def register_predictor(name: str, factory: Callable[[], Predictor]) -> None:
    """Make another predictor available to ``--predictor`` (e.g. the forecaster's models)."""
    PREDICTORS[name] = factory


@dataclass
class DryRunResult:
    time: list[float] = field(default_factory=list)
    rr: list[float] = field(default_factory=list)
    est_rr: list[float] = field(default_factory=list)
    isl: list[float] = field(default_factory=list)
    est_isl: list[float] = field(default_factory=list)
    osl: list[float] = field(default_factory=list)
    est_osl: list[float] = field(default_factory=list)
    num_p: list[int] = field(default_factory=list)
    num_d: list[int] = field(default_factory=list)
    explanations: list[dict[str, Any] | None] = field(default_factory=list)
    # what the policy needed before stabilisation, step limits and budget, and what bound it
    need_p: list[int | None] = field(default_factory=list)
    need_d: list[int | None] = field(default_factory=list)
    prefill_bound_by: list[str | None] = field(default_factory=list)
    decode_bound_by: list[str | None] = field(default_factory=list)
    # fast-path scale-ups between planning intervals: (time, prefill, decode)
    fast_path: list[tuple[float, int, int]] = field(default_factory=list)

    def per_interval(self) -> dict[str, list[Any]]:
        return {
            "time": self.time,
            "rr": self.rr,
            "est_rr": self.est_rr,
            "isl": self.isl,
            "est_isl": self.est_isl,
            "osl": self.osl,
            "est_osl": self.est_osl,
            "num_p": self.num_p,
            "num_d": self.num_d,
            "need_p": self.need_p,
            "need_d": self.need_d,
            "prefill_bound_by": self.prefill_bound_by,
            "decode_bound_by": self.decode_bound_by,
        }

    def fast_path_events(self) -> list[dict[str, Any]]:
        return [{"time": t, "num_p": p, "num_d": d} for t, p, d in self.fast_path]


def _finite_non_negative(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else 0.0


def need_of(explanation: dict[str, Any] | None, role: str) -> int | None:
    """The replicas a decision needed before stabilisation, step limits and the budget."""
    if not explanation or explanation.get("held"):
        return None
    detail = explanation.get(role)
    if not isinstance(detail, dict):
        return None
    if "needed_replicas" in detail:  # dynamo
        return int(detail["needed_replicas"])
    for step in detail.get("steps", []):  # slaplanner: the need within the role's bounds
        if step.get("step") == "role_bounds":
            return int(step["replicas"])
    return None


def _short_windows(
    fast_load: traces.IntervalLoad | None, interval_s: float
) -> tuple[int, dict[int, dict[int, int]]]:
    """Short windows per interval: ``(windows per interval, {interval index: {offset: row}})``."""
    if fast_load is None:
        return 0, {}
    per_interval = round(interval_s / fast_load.interval_s)
    rows: dict[int, dict[int, int]] = {}
    for row, index in enumerate(fast_load.index.tolist()):
        parent, offset = divmod(int(index), per_interval)
        rows.setdefault(parent, {})[offset] = row
    return per_interval, rows


def run_dry_run(
    load: traces.IntervalLoad,
    knobs: DeploymentKnobs,
    predictor: str = "constant",
    start_prefill: int = 1,
    start_decode: int = 1,
    profile: Profile | None = None,
    fast_load: traces.IntervalLoad | None = None,
) -> DryRunResult:
    """Decide every interval of ``load`` as Dynamo's dry run does; pure apart from loading the
    profile (pass ``profile`` to reuse one already loaded from ``knobs.profile_path``).

    ``fast_load``, the same trace bucketed into windows that divide the interval, is replayed
    through the fast path of a policy that has one (ignored otherwise)."""
    settings = DeciderSettings.model_validate({**knobs.model_dump(), "no_correction": True})
    decider = Decider(settings, None if profile is None else {knobs.profile_path: profile})
    interval = load.interval_s
    predictors = {series: PREDICTORS[predictor]() for series in ("rr", "isl", "osl")}
    result = DryRunResult()
    if not decider.has_fast_path():
        fast_load = None
    if fast_load is not None:
        ratio = interval / fast_load.interval_s
        if fast_load.interval_s >= interval or abs(ratio - round(ratio)) > 1e-9:
            raise ValueError(
                f"the fast-path interval ({fast_load.interval_s:g} s) must divide the interval "
                f"({interval:g} s) into several windows"
            )
    per_interval, short_rows = _short_windows(fast_load, interval)
    current = (start_prefill, start_decode)
    for position in range(len(load)):
        rr = float(load.num_requests[position])
        isl = float(load.isl_avg_tokens[position])
        osl = float(load.osl_avg_tokens[position])
        now = position * interval
        if position == 0:
            est = (rr, isl, osl)
            num_p, num_d, why = start_prefill, start_decode, None
        else:
            est = (
                predictors["rr"].predict_next(),
                predictors["isl"].predict_next(),
                predictors["osl"].predict_next(),
            )
            rr_hat, isl_hat, osl_hat = (_finite_non_negative(v) for v in est)
            observed = MetricSnapshot(
                id=f"dry-run-observed-{position - 1}",
                deployment=DRY_RUN_DEPLOYMENT,
                window_end=now,
                window_s=interval,
                source="trace",
                num_requests=result.rr[-1],
                isl_avg=result.isl[-1],
                osl_avg=result.osl[-1],
                prefill_workers=current[0],
                decode_workers=current[1],
            )
            forecast = LoadForecast(
                id=f"dry-run-forecast-{position}",
                deployment=DRY_RUN_DEPLOYMENT,
                window_end=now,
                window_s=interval,
                model=predictor,
                steps=[
                    ForecastStep(
                        window_end=now + interval,
                        num_requests=rr_hat,
                        num_requests_upper=rr_hat,
                        isl_avg=isl_hat,
                        isl_avg_upper=isl_hat,
                        osl_avg=osl_hat,
                        osl_avg_upper=osl_hat,
                    )
                ],
                observed=observed,
            )
            target = decider.decide(forecast)
            num_p, num_d, why = target.prefill_replicas, target.decode_replicas, target.explanation
        current = (num_p, num_d)
        if fast_load is not None:
            current = _replay_short_windows(
                decider, fast_load, short_rows.get(int(load.index[position]), {}),
                per_interval, now, current, result,
            )
        for series, value in (("rr", rr), ("isl", isl), ("osl", osl)):
            predictors[series].add(value)
        result.time.append(now)
        result.rr.append(rr)
        result.isl.append(isl)
        result.osl.append(osl)
        result.est_rr.append(float(est[0]))
        result.est_isl.append(float(est[1]))
        result.est_osl.append(float(est[2]))
        result.num_p.append(num_p)
        result.num_d.append(num_d)
        result.explanations.append(why)
        result.need_p.append(need_of(why, "prefill"))
        result.need_d.append(need_of(why, "decode"))
        result.prefill_bound_by.append(why.get("prefill_bound_by") if why else None)
        result.decode_bound_by.append(why.get("decode_bound_by") if why else None)
    return result


def _replay_short_windows(
    decider: Decider,
    fast_load: traces.IntervalLoad,
    rows: dict[int, int],
    per_interval: int,
    start_s: float,
    current: tuple[int, int],
    result: DryRunResult,
) -> tuple[int, int]:
    """Feed one interval's short windows (empty ones too) to the fast path; the replicas after."""
    window = fast_load.interval_s
    for offset in range(per_interval):
        row = rows.get(offset)
        end = start_s + (offset + 1) * window
        snapshot = MetricSnapshot(
            id=f"dry-run-short-{end:.6f}",
            deployment=DRY_RUN_DEPLOYMENT,
            window_end=end,
            window_s=window,
            source="trace",
            num_requests=0.0 if row is None else float(fast_load.num_requests[row]),
            isl_avg=None if row is None else float(fast_load.isl_avg_tokens[row]),
            osl_avg=None if row is None else float(fast_load.osl_avg_tokens[row]),
            prefill_workers=current[0],
            decode_workers=current[1],
        )
        target = decider.on_snapshot(snapshot)
        if target is not None:
            current = (target.prefill_replicas, target.decode_replicas)
            result.fast_path.append((end, *current))
    return current


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


# Planning flag -> settings field, for error messages that name what the user typed.
_FLAG_OF_FIELD = {
    "profile_path": "--profile",
    "policy": "--policy",
    "ttft_target_s": "--ttft",
    "itl_target_s": "--itl",
    "adjustment_interval_s": "--interval",
    "max_gpu_budget": "--max-gpu-budget",
    "min_endpoint": "--min-endpoint",
    "prefill_engine_gpus": "--prefill-engine-gpus",
    "decode_engine_gpus": "--decode-engine-gpus",
}


def knob_default(name: str) -> Any:
    """The service's default of one ``DeploymentKnobs`` field."""
    return DeploymentKnobs.model_fields[name].get_default(call_default_factory=True)


def add_planning_arguments(
    parser: argparse.ArgumentParser,
    *,
    policies: Sequence[str],
    default_policy: str,
    predictors: Sequence[str],
    enforce_gpu_budget: bool,
    trace_default: str | None = None,
    policy_help: str = "sizing policy (default %(default)s)",
) -> None:
    """The options every trace replay shares (``dry-run``, ``simulate``, ``replay``, ``demo``):
    the trace, the deployment's knobs under the flags of Dynamo's dry run, the start counts and
    the outputs. ``trace_default`` makes ``--trace`` optional."""
    parser.add_argument(
        "--trace", required=trace_default is None, default=trace_default,
        help="Mooncake .jsonl or Azure .csv trace"
        + ("" if trace_default is None else " (default: %(default)s)"),
    )
    parser.add_argument(
        "--speedup", type=float, default=1.0,
        help="divide every arrival time by this (default %(default)s)",
    )
    parser.add_argument(
        "--profile", "--profile-results-dir", dest="profile", default=knob_default("profile_path"),
        help="profile directory or JSON file (default: the bundled H200 profile)",
    )
    parser.add_argument(
        "--policy", default=default_policy, choices=list(policies), help=policy_help,
    )
    parser.add_argument(
        "--predictor", "--load-predictor", dest="predictor", default="constant",
        choices=list(predictors), help="load predictor (default %(default)s)",
    )
    parser.add_argument(
        "--interval", "--adjustment-interval", dest="interval",
        default=f"{knob_default('adjustment_interval_s'):g}s",
        help="adjustment interval: '30s', '1m' or bare seconds (default %(default)s)",
    )
    parser.add_argument(
        "--ttft", default=f"{knob_default('ttft_target_s') * 1000:g}ms",
        help="TTFT target with a unit, e.g. 100ms (default %(default)s)",
    )
    parser.add_argument(
        "--itl", default=f"{knob_default('itl_target_s') * 1000:g}ms",
        help="ITL target with a unit, e.g. 10ms (default %(default)s)",
    )
    parser.add_argument(
        "--max-gpu-budget", type=int, default=knob_default("max_gpu_budget"),
        help="GPUs at most, prefill and decode together (default %(default)s)",
    )
    parser.add_argument("--min-endpoint", type=int, default=knob_default("min_endpoint"))
    parser.add_argument(
        "--prefill-engine-gpus", "--prefill-engine-num-gpu", type=int,
        dest="prefill_engine_gpus", default=knob_default("prefill_engine_gpus"),
    )
    parser.add_argument(
        "--decode-engine-gpus", "--decode-engine-num-gpu", type=int,
        dest="decode_engine_gpus", default=knob_default("decode_engine_gpus"),
    )
    parser.add_argument(
        "--start-prefill", "--start-num-p", dest="start_prefill", type=int, default=1,
        help="prefill replicas at the start (default 1)",
    )
    parser.add_argument(
        "--start-decode", "--start-num-d", dest="start_decode", type=int, default=1,
        help="decode replicas at the start (default 1)",
    )
    parser.add_argument(
        "--enforce-gpu-budget", choices=["true", "false"],
        default=str(enforce_gpu_budget).lower(),
        help="the decider's guard where a policy's counts exceed the budget (default "
        "%(default)s; false reproduces Dynamo's numbers exactly, over the budget if need be)",
    )
    parser.add_argument("--json", dest="json_out", help="write the result (JSON) here")
    parser.add_argument("--plot", dest="plot_out", help="write a PNG of the run here")
    parser.add_argument("--quiet", action="store_true", help="do not print the interval table")


def planning_knobs(
    args: argparse.Namespace, *, policy: str, no_correction: bool
) -> DeploymentKnobs:
    """The deployment's knobs from the options ``add_planning_arguments`` added; raises
    ``ValueError`` naming each flag that is wrong."""
    try:
        return DeploymentKnobs.model_validate(
            {
                "profile_path": args.profile,
                "policy": policy,
                "ttft_target_s": args.ttft,
                "itl_target_s": args.itl,
                "adjustment_interval_s": args.interval,
                "max_gpu_budget": args.max_gpu_budget,
                "min_endpoint": args.min_endpoint,
                "prefill_engine_gpus": args.prefill_engine_gpus,
                "decode_engine_gpus": args.decode_engine_gpus,
                "no_correction": no_correction,
                "enforce_gpu_budget": args.enforce_gpu_budget == "true",
            }
        )
    except ValidationError as exc:
        problems = []
        for item in exc.errors():
            name = str(item["loc"][0]) if item["loc"] else ""
            flag = _FLAG_OF_FIELD.get(name, name or "settings")
            problems.append(f"{flag}: {item['msg'].removeprefix('Value error, ')}")
        raise ValueError("; ".join(problems)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slaplanner dry-run",
        description="Replay a request trace through a load predictor and a sizing policy, and "
        "report the replicas chosen per interval (as Dynamo's planner dry run does).",
    )
    # The budget guard is off by default: the dry run reproduces Dynamo's reference numbers.
    add_planning_arguments(
        parser, policies=registry.policy_names(), default_policy=registry.DEFAULT_POLICY,
        predictors=sorted(PREDICTORS), enforce_gpu_budget=False,
    )
    parser.add_argument(
        "--fast-path-interval",
        default="5s",
        help="replay each interval as short snapshots of this length through the policy's fast "
        "path ('5s'; it must divide the interval; '0s' turns it off; dynamo has none)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "slaplanner dry-run"
    if not args.speedup > 0:
        print(f"{prog}: --speedup must be positive, got {args.speedup}", file=sys.stderr)
        return 2
    if args.start_prefill < 0 or args.start_decode < 0:
        print(f"{prog}: --start-prefill and --start-decode must be >= 0", file=sys.stderr)
        return 2
    try:
        cli_checks.output_paths({"--json": args.json_out, "--plot": args.plot_out})
        knobs = planning_knobs(args, policy=args.policy, no_correction=True)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    try:
        trace = traces.load_trace(args.trace).sped_up(args.speedup)
    except (traces.TraceError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if len(trace) == 0:
        print(f"{prog}: {args.trace}: the trace has no requests", file=sys.stderr)
        return 2
    try:
        fast_s = parse_duration_s(args.fast_path_interval)
    except ValueError as exc:
        print(f"{prog}: --fast-path-interval: {exc}", file=sys.stderr)
        return 2
    fast_load = None
    if fast_s > 0:
        ratio = knobs.adjustment_interval_s / fast_s
        if fast_s >= knobs.adjustment_interval_s or abs(ratio - round(ratio)) > 1e-9:
            print(
                f"{prog}: --fast-path-interval: {fast_s:g} s must divide the interval "
                f"({knobs.adjustment_interval_s:g} s) into several windows",
                file=sys.stderr,
            )
            return 2
        fast_load = traces.bucket_by_interval(trace, fast_s)
    try:
        result = run_dry_run(
            traces.bucket_by_interval(trace, knobs.adjustment_interval_s),
            knobs,
            predictor=args.predictor,
            start_prefill=args.start_prefill,
            start_decode=args.start_decode,
            fast_load=fast_load,
        )
    except ProfileError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(format_table(result))
    if args.json_out:
        document = {
            "trace": Path(args.trace).name,
            "speedup": args.speedup,
            "adjustment_interval_s": knobs.adjustment_interval_s,
            "max_gpu_budget": knobs.max_gpu_budget,
            "ttft_s": knobs.ttft_target_s,
            "itl_s": knobs.itl_target_s,
            "min_endpoint": knobs.min_endpoint,
            "prefill_engine_num_gpu": knobs.prefill_engine_gpus,
            "decode_engine_num_gpu": knobs.decode_engine_gpus,
            "load_predictor": args.predictor,
            "policy": knobs.policy,
            "profile": knobs.profile_path,
            "start_num_p": args.start_prefill,
            "start_num_d": args.start_decode,
            "per_interval": result.per_interval(),
            "fast_path_events": result.fast_path_events(),
        }
        Path(args.json_out).write_text(json.dumps(document) + "\n", encoding="utf-8")
    if args.plot_out:
        title = (
            f"{Path(args.trace).name} x{args.speedup:g}, "
            f"interval {knobs.adjustment_interval_s:g} s, "
            f"policy {knobs.policy}, predictor {args.predictor}"
        )
        write_plot(result, Path(args.plot_out), title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
