"""PromQL for the collector (pure): metric dialects, queries, and what their answers mean.

Nothing here talks to Prometheus. ``plan`` turns a dialect (plus the operator's overrides) into
one PromQL query per snapshot field for a scope (the deployment's label matchers, the grouping
labels of discovered deployments, the window); ``interpret`` turns the vector a query returned into
a value or a reason; ``diagnose`` says what to check when a metric is missing.

Every window query is evaluated at the window's end (the ``time`` of the instant query) and covers
exactly ``[end - window, end]``, so the values do not depend on when the query ran.

Window functions. ``increase`` is Dynamo's planner: ``increase(x_sum[w]) / increase(x_count[w])``
for averages and ``increase(requests_total[w])`` for the count (ai-dynamo/dynamo,
components/planner/src/dynamo/planner/utils/prometheus.py). Prometheus extrapolates ``increase``
to the window's edges, so one window's count is an estimate (the ratio of two increases is not
affected: the factor cancels). ``exact`` (the default) reads the counter at the window's end minus
its last sample before the window's start, per series, like the direct-scrape source: windows
tile, their counts add up to the counter's growth, and a reset counts the whole new value.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from string import Template
from typing import Any

import numpy as np

from services.collector import window
from shared import window_stats
from shared.messages import DNS_LABEL, ArrivalSignal, DeploymentKey


class Kind(StrEnum):
    COUNT = "count"  # sum of a counter's increase over the window
    AVERAGE = "average"  # increase(_sum) / increase(_count) of a histogram
    QUANTILE = "quantile"  # histogram_quantile over the window's bucket increases
    GAUGE_SUM = "gauge_sum"  # sum of a gauge at the window's end
    GAUGE_MEAN = "gauge_mean"  # mean of a gauge over the workers at the window's end
    WORKERS = "workers"  # number of scrape targets (instances) that expose a metric
    SHARE = "share"  # share under a target, from the window's bucket increases (per ``le``)


class Role(StrEnum):
    ALL = "all"
    PREFILL = "prefill"
    DECODE = "decode"


class Method(StrEnum):
    EXACT = "exact"
    INCREASE = "increase"


# Every snapshot field the Prometheus source fills, and how its answer is read.
FIELD_KINDS: dict[str, Kind] = {
    **{f: Kind.COUNT for f in window.COUNT_FIELDS},
    **{f: Kind.AVERAGE for f in window.AVERAGE_FIELDS},
    **{f: Kind.QUANTILE for f in window.QUANTILE_FIELDS},
    **{f: Kind.GAUGE_SUM for f in window.GAUGE_FIELDS},
    "kv_cache_usage": Kind.GAUGE_MEAN,
    "prefill_workers": Kind.WORKERS,
    "decode_workers": Kind.WORKERS,
    "ttft_under_target_share": Kind.SHARE,
    "itl_under_target_share": Kind.SHARE,
}
# The snapshot fields a share query fills besides the share itself.
SHARE_FIELDS = {share: tuple(f"{share.split('_')[0]}_{suffix}" for suffix in
                             ("target_s", "target_bucket_s", "share_method"))
                for share in ("ttft_under_target_share", "itl_under_target_share")}
FIELDS = tuple(FIELD_KINDS)

# Placeholders an operator may use in a query of the queries file.
PLACEHOLDERS = {
    "selector": "label matchers of the deployment, without braces",
    "prefill": "$selector plus the prefill workers' matcher",
    "decode": "$selector plus the decode workers' matcher",
    "window": "the window as a PromQL duration, e.g. 60s",
    "by": "the grouping labels of discovered deployments (empty for a static one)",
}


@dataclass(frozen=True)
class Recipe:
    """How a dialect reads one field: which kind of query, over which metric, for which workers."""

    kind: Kind
    metric: str  # a key of the dialect's metric table
    role: Role = Role.ALL
    quantile: float | None = None
    extra: str = ""  # more label matchers (Dynamo's status="error", worker_type="prefill")
    # a count whose series only appears with its first event (Dynamo's status="error"): 0, not
    # unknown, while the metric without ``extra`` has series
    absent_is_zero: bool = False
    # the metric has no model label (the KV router's per-worker gauges): model matchers of the
    # deployment's selector are left out for it
    no_model_label: bool = False
    # what a WORKERS query counts: scrape targets, or the router's worker ids
    per: str = "instance"
    # read per deployment where this recipe finds no series (the router's registry of workers
    # where the engines' series carry no role label)
    then: Recipe | None = None


@dataclass(frozen=True)
class ArrivalCounter:
    """A counter that counts each request once, at ``signal``: what arrivals are read from."""

    signal: ArrivalSignal
    metric: str  # a key of the dialect's metric table
    suffix: str = ""  # "_count" of a histogram observed once per request
    role: Role = Role.ALL


@dataclass(frozen=True)
class Dialect:
    name: str
    about: str
    metrics: Mapping[str, tuple[str, ...]]  # key -> names, preferred first, others older
    recipes: Mapping[str, Recipe]
    detect: str  # metric key whose presence identifies the dialect
    discovery: str  # metric key whose label values name the deployments
    # the counters arrivals are counted from, the truest first (see ``ArrivalSignal``)
    arrivals: tuple[ArrivalCounter, ...] = ()
    unobserved: Mapping[str, str] = field(default_factory=dict)  # field -> why it has no query


def _histogram_recipes(role_of: Mapping[str, Role], ok: str = "") -> dict[str, Recipe]:
    """Every dialect's recipes; ``ok`` is the matcher of requests that did not fail."""
    recipes = {"num_requests": Recipe(Kind.COUNT, "requests", role_of["requests"], extra=ok)}
    for fld, key in (("isl_avg", "isl"), ("osl_avg", "osl"), ("ttft_avg_s", "ttft"),
                     ("itl_avg_s", "itl"), ("request_duration_avg_s", "duration"),
                     ("queue_time_avg_s", "queue_time"), ("prefill_time_avg_s", "prefill_time"),
                     ("decode_time_avg_s", "decode_time")):
        recipes[fld] = Recipe(Kind.AVERAGE, key, role_of[key])
    for fld, key, q in (("isl_p50", "isl", 0.5), ("isl_p90", "isl", 0.9),
                        ("isl_p99", "isl", 0.99), ("osl_p90", "osl", 0.9),
                        ("ttft_p90_s", "ttft", 0.9), ("ttft_p99_s", "ttft", 0.99),
                        ("itl_p90_s", "itl", 0.9), ("itl_p99_s", "itl", 0.99),
                        ("queue_time_p90_s", "queue_time", 0.9),
                        ("prefill_time_p90_s", "prefill_time", 0.9)):
        recipes[fld] = Recipe(Kind.QUANTILE, key, role_of[key], q)
    recipes["ttft_under_target_share"] = Recipe(Kind.SHARE, "ttft", role_of["ttft"])
    recipes["itl_under_target_share"] = Recipe(Kind.SHARE, "itl_per_request", Role.DECODE)
    recipes["requests_running"] = Recipe(Kind.GAUGE_SUM, "inflight", role_of["inflight"])
    recipes["requests_waiting"] = Recipe(Kind.GAUGE_SUM, "engine_queue", Role.ALL)
    recipes["kv_cache_usage"] = Recipe(Kind.GAUGE_MEAN, "kv_usage", Role.DECODE)
    recipes["prefill_workers"] = Recipe(Kind.WORKERS, "workers", Role.PREFILL)
    recipes["decode_workers"] = Recipe(Kind.WORKERS, "workers", Role.DECODE)
    return recipes


