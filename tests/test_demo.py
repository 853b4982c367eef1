"""The README's first command, as a person runs it (shortened to a few intervals)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_the_demo_replays_a_trace_through_the_four_services_and_exits_0() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SLAPLANNER_NATS_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--max-intervals", "6"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("t (s)"))
    rows = [line.split() for line in lines[header + 1:]
            if line.strip() and line.split()[0].isdigit()][:6]
    assert [row[0] for row in rows] == ["15", "30", "45", "60", "75", "90"]
    # the first window of the Azure code trace at x10: 63 requests (checked in the trace)
    assert rows[0][1] == "63"
    assert all(row[-1] in ("dry-run", "unchanged") for row in rows)
    assert "6 intervals" in result.stdout
