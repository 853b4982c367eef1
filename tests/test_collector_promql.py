"""The Prometheus source's pure parts: queries, answers, dialects, queries file, schedule."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from services.collector import promql, query_config, snapshot, ticks, window
from services.collector.__main__ import load_queries
from services.collector.promql import Kind, Sample
from services.collector.settings import CollectorSettings
from shared import settings as settings_mod
from shared.messages import DNS_LABEL, DeploymentKey


def scope(selector: str = 'model="llama"', by: tuple[str, ...] = (), window_s: float = 60.0,
          method: promql.Method = promql.Method.EXACT) -> promql.Scope:
    return promql.Scope(selector, by, 'dynamo_component="prefill"',
                        'dynamo_component=~"backend|decode"', window_s, method)


def queries(dialect: promql.Dialect, s: promql.Scope,
            overrides: promql.Overrides | None = None) -> dict[str, str]:
    plan = promql.plan(dialect, overrides or promql.Overrides(), s)
    return {q.field: q.promql for q in plan.queries}


# --- queries ---------------------------------------------------------------------------------


def test_the_increase_method_asks_what_dynamos_planner_asks() -> None:
    # ai-dynamo/dynamo components/planner/src/dynamo/planner/utils/prometheus.py:
    #   increase(dynamo_frontend_requests_total[{interval}])
    #   increase({metric}_sum[{interval}])/increase({metric}_count[{interval}])
    q = queries(promql.DYNAMO, scope(method=promql.Method.INCREASE))
    # ... without the requests that failed (status="error"), which are counted apart
    assert q["num_requests"] == ('sum (increase(dynamo_frontend_requests_total{model="llama",'
                                 'status!="error"}[60s]))')
    # (0 while the error series does not exist yet: Dynamo creates it with its first failure)
    assert q["requests_failed"] == ('sum (increase(dynamo_frontend_requests_total{model="llama",'
                                    'status="error"}[60s])) or (0 * sum (increase('
                                    'dynamo_frontend_requests_total{model="llama"}[60s])))')
    assert q["isl_avg"] == (
        'sum (increase(dynamo_frontend_input_sequence_tokens_sum{model="llama"}[60s])) / '
        'sum (increase(dynamo_frontend_input_sequence_tokens_count{model="llama"}[60s]))')
    assert q["ttft_p99_s"] == (
        "histogram_quantile(0.99, sum by (le) "
        '(increase(dynamo_frontend_time_to_first_token_seconds_bucket{model="llama"}[60s])))')


def test_the_exact_method_starts_from_the_last_sample_before_the_window() -> None:
    text = promql.increase("x_total{a=\"b\"}", "60s", promql.Method.EXACT)
    assert text == ('((x_total{a="b"} - last_over_time(x_total{a="b"}[60s] offset 60s)) >= 0) '
                    'or (x_total{a="b"} and last_over_time(x_total{a="b"}[60s] offset 60s)) '
                    # new in the window (none in the hour before): all of it counts
                    'or (x_total{a="b"} unless last_over_time(x_total{a="b"}[1h] offset 60s)) '
                    'or (x_total{a="b"} - min_over_time(x_total{a="b"}[60s]))')


def test_gauges_are_read_at_the_windows_end_only_if_scraped_inside_it() -> None:
    q = queries(promql.DYNAMO, scope(window_s=30.0))
    assert q["requests_running"] == (
        'sum (dynamo_frontend_inflight_requests{model="llama"} and '
        'last_over_time(dynamo_frontend_inflight_requests{model="llama"}[30s]))')


def test_discovered_deployments_are_one_group_each_in_every_query() -> None:
    q = queries(promql.VLLM, scope(selector="", by=("namespace", "model")))
    assert q["num_requests"].startswith("sum by (namespace, model) (")
    assert q["ttft_p90_s"].startswith("histogram_quantile(0.9, sum by (le, namespace, model) (")
    assert q["decode_workers"].startswith(
        "count by (namespace, model) (count by (instance, namespace, model) (")


def test_vllm_roles_and_renamed_metrics_are_in_the_queries() -> None:
    q = queries(promql.VLLM, scope())
    assert 'vllm:time_to_first_token_seconds_sum{model="llama",dynamo_component="prefill"}' \
        in q["ttft_avg_s"]
    assert 'vllm:request_success_total{model="llama",dynamo_component=~"backend|decode"}' \
        in q["num_requests"]
    for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
                 "vllm_kv_cache_usage_perc", "vllm_gpu_cache_usage_perc"):
        assert f"{name}{{" in q["kv_cache_usage"]
    for name in ("vllm:inter_token_latency_seconds_bucket",
                 "vllm:time_per_output_token_seconds_bucket"):
        assert f"{name}{{" in q["itl_p99_s"]
    assert q["requests_running"].count("dynamo_component") == 0, "every worker's requests"


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(60.0, "60s"), (5.0, "5s"), (2.5, "2500ms"), (0.1, "100ms"), (3600.0, "3600s")],
    ids=["a minute", "five seconds", "a fraction in milliseconds", "a tenth", "an hour"],
)
def test_windows_are_promql_durations(seconds: float, expected: str) -> None:
    assert promql.duration(seconds) == expected


def test_a_window_shorter_than_a_millisecond_is_refused() -> None:
    with pytest.raises(ValueError, match="too short"):
        promql.duration(0.0001)


@pytest.mark.parametrize(
    ("text", "tidy"),
    [("", ""), ('model="llama"', 'model="llama"'),
     (' model = "llama" , ns=~"prod|dev" ', 'model="llama",ns=~"prod|dev"'),
     ('a!="x\\"y",b!~"z"', 'a!="x\\"y",b!~"z"')],
    ids=["nothing", "one", "spaces are tidied", "escapes and negations"],
)
def test_label_matchers_are_checked_and_tidied(text: str, tidy: str) -> None:
    assert promql.check_matchers(text) == tidy


@pytest.mark.parametrize(
    "text", ['{model="llama"}', "model=llama", 'model="llama" ns="x"', '1x="y"'],
    ids=["braces", "unquoted value", "no comma", "bad label name"],
)
def test_what_is_not_a_label_matcher_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        promql.check_matchers(text)


def test_a_label_value_is_quoted_for_promql() -> None:
    assert promql.quote('a"b\\c') == '"a\\"b\\\\c"'


# --- the answers -----------------------------------------------------------------------------

ONE = {"model": "llama"}


@pytest.mark.parametrize(
    ("kind", "field", "samples", "value", "reason"),
    [
        pytest.param(Kind.COUNT, "num_requests", [Sample(ONE, 0.0)], 0.0, "",
                     id="zero requests is a real zero: idle"),
        pytest.param(Kind.COUNT, "num_requests", [], None, promql.NO_SERIES[Kind.COUNT],
                     id="no series is unknown"),
        pytest.param(Kind.AVERAGE, "isl_avg", [Sample(ONE, math.nan)], None, window.UNDEFINED,
                     id="a NaN average is undefined: 0/0 of an empty window"),
        pytest.param(Kind.QUANTILE, "ttft_p99_s", [Sample(ONE, math.nan)], None,
                     window.UNDEFINED, id="a NaN quantile is undefined too"),
        pytest.param(Kind.COUNT, "num_requests", [Sample(ONE, math.nan)], None,
                     "the query returned NaN", id="a NaN count is not a number we saw"),
        pytest.param(Kind.AVERAGE, "ttft_avg_s", [Sample(ONE, math.inf)], None,
                     "the query returned inf", id="an infinite average is refused"),
        pytest.param(Kind.GAUGE_SUM, "requests_running", [Sample(ONE, -1.0)], None,
                     "negative value -1", id="a negative gauge is refused"),
        pytest.param(Kind.GAUGE_MEAN, "kv_cache_usage", [Sample(ONE, 85.0)], None,
                     "85 is not a fraction in [0, 1] (is the metric a percentage?)",
                     id="KV usage must be a fraction"),
        pytest.param(Kind.WORKERS, "decode_workers", [Sample(ONE, 3.0000001)], 3.0, "",
                     id="a worker count is a whole number"),
        pytest.param(Kind.COUNT, "num_requests", [Sample(ONE, 1.0), Sample(ONE, 2.0)], None,
                     "the query returned 2 series for one deployment; aggregate it "
                     "(sum by ($by) (...))", id="two series for one deployment are refused"),
    ],
)
def test_each_answer_is_a_value_or_says_why_not(
    kind: Kind, field: str, samples: list[Sample], value: float | None, reason: str
) -> None:
    assert promql.interpret(kind, samples, field) == (value, reason)


def test_a_deployments_values_come_from_its_own_group() -> None:
    groups: dict[str, dict[tuple[str, ...], list[Sample]]] = {
        "num_requests": {("llama",): [Sample({"model": "llama"}, 12.0)],
                         ("mistral",): [Sample({"model": "mistral"}, 3.0)]},
        "decode_workers": {("llama",): [Sample({"model": "llama"}, 2.0)]},
    }
    values = promql.values_for(groups, promql.FIELD_KINDS, ("mistral",))
    assert values.values == {"num_requests": 3.0, "decode_workers": None}
    assert values.gaps == {"decode_workers": promql.NO_SERIES[Kind.WORKERS]}
    llama = promql.values_for(groups, promql.FIELD_KINDS, ("llama",))
    assert llama.values["decode_workers"] == 2 and isinstance(llama.values["decode_workers"], int)


def test_answers_are_parsed_as_samples() -> None:
    vector = [{"metric": {"model": "a"}, "value": [1.0, "NaN"]},
              {"metric": {}, "value": [1.0, "+Inf"]}]
    parsed = promql.parse_result(vector)
    assert math.isnan(parsed[0].value) and parsed[0].labels == {"model": "a"}
    assert parsed[1].value == math.inf
    assert promql.parse_result([1700000000.0, "4"]) == [Sample({}, 4.0)]  # a scalar
    with pytest.raises(ValueError, match="range vector"):
        promql.parse_result([{"metric": {}, "values": [[1.0, "1"]]}])


def test_answers_are_split_by_the_discovery_labels() -> None:
    samples = [Sample({"namespace": "prod", "model": "a"}, 1.0), Sample({"model": "b"}, 2.0)]
    assert promql.split(samples, ("namespace", "model")) == {
        ("prod", "a"): [samples[0]], ("", "b"): [samples[1]]}


# --- dialects and deployments ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("present", "expected"),
    [({"dynamo_frontend_requests_total", "vllm:request_success_total"}, "dynamo"),
     ({"nv_llm_http_service_requests_total"}, "dynamo-legacy"),
     ({"vllm:request_success_total"}, "vllm"),
     ({"vllm_request_success_total"}, "vllm"),
     ({"up"}, None)],
    ids=["a Dynamo deployment also has engine metrics: the frontend wins",
         "the older frontend names", "vLLM alone", "vLLM stored with escaped names",
         "nothing known"],
)
def test_the_dialect_is_detected_from_the_metrics_present(present: set[str],
                                                          expected: str | None) -> None:
    found = promql.detect(present)
    assert (found.name if found else None) == expected


def test_the_detection_query_lists_every_dialects_identifying_metric() -> None:
    text = promql.detection_query()
    for name in ("dynamo_frontend_requests_total", "nv_llm_http_service_requests_total",
                 "vllm:request_success_total"):
        assert re.escape(name) in text


@pytest.mark.parametrize(
    ("value", "expected"),
    [("llama", "llama"), ("mistral-7b", "mistral-7b")],
    ids=["a valid name is kept", "dashes and digits too"],
)
def test_a_label_value_that_is_a_dns_label_names_the_deployment(value: str,
                                                                expected: str) -> None:
    assert promql.dns_label(value) == expected


def test_other_label_values_are_tidied_and_told_apart_by_a_hash() -> None:
    a = promql.dns_label("meta-llama/Llama-3.1-8B-Instruct")
    b = promql.dns_label("meta-llama/llama-3.1-8b-instruct")
    assert a.startswith("meta-llama-llama-3-1-8b-instruct-") and a != b
    long = promql.dns_label("X" * 300)
    assert len(long) <= 63 and re.match(DNS_LABEL, long) and re.match(DNS_LABEL, a)
    assert promql.dns_label("meta-llama/Llama-3.1-8B-Instruct") == a, "stable"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("llama", None),
        ("meta-llama/Llama-3.1-8B", None),  # tidied into a name, not skipped
        ("llama\n", "control characters"),  # re's $ would match before the newline
        ("bad\x00name", "control characters"),
        ("zero\u200bwidth", "control characters"),
        ("", "empty"),
        ("x" * 254, "longer than 253 characters"),
    ],
    ids=["a name", "a model id", "a trailing newline", "a NUL", "a zero-width space",
         "nothing", "too long"],
)
def test_label_values_that_cannot_name_a_deployment_say_why(value: str,
                                                           problem: str | None) -> None:
    assert promql.label_problem(value) == problem
    if problem is None:
        assert promql.discovered_key((value,), ("model",), "prod").name == promql.dns_label(value)
    else:
        with pytest.raises(ValueError, match=re.escape(problem)):
            promql.discovered_key((value,), ("model",), "prod")


def test_a_trailing_newline_is_never_taken_for_a_dns_label() -> None:
    assert promql.dns_label("llama\n") != "llama\n"
    assert re.fullmatch(DNS_LABEL.strip("^$"), promql.dns_label("llama\n"))


def test_discovered_keys_take_the_namespace_from_a_label_or_the_setting() -> None:
    assert promql.discovered_key(("llama",), ("model",), "prod") == \
        DeploymentKey(namespace="prod", name="llama")
    assert promql.discovered_key(("team-a", "llama"), ("namespace", "model"), "prod") == \
        DeploymentKey(namespace="team-a", name="llama")


def test_the_legacy_prefix_renames_the_queue_gauge_too() -> None:
    # DYN_METRICS_PREFIX renames every frontend metric (lib/llm/src/http/service/metrics.rs)
    q = queries(promql.DYNAMO_LEGACY, scope())
    assert "nv_llm_http_service_queued_requests{" in q["requests_before_first_token"]


def test_the_engine_queue_and_the_frontends_count_before_the_first_token_are_apart() -> None:
    q = queries(promql.DYNAMO, scope())
    assert "vllm:num_requests_waiting{" in q["requests_waiting"]
    assert "queued_requests" not in q["requests_waiting"]
    assert "dynamo_frontend_queued_requests{" in q["requests_before_first_token"]
    assert 'worker_type="prefill"' in q["prefill_tokens_pending"]
    # what TTFT is made of, from the prefill engines
    assert 'vllm:request_queue_time_seconds_sum{model="llama",dynamo_component="prefill"}' \
        in q["queue_time_avg_s"]
    assert 'vllm:request_prefill_time_seconds_bucket{model="llama",dynamo_component="prefill"}' \
        in q["prefill_time_p90_s"]


def test_a_share_query_returns_the_buckets_and_the_share_is_worked_out_from_them() -> None:
    q = queries(promql.VLLM, scope(by=("model",)))
    assert q["ttft_under_target_share"].startswith("sum by (le, model) (")
    assert "vllm:request_time_per_output_token_seconds_bucket{" in q["itl_under_target_share"]
    samples = [Sample({"le": le, "model": "llama"}, v)
               for le, v in (("0.25", 10.0), ("0.5", 70.0), ("1.0", 90.0), ("+Inf", 100.0))]
    groups = {"ttft_under_target_share": promql.split(samples, ("model",))}
    values = promql.values_for(groups, promql.FIELD_KINDS, ("llama",),
                               {"ttft_under_target_share": 0.5})
    assert values.values == {"ttft_under_target_share": 0.7, "ttft_target_s": 0.5,
                             "ttft_target_bucket_s": 0.5, "ttft_share_method": "bucket_edge"}


def fallback_scope(selector: str = 'model="llama"', by: tuple[str, ...] = ()) -> promql.Scope:
    return promql.Scope(selector, by, 'dynamo_component="prefill"',
                        'dynamo_component=~"backend|decode"', 60.0, promql.Method.EXACT,
                        'role="prefill"', 'role="decode"')


def test_a_workers_series_is_read_with_either_role_label_once() -> None:
    # Dynamo labels engine metrics with dynamo_component from 1.0 on; before, only the pod's
    # role (relabelled by the scrape job) says which workers are which
    q = queries(promql.VLLM, fallback_scope())
    for role in ('dynamo_component=~"backend|decode"', 'role="decode"'):
        assert f'vllm:kv_cache_usage_perc{{model="llama",{role}}}' in q["kv_cache_usage"]
        assert f'vllm:request_success_total{{model="llama",{role}}}' in q["num_requests"]
    # the alternatives are joined per series with `or`: a series with both labels counts once
    assert q["kv_cache_usage"].startswith("avg ((") and ") or (" in q["kv_cache_usage"]
    assert "role=" not in queries(promql.VLLM, scope())["kv_cache_usage"], "no fallback set"


def test_dynamo_counts_registered_workers_where_the_engines_carry_no_role() -> None:
    q = queries(promql.DYNAMO, fallback_scope())["prefill_workers"]
    engines, router = q.split(") or (count (count by (router_worker_id) (")
    assert engines.startswith("(count (count by (instance) (")
    # the router's gauge has no model label: the model matcher is left out for it
    assert router.startswith('dynamo_component_router_worker_registered{worker_type="prefill"}')
    assert "model" not in router


def test_a_metric_without_a_model_label_is_not_read_per_discovered_model() -> None:
    plan = promql.plan(promql.DYNAMO, promql.Overrides(), scope(selector="", by=("model",)))
    assert "no model label" in plan.unobserved["prefill_tokens_pending"]
    by_deployment = promql.plan(promql.DYNAMO, promql.Overrides(),
                                scope(selector="", by=("namespace", "deployment")))
    assert "prefill_tokens_pending" not in by_deployment.unobserved
    q = {x.field: x.promql for x in plan.queries}
    assert "dynamo_component_router_worker_registered" not in q["prefill_workers"]


def test_the_check_at_start_looks_for_a_router_gauge_without_the_model_matcher() -> None:
    s = fallback_scope()
    query = next(q for q in promql.plan(promql.DYNAMO, promql.Overrides(), s).queries
                 if q.field == "prefill_tokens_pending")
    (read,) = query.reads
    text = promql.presence_query(read, s)
    assert 'dynamo_frontend_worker_active_prefill_tokens{worker_type="prefill"}' in text
    assert "model" not in text


@pytest.mark.parametrize(
    ("readings", "counts"),
    [
        pytest.param([10.0, 12.0, 12.0, 20.0], [2.0, 0.0, 8.0], id="increases edge to edge"),
        pytest.param([10.0, 3.0, 5.0], [3.0, 2.0], id="a reset counts its whole new value"),
        pytest.param([None, None, 4.0, 6.0], [0.0, 4.0, 2.0],
                     id="a series that appears is new: all of it counts"),
        pytest.param([10.0, None, 13.0], [0.0, 3.0],
                     id="a missing reading passes its arrivals to the next bin"),
        pytest.param([None, None], [0.0], id="no reading, no arrival"),
    ],
)
def test_arrivals_per_bin_are_a_counters_increases_between_edges(
        readings: list[float | None], counts: list[float]) -> None:
    assert window.bin_increases(readings) == counts


def test_arrivals_per_bin_add_up_the_series_of_a_deployment() -> None:
    series = [promql.Series({"model": "llama", "endpoint": "chat"},
                            ((100.0, 5.0), (101.0, 7.0), (102.0, 7.0))),
              promql.Series({"model": "Llama", "endpoint": "completions"},
                            ((101.001, 1.0), (102.0, 4.0))),  # new in the window
              promql.Series({"model": "other"}, ((100.0, 0.0), (102.0, 9.0)))]
    counts = promql.counts_by_group(series, ("model",), 100.0, 1.0, 2)
    assert counts == {("llama",): [3.0, 3.0], ("other",): [0.0, 9.0]}


@pytest.mark.parametrize(
    ("selector", "caseless"),
    [
        ('model="Llama-3"', 'model=~"(?i)Llama\\\\-3"'),
        ('model_name!="Qwen/Qwen3"', 'model_name!~"(?i)Qwen/Qwen3"'),
        ('dynamo_namespace="Prod"', 'dynamo_namespace="Prod"'),
    ],
    ids=["a model is matched whatever its case", "model_name too, and negated",
         "other labels keep their case"],
)
def test_model_matchers_ignore_case_as_dynamos_planner_does(selector: str, caseless: str) -> None:
    assert promql.caseless(selector) == caseless


def test_discovered_models_that_differ_in_case_are_one_deployment() -> None:
    samples = [Sample({"model": "qwen/qwen3-0.6b"}, 1.0), Sample({"model": "Qwen/Qwen3-0.6B"}, 2.0)]
    assert list(promql.split(samples, ("model",))) == [("qwen/qwen3-0.6b",)]


def test_overrides_rename_metrics_replace_queries_and_disable_them() -> None:
    overrides = promql.Overrides(
        metrics={"requests": ("my_requests_total",)},
        queries={"ttft_p99_s": "max(my_p99{$selector}) # $window $by",
                 "prefill_workers": ""},
        origin="q.toml")
    plan = promql.plan(promql.DYNAMO, overrides, scope(window_s=30.0))
    by_field = {q.field: q for q in plan.queries}
    assert "my_requests_total{" in by_field["num_requests"].promql
    assert by_field["num_requests"].origin == "[metrics].requests in q.toml"
    assert by_field["ttft_p99_s"].promql == 'max(my_p99{model="llama"}) # 30s '
    assert by_field["ttft_p99_s"].reads == ()
    assert plan.unobserved["prefill_workers"] == "query disabled in q.toml"


# --- the queries file ----------------------------------------------------------------------------

GOOD = """
[metrics]
requests = "my_frontend_requests_total"
kv_usage = ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]

