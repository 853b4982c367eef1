"""Window values from two scrapes of each endpoint: increases, resets, averages, quantiles,
workers, honest gaps; arrivals from the scrapes in between."""

from __future__ import annotations

import math

import pytest

from services.collector import exposition, promql, window
from services.collector.exposition import Endpoint, Exposition, Target
from services.collector.scrape import ScrapeCollector, expand, next_boundary
from services.collector.settings import CollectorSettings

SCRAPE_1 = """
# TYPE dynamo_frontend_requests counter
dynamo_frontend_requests_total{model="llama"} 100
dynamo_frontend_requests_total{model="other"} 7
# TYPE dynamo_frontend_input_sequence_tokens histogram
dynamo_frontend_input_sequence_tokens_bucket{model="llama",le="1000"} 10
dynamo_frontend_input_sequence_tokens_bucket{model="llama",le="4000"} 90
dynamo_frontend_input_sequence_tokens_bucket{model="llama",le="+Inf"} 100
dynamo_frontend_input_sequence_tokens_sum{model="llama"} 250000
dynamo_frontend_input_sequence_tokens_count{model="llama"} 100
"""
SCRAPE_2 = """
# TYPE dynamo_frontend_requests counter
dynamo_frontend_requests_total{model="llama"} 160
dynamo_frontend_requests_total{model="other"} 9
# TYPE dynamo_frontend_input_sequence_tokens histogram
dynamo_frontend_input_sequence_tokens_bucket{model="llama",le="1000"} 10
dynamo_frontend_input_sequence_tokens_bucket{model="llama",le="4000"} 130
dynamo_frontend_input_sequence_tokens_bucket{model="llama",le="+Inf"} 160
dynamo_frontend_input_sequence_tokens_sum{model="llama"} 430000
dynamo_frontend_input_sequence_tokens_count{model="llama"} 160
# TYPE dynamo_frontend_inflight_requests gauge
dynamo_frontend_inflight_requests{model="llama"} 12
"""


def frontend(before: str | None, after: str, url: str = "http://fe/metrics") -> Target:
    return Target(url, Endpoint.FRONTEND, exposition.parse(after),
                  None if before is None else exposition.parse(before))


def dynamo(*targets: Target, selector: str = 'model="llama"') -> window.WindowValues:
    return exposition.window_values(promql.DYNAMO, targets, selector)


def test_the_window_is_the_increase_between_scrapes_for_the_chosen_labels() -> None:
    values = dynamo(frontend(SCRAPE_1, SCRAPE_2))
    assert values.values["num_requests"] == 60.0  # 160 - 100, "other" excluded
    assert values.values["isl_avg"] == pytest.approx(3000.0)  # (430000 - 250000) / 60
    # 60 new requests: 0 below 1000, 40 in (1000, 4000], 20 above 4000.
    # p90 rank 54 lies past 40, in +Inf: the highest finite edge is the best estimate.
    assert values.values["isl_p90"] == 4000.0
    assert values.values["requests_running"] == 12.0
    assert values.values["ttft_avg_s"] is None
    assert "no data" in values.gaps["ttft_avg_s"]


def test_the_model_is_matched_whatever_its_case() -> None:
    # the frontend lower-cases its model label; the operator writes the model as it is spelled
    assert dynamo(frontend(SCRAPE_1, SCRAPE_2), selector='model="Llama"').values[
        "num_requests"] == 60.0


def test_a_counter_reset_counts_the_whole_new_value() -> None:
    assert window.counter_increase(500.0, 20.0) == 20.0  # restarted frontend
    assert window.counter_increase(500.0, 520.0) == 20.0


def test_an_empty_window_gives_undefined_averages_not_zeros() -> None:
    values = dynamo(frontend(SCRAPE_1, SCRAPE_1))
    assert values.values["num_requests"] == 0.0  # a real zero: idle
    assert values.values["isl_avg"] is None  # undefined: no requests
    assert values.gaps["isl_avg"] == "no samples in window"


