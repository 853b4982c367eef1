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

Predictors: ``constant`` is Dynamo's (next = last, 0 before any data), which the reference
decisions use; every other predictor of the forecaster runs through the forecaster's own core,
with its horizon and upper quantiles, as the service would run it. The dry run defaults to
Dynamo's policy (its reference) and, for the same reason, to no GPU budget guard.
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

from services.decider.core import Decider
from services.decider.knobs import DeploymentKnobs
from services.decider.settings import DeciderSettings
from services.forecaster.core import Forecaster
from services.forecaster.predictors import PredictorUnavailable, ensure_available
from services.forecaster.settings import PREDICTOR_NAMES, ForecasterSettings
from shared import cli_checks, traces
from shared.explanation import Explanation
from shared.messages import DeploymentKey, ForecastStep, LoadForecast, MetricSnapshot
from shared.perf_model import Profile, ProfileError
from shared.settings import parse_seconds
from sim import options
from sim.dryrun_report import format_table, write_plot

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
    """The replicas a decision needed before stabilisation, step limits and the budget: Dynamo's
    rounded need, or the slaplanner need within the role's bounds."""
    if not explanation or explanation.get("held"):
        return None
    part = Explanation.from_dict(explanation).role(role)
    if "needed_replicas" in part.detail:  # dynamo
        return int(part.detail["needed_replicas"])
    return None if part.trail is None else part.trail.replicas_after("role_bounds")


class _ForecasterLoad:
    """The forecaster's own core as the dry run's predictor: each interval's observation in,
    its forecast (every step to the horizon, with upper quantiles) out."""

    def __init__(self, predictor: str) -> None:
        self.forecaster = Forecaster(ForecasterSettings(predictor=predictor))

    def forecast(self, observed: MetricSnapshot) -> LoadForecast:
        self.forecaster.observe(observed)
        return self.forecaster.forecast(observed)


def predictor_names() -> list[str]:
    """Dynamo's one-step predictors (and any registered), then every one of the forecaster."""
    return [*PREDICTORS, *(name for name in PREDICTOR_NAMES if name not in PREDICTORS)]


def run_dry_run(
    trace: traces.Trace,
    knobs: DeploymentKnobs,
    predictor: str = "constant",
    start_prefill: int = 1,
    start_decode: int = 1,
    profile: Profile | None = None,
    fast_path_s: float | None = None,
) -> DryRunResult:
    """Decide every interval of ``trace`` as Dynamo's dry run does; pure apart from loading the
    profile (pass ``profile`` to reuse one already loaded from ``knobs.profile_path``).

    ``fast_path_s``: windows (dividing the interval) through which each interval is replayed
    into the fast path of a policy that has one (ignored otherwise)."""
    settings = DeciderSettings.model_validate({**knobs.model_dump(), "no_correction": True})
    decider = Decider(settings, None if profile is None else {knobs.profile_path: profile})
    interval = knobs.adjustment_interval_s
    # Dynamo's dry run skips intervals without a request; time is the position times the interval.
    windows = [w for w in traces.window_loads(trace, interval, percentiles=False)
               if w.num_requests]
    one_step = predictor in PREDICTORS
    predictors = {s: PREDICTORS[predictor]() for s in ("rr", "isl", "osl")} if one_step else {}
    forecaster = None if one_step else _ForecasterLoad(predictor)
    result = DryRunResult()
    if not decider.has_fast_path():
        fast_path_s = None
    short: dict[int, traces.WindowLoad] = {}
    per_interval = 0
    if fast_path_s:
        ratio = interval / fast_path_s
        if fast_path_s >= interval or abs(ratio - round(ratio)) > 1e-9:
            raise ValueError(
                f"the fast-path interval ({fast_path_s:g} s) must divide the interval "
                f"({interval:g} s) into several windows"
            )
        per_interval = round(ratio)
        short = {w.index: w for w in traces.window_loads(trace, fast_path_s, percentiles=False)}
    current = (start_prefill, start_decode)
    for position, window in enumerate(windows):
        rr = float(window.num_requests)
        isl, osl = float(window.isl_avg or 0.0), float(window.osl_avg or 0.0)
        now = position * interval
        if position == 0:
            est = (rr, isl, osl)
            num_p, num_d, why = start_prefill, start_decode, None
        else:
            observed = snapshot_of(
                f"dry-run-observed-{position - 1}", now, interval, windows[position - 1], current
            )
            if forecaster is not None:
                forecast = forecaster.forecast(observed)
                first = forecast.steps[0]
                est = (first.num_requests, first.isl_avg, first.osl_avg)
            else:
                est = (predictors["rr"].predict_next(), predictors["isl"].predict_next(),
                       predictors["osl"].predict_next())
                forecast = _one_step(position, now, interval, predictor, est, observed)
            target = decider.decide(forecast)
            num_p, num_d, why = target.prefill_replicas, target.decode_replicas, target.explanation
        current = (num_p, num_d)
        if short:
            current = _replay_short_windows(
                decider, short, window.index * per_interval, per_interval, fast_path_s or 0.0,
                now, current, result,
            )
        for series, value in (("rr", rr), ("isl", isl), ("osl", osl)):
            if series in predictors:
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