[queries]
ttft_p99_s = 'histogram_quantile(0.99, sum by (le, $by) (rate(x_bucket{$selector}[$window])))'
prefill_workers = ""

[[deployments]]
namespace = "prod"
name = "llama"
selector = 'model="llama", dynamo_namespace="prod-llama"'

[[deployments]]
namespace = "prod"
name = "mistral"
"""


def test_a_good_queries_file_is_read() -> None:
    config = query_config.parse(GOOD, "q.toml")
    assert config.overrides.metrics["kv_usage"] == ("vllm:kv_cache_usage_perc",
                                                    "vllm:gpu_cache_usage_perc")
    assert config.overrides.queries["prefill_workers"] == ""
    assert [d.key.name for d in config.deployments] == ["llama", "mistral"]
    assert config.deployments[0].selector == 'model="llama",dynamo_namespace="prod-llama"'
    assert config.deployments[1].selector == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[metric]\n", "q.toml: metric: unknown section"),
        ("[metrics]\nrequest = 'x'\n", "q.toml: [metrics].request: unknown metric key"),
        ("[metrics]\nrequests = 'my-requests'\n",
         "q.toml: [metrics].requests: 'my-requests' is not a Prometheus metric name"),
        ("[metrics]\nrequests = []\n", "q.toml: [metrics].requests: must be a metric name"),
        ("[queries]\nttft_p99 = 'x'\n", "q.toml: [queries].ttft_p99: unknown field"),
        ("[queries]\nttft_p99_s = 3\n", "q.toml: [queries].ttft_p99_s: must be a PromQL string"),
        ("[queries]\nttft_p99_s = 'x{$labels}'\n",
         "q.toml: [queries].ttft_p99_s: unknown placeholder $labels"),
        ("[queries]\nttft_p99_s = 'x $ 1'\n", "q.toml: [queries].ttft_p99_s: a '$' that"),
        ("[[deployments]]\nnamespace = 'Prod'\nname = 'llama'\n",
         "q.toml: deployments[0].namespace: 'Prod' is not a DNS-1123 label"),
        ("[[deployments]]\nnamespace = 'prod'\n",
         "q.toml: deployments[0].name: is required"),
        ("[[deployments]]\nnamespace = 'prod'\nname = 'a'\nselector = '{model=\"a\"}'\n",
         "q.toml: deployments[0].selector: not a label matcher"),
        ("[[deployments]]\nnamespace = 'prod'\nname = 'a'\nlabels = 'x'\n",
         "q.toml: deployments[0].labels: unknown key"),
        ("[[deployments]]\nnamespace='p'\nname='a'\n[[deployments]]\nnamespace='p'\nname='a'\n",
         "q.toml: deployments[1]: deployment p/a is listed twice"),
        ("[queries\n", "q.toml: not valid TOML"),
    ],
    ids=["unknown section", "unknown metric key", "bad metric name", "empty list",
         "unknown field", "not a string", "unknown placeholder", "stray dollar",
         "namespace not a DNS label", "name missing", "selector with braces", "unknown key",
         "duplicate deployment", "broken TOML"],
)
def test_a_bad_queries_file_is_refused_naming_the_file_and_the_field(text: str,
                                                                     message: str) -> None:
    with pytest.raises(query_config.QueryConfigError) as error:
        query_config.parse(text, "q.toml")
    assert str(error.value).startswith(message), str(error.value)


def test_a_missing_queries_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(query_config.QueryConfigError, match=r"nope\.toml: cannot read"):
        query_config.load(tmp_path / "nope.toml")


def test_the_service_exits_at_start_on_a_bad_queries_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "collector.toml"
    path.write_text("[queries]\nttft = 'x'\n")
    settings = CollectorSettings(source="prometheus", queries_file=str(path))
    with pytest.raises(SystemExit) as exit_info:
        load_queries(settings)
    assert exit_info.value.code == 2
    assert f"{path}: [queries].ttft: unknown field" in capsys.readouterr().err


def test_listed_and_discovered_deployments_exclude_each_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "collector.toml"
    path.write_text("[[deployments]]\nnamespace = 'p'\nname = 'a'\n")
    settings = CollectorSettings(source="prometheus", queries_file=str(path),
                                 discover_labels=["model"])
    with pytest.raises(SystemExit):
        load_queries(settings)
    assert "exclude each other" in capsys.readouterr().err


def test_a_bad_selector_names_the_flag_and_the_variable(
    capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        settings_mod.parse(CollectorSettings, [], {"SLAPLANNER_SELECTOR": "{model='x'}"},
                           "collector", "")
    assert "--selector / SLAPLANNER_SELECTOR" in capsys.readouterr().err


def test_dynamos_flag_name_for_prometheus_is_accepted() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    settings_mod.add_arguments(parser, CollectorSettings)
    args = parser.parse_args(["--prometheus-endpoint", "http://prom:9090"])
    assert settings_mod.settings_from(CollectorSettings, args, {}).prometheus_url == \
        "http://prom:9090"


# --- snapshots and the schedule ------------------------------------------------------------------


def test_a_long_reason_is_cut_to_what_the_snapshot_allows() -> None:
    key = DeploymentKey(namespace="prod", name="llama")
    values = window.WindowValues(values={"num_requests": None}, gaps={"num_requests": "x" * 900})
    snap = snapshot.observed(key, 60.0, 60.0, "prometheus", values)
    assert len(snap.gaps["num_requests"]) == snapshot.MAX_REASON_CHARS
    assert snapshot.stale(key, 60.0, 60.0, "prometheus", "y" * 900).gaps["all"].endswith("...")


@pytest.mark.parametrize(
    ("now", "interval", "delay", "expected"),
    [(100.0, 60.0, 5.0, 2),  # window 1 ends at 60, was due at 65: gone; window 2 ends at 120
     (62.0, 60.0, 5.0, 1),  # window 1 ended at 60 and is due at 65: read it
     (65.0, 60.0, 5.0, 2)],  # due exactly now counts as begun before start: the next one
    ids=["the next window after a start", "a window that ended but is not yet due",
         "a window due at the very start"],
)
def test_the_first_window_read_is_the_first_not_yet_due(now: float, interval: float,
                                                         delay: float, expected: int) -> None:
    assert ticks.first_index(now, interval, delay) == expected


def test_a_slow_window_is_caught_up_in_order_and_a_hopeless_backlog_said_so() -> None:
    # timeline, interval 60 s, delay 5 s: window k ends at 60k and is due at 60k + 5
    assert ticks.catch_up(10, 605.0, 60.0, 5.0, 3) == ticks.CatchUp(10, ())  # on time
    assert ticks.catch_up(10, 670.0, 60.0, 5.0, 3) == ticks.CatchUp(10, ())  # 10 and 11 due
    assert ticks.catch_up(10, 785.0, 60.0, 5.0, 3) == ticks.CatchUp(11, (10,))  # 10..13 due
    assert ticks.catch_up(10, 2000.0, 60.0, 5.0, 3) == ticks.CatchUp(
        31, tuple(range(10, 31)))  # 10..33 due: the last 3 are read


def test_window_ends_are_exact_multiples() -> None:
    assert ticks.end_of(28_333_334, 60.0) == 1_700_000_040.0
    assert ticks.due_at(3, 0.1, 0.05) == pytest.approx(0.35)
