"""What the product buys: the same slice under Dynamo's policy, the best fixed fleet and the
clairvoyant reference, one line each beside the run's own GPU-hours (the end of the demo).

The three runs are in process (the simulator and the cores, as ``slaplanner simulate`` and the
planning benchmark run them) on the run's trace, profile, targets and cluster: Dynamo's policy
as the benchmark's ``dynamo (constant)`` row (Dynamo's arithmetic and constant predictor,
from the same fleet at time 0), the two references as ``sim.references`` finds them for the
attainment goal. Together they take well under a second on the demo's slice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from shared import conditions
from shared.perf_model import Profile
from shared.traces import Trace
from sim import references
from sim.cluster import ClusterConfig
from sim.loop import LoopResult, PlanningSetup, simulate

DYNAMO = "Dynamo's policy"
BEST_FIXED = "best fixed fleet"
CLAIRVOYANT = "clairvoyant"


@dataclass(frozen=True)
class Line:
    """One comparison run: its name, how it was set, and its scores."""

    name: str
    detail: str
    gpu_hours: float
    sla_attainment: float | None


def dynamo_setup(setup: PlanningSetup) -> PlanningSetup:
    """Dynamo's policy and its constant predictor, with everything else of ``setup``."""
    return replace(setup.with_knobs(policy="dynamo"), predictor="constant", planner=None)


def compare(
    trace: Trace, profile: Profile, setup: PlanningSetup, config: ClusterConfig,
    start: tuple[int, int], goal: float, max_intervals: int | None = None,
) -> list[Line]:
    """Dynamo's policy from ``start`` engines, then the best fixed fleet and the clairvoyant
    reaching ``goal``."""
    dynamo = simulate(trace, profile, dynamo_setup(setup), config, start=start,
                      max_intervals=max_intervals)
    fixed = references.run("best-fixed", trace, profile, setup, config, goal=goal,
                           max_intervals=max_intervals)
    oracle = references.run("clairvoyant", trace, profile, setup, config, goal=goal,
                            max_intervals=max_intervals)
    return [
        _line(DYNAMO, "constant predictor, same start", dynamo),
        _line(BEST_FIXED, f"{fixed.detail['prefill']} P + {fixed.detail['decode']} D"
              + _missed(fixed), fixed.run),
        _line(CLAIRVOYANT, "a fleet per interval" + _missed(oracle), oracle.run),
    ]


def _missed(found: references.Reference) -> str:
    """A reference that could not reach the goal says so (the closest it came is shown)."""
    return "" if found.detail["reached_goal"] else ", goal not reached"


def _line(name: str, detail: str, run: LoopResult) -> Line:
    return Line(name, detail, float(run.scores["gpu_hours"]), run.scores["sla_attainment"])


def format_lines(product: str, product_gpu_hours: float, lines: list[Line], goal: float) -> str:
    """A heading, then per line its GPU-hours, attainment and ``product``'s GPU-hours over its
    (3.000 over 1.500: ``2.00 x``)."""
    names = [f"{line.name} ({line.detail})" for line in lines]
    width = max(map(len, names))
    rows = [f"the same slice in the simulator ({product} N x: its {product_gpu_hours:.3f} "
            f"GPU-hours over theirs;\nbest fixed and clairvoyant: the cheapest reaching "
            f"{conditions.percent(goal)}, found knowing every request):"]
    for name, line in zip(names, lines, strict=True):
        ratio = f"{product_gpu_hours / line.gpu_hours:.2f} x" if line.gpu_hours > 0 else "-"
        attainment = ("-" if line.sla_attainment is None
                      else conditions.percent(line.sla_attainment))
        rows.append(f"  {name:<{width}}  {line.gpu_hours:.3f} GPU-hours, SLA attainment "
                    f"{attainment:>8}, {product} {ratio}")
    return "\n".join(rows)
