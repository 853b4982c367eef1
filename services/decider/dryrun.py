"""``slaplanner dry-run``: replay a trace through a load predictor and the decider, offline.

Dynamo's planner ships the same tool (``planner_sla_dryrun``); operators use it before trusting a
planner with a cluster. Semantics follow Dynamo's ``Planner.dryrun_run`` (ai-dynamo/dynamo,
Apache-2.0): requests are bucketed by ``arrival // interval`` with empty intervals skipped; the
first interval keeps the start counts and its "estimate" repeats its observation; interval ``i``
is decided from a prediction made from the observations of intervals ``0 .. i-1``; ``time`` is
the position of the interval times the interval (Dynamo's convention, also where empty intervals
were skipped). A trace has no latencies, so correction factors stay at 1, as in Dynamo's dry run.

The decision for each interval goes through the same ``Decider`` the service runs, fed with the
same ``LoadForecast`` messages the forecaster would publish.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from services.decider import registry
from services.decider.core import Decider
from services.decider.settings import DeciderSettings, DeploymentKnobs
from shared import traces
from shared.messages import DeploymentKey, ForecastStep, LoadForecast, MetricSnapshot
from shared.perf_model import Profile, ProfileError

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
        }


def _finite_non_negative(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else 0.0


def run_dry_run(
    load: traces.IntervalLoad,
    knobs: DeploymentKnobs,
    predictor: str = "constant",
    start_prefill: int = 1,
    start_decode: int = 1,
    profile: Profile | None = None,
) -> DryRunResult:
    """Decide every interval of ``load`` as Dynamo's dry run does; pure apart from loading the
    profile (pass ``profile`` to reuse one already loaded from ``knobs.profile_path``)."""
    settings = DeciderSettings.model_validate({**knobs.model_dump(), "no_correction": True})
    decider = Decider(settings, None if profile is None else {knobs.profile_path: profile})
    interval = load.interval_s
    predictors = {series: PREDICTORS[predictor]() for series in ("rr", "isl", "osl")}
    result = DryRunResult()
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
                prefill_workers=result.num_p[-1],
                decode_workers=result.num_d[-1],
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
    return result


def budget_mark(explanation: dict[str, Any] | None) -> str:
    """'!' where the counts exceed the GPU budget (Dynamo's own cut, kept exactly), '~' where the
    budget guard changed Dynamo's counts to stay within it, '' otherwise."""
    budget = explanation.get("gpu_budget") if explanation else None
    if not isinstance(budget, dict) or not budget.get("dynamo_cut_exceeds_budget"):
        return ""
    return "!" if budget.get("final_gpus", 0) > budget.get("max_gpus", 0) else "~"


def format_table(result: DryRunResult) -> str:
    header = (
        f"{'time_s':>9} {'rr':>7} {'est_rr':>8} {'isl':>9} {'est_isl':>9} "
        f"{'osl':>7} {'est_osl':>8} {'num_p':>6} {'num_d':>6}"
    )
    lines = [header]
    marks = [budget_mark(e) for e in result.explanations]
    for i in range(len(result.time)):
        lines.append(
            f"{result.time[i]:>9.1f} {result.rr[i]:>7.0f} {result.est_rr[i]:>8.1f} "
            f"{result.isl[i]:>9.1f} {result.est_isl[i]:>9.1f} {result.osl[i]:>7.1f} "
            f"{result.est_osl[i]:>8.1f} {result.num_p[i]:>6d} {result.num_d[i]:>6d}"
            + (f" {marks[i]}" if marks[i] else "")
        )
    replica_intervals = sum(p + d for p, d in zip(result.num_p, result.num_d, strict=True))
    lines.append(
        f"{len(result.time)} intervals; replica-intervals (prefill + decode): {replica_intervals}"
    )
    if "!" in marks:
        lines.append("! over the GPU budget: Dynamo's own cut (its min_endpoint floor binds)")
    if "~" in marks:
        lines.append("~ Dynamo's cut exceeded the GPU budget; the guard removed replicas")
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
    replica_ax.plot(result.time, result.num_p, label="prefill replicas", drawstyle="steps-post")
    replica_ax.plot(result.time, result.num_d, label="decode replicas", drawstyle="steps-post")
    replica_ax.set_ylabel("replicas")
    replica_ax.set_xlabel("time, seconds")
    replica_ax.legend(loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# Dry-run flag -> settings field, for error messages that name what the user typed.
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


def _default(name: str) -> Any:
    return DeploymentKnobs.model_fields[name].get_default(call_default_factory=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slaplanner dry-run",
        description="Replay a request trace through a load predictor and a sizing policy, and "
        "report the replicas chosen per interval (as Dynamo's planner dry run does).",
    )
    parser.add_argument("--trace", required=True, help="Mooncake .jsonl or Azure .csv trace")
    parser.add_argument(
        "--speedup", type=float, default=1.0, help="divide every arrival time by this (default 1)"
    )
    parser.add_argument(
        "--profile",
        "--profile-results-dir",
        dest="profile",
        default=_default("profile_path"),
        help="profile directory or JSON file (default: the bundled H200 profile)",
    )
    parser.add_argument("--policy", default=_default("policy"), choices=registry.policy_names())
    parser.add_argument(
        "--predictor",
        "--load-predictor",
        dest="predictor",
        default="constant",
        choices=sorted(PREDICTORS),
        help="load predictor (default constant)",
    )
    parser.add_argument(
        "--interval",
        "--adjustment-interval",
        dest="interval",
        default=f"{_default('adjustment_interval_s'):g}s",
        help="adjustment interval: '30s', '1m' or bare seconds (default %(default)s)",
    )
    parser.add_argument(
        "--ttft",
        default=f"{_default('ttft_target_s') * 1000:g}ms",
        help="TTFT target with a unit, e.g. 100ms (default %(default)s)",
    )
    parser.add_argument(
        "--itl",
        default=f"{_default('itl_target_s') * 1000:g}ms",
        help="ITL target with a unit, e.g. 10ms (default %(default)s)",
    )
    parser.add_argument("--max-gpu-budget", type=int, default=_default("max_gpu_budget"))
    parser.add_argument("--min-endpoint", type=int, default=_default("min_endpoint"))
    parser.add_argument(
        "--prefill-engine-gpus",
        "--prefill-engine-num-gpu",
        type=int,
        dest="prefill_engine_gpus",
        default=_default("prefill_engine_gpus"),
    )
    parser.add_argument(
        "--decode-engine-gpus",
        "--decode-engine-num-gpu",
        type=int,
        dest="decode_engine_gpus",
        default=_default("decode_engine_gpus"),
    )
    parser.add_argument(
        "--start-prefill",
        "--start-num-p",
        dest="start_prefill",
        type=int,
        default=1,
        help="prefill replicas in the first interval (default 1)",
    )
    parser.add_argument(
        "--start-decode",
        "--start-num-d",
        dest="start_decode",
        type=int,
        default=1,
        help="decode replicas in the first interval (default 1)",
    )
    parser.add_argument(
        "--enforce-gpu-budget",
        choices=["true", "false"],
        default="false",
        help="true: apply the service's guard where Dynamo's budget cut exceeds the budget; "
        "false (default): reproduce Dynamo's numbers exactly and mark such intervals with '!'",
    )
    parser.add_argument("--json", dest="json_out", help="write the per-interval result here")
    parser.add_argument("--plot", dest="plot_out", help="write a PNG of load and replicas here")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
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
        knobs = DeploymentKnobs.model_validate(
            {
                "profile_path": args.profile,
                "policy": args.policy,
                "ttft_target_s": args.ttft,
                "itl_target_s": args.itl,
                "adjustment_interval_s": args.interval,
                "max_gpu_budget": args.max_gpu_budget,
                "min_endpoint": args.min_endpoint,
                "prefill_engine_gpus": args.prefill_engine_gpus,
                "decode_engine_gpus": args.decode_engine_gpus,
                "no_correction": True,
                "enforce_gpu_budget": args.enforce_gpu_budget == "true",
            }
        )
    except ValidationError as exc:
        for item in exc.errors():
            name = str(item["loc"][0]) if item["loc"] else ""
            flag = _FLAG_OF_FIELD.get(name, name or "settings")
            print(f"{prog}: {flag}: {item['msg'].removeprefix('Value error, ')}", file=sys.stderr)
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
        result = run_dry_run(
            traces.bucket_by_interval(trace, knobs.adjustment_interval_s),
            knobs,
            predictor=args.predictor,
            start_prefill=args.start_prefill,
            start_decode=args.start_decode,
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