def vllm(*names: str) -> tuple[str, ...]:
    """vLLM metric names, and the same with ``:`` escaped to ``_``: prometheus-client's
    OpenMetrics exposition writes ``vllm:x`` as ``vllm_x`` when Prometheus negotiates that
    format (prometheus/client_python#1177), so a directly scraped vLLM may be stored either way."""
    return names + tuple(n.replace(":", "_") for n in names)


# The engine's own per-worker metrics, renamed across vLLM versions (newest first). Dynamo's
# workers re-expose them with dynamo_namespace/dynamo_component labels.
VLLM_KV_USAGE = vllm("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
VLLM_ITL = vllm("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")
VLLM_WORKER = vllm("vllm:num_requests_running")
# What every dialect reads from the engines (vllm/v1/metrics/loggers.py): the time a request
# waited in the engine's queue and computed its prefill, observed when the engine finishes it
# (on a prefill worker: at its first token), its decode time, the engine queue, and the mean ITL
# of each request (a per-request histogram since vLLM 0.11; the ITL histograms count tokens).
VLLM_ENGINE = {
    "queue_time": vllm("vllm:request_queue_time_seconds"),
    "prefill_time": vllm("vllm:request_prefill_time_seconds"),
    "decode_time": vllm("vllm:request_decode_time_seconds"),
    "engine_queue": vllm("vllm:num_requests_waiting"),
    "itl_per_request": vllm("vllm:request_time_per_output_token_seconds"),
}
ENGINE_ROLES = {"queue_time": Role.PREFILL, "prefill_time": Role.PREFILL,
                "decode_time": Role.DECODE, "engine_queue": Role.ALL}


def _frontend(prefix: str, name: str, about: str) -> Dialect:
    metrics = {
        "requests": (f"{prefix}_requests_total",),
        "failed": (f"{prefix}_requests_total",),
        "isl": (f"{prefix}_input_sequence_tokens",),
        "osl": (f"{prefix}_output_sequence_tokens",),
        "ttft": (f"{prefix}_time_to_first_token_seconds",),
        "itl": (f"{prefix}_inter_token_latency_seconds",),
        "duration": (f"{prefix}_request_duration_seconds",),
        "inflight": (f"{prefix}_inflight_requests",),
        "queued": (f"{prefix}_queued_requests",),
        # the KV router's view (lib/llm/src/kv_router/metrics.rs): input tokens routed to each
        # prefill worker and not yet prefilled, and those still in its own queue
        "prefill_tokens": (f"{prefix}_worker_active_prefill_tokens",
                           f"{prefix}_router_queue_pending_isl_tokens"),
        "kv_usage": VLLM_KV_USAGE,
        "workers": VLLM_WORKER,
        "discovery": (f"{prefix}_requests_total", f"{prefix}_inflight_requests"),
        # counted when the frontend accepts a request (Dynamo 1.3 and later,
        # ai-dynamo/dynamo#9526); requests_total counts it when it ends
        "requests_started": (f"{prefix}_requests_started_total",),
        # 1 per worker and DP rank the KV router has registered, by worker_type (Dynamo 1.3
        # and later, ai-dynamo/dynamo#10587, lib/llm/src/kv_router/metrics.rs)
        "registered": ("dynamo_component_router_worker_registered",),
        **VLLM_ENGINE,
    }
    # Dynamo counts a request in requests_total when it ends, labelled status="success" or
    # "error" (lib/llm/src/http/service/metrics.rs): failed ones are counted apart
    roles = {k: ENGINE_ROLES.get(k, Role.ALL) for k in metrics}
    recipes = _histogram_recipes(roles, ok='status!="error"')
    recipes["requests_failed"] = Recipe(Kind.COUNT, "failed", extra='status="error"',
                                        absent_is_zero=True)
    recipes["requests_before_first_token"] = Recipe(Kind.GAUGE_SUM, "queued")
    recipes["prefill_tokens_pending"] = Recipe(Kind.GAUGE_SUM, "prefill_tokens",
                                               extra='worker_type="prefill"',
                                               no_model_label=True)
    for fld, role in (("prefill_workers", Role.PREFILL), ("decode_workers", Role.DECODE)):
        # the engines exposing metrics in the role; where none carries a role label, the
        # workers the router has registered (distinct worker ids, DP ranks together)
        recipes[fld] = replace(recipes[fld], then=Recipe(
            Kind.WORKERS, "registered", extra=f'worker_type="{role}"', no_model_label=True,
            per="router_worker_id"))
    arrivals = (ArrivalCounter(ArrivalSignal.REQUEST_START, "requests_started"),
                ArrivalCounter(ArrivalSignal.FIRST_TOKEN, "ttft", "_count"),
                ArrivalCounter(ArrivalSignal.REQUEST_END, "requests"))
    return Dialect(name, about, metrics, recipes, detect="requests", discovery="discovery",
                   arrivals=arrivals)


DYNAMO = _frontend("dynamo_frontend", "dynamo", "Dynamo frontend (dynamo_frontend_*)")
# DYN_METRICS_PREFIX renames every frontend metric, the queue gauge included
DYNAMO_LEGACY = _frontend("nv_llm_http_service", "dynamo-legacy",
                          "Dynamo frontend, older names (nv_llm_http_service_*)")
VLLM = Dialect(
    "vllm",
    "vLLM engine metrics (vllm:*), per worker; prefill and decode told apart by labels",
    metrics={
        "requests": vllm("vllm:request_success_total"),
        "isl": vllm("vllm:request_prompt_tokens"),
        "osl": vllm("vllm:request_generation_tokens"),
        "ttft": vllm("vllm:time_to_first_token_seconds"),
        "itl": VLLM_ITL,
        "duration": vllm("vllm:e2e_request_latency_seconds"),
        "inflight": VLLM_WORKER,
        "kv_usage": VLLM_KV_USAGE,
        "workers": VLLM_WORKER,
        "discovery": VLLM_WORKER,
        **VLLM_ENGINE,
    },
    # Every request finishes on a decode worker, which also records its prompt length; the first
    # token is the prefill worker's (what the prefill profile measures); the ITL is decode's.
    recipes=_histogram_recipes({
        "requests": Role.DECODE, "isl": Role.DECODE, "osl": Role.DECODE, "ttft": Role.PREFILL,
        "itl": Role.DECODE, "duration": Role.DECODE, "inflight": Role.ALL, **ENGINE_ROLES,
    }),
    detect="requests",
    discovery="discovery",
    # vLLM counts no request at its arrival; every request has its first token on a decode
    # worker (after its prefill, local or remote) and ends there
    arrivals=(ArrivalCounter(ArrivalSignal.FIRST_TOKEN, "ttft", "_count", Role.DECODE),
              ArrivalCounter(ArrivalSignal.REQUEST_END, "requests", "", Role.DECODE)),
    unobserved={
        "requests_failed": "vLLM counts finished requests only (request_success_total)",
        "requests_before_first_token": "the engines do not count requests before their first "
                                       "token (requests_waiting is their queue)",
        "prefill_tokens_pending": "vLLM exports no count of queued prefill tokens",
    },
)

# In the order auto-detection prefers them: a Dynamo deployment also exposes vllm:* metrics.
DIALECTS: dict[str, Dialect] = {d.name: d for d in (DYNAMO, DYNAMO_LEGACY, VLLM)}
METRIC_KEYS = tuple(dict.fromkeys([*DYNAMO.metrics, *VLLM.metrics]))


def detection_names() -> set[str]:
    """The metric names that identify a dialect."""
    return {n for d in DIALECTS.values() for n in d.metrics[d.detect]}


def detection_query() -> str:
    """One query listing which dialects' identifying metrics exist at all."""
    names = sorted(detection_names())
    return f'group by (__name__) ({{__name__=~"{"|".join(re.escape(n) for n in names)}"}})'


def detect(present: Iterable[str]) -> Dialect | None:
    """The first dialect (in preference order) whose identifying metric is present."""
    names = set(present)
    for dialect in DIALECTS.values():
        if names.intersection(dialect.metrics[dialect.detect]):
            return dialect
    return None


# --- label matchers --------------------------------------------------------------------------

_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')
METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


_ESCAPED = {"n": "\n", "t": "\t", "r": "\r"}


def unquote(value: str) -> str:
    """A PromQL string literal's content with its backslash escapes undone."""
    return re.sub(r"\\(.)", lambda m: _ESCAPED.get(m.group(1), m.group(1)), value)


def matcher_parts(text: str) -> list[tuple[str, str, str]]:
    """(label, operator, value) of each label matcher, the value's escapes undone."""
    return [(m.group(1), m.group(2), unquote(m.group(3))) for m in _MATCHER.finditer(text)]


def check_matchers(text: str) -> str:
    """Validate PromQL label matchers without braces (``a="x", b=~"y.*"``); return them tidied.

    Raises ``ValueError`` naming the part that is not a matcher.
    """
    parts: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = _MATCHER.match(text, pos)
        if match is None:
            raise ValueError(
                f"not a label matcher at {text[pos:pos + 40]!r}; write e.g. "
                'model="llama",namespace=~"prod|staging" (no braces, values in double quotes)'
            )
        parts.append(f'{match.group(1)}{match.group(2)}"{match.group(3)}"')
        pos = match.end()
        if pos < len(text):
            if text[pos] != ",":
                raise ValueError(f"expected ',' between label matchers at {text[pos:pos + 40]!r}")
            pos += 1
    return ",".join(parts)


def quote(value: str) -> str:
    """A PromQL double-quoted string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def join(*matchers: str) -> str:
    return ",".join(m for m in matchers if m)


def duration(seconds: float) -> str:
    """A PromQL duration: whole seconds when exact, else milliseconds (``2500ms``)."""
    millis = round(seconds * 1000.0)
    if millis <= 0:
        raise ValueError(f"a window of {seconds} s is too short for PromQL")
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


# --- rendering -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """What one set of queries covers: label matchers, grouping labels, the window."""

    selector: str  # matchers every series must have (a deployment, or all when grouping)
    by: tuple[str, ...]  # grouping labels, one group per discovered deployment; () for one
    prefill: str  # matcher of the prefill workers
    decode: str  # matcher of the decode workers
    window_s: float
    method: Method = Method.EXACT
    # matchers of the same workers where their series lack the first ones' labels (Dynamo
    # before 1.0 does not label engine metrics with dynamo_component; a scrape job can label
    # them with the pod's role)
    prefill_fallback: str = ""
    decode_fallback: str = ""

    def matcher(self, role: Role) -> str:
        """The first matcher of a role's series (``$prefill``, ``$decode``)."""
        return self.matchers(role)[0]

    def role_matchers(self, role: Role) -> tuple[str, ...]:
        """A role's own matchers, the preferred first (none for every worker)."""
        if role is Role.ALL:
            return ("",)
        first, fallback = ((self.prefill, self.prefill_fallback) if role is Role.PREFILL
                           else (self.decode, self.decode_fallback))
        return (first, fallback) if fallback and fallback != first else (first,)

    def matchers(self, role: Role) -> tuple[str, ...]:
        """Alternative matchers of a role's series: each series matching any of them is
        read once (``or``), whichever labels its workers carry."""
        return tuple(join(self.selector, m) for m in self.role_matchers(role))

    def placeholders(self) -> dict[str, str]:
        return {"selector": self.selector, "prefill": self.matcher(Role.PREFILL),
                "decode": self.matcher(Role.DECODE), "window": duration(self.window_s),
                "by": ", ".join(self.by)}


# How far back a series must be absent to count as new (all of its value in its first window).
NEW_SERIES_LOOKBACK = "1h"


def increase(series: str, window: str, method: Method) -> str:
    """The increase of every counter series of ``series`` over the window, per series."""
    if method is Method.INCREASE:
        return f"increase({series}[{window}])"
    # exact: end value minus the last sample of the window before (a counter that went down was
    # reset: all of its value is new). A series without a sample there is either new (no sample
    # in the hour before the window: Dynamo creates a label set's series with its first
    # request, so all of its value is new and counts) or back from a scrape gap (it counts
    # from its first sample in the window, so a gap is not poured into one window).
    start = f"last_over_time({series}[{window}] offset {window})"
    seen_before = f"last_over_time({series}[{NEW_SERIES_LOOKBACK}] offset {window})"
    return (f"(({series} - {start}) >= 0) or ({series} and {start}) "
            f"or ({series} unless {seen_before}) "
            f"or ({series} - min_over_time({series}[{window}]))")


_MODEL_MATCHER = re.compile(r'(^|,)model(=~|!~|!=|=)"')


def _model_spellings(name: str, match: str) -> list[str]:
    """vLLM labels its model ``model_name`` (Dynamo may add ``model`` too): a ``model`` matcher
    on an engine metric also tries ``model_name``."""
    if not name.startswith("vllm") or not _MODEL_MATCHER.search(match):
        return [match]
    return [match, _MODEL_MATCHER.sub(r'\1model_name\2"', match)]


def _any(names: Sequence[str], suffix: str, matchers: str | Sequence[str],
         per_series: Callable[[str], str] | None = None) -> str:
    """Alternatives (renamed metrics, label spellings, role matchers) joined with ``or``: each
    series once, whichever of them it matches."""
    alternatives = (matchers,) if isinstance(matchers, str) else tuple(matchers)
    terms = list(dict.fromkeys(f"{n}{suffix}{{{m}}}" for n in names for match in alternatives
                               for m in _model_spellings(n, match)))
    if per_series is not None:
        terms = [per_series(t) for t in terms]
    return terms[0] if len(terms) == 1 else " or ".join(f"({t})" for t in terms)


def without_model(matchers: str) -> str:
    """Matchers without those of the model labels (for a metric that has none)."""
    return ",".join(f'{m.group(1)}{m.group(2)}"{m.group(3)}"' for m in _MATCHER.finditer(matchers)
                    if m.group(1) not in CASELESS_LABELS)


def series_matchers(scope: Scope, role: Role, extra: str = "",
                    no_model_label: bool = False) -> tuple[str, ...]:
    """The alternative matchers of a metric's series for a deployment and a role."""
    out = [join(m, extra) for m in scope.matchers(role)]
    if no_model_label:
        out = [without_model(m) for m in out]
    return tuple(dict.fromkeys(out))


def aggregate(op: str, labels: Sequence[str]) -> str:
    """``sum`` or ``sum by (a, b)``: plain when there is nothing to group by."""
    return f"{op} by ({', '.join(labels)})" if labels else op


def render(recipe: Recipe, names: Sequence[str], scope: Scope) -> str:
    """The PromQL of one recipe for one scope."""
    match = series_matchers(scope, recipe.role, recipe.extra, recipe.no_model_label)
    by = scope.by
    w = duration(scope.window_s)

    def inc(series: str) -> str:
        return increase(series, w, scope.method)

    def fresh(series: str) -> str:
        # the value at the window's end, if it was scraped inside the window: a gauge that
        # Prometheus has not seen for a while (its own restart, say) is unknown, not current
        return f"{series} and last_over_time({series}[{w}])"

    if recipe.kind is Kind.COUNT:
        count = f"{aggregate('sum', by)} ({_any(names, '', match, inc)})"
        if not recipe.absent_is_zero:
            return count
        everything = _any(names, "", scope.matchers(recipe.role), inc)
        return f"{count} or (0 * {aggregate('sum', by)} ({everything}))"
    if recipe.kind is Kind.AVERAGE:
        total = f"{aggregate('sum', by)} ({_any(names, '_sum', match, inc)})"
        count = f"{aggregate('sum', by)} ({_any(names, '_count', match, inc)})"
        return f"{total} / {count}"
    if recipe.kind is Kind.QUANTILE:
        assert recipe.quantile is not None
        buckets = _any(names, "_bucket", match, inc)
        return f"histogram_quantile({recipe.quantile:g}, {aggregate('sum', ('le', *by))} " \
               f"({buckets}))"
    if recipe.kind is Kind.SHARE:  # the buckets themselves; the share is worked out here
        return f"{aggregate('sum', ('le', *by))} ({_any(names, '_bucket', match, inc)})"
    if recipe.kind is Kind.GAUGE_SUM:
        return f"{aggregate('sum', by)} ({_any(names, '', match, fresh)})"
    if recipe.kind is Kind.GAUGE_MEAN:
        return f"{aggregate('avg', by)} ({_any(names, '', match, fresh)})"
    if recipe.kind is Kind.WORKERS:
        per_worker = f"{aggregate('count', (recipe.per, *by))} " \
                     f"({_any(names, '', match, fresh)})"
        return f"{aggregate('count', by)} ({per_worker})"
    raise AssertionError(recipe.kind)


def render_template(template: str, scope: Scope) -> str:
    """An operator's query with its ``$placeholders`` filled (``$$`` is a dollar sign)."""
    return Template(template).substitute(scope.placeholders())


def template_errors(template: str) -> list[str]:
    """What is wrong with an operator's query template (unknown placeholders, stray ``$``)."""
    tpl = Template(template)
    if not tpl.is_valid():
        return ["a '$' that starts no placeholder (write $$ for a dollar sign)"]
    unknown = sorted(set(tpl.get_identifiers()) - set(PLACEHOLDERS))
    return [f"unknown placeholder ${name} (known: "
            f"{', '.join('$' + p for p in PLACEHOLDERS)})" for name in unknown]


@dataclass(frozen=True)
class Read:
    """A metric a query reads, for the missing-metric check: its names and matchers."""

    names: tuple[str, ...]
    suffix: str  # "", "_bucket", "_count", ...
    role: Role
    extra: str = ""  # the recipe's own matchers (worker_type="prefill")
    no_model_label: bool = False

    def matchers(self, scope: Scope, role: Role | None = None) -> tuple[str, ...]:
        return series_matchers(scope, self.role if role is None else role, self.extra,
                               self.no_model_label)


@dataclass(frozen=True)
class Query:
    field: str
    kind: Kind
    promql: str
    # empty for an operator's own query; more than one where a deployment without series of
    # the first is read from the next (the router's registry of workers)
    reads: tuple[Read, ...]
    origin: str  # where it comes from, for the log and the reasons


@dataclass(frozen=True)
class Overrides:
    """What the queries file changes: metric names, whole queries ('' disables one)."""

    metrics: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    queries: Mapping[str, str] = field(default_factory=dict)
    origin: str = "the queries file"


@dataclass(frozen=True)
class Plan:
    queries: tuple[Query, ...]
    unobserved: Mapping[str, str]  # field -> why there is no query for it


# The series a query of each kind reads, as the check at start looks for them.
SUFFIX = {Kind.AVERAGE: "_count", Kind.QUANTILE: "_bucket", Kind.SHARE: "_bucket"}


def plan(dialect: Dialect, overrides: Overrides, scope: Scope) -> Plan:
    """One query per field of the snapshot (or the reason there is none)."""
    names = {**dialect.metrics, **overrides.metrics}
    queries: list[Query] = []
    unobserved: dict[str, str] = {}
    for fld, kind in FIELD_KINDS.items():
        if fld in overrides.queries:
            template = overrides.queries[fld]
            if not template.strip():
                unobserved[fld] = f"query disabled in {overrides.origin}"
            else:
                queries.append(Query(fld, kind, render_template(template, scope), (),
                                     f"[queries] in {overrides.origin}"))
            continue
        recipe = dialect.recipes.get(fld)
        if recipe is None:
            unobserved[fld] = dialect.unobserved.get(fld, f"the {dialect.name} dialect has none")
            continue
        texts: list[str] = []
        reads: list[Read] = []
        link: Recipe | None = recipe
        while link is not None:
            if link.no_model_label and CASELESS_LABELS.intersection(scope.by):
                # its series cannot be told apart per model: not a deployment's own
                break
            metric_names = tuple(names[link.metric])
            texts.append(render(link, metric_names, scope))
            reads.append(Read(metric_names, SUFFIX.get(link.kind, ""), link.role, link.extra,
                              link.no_model_label))
            link = link.then
        if not texts:
            unobserved[fld] = (f"{', '.join(names[recipe.metric])} has no model label: it "
                               "cannot be told apart per model with --discover-labels "
                               f"{', '.join(scope.by)}")
            continue
        origin = (f"[metrics].{recipe.metric} in {overrides.origin}"
                  if recipe.metric in overrides.metrics else f"dialect {dialect.name}")
        text = texts[0] if len(texts) == 1 else " or ".join(f"({t})" for t in texts)
        queries.append(Query(fld, kind, text, tuple(reads), origin))
    return Plan(tuple(queries), unobserved)


# --- answers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    labels: Mapping[str, str]
    value: float


def parse_result(result: Any) -> list[Sample]:
    """The ``data.result`` of an instant query as samples; a scalar is one unlabelled sample.

    Raises ``ValueError`` for a range vector or anything else that is not one value per series.
    """
    if (isinstance(result, list) and len(result) == 2
            and isinstance(result[0], int | float) and isinstance(result[1], str)):
        return [Sample({}, float(result[1]))]  # a scalar: [time, "value"]
    if not isinstance(result, list):
        raise ValueError(f"unexpected result {str(result)[:100]!r}")
    samples = []
    for item in result:
        if not isinstance(item, dict) or "value" not in item:
            raise ValueError("the query returned a range vector; it must return one value per "
                             "series (an instant vector)")
        samples.append(Sample(dict(item.get("metric", {})), float(item["value"][1])))
    return samples


# Labels whose values are compared without case: the Dynamo frontend lower-cases its ``model``
# label while the engines keep the model's own spelling (Dynamo's planner compares them the same
# way, components/src/dynamo/planner/utils/prometheus.py).
CASELESS_LABELS = frozenset({"model", "model_name"})


@dataclass(frozen=True)
class Series:
    labels: Mapping[str, str]
    values: tuple[tuple[float, float], ...]  # (epoch seconds, value)


def parse_range(result: Any) -> list[Series]:
    """The ``data.result`` of a range query (a matrix); ``ValueError`` for anything else."""
    if not isinstance(result, list):
        raise ValueError(f"unexpected result {str(result)[:100]!r}")
    out = []
    for item in result:
        if not isinstance(item, dict) or "values" not in item:
            raise ValueError("the range query did not return a matrix")
        out.append(Series(dict(item.get("metric", {})),
                          tuple((float(t), float(v)) for t, v in item["values"])))
    return out


def arrival_samples_query(counter: ArrivalCounter, names: Sequence[str], scope: Scope) -> str:
    """How many samples the counter's best-scraped series of each group has in the window: it
    bounds how fine the window's arrival bins can be."""
    w = duration(scope.window_s)
    inner = _any(names, counter.suffix, scope.matchers(counter.role),
                 lambda t: f"count_over_time({t}[{w}])")
    return f"{aggregate('max', scope.by)} ({inner})"


def arrival_counter_query(counter: ArrivalCounter, names: Sequence[str], scope: Scope) -> str:
    """The counter's series themselves, for a range query that reads them at every bin's edge:
    their increases from edge to edge are the arrivals per bin (``window.bin_increases``)."""
    return _any(names, counter.suffix, scope.matchers(counter.role))


def counts_by_group(series: Sequence[Series], by: Sequence[str], start: float, bin_s: float,
                    bins: int) -> dict[tuple[str, ...], list[float]]:
    """Each group's arrivals per bin from its counter series read at the bins' edges (``start``
    and every ``bin_s`` after it, ``bins + 1`` edges): the sum of the series' increases."""
    groups: dict[tuple[str, ...], np.ndarray] = {}
    for one in series:
        readings: list[float | None] = [None] * (bins + 1)
        for t, v in one.values:
            index = round((t - start) / bin_s)
            if 0 <= index <= bins and math.isfinite(v):
                readings[index] = v
        counts = np.asarray(window.bin_increases(readings), dtype=np.float64)
        key = group_key(one.labels, by)
        groups[key] = groups[key] + counts if key in groups else counts
    return {g: c.tolist() for g, c in groups.items()}


def group_key(labels: Mapping[str, str], by: Sequence[str]) -> tuple[str, ...]:
    return tuple(labels.get(label, "").lower() if label in CASELESS_LABELS
                 else labels.get(label, "") for label in by)


def caseless(matchers: str) -> str:
    """Label matchers with each ``model="X"`` (or ``model_name``) made case-insensitive."""
    out = []
    for part in _MATCHER.finditer(matchers):
        label, op, value = part.groups()
        if label in CASELESS_LABELS and op in ("=", "!="):
            literal = re.escape(unquote(value))
            value = quote(f"(?i){literal}")[1:-1]
            op = "=~" if op == "=" else "!~"
        out.append(f'{label}{op}"{value}"')
    return ",".join(out)


def split(samples: Iterable[Sample], by: Sequence[str]) -> dict[tuple[str, ...], list[Sample]]:
    groups: dict[tuple[str, ...], list[Sample]] = {}
    for sample in samples:
        groups.setdefault(group_key(sample.labels, by), []).append(sample)
    return groups


NO_SERIES = {
    Kind.COUNT: "no data: no series (metric absent, labels not matching, or no sample in window)",
    Kind.AVERAGE: "no data: no series (metric absent, labels not matching, or no sample in window)",
    Kind.QUANTILE: "no data: no series (metric absent, labels not matching, or no sample in "
                   "window)",
    Kind.GAUGE_SUM: "no data: the gauge has no series at the window's end",
    Kind.GAUGE_MEAN: "no data: the gauge has no series at the window's end",
    Kind.WORKERS: "no data: no worker exposes the metric (none running, or the role selector "
                  "matches none)",
    Kind.SHARE: "no data: no series (metric absent, labels not matching, or no sample in window)",
}


def interpret(kind: Kind, samples: Sequence[Sample], fld: str = "") -> tuple[float | None, str]:
    """A field's value from the samples of one deployment, or ``None`` and why.

    Three kinds of null: unknown (no series), undefined (NaN: 0/0 of an empty window, reason
    ``window.UNDEFINED``) and implausible (a value the field cannot hold). A real 0 is a value.
    """
    if not samples:
        return None, NO_SERIES[kind]
    if len(samples) > 1:
        return None, (f"the query returned {len(samples)} series for one deployment; "
                      "aggregate it (sum by ($by) (...))")
    value = samples[0].value
    if math.isnan(value):
        if kind in (Kind.AVERAGE, Kind.QUANTILE):
            return None, window.UNDEFINED
        return None, "the query returned NaN"
    if math.isinf(value):
        return None, f"the query returned {value}"
    if value < 0:
        return None, f"negative value {value:g}"
    if fld == "kv_cache_usage" and value > 1.0:
        return None, f"{value:g} is not a fraction in [0, 1] (is the metric a percentage?)"
    if kind is Kind.WORKERS:
        return float(round(value)), ""
    return value, ""


def share(samples: Sequence[Sample], target: float, fld: str) -> tuple[dict[str, Any], str]:
    """The share under ``target`` (and how it was worked out) from a window's bucket increases
    per ``le``; the fields it fills, or nothing and why."""
    if not samples:
        return {}, NO_SERIES[Kind.SHARE]
    try:
        buckets = {float(s.labels["le"]): s.value for s in samples}
    except (KeyError, ValueError):
        return {}, "the share query must return one series per bucket bound (by le)"
    return share_fields(buckets, target, fld)


def share_fields(buckets: Mapping[float, float], target: float, fld: str
                 ) -> tuple[dict[str, Any], str]:
    """The share fields from a window's bucket increases (``le`` -> observations at or below
    it), or nothing and why."""
    result = window_stats.share_from_buckets(buckets, target)
    if result.share is None:
        reason = window.UNDEFINED if result.reason == window_stats.NO_SAMPLES else result.reason
        return {}, reason
    target_f, bucket_f, method_f = SHARE_FIELDS[fld]
    return {fld: result.share, target_f: target, bucket_f: result.bucket_s,
            method_f: result.method}, ""


def values_for(groups: Mapping[str, Mapping[tuple[str, ...], Sequence[Sample]]],
               kinds: Mapping[str, Kind], member: tuple[str, ...],
               targets: Mapping[str, float] | None = None) -> window.WindowValues:
    """One deployment's window values from every query's grouped answer; ``targets`` are the
    latency targets of the share fields (field -> seconds)."""
    values: dict[str, Any] = {}
    gaps: dict[str, str] = {}
    for fld, by_group in groups.items():
        if kinds[fld] is Kind.SHARE:
            if targets is None or fld not in targets:
                continue
            filled, reason = share(by_group.get(member, ()), targets[fld], fld)
            values.update(filled)
            if reason:
                gaps[fld] = reason
            continue
        value, reason = interpret(kinds[fld], by_group.get(member, ()), fld)
        # worker counts are integers on the bus (and the model is strict about it)
        values[fld] = int(value) if kinds[fld] is Kind.WORKERS and value is not None else value
        if value is None:
            gaps[fld] = reason
    return window.WindowValues(values=values, gaps=gaps)


# --- deployments from label values -------------------------------------------------------------

_DNS = re.compile(DNS_LABEL)
# A label value longer than this names no deployment (a DNS name is at most 253 characters;
# model ids are far shorter): a value that long is a mistake or an attack.
MAX_LABEL_VALUE_CHARS = 253


def label_problem(value: str) -> str | None:
    """Why a label value cannot name a deployment (skip it), or ``None`` if it can."""
    if not value:
        return "empty"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in value):
        return "control characters"
    if len(value) > MAX_LABEL_VALUE_CHARS:
        return f"longer than {MAX_LABEL_VALUE_CHARS} characters"
    return None


