"""The slaplanner policy's arithmetic, one table per plain function, the working in comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.decider.policies.slaplanner import (
    attainment,
    corrections,
    queueing,
    sizing,
    stabilise,
)
from services.decider.policies.slaplanner.bounds import ratio_bounds, split_gpu_budget
from services.decider.policies.slaplanner.load import design_point
from shared.explanation import Rule
from shared.messages import MetricSnapshot
from tests.test_slaplanner_policy_support import PROFILE, config, snapshot


def erlang_c_by_the_book(servers: int, load: float) -> float:
    """Erlang C from its textbook closed form, to check the recursion against."""
    top = load**servers / math.factorial(servers) * servers / (servers - load)
    bottom = sum(load**k / math.factorial(k) for k in range(servers)) + top
    return top / bottom


@pytest.mark.parametrize(
    ("servers", "load", "expected"),
    [
        pytest.param(1, 0.5, 0.5, id="one server waits as often as it is busy (M/M/1: rho)"),
        pytest.param(2, 1.0, 1 / 3, id="two servers at one erlang wait a third of the time"),
        pytest.param(3, 2.0, 4 / 9, id="three servers at two erlangs wait four ninths"),
        pytest.param(2, 2.0, 1.0, id="an unstable queue always waits"),
        pytest.param(4, 0.0, 0.0, id="no load never waits"),
    ],
)
def test_erlang_c(servers: int, load: float, expected: float) -> None:
    assert queueing.erlang_c(servers, load) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("servers", [2, 5, 13, 40])
def test_the_erlang_c_recursion_agrees_with_the_closed_form(servers: int) -> None:
    load = 0.8 * servers
    assert queueing.erlang_c(servers, load) == pytest.approx(
        erlang_c_by_the_book(servers, load), rel=1e-10
    )


def one_prompt_queue(load: float, variability: float) -> attainment.PrefillQueue:
    """A queue of one-second requests at ``load`` erlangs whose Allen-Cunneen factor is
    ``variability`` (Poisson arrivals, service cv^2 = 2 * variability - 1)."""
    return attainment.PrefillQueue(
        rate_per_s=load, service_s=np.array([1.0]), latency_s=np.array([0.0]),
        weights=np.array([1.0]), arrival_cv2=1.0, service_cv2_default=2 * variability - 1,
    )


@pytest.mark.parametrize(
    ("load", "budget_s", "variability", "expected"),
    [
        pytest.param(
            1.0, 1.0, 1.0, 4,
            # P(W > t) = C(c, a) exp(-(c - a) t / S), S = 1:
            # c=3: 0.0909 * e^-2 = 0.0123 > 0.01;  c=4: 0.0204 * e^-3 = 0.0010
            id="one erlang, a budget of one service time, 1% tail: four servers",
        ),
        pytest.param(
            1.0, 1.0, 0.5, 3,
            # Allen-Cunneen with deterministic service halves the wait: the tail's exponent
            # doubles. c=2: (1/3) e^-2 = 0.045;  c=3: 0.0909 e^-4 = 0.0017
            id="the same with equal prompts (M/D/c): three servers",
        ),
        pytest.param(
            1.0, 0.0, 1.0, 5,
            # no wait allowed: C(c, 1) <= 0.01. C(4, 1) = 0.0204;  C(5, 1) = 0.0038
            id="no wait budget at all: Erlang C itself under the tail, five servers",
        ),
        pytest.param(
            12.0, 100.0, 1.0, 13,
            # a budget of 100 service times: any stable count meets it, so floor(a) + 1
            id="a loose budget needs only a stable queue: floor(a) + 1",
        ),
        pytest.param(0.0, 1.0, 1.0, 0, id="no load needs no server"),
    ],
)
def test_fewest_prefill(load: float, budget_s: float, variability: float, expected: int) -> None:
    found = attainment.fewest_prefill(one_prompt_queue(load, variability), budget_s, 0.01,
                                      10_000)
    assert (found.engines, found.reached) == (expected, True)
    shares = attainment.prefill_miss_shares(one_prompt_queue(load, variability), budget_s,
                                            expected)
    assert shares[expected] == pytest.approx(found.share) and found.share <= 0.01
    assert expected == 0 or shares[expected - 1] > 0.01


def test_a_load_beyond_the_maximum_is_capped_and_says_so() -> None:
    found = attainment.fewest_prefill(one_prompt_queue(50.0, 1.0), 1.0, 0.01, 20)
    assert (found.engines, found.reached) == (20, False)


@pytest.mark.parametrize(
    ("ttft_s", "variability", "expected"),
    [
        pytest.param(
            0.1, sizing.Variability(1.0, 1.0), 18,
            # S = 3000 / 49,481.09 = 0.06063 s; a = 200/s * S = 12.13 erlangs; wait budget
            # 0.1 - 0.06046 (profiled TTFT) = 0.03954 s; P(W > budget) with 17 engines 0.57 %,
            # with 18 engines 0.18 %: the first within TTFT's half of the 1 % the goal allows
            id="Dynamo's worked example at 200 req/s under 100 ms: 18 engines, not 13",
        ),
        pytest.param(
            0.1, sizing.Variability(1.0, 0.0), 16,
            # 15 engines 0.80 %, 16 engines 0.14 %
            id="the same with prompts of one length (Allen-Cunneen 1/2): 16 engines",
        ),
        pytest.param(
            2.0, sizing.Variability(1.0, 1.0), 13,
            # a 1.94 s budget is 32 service times: ceil(12.13) = 13, Dynamo's own count
            id="a loose TTFT target needs only Dynamo's throughput count",
        ),
    ],
)
def test_prefill_sizing_keeps_queueing_plus_prefill_under_the_ttft_target(
    ttft_s: float, variability: sizing.Variability, expected: int
) -> None:
    sized = sizing.size_prefill(200.0, 3000.0, PROFILE, config(ttft_target_s=ttft_s), 1.0,
                                variability)
    assert sized.replicas == expected
    assert sized.offered_load == pytest.approx(200 * 3000 / 49_481.09, rel=1e-6)


def test_a_ttft_target_below_the_prefill_time_is_sized_for_a_short_queue_and_flagged() -> None:
    sized = sizing.size_prefill(10.0, 16_000.0, PROFILE, config(ttft_target_s=0.2), 1.0)
    assert not sized.reachable and sized.detail["ttft_reachable"] is False
    assert sized.wait_budget_s == pytest.approx(0.1 * sized.prefill_s)


@pytest.mark.parametrize(
    ("itl_s", "expected", "bound_by", "per_engine"),
    [
        pytest.param(
            0.01, 14, Rule.ITL_CURVE, 48.486,
            # context 3000 + 300/2 = 3150; the grid row meets 10 ms up to KV usage 0.1616
            # (ITL 9.73 ms): 0.1616 * 945,029 / 3150 = 48.49 requests per engine.
            # In flight: 200/s * 300 tokens * 9.73 ms = 584.1; a request is in an over-full
            # batch when the others fill it: P(N >= c k) <= 0.5 % (ITL's half of the goal's
            # 1 %) needs c k >= 647 + 1 (Poisson 99.5 % quantile + 1); 648 / 48.49 = 13.4 -> 14
            id="Dynamo's worked example at 200 req/s under 10 ms: 14 engines by the ITL curve",
        ),
        pytest.param(
            0.1, 10, Rule.KV_CAPACITY, 269.705,
            # every load meets 100 ms: the KV headroom binds at usage 0.899 (the grid column
            # below 0.9): 0.899 * 945,029 / 3150 = 269.7 per engine, ITL there 39.8 ms;
            # in flight 200 * 300 * 0.0398 = 2389.6, 99.5 % quantile 2516 + 1 -> 2517 / 269.7
            # -> 10
            id="a loose ITL target: the KV cache binds first",
        ),
    ],
)
def test_decode_sizing_by_littles_law(
    itl_s: float, expected: int, bound_by: Rule, per_engine: float
) -> None:
    sized = sizing.size_decode(200.0, 3000.0, 300.0, PROFILE, config(itl_target_s=itl_s), 1.0)
    assert (sized.replicas, sized.reason) == (expected, bound_by)
    assert sized.per_engine == pytest.approx(per_engine, rel=1e-4)
    covered = sized.detail["in_flight_covered"]
    assert math.ceil(covered / sized.per_engine) == expected


def test_a_slower_decode_engine_lowers_the_concurrency_it_may_run() -> None:
    as_profiled = sizing.size_decode(200.0, 3000.0, 300.0, PROFILE, config(), 1.0)
    slower = sizing.size_decode(200.0, 3000.0, 300.0, PROFILE, config(), 1.2)
    assert slower.per_engine < as_profiled.per_engine
    assert slower.replicas > as_profiled.replicas


@pytest.mark.parametrize(
    ("point", "upper", "theirs", "ours", "expected"),
    [
        pytest.param(100.0, 140.0, 0.9, 0.9, 140.0, id="same confidence: the upper quantile"),
        pytest.param(100.0, 140.0, 0.9, 0.5, 100.0, id="confidence one half: the point"),
        pytest.param(
            100.0, 140.0, 0.9, 0.75, 100.0 + 40.0 * 0.67449 / 1.28155,
            id="0.75 against 0.9: the spread times z(0.75) / z(0.9)",
        ),
        pytest.param(100.0, 140.0, 0.9, 0.3, 100.0 - 40.0 * 0.52440 / 1.28155,
                     id="below one half: under the point"),
        pytest.param(100.0, 100.0, 0.9, 0.99, 100.0, id="no spread, nothing to add"),
        pytest.param(0.0, 100.0, 0.9, 0.75, 100.0 * 0.67449 / 1.28155,
                     id="no requests forecast under a band: the band at our quantile"),
    ],
)
def test_one_quantity_with_a_band_is_the_forecast_at_our_confidence(
    point: float, upper: float, theirs: float, ours: float, expected: float
) -> None:
    planned = design_point({"requests": point, "isl": 2000.0},
                           {"requests": upper, "isl": 2000.0}, theirs, ours)
    assert planned["requests"] == pytest.approx(expected, rel=1e-4)
    assert planned["isl"] == 2000.0


def test_a_quantity_forecast_at_zero_under_a_band_takes_the_whole_error() -> None:
    """Its relative error is unbounded: in the limit the others stay at their points (before
    the joint quantile, a point of 0 planned on the band; it must not plan 0)."""
    planned = design_point({"requests": 0.0, "isl": 3000.0}, {"requests": 100.0, "isl": 3300.0},
                           0.9, 0.75)
    assert planned["requests"] == pytest.approx(100.0 * 0.67449 / 1.28155, rel=1e-4)
    assert planned["isl"] == 3000.0
    near_zero = design_point({"requests": 1e-9, "isl": 3000.0},
                             {"requests": 100.0, "isl": 3300.0}, 0.9, 0.75)
    assert near_zero == pytest.approx(planned, rel=1e-6)


def test_a_product_is_planned_at_our_quantile_not_at_every_factors() -> None:
    """Requests and mean prompt each with a 10 % relative error (their 0.9 quantiles 12.8 %
    up): the prefill work, their product, has a 14.1 % error; at 0.75 it is planned 9.5 % up
    (each factor 4.8 %), where both factors at their own 0.75 quantile would be 13.9 %."""
    z90, z75 = 1.28155, 0.67449
    points = {"requests": 100.0, "isl": 2000.0}
    uppers = {"requests": 100.0 * (1 + 0.1 * z90), "isl": 2000.0 * (1 + 0.1 * z90)}
    planned = design_point(points, uppers, 0.9, 0.75)
    for name in points:
        assert planned[name] / points[name] == pytest.approx(1 + z75 * 0.1 / 2 ** 0.5, rel=1e-6)
    work = planned["requests"] * planned["isl"] / (100.0 * 2000.0)
    both_at_quantile = (1 + z75 * 0.1) ** 2
    assert work == pytest.approx(1 + z75 * 0.1 * 2 ** 0.5, abs=0.003)
    assert work < both_at_quantile - 0.04
    # the wider band moves more: its factor carries more of the product's error
    uneven = design_point(points, {"requests": 100.0 * (1 + 0.3 * z90), "isl": uppers["isl"]},
                          0.9, 0.75)
    assert uneven["requests"] / 100.0 - 1 > 5 * (uneven["isl"] / 2000.0 - 1) > 0
    # below one half, every factor is planned below its point; no band, the points
    assert all(v < points[k] for k, v in design_point(points, uppers, 0.9, 0.3).items())
    assert design_point(points, points, 0.9, 0.99) == points


KNOBS = corrections.CorrectionKnobs(half_life_s=120.0, min_weight_requests=50.0, minimum=0.5,
                                    maximum=3.0)


@pytest.mark.parametrize(
    ("before", "observed", "requests", "elapsed_s", "expected"),
    [
        pytest.param(
            corrections.Correction(1.0, 0.0, None), 1.2, 950.0, 0.0, 1.19,
            # (50 * 1.0 + 950 * 1.2) / (50 + 950) = 1.19: a busy first window counts
            id="a busy first window moves the factor most of the way",
        ),
        pytest.param(
            corrections.Correction(1.0, 2000.0, 0.0), 40.0, 2.0, 60.0, 1.0 + 2 * 2.0 / 1416.2,
            # observed 40 clamps to 3; the past 2000 requests decay by 0.5^(60/120) to 1414.2;
            # (1414.2 * 1 + 2 * 3) / 1416.2
            id="two requests with a huge latency barely move it",
        ),
        pytest.param(
            corrections.Correction(1.0, 0.0, 0.0), 40.0, 2.0, 60.0, 1.0 + 2 * 2.0 / 52.0,
            # no past weight: the minimum weight of 50 requests still stands in
            id="two requests with a huge latency and no history move it 8 % at most",
        ),
        pytest.param(
            corrections.Correction(1.5, 100.0, 0.0), 0.01, 100.0, 0.0, (150 + 50) / 200,
            # observed 0.01 clamps to 0.5: (100 * 1.5 + 100 * 0.5) / 200 = 1.0
            id="an implausibly fast window is clamped before it counts",
        ),
    ],
)
def test_correction_factors_are_clamped_and_weighted_by_requests(
    before: corrections.Correction,
    observed: float,
    requests: float,
    elapsed_s: float,
    expected: float,
) -> None:
    now = (before.updated_at_s or 0.0) + elapsed_s
    after, _ = corrections.updated(before, observed, requests, now, KNOBS)
    assert after.factor == pytest.approx(expected, rel=1e-4)


def test_a_window_without_requests_or_with_a_nonsense_factor_changes_nothing() -> None:
    before = corrections.Correction(1.3, 500.0, 0.0)
    for observed, requests in ((1.1, 0.0), (math.nan, 100.0), (-1.0, 100.0), (math.inf, 10.0)):
        assert corrections.updated(before, observed, requests, 60.0, KNOBS)[0] == before


@pytest.mark.parametrize(
    ("desired", "current", "highest", "expected"),
    [
        pytest.param(8, 5, 9, (8, Rule.WITHIN_BOUNDS), id="up at once, whatever the window"),
        pytest.param(3, 6, 5, (5, Rule.SCALE_DOWN_STABILISED), id="down to the window's high"),
        pytest.param(3, 6, 9, (6, Rule.SCALE_DOWN_STABILISED), id="never up for an old high"),
        pytest.param(3, 6, 3, (3, Rule.WITHIN_BOUNDS), id="down once the window agrees"),
        pytest.param(3, None, 9, (3, Rule.WITHIN_BOUNDS), id="nothing running: as wanted"),
    ],
)
def test_scale_down_stabilisation(
    desired: int, current: int | None, highest: int | None, expected: tuple[int, Rule]
) -> None:
    assert stabilise.scale_down_stabilised(desired, current, highest) == expected


@pytest.mark.parametrize(
    ("desired", "current", "expected"),
    [
        pytest.param(20, 3, (7, Rule.STEP_LIMIT_UP), id="up by max(4, 100 % of 3) = 4"),
        pytest.param(30, 10, (20, Rule.STEP_LIMIT_UP), id="up by max(4, 100 % of 10) = 10"),
        pytest.param(1, 10, (5, Rule.STEP_LIMIT_DOWN), id="down by max(1, 50 % of 10) = 5"),
        pytest.param(0, 1, (0, Rule.WITHIN_BOUNDS), id="down by at least one"),
        pytest.param(6, 5, (6, Rule.WITHIN_BOUNDS), id="a small step passes"),
    ],
)
def test_step_limits(desired: int, current: int, expected: tuple[int, Rule]) -> None:
    assert stabilise.step_limited(desired, current, 4, 100.0, 1, 50.0) == expected


def test_the_window_forgets_old_and_future_recommendations() -> None:
    window = (
        stabilise.Recommendation(0.0, 9, 9),
        stabilise.Recommendation(200.0, 5, 4),
        stabilise.Recommendation(900.0, 7, 7),  # from a clock ahead of ours
    )
    kept = stabilise.record(window, 400.0, 2, 3, 300.0)
    assert [r.at_s for r in kept] == [200.0, 400.0]
    assert (stabilise.window_max(kept, "prefill"), stabilise.window_max(kept, "decode")) == (5, 4)


@pytest.mark.parametrize(
    ("knobs", "counts", "expected"),
    [
        pytest.param({"min_prefill_decode_ratio": 0.5}, (1, 6), (3, 6), id="prefill raised to 6/2"),
        pytest.param({"max_prefill_decode_ratio": 2.0}, (9, 2), (9, 5), id="decode raised to 9/2"),
        pytest.param({"min_prefill_decode_ratio": 0.5, "max_prefill_decode_ratio": 2.0},
                     (4, 4), (4, 4), id="within both bounds: unchanged"),
        pytest.param({"max_prefill_decode_ratio": 2.0, "max_decode_replicas": 3},
                     (9, 2), (9, 3), id="a maximum may stop the raise"),
    ],
)
def test_prefill_decode_ratio_bounds_raise_the_short_role(
    knobs: dict[str, float], counts: tuple[int, int], expected: tuple[int, int]
) -> None:
    prefill, decode, _, _ = ratio_bounds(*counts, config(**knobs))
    assert (prefill, decode) == expected


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        pytest.param(
            29, (16, 13),
            # needs 17 prefill + 13 decode = 30 GPUs. Predicted share within both targets:
            # 16 + 13: (1 - 1.75 %) x (1 - 2.85 %) = 95.4 %;  17 + 12: (1 - 0.57 %) x
            # (1 - P(N > 12 x 48.49 = 581, mean 584) = 54 %) = 45.7 %: one prefill engine less
            id="one GPU short: prefill gives one up, decode would lose half its requests",
        ),
        pytest.param(
            28, (15, 13),
            # 15 + 13: (1 - 5.2 %) x (1 - 2.85 %) = 92.1 %, the best of the splits
            id="two GPUs short: still from prefill, whose queue degrades gently",
        ),
        pytest.param(
            20, (10, 10),
            # 12.13 erlangs of prefill and 12.05 engines' worth of decode: no split of 20 keeps
            # up with both, so the bottleneck is made least overloaded: 10/12.13 and 10/12.05
            # (Dynamo's proportional cut, 17 x 20/30 = 11 and 9, starves decode more)
            id="far too few GPUs: the pipeline's bottleneck is balanced",
        ),
    ],
)
def test_a_binding_budget_goes_where_the_shortfall_costs_the_sla_least(
    budget: int, expected: tuple[int, int]
) -> None:
    cfg = config(max_total_gpus=budget)
    prefill = sizing.size_prefill(200.0, 3000.0, PROFILE, cfg, 1.0)  # 17 engines
    decode = sizing.size_decode(200.0, 3000.0, 300.0, PROFILE, cfg, 1.0)  # 13 engines
    split = split_gpu_budget(17, 13, (1, 1), cfg, prefill.hurt, decode.hurt)
    assert (split.prefill, split.decode) == expected
    assert split.detail["binds"] and split.detail["final_gpus"] == budget
    assert f"{budget} GPUs cannot hold 17 prefill + 13 decode" in split.detail["why"]


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [
        pytest.param(1.0, 0.0, id="one length: no variability"),
        pytest.param(2.3026, 1.0, id="p90 = 2.30 x mean, the exponential's: cv^2 = 1"),
        pytest.param(1.9449, 0.5, id="p90 = 1.94 x mean, gamma of shape 2: cv^2 = 1/2"),
        pytest.param(50.0, sizing.MAX_SERVICE_CV2, id="beyond any sane spread: capped"),
    ],
)
def test_prefill_variability_from_the_isl_spread(ratio: float, expected: float) -> None:
    assert sizing._gamma_cv2_from_p90_ratio(ratio) == pytest.approx(expected, abs=2e-3)


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        pytest.param([10.0] * 12, 0.0, id="the same count every window: no burstiness"),
        pytest.param([0.0, 20.0] * 6, 20.0, id="all or nothing: dispersion 20"),
        pytest.param([5.0] * 4, None, id="too few windows to say"),
    ],
)
def test_arrival_burstiness_from_short_windows(
    counts: list[float], expected: float | None
) -> None:
    # half the mean squared difference of consecutive counts over their mean:
    # [0, 20, 0, ...]: 400 / 2 / 10 = 20
    dispersion, _ = sizing.arrival_cv2_from_counts(counts)
    assert dispersion == (None if expected is None else pytest.approx(expected))


def _window(ttft_avg_s: float, ttft_p90_s: float | None, isl_p90: float | None) -> MetricSnapshot:
    # 600 requests of ISL 3000 (about 60 ms of prefill each) in a minute on 4 engines: 15 %
    # busy, so the M/M/c model sees almost no queueing and puts any excess on the engines.
    return snapshot(60.0, requests=600.0, prefill=4, ttft_avg_s=ttft_avg_s,
                    ttft_p90_s=ttft_p90_s, isl_p90=isl_p90)


def test_the_ttft_p90_caps_the_prefill_slowdown_that_bunched_arrivals_would_inflate() -> None:
    # Mean TTFT 0.12 s, twice the prefill time: the mean-TTFT model alone says 2x slower
    # engines. But 90 % of the requests had their first token within 0.072 s, and none can be
    # faster than its prefill (0.0605 s at ISL 3000, as profiled), so at most 0.072 / 0.0605:
    # the excess of the mean is a few requests that queued behind a burst.
    prefill_s = PROFILE.prefill.ttft_s(3000.0)
    factor, detail = sizing.observed_prefill_factor(_window(0.12, 0.072, 3000.0), PROFILE,
                                                    config())
    assert detail["capped_from"] == pytest.approx(2.0, rel=0.05)
    assert factor == pytest.approx(0.072 / prefill_s)


@pytest.mark.parametrize(
    ("ttft_p90_s", "isl_p90"),
    [
        pytest.param(0.5, 3000.0, id="a p90 that allows the model's slowdown does not bind"),
        pytest.param(None, 3000.0, id="no TTFT p90: nothing to cap with"),
        pytest.param(0.072, None, id="no ISL p90: nothing to cap with"),
    ],
)
def test_the_mean_ttft_model_stands_when_the_p90_does_not_contradict_it(
    ttft_p90_s: float | None, isl_p90: float | None
) -> None:
    factor, detail = sizing.observed_prefill_factor(_window(0.12, ttft_p90_s, isl_p90), PROFILE,
                                                    config())
    assert "capped_from" not in detail
    assert factor == pytest.approx(2.0, rel=0.05)


@pytest.mark.parametrize("mean", [1e300, math.inf])
def test_a_runaway_mean_in_flight_is_covered_by_itself_not_a_crash(mean: float) -> None:
    # scipy's Poisson inversion gives NaN this far out; the spread (sqrt(mean)) is nothing there.
    assert queueing.poisson_quantile(mean, 0.9) == mean
