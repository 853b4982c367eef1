"""The load bench, small: real services on a real nats-server, every snapshot decided once.

Speed is not asserted here (the figures go to docs/benchmarks.md); what is checked is that the
bench's matching by derived ids sees every decision of every interval exactly once, and that it
measures every process it started.
"""

from __future__ import annotations

from bench import load

DEPLOYMENTS = 20
INTERVALS = 2


async def test_every_snapshot_of_every_interval_becomes_exactly_one_scale_event() -> None:
    args = load.parse_args(["--deployments", str(DEPLOYMENTS), "--intervals", str(INTERVALS),
                            "--interval-s", "3", "--grace-s", "30"])
    result = await load.run(args)

    expected = DEPLOYMENTS * INTERVALS  # 40 snapshots, one decision each
    assert result["expected"] == expected
    for stage in ("forecast", "target", "scaled"):
        assert result["stages"][stage]["received"] == expected, stage
    assert result["duplicates"] == {}
    assert result["processes"].keys() == {
        "forecaster-0", "decider", "actuator", "nats-server", "bench"}
    for name, usage in result["processes"].items():
        assert usage["rss_mib_max"] > 0, name


def test_the_load_spans_quiet_and_busy_deployments_with_distinct_names() -> None:
    loads = load.deployment_loads(1000)
    assert len({d.key for d in loads}) == 1000
    rates = sorted(d.rate_rps for d in loads)
    assert rates[0] < 0.5 and rates[-1] > 40.0  # from a few requests a minute to tens a second