def dns_label(value: str) -> str:
    """A label value as a DNS-1123 label (a subject token): itself if it is one, else a tidied
    form plus a short hash of the original, so that two values never share a name.

    ``fullmatch``, not ``match``: Python's ``$`` also matches before a trailing newline."""
    if _DNS.fullmatch(value):
        return value
    tidy = re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")[:54].strip("-") or "x"
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:8]
    return f"{tidy}-{digest}"


def discovered_key(values: Sequence[str], labels: Sequence[str],
                   default_namespace: str) -> DeploymentKey:
    """The deployment named by one group of label values: (name) or (namespace, name).

    Raises ``ValueError`` naming the value when one of them cannot name a deployment."""
    for label, value in zip(labels, values, strict=True):
        problem = label_problem(value)
        if problem is not None:
            raise ValueError(f"{label}={value!r}: {problem}")
    if len(labels) == 1:
        return DeploymentKey(namespace=default_namespace, name=dns_label(values[0]))
    return DeploymentKey(namespace=dns_label(values[0]), name=dns_label(values[1]))


def discovery_query(dialect: Dialect, overrides: Overrides, scope: Scope) -> str:
    names = overrides.metrics.get(dialect.discovery, dialect.metrics[dialect.discovery])
    return f"{aggregate('group', scope.by)} ({_any(names, '', scope.selector)})"