def _one_step(
    position: int, now: float, interval: float, predictor: str, est: Sequence[float],
    observed: MetricSnapshot,
) -> LoadForecast:
    """The forecast a one-step predictor gives: one step, no quantile (point = upper)."""
    rr_hat, isl_hat, osl_hat = (_finite_non_negative(v) for v in est)
    return LoadForecast(
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


def snapshot_of(
    snapshot_id: str, window_end: float, window_s: float, load: traces.WindowLoad | None,
    current: tuple[int, int],
) -> MetricSnapshot:
    """What a collector would report of one window of the trace (``None``: no request in it),
    with the replicas the dry run has; a trace has no latencies."""
    return MetricSnapshot(
        id=snapshot_id,
        deployment=DRY_RUN_DEPLOYMENT,
        window_end=window_end,
        window_s=window_s,
        source="trace",
        num_requests=0.0 if load is None else float(load.num_requests),
        isl_avg=None if load is None else load.isl_avg,
        osl_avg=None if load is None else load.osl_avg,
        prefill_workers=current[0],
        decode_workers=current[1],
    )


def _replay_short_windows(
    decider: Decider,
    short: dict[int, traces.WindowLoad],
    first_index: int,
    per_interval: int,
    window: float,
    start_s: float,
    current: tuple[int, int],
    result: DryRunResult,
) -> tuple[int, int]:
    """Feed one interval's short windows (idle ones too) to the fast path; the replicas after."""
    for offset in range(per_interval):
        end = start_s + (offset + 1) * window
        snapshot = snapshot_of(
            f"dry-run-short-{end:.6f}", end, window, short.get(first_index + offset), current
        )
        target = decider.on_snapshot(snapshot)
        if target is not None:
            current = (target.prefill_replicas, target.decode_replicas)
            result.fast_path.append((end, *current))
    return current


def build_parser(knobs_cls: type[DeploymentKnobs] = DeploymentKnobs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slaplanner dry-run",
        description="Replay a request trace through a load predictor and a sizing policy, and "
        "report the replicas chosen per interval (as Dynamo's planner dry run does). It "
        "defaults to Dynamo's policy with Dynamo's constant predictor and no budget guard, "
        "which reproduce Dynamo's own dry run; --policy slaplanner runs ours.",
    )
    options.add_trace_arguments(parser, predictors=predictor_names(), default_predictor="constant")
    parser.add_argument(
        "--fast-path-interval",
        default="5s",
        help="replay each interval as short snapshots of this length through the policy's fast "
        "path ('5s'; it must divide the interval; '0s' turns it off; dynamo has none)",
    )
    # Dynamo's policy and numbers by default: the dry run reproduces Dynamo's reference.
    options.add_knob_arguments(
        parser, knobs_cls, defaults={"policy": "dynamo", "enforce_gpu_budget": False}
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
        if args.predictor not in PREDICTORS:  # the forecaster's: its extra must be installed
            ensure_available(args.predictor)
        knobs = options.knobs_from_args(args, no_correction=True)
        fast_s = parse_seconds(args.fast_path_interval)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except PredictorUnavailable as exc:
        print(f"{prog}: --predictor {args.predictor}: {exc}", file=sys.stderr)
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
            trace,
            knobs,
            predictor=args.predictor,
            start_prefill=args.start_prefill,
            start_decode=args.start_decode,
            fast_path_s=fast_s or None,
        )
    except ValueError as exc:  # ProfileError is one; a fast-path interval that does not divide
        print(f"{prog}: {'' if isinstance(exc, ProfileError) else '--fast-path-interval: '}"
              f"{exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(format_table(result))
    if args.json_out:
        document = {
            "trace": Path(args.trace).name,
            "speedup": args.speedup,
            "adjustment_interval_s": knobs.adjustment_interval_s,
            "max_gpu_budget": knobs.max_total_gpus,
            "ttft_s": knobs.ttft_target_s,
            "itl_s": knobs.itl_target_s,
            "min_endpoint": knobs.min_endpoint,
            "prefill_engine_num_gpu": knobs.prefill_engine_num_gpu,
            "decode_engine_num_gpu": knobs.decode_engine_num_gpu,
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