@pytest.mark.parametrize(
    ("quantile", "buckets", "expected"),
    [
        pytest.param(0.5, {0.1: 50.0, 0.2: 100.0, math.inf: 100.0}, 0.1,
                     id="the median at the top of the first bucket"),
        pytest.param(0.75, {0.1: 50.0, 0.2: 100.0, math.inf: 100.0}, 0.15,
                     id="linear inside the second bucket"),  # 0.1 + 0.1 * (75 - 50) / 50
        pytest.param(0.9, {0.1: 0.0, math.inf: 0.0}, None, id="no samples, no quantile"),
        pytest.param(0.5, {0.1: 5.0, 0.2: 5.0}, None, id="no +Inf bucket, not a histogram"),
    ],
)
def test_histogram_quantile_matches_prometheus(
    quantile: float, buckets: dict[float, float], expected: float | None
) -> None:
    result = window.histogram_quantile(quantile, buckets)
    assert result == (pytest.approx(expected) if expected is not None else None)


def test_the_fields_of_metrics_nobody_exposes_say_so() -> None:
    values = dynamo(frontend(SCRAPE_1, SCRAPE_2))
    # no worker endpoint: the engines' fields are unknown, each with its reason
    for name in ("kv_cache_usage", "prefill_workers", "decode_workers", "queue_time_avg_s"):
        assert values.values[name] is None
        assert values.gaps[name].startswith("no data"), name


@pytest.mark.parametrize(
    ("now", "interval", "expected"),
    [(100.0, 60.0, 120.0), (120.0, 60.0, 180.0), (119.999, 5.0, 120.0)],
    ids=["the next minute", "exactly on a boundary goes to the next", "short intervals"],
)
def test_ticks_align_to_interval_boundaries(now: float, interval: float, expected: float) -> None:
    assert next_boundary(now, interval) == pytest.approx(expected)


def test_a_series_that_appears_between_scrapes_started_at_zero() -> None:
    values = dynamo(frontend("", SCRAPE_2))
    assert values.values["num_requests"] == 160.0
    assert values.values["isl_avg"] == pytest.approx(430000 / 160)


def worker(running: float, waiting: float, kv: float, queue_s: tuple[float, float]) -> str:
    """A vLLM engine's exposition: its gauges and a request-queue-time histogram (sum, count)."""
    total, count = queue_s
    return f"""
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="Llama"}} {running}
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="Llama"}} {waiting}
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="Llama"}} {kv}
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_bucket{{engine="0",model_name="Llama",le="+Inf"}} {count}
vllm:request_queue_time_seconds_sum{{engine="0",model_name="Llama"}} {total}
vllm:request_queue_time_seconds_count{{engine="0",model_name="Llama"}} {count}
"""


def workers(*specs: tuple[str, Endpoint, str | None, str]) -> list[Target]:
    return [Target(url, role, exposition.parse(after),
                   None if before is None else exposition.parse(before))
            for url, role, before, after in specs]


def test_worker_endpoints_give_worker_counts_kv_usage_and_engine_queues() -> None:
    targets = workers(
        ("p0", Endpoint.PREFILL, worker(0, 0, 0.1, (1.0, 10)), worker(1, 2, 0.2, (3.0, 20))),
        ("d0", Endpoint.DECODE, worker(0, 0, 0.3, (0.0, 0)), worker(5, 1, 0.6, (0.0, 0))),
        ("d1", Endpoint.DECODE, worker(0, 0, 0.3, (0.0, 0)), worker(6, 0, 0.4, (0.0, 0))))
    # the deployment's matchers select frontend series only: a worker is the deployment's by
    # the list its URL is in (vLLM spells the model as it likes)
    values = exposition.window_values(promql.VLLM, targets, 'model="llama"')
    assert values.values["prefill_workers"] == 1 and values.values["decode_workers"] == 2
    assert values.values["kv_cache_usage"] == pytest.approx(0.5)  # decode only: (0.6 + 0.4) / 2
    assert values.values["requests_waiting"] == 3.0  # every engine's queue
    assert values.values["requests_running"] == 12.0
    assert values.values["queue_time_avg_s"] == pytest.approx(0.2)  # prefill: (3 - 1) / 10


def test_a_worker_that_does_not_answer_leaves_totals_unknown_and_means_standing() -> None:
    targets = workers(
        ("d0", Endpoint.DECODE, worker(0, 0, 0.3, (0.0, 0)), worker(5, 1, 0.6, (0.0, 0))))
    values = exposition.window_values(promql.VLLM, targets, "",
                                      unanswered={Endpoint.DECODE: "1 of 2 decode endpoints "
                                                  "did not answer (d1: refused)"})
    assert values.values["kv_cache_usage"] == pytest.approx(0.6), "a mean of those that answer"
    assert values.values["decode_workers"] == 1, "the workers that answered"
    assert values.values["requests_running"] is None
    assert values.gaps["requests_running"] == ("incomplete: 1 of 2 decode endpoints did not "
                                               "answer (d1: refused)")


