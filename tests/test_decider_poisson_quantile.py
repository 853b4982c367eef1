"""The decider's Poisson quantile is scipy's, computed without scipy's per-call overhead."""

from __future__ import annotations

import pytest
from scipy import stats

from services.decider.policies.slaplanner import queueing


@pytest.mark.parametrize(
    ("mean", "quantile"),
    [
        (0.3, 0.9),       # mostly zero in flight
        (1.0, 0.5),
        (4.2, 0.95),
        (37.3, 0.99),
        (250.0, 0.999),
        (1.0e5, 0.9),     # a very busy deployment
        (2.0, 0.1353352832366127),  # exactly P(N = 0): the boundary between 0 and 1
    ],
)
def test_poisson_quantile_equals_scipys(mean: float, quantile: float) -> None:
    assert queueing.poisson_quantile(mean, quantile) == float(stats.poisson.ppf(quantile, mean))


@pytest.mark.parametrize("quantile", [0.0, 1.0])
def test_poisson_quantile_edges_are_scipys(quantile: float) -> None:
    assert queueing.poisson_quantile(5.0, quantile) == float(stats.poisson.ppf(quantile, 5.0))


def test_no_load_means_nobody_in_flight() -> None:
    assert queueing.poisson_quantile(0.0, 0.99) == 0.0
