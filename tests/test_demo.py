"""The README's first command, as a person runs it: ``slaplanner demo`` with its own defaults (the
whole bundled slice), on the test's nats-server, from a fresh working directory."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

from shared import traces
from shared.messages import Outcome
from sim import comparison, demo
from tests.conftest import NatsEndpoint

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUMBER = r"(\d+(?:\.\d+)?)"


def test_the_demo_replays_the_bundled_slice_and_prints_the_table_the_report_and_a_plot(
    nats_server: NatsEndpoint, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SLAPLANNER_NATS_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--nats-url", nats_server.url],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.splitlines()[0] == (
        f"forecaster -> decider -> actuator on the NATS server at {nats_server.url} (--nats-url "
        "or SLAPLANNER_NATS_URL): services already reading its stream share the work, and the "
        "numbers then differ")

    # One row per 15 s interval of the sped-up trace, every request counted exactly once.
    trace = traces.load_trace(demo.DEMO_TRACE).sped_up(demo.DEMO_DEFAULTS["speedup"])
    intervals = math.floor(float(trace.arrival_s[-1]) / 15.0) + 1  # 23
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s+\d\d:\d\d\s+\d+\s", line)]
    assert [row[0] for row in rows] == [f"{15 * (i + 1) // 60:02d}:{15 * (i + 1) % 60:02d}"
                                        for i in range(intervals)]
    assert sum(int(row[1]) for row in rows) == len(trace) == 8819
    assert rows[0][1] == "63"  # the first 15 s of the code trace at x10 (checked in the trace)
    outcomes = {str(outcome) for outcome in Outcome}
    for row in rows[:-1]:  # no decision is taken after the last window
        prefill, decode = int(row[8]), int(row[9])
        assert prefill >= 1 and decode >= 1 and prefill + decode <= 32, row
        assert row[-1] in outcomes, row
    assert "applied" in {row[-1] for row in rows[:-1]}  # it did scale

    # The SLA report.
    requests, clipped = map(int, _match(r"(\d+) requests \((\d+) clipped to the context", out))
    assert requests == len(trace) and 0 <= clipped <= requests
    sla, ttft, itl = (float(v) / 100 for v in _match(
        rf"SLA attainment {NUMBER} % \(TTFT {NUMBER} %, ITL {NUMBER} %\)", out))
    assert 0.0 <= sla <= min(ttft, itl) <= 1.0 and 0.0 <= max(ttft, itl) <= 1.0
    for name in ("TTFT", "ITL"):
        p50, p90, p99 = map(float, _match(
            rf"{name} p50/p90/p99 {NUMBER} / {NUMBER} / {NUMBER} ms", out))
        assert 0.0 < p50 <= p90 <= p99
    gpu_hours, lower, ratio, actions = map(float, _match(
        rf"{NUMBER} GPU-hours, lower bound {NUMBER} \({NUMBER} x\), (\d+) scaling actions", out))
    assert 0.0 < lower <= gpu_hours and ratio >= 1.0 and actions >= 1
    assert abs(ratio - gpu_hours / lower) < 0.05

    # What the product buys: the same slice under Dynamo's policy, the best fixed fleet and the
    # clairvoyant, each with slaplanner's GPU-hours over its own.
    (product,) = _match(rf"slaplanner N x: its {NUMBER} GPU-hours over theirs", out)
    assert float(product) == round(gpu_hours, 3)
    (goal,) = _match(rf"the cheapest reaching {NUMBER} %", out)
    assert float(goal) == 99.0  # the demo's --goal
    compared = {}
    for name in ("Dynamo's policy", "best fixed fleet", "clairvoyant"):
        hours, attainment, times = map(float, _match(
            rf"\n  {name} \([^)]*\) +{NUMBER} GPU-hours, SLA attainment +{NUMBER} %, "
            rf"slaplanner {NUMBER} x\n", out + "\n"))
        assert hours > 0.0 and 0.0 <= attainment <= 100.0
        # The printed ratio is the printed figures' quotient, to their rounding (3 and 2 places).
        low = (float(product) - 0.0005) / (hours + 0.0005) - 0.005
        high = (float(product) + 0.0005) / (hours - 0.0005) + 0.005
        assert low <= times <= high, (name, product, hours, times)
        compared[name] = (hours, attainment)
    # The clairvoyant may change its fleet every interval and the fixed fleet may not: it is
    # never dearer for the same goal, and both reach it on this slice.
    assert compared["clairvoyant"][0] <= compared["best fixed fleet"][0]
    assert min(compared["clairvoyant"][1], compared["best fixed fleet"][1]) >= 99.0
    (fixed_p, fixed_d) = map(int, _match(r"best fixed fleet \((\d+) P \+ (\d+) D\)", out))
    assert fixed_p >= 1 and fixed_d >= 1

    # The plot, in the working directory by default.
    (where,) = _match(r"plot of load, forecast, replicas and latencies: (\S+)", out)
    plot = tmp_path / "demo.png"
    assert Path(where) == plot.resolve()
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    assert plot.stat().st_size > 30_000  # four panels of lines, not an empty figure


def test_the_demo_keeps_to_its_own_server_whatever_slaplanner_nats_url_names(
    tmp_path: Path,
) -> None:
    # The variable the README exports for hand-started services; the demo must not join them.
    env = {**os.environ, "SLAPLANNER_NATS_URL": "nats://127.0.0.1:1"}
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--max-intervals", "2", "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.match(r"forecaster -> decider -> actuator on an embedded nats-server at "
                    r"nats://127\.0\.0\.1:\d+ \(--nats-url to use another\)\n", result.stdout)


def test_an_output_into_a_missing_folder_fails_at_once_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--plot", "plots/demo.png"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""  # no server started, nothing replayed
    assert result.stderr.splitlines() == [
        "slaplanner demo: --plot plots/demo.png: the folder plots does not exist; create it "
        "(mkdir -p plots) or write elsewhere"]


def test_the_comparison_line_divides_the_products_gpu_hours_by_each() -> None:
    lines = [comparison.Line("Dynamo's policy", "constant predictor, same start", 0.5, 0.25),
             comparison.Line("clairvoyant", "a fleet per interval, goal not reached", 1.5, None)]
    text = comparison.format_lines("slaplanner", 3.0, lines, 0.99)
    assert text.splitlines() == [
        "the same slice in the simulator (slaplanner N x: its 3.000 GPU-hours over theirs;",
        "best fixed and clairvoyant: the cheapest reaching 99.00 %, found knowing every request):",
        "  Dynamo's policy (constant predictor, same start)      0.500 GPU-hours, "
        "SLA attainment  25.00 %, slaplanner 6.00 x",  # 3.000 / 0.500
        "  clairvoyant (a fleet per interval, goal not reached)  1.500 GPU-hours, "
        "SLA attainment        -, slaplanner 2.00 x",  # 3.000 / 1.500
    ]


def _match(pattern: str, text: str) -> tuple[str, ...]:
    found = re.search(pattern, text)
    assert found is not None, f"{pattern!r} not in the demo's output:\n{text}"
    return found.groups()