def test_a_worker_back_after_a_failed_scrape_counts_from_its_next_window() -> None:
    success = """
# TYPE vllm:request_success counter
vllm:request_success_total{{engine="0",finished_reason="stop"}} {0}
"""
    targets = workers(("d0", Endpoint.DECODE, success.format(10), success.format(15)),
                      ("d1", Endpoint.DECODE, None, success.format(500)))
    values = exposition.window_values(promql.VLLM, targets)
    assert values.values["num_requests"] is None
    assert "d1 has no scrape at the window's start" in values.gaps["num_requests"]


def settings(**overrides: object) -> CollectorSettings:
    values: dict[str, object] = {"source": "scrape", "interval_s": 4.0, "arrival_bin_s": 1.0,
                                 "dialect": "dynamo", "scrape_labels": ["model=llama"],
                                 **overrides}
    return CollectorSettings.model_validate(values)


STARTED = """
# TYPE dynamo_frontend_requests_started counter
dynamo_frontend_requests_started_total{{model="llama",endpoint="chat_completions"}} {0}
dynamo_frontend_requests_started_total{{model="other",endpoint="chat_completions"}} 1000
"""


def test_the_scrape_source_counts_arrivals_per_bin_from_the_scrapes_in_between() -> None:
    collector = ScrapeCollector(settings())
    fe = {"http://fe/metrics": Endpoint.FRONTEND}

    def at(count: int) -> dict[str, Exposition | str]:
        return {"http://fe/metrics": exposition.parse(STARTED.format(count))}

    first = collector.window(100.0, at(50), fe)
    assert first.stale and first.gaps["all"] == "first scrape: baseline for the next window"
    for t, count in ((101.0, 50), (102.0, 62), (103.0, 63)):
        collector.arrival_scrape(t, at(count))
    snap = collector.window(104.0, at(63), fe)
    # bins of 1 s: 0, 12, 1, 0 arrivals (the "other" model's series is not the deployment's)
    assert snap.arrival_signal == "request_start" and snap.arrival_bin_s == 1.0
    assert snap.arrivals_peak_1s == 12.0 and snap.arrival_peaks_exact is True
    # mean 13 / 4 = 3.25, variance (144 + 1) / 4 - 3.25 ** 2 = 25.6875
    assert snap.arrival_dispersion == pytest.approx(25.6875 / 3.25)
    assert snap.num_requests is None and "no data" in snap.gaps["num_requests"]


def test_a_missed_or_failed_arrival_scrape_leaves_the_arrival_fields_null() -> None:
    collector = ScrapeCollector(settings())
    fe = {"http://fe/metrics": Endpoint.FRONTEND}
    page = {"http://fe/metrics": exposition.parse(STARTED.format(5))}
    collector.window(100.0, page, fe)
    collector.arrival_scrape(101.0, page)
    collector.arrival_scrape(102.0, {"http://fe/metrics": "connection refused"})
    collector.arrival_scrape(103.0, page)
    snap = collector.window(104.0, page, fe)
    assert snap.arrival_dispersion is None
    assert snap.gaps["arrival_dispersion"] == \
        "an arrival scrape failed at 102: http://fe/metrics: connection refused"
    collector.arrival_scrape(106.0, page)  # the one at 105 never happened
    collector.arrival_scrape(107.0, page)
    snap = collector.window(108.0, page, fe)
    assert "1 of the window's arrival scrapes were missed" in snap.gaps["arrival_dispersion"]


def test_a_frontend_that_fails_makes_the_window_stale() -> None:
    collector = ScrapeCollector(settings())
    fe = {"http://fe/metrics": Endpoint.FRONTEND, "http://d0/metrics": Endpoint.DECODE}
    page = exposition.parse(STARTED.format(5))
    collector.window(100.0, {"http://fe/metrics": page, "http://d0/metrics": page}, fe)
    snap = collector.window(104.0, {"http://fe/metrics": "timed out",
                                    "http://d0/metrics": page}, fe)
    assert snap.stale and snap.gaps["all"] == ("scrape of the frontend failed: "
                                               "http://fe/metrics: timed out")