def group_selector(scope: Scope, member: tuple[str, ...]) -> str:
    """The matchers of one discovered deployment (for messages and checks)."""
    return join(scope.selector, *(f"{label}={quote(v)}" for label, v in zip(scope.by, member,
                                                                             strict=True)))


# --- the missing-metric check ----------------------------------------------------------------


def presence_query(read: Read, scope: Scope, role: Role | None = None,
                   role_matcher: str | None = None) -> str:
    """Which groups have at least one series of the metric: with the read's own role (any of
    its matchers), another ``role`` (``Role.ALL``: whatever the role), or one ``role_matcher``
    of the read's role."""
    if role_matcher is None:
        matchers = read.matchers(scope, role)
    else:
        matchers = (join(scope.selector, role_matcher, read.extra),)
        if read.no_model_label:
            matchers = (without_model(matchers[0]),)
    return f"{aggregate('count', scope.by)} ({_any(read.names, read.suffix, matchers)})"


def anywhere_query(read: Read) -> str:
    return f"count({_any(read.names, read.suffix, '')})"


def metric_list(read: Read) -> str:
    return " or ".join(n + read.suffix for n in read.names)


def diagnose(query: Query, read: Read, scope: Scope, member: tuple[str, ...],
             without_role: bool, anywhere: bool, targets_down: int) -> str:
    """What to check when ``read`` has no series for a deployment."""
    names = metric_list(read)
    where = group_selector(scope, member)
    if read.role is not Role.ALL and without_role:
        role_matchers = " or ".join(scope.role_matchers(read.role))
        return (f"{query.field}: {names} exists for {{{where}}} but not for its {read.role} "
                f"workers ({role_matchers}): check --{read.role}-selector and "
                f"--{read.role}-fallback-selector (for an aggregated deployment, disable the "
                "prefill queries)")
    if anywhere:
        return (f"{query.field}: {names} exists, but no series has the labels {{{where}}}: "
                "check the deployment's selector or discovery labels")
    down = f"; {targets_down} scrape target(s) are down (up == 0)" if targets_down else ""
    return (f"{query.field}: no series named {names} in Prometheus: check the metric name "
            f"(--dialect, or [metrics] in the queries file, from {query.origin}), that the "
            f"serving pods are up and that Prometheus scrapes them{down}")