@pytest.mark.parametrize(
    ("urls", "expected"),
    [
        (["http://10.0.0.9:8000/metrics"], ["http://10.0.0.9:8000/metrics"]),
        (["dns+http://vllm-decode:8000/metrics"],
         ["http://10.1.0.4:8000/metrics", "http://10.1.0.7:8000/metrics"]),
        (["dns+http://v6-only/metrics"], ["http://[fd00::5]:80/metrics"]),
    ],
    ids=["a plain URL is one endpoint", "a dns+ URL is one per address",
         "an IPv6 address is bracketed, the port defaults"],
)
def test_dns_urls_stand_for_every_address_of_the_name(urls: list[str],
                                                      expected: list[str]) -> None:
    addresses = {"vllm-decode": ["10.1.0.4", "10.1.0.7"], "v6-only": ["fd00::5"]}
    found, problems = expand(urls, lambda host, port: addresses[host])
    assert found == expected and problems == []


def test_a_dns_url_that_does_not_resolve_says_so() -> None:
    def fail(host: str, port: int) -> list[str]:
        raise OSError(-2, "Name or service not known")

    found, problems = expand(["dns+http://vllm-prefill:8000/metrics"], fail)
    assert found == []
    assert problems == ["dns+http://vllm-prefill:8000/metrics: Name or service not known"]


def test_localhost_resolves_to_one_endpoint_even_with_ipv6_too() -> None:
    found, _ = expand(["dns+http://localhost:9/metrics"])
    assert found == ["http://127.0.0.1:9/metrics"]


def test_worker_endpoints_alone_are_read_as_vllm_and_their_first_tokens_are_the_arrivals() -> None:
    ttft = """
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{engine="0",model_name="Llama",le="0.5"}} {0}
vllm:time_to_first_token_seconds_bucket{{engine="0",model_name="Llama",le="+Inf"}} {0}
vllm:time_to_first_token_seconds_sum{{engine="0",model_name="Llama"}} {1}
vllm:time_to_first_token_seconds_count{{engine="0",model_name="Llama"}} {0}
"""
    collector = ScrapeCollector(settings(dialect="auto", scrape_labels=[]))
    urls = {"http://d0/metrics": Endpoint.DECODE, "http://d1/metrics": Endpoint.DECODE}

    def at(d0: int, d1: int) -> dict[str, Exposition | str]:
        return {"http://d0/metrics": exposition.parse(worker(1, 0, 0.2, (0, 0))
                                                      + ttft.format(d0, d0 * 0.1)),
                "http://d1/metrics": exposition.parse(worker(2, 0, 0.4, (0, 0))
                                                      + ttft.format(d1, d1 * 0.1))}

    collector.window(100.0, at(0, 0), urls)
    for t, d0, d1 in ((101.0, 2, 0), (102.0, 2, 3), (103.0, 2, 3)):
        collector.arrival_scrape(t, at(d0, d1))
    snap = collector.window(104.0, at(2, 3), urls)
    # no vllm:request_success_total yet (no request ended): read as vLLM's, workers alone
    assert snap.decode_workers == 2 and snap.kv_cache_usage == pytest.approx(0.3)
    assert snap.requests_running == 3.0
    assert snap.arrival_signal == "first_token" and snap.arrivals_peak_1s == 3.0
    assert snap.gaps["prefill_workers"].startswith("no data")


def test_without_worker_endpoints_dynamo_counts_the_workers_its_router_registered() -> None:
    registry = """
# TYPE dynamo_component_router_worker_registered gauge
dynamo_component_router_worker_registered{router_worker_id="7",dp_rank="0",worker_type="prefill"} 1
dynamo_component_router_worker_registered{router_worker_id="7",dp_rank="1",worker_type="prefill"} 1
dynamo_component_router_worker_registered{router_worker_id="9",dp_rank="0",worker_type="prefill"} 1
dynamo_component_router_worker_registered{router_worker_id="4",dp_rank="0",worker_type="decode"} 1
"""
    values = dynamo(frontend(SCRAPE_1 + registry, SCRAPE_2 + registry))
    # distinct workers, their DP ranks together; the gauge has no model label
    assert values.values["prefill_workers"] == 2 and values.values["decode_workers"] == 1
