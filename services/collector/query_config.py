"""The queries file (TOML): metric names, whole queries and static deployments, checked on load.

```toml
[metrics]                       # rename a metric; the query keeps the dialect's shape
requests = "my_frontend_requests_total"
kv_usage = ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]   # first found wins

[queries]                       # replace a whole query; "" disables it (the field stays null)
ttft_p99_s = 'histogram_quantile(0.99, sum by (le, $by) (rate(x_bucket{$selector}[$window])))'
prefill_workers = ""

[[deployments]]                 # static deployments, each with its PromQL label matchers
namespace = "prod"
name = "llama"
selector = 'model="llama",dynamo_namespace="prod-llama"'
```

Every error names the file and the field (``collector.toml: [queries].ttft_p99_s: ...``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from services.collector import promql
from shared.messages import DeploymentKey

SECTIONS = ("metrics", "queries", "deployments")


class QueryConfigError(ValueError):
    """A queries file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class StaticDeployment:
    key: DeploymentKey
    selector: str  # PromQL label matchers, no braces


@dataclass(frozen=True)
class QueryConfig:
    overrides: promql.Overrides = field(default_factory=promql.Overrides)
    deployments: tuple[StaticDeployment, ...] = ()


def load(path: str | Path) -> QueryConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QueryConfigError(f"{path}: cannot read the queries file: {exc.strerror}") from None
    return parse(text, str(path))


def parse(text: str, origin: str) -> QueryConfig:
    def fail(where: str, message: str) -> QueryConfigError:
        return QueryConfigError(f"{origin}: {where}: {message}")

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise QueryConfigError(f"{origin}: not valid TOML: {exc}") from None
    for key in data:
        if key not in SECTIONS:
            raise fail(key, f"unknown section; known: {', '.join(SECTIONS)}")

    metrics = _metrics(_table(data, "metrics", fail), fail)
    queries = _queries(_table(data, "queries", fail), fail)
    deployments = _deployments(data.get("deployments", []), fail)
    return QueryConfig(promql.Overrides(metrics, queries, origin), deployments)


def _table(data: dict[str, Any], name: str, fail: Any) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise fail(f"[{name}]", "must be a table")
    return table


def _metrics(table: dict[str, Any], fail: Any) -> dict[str, tuple[str, ...]]:
    metrics: dict[str, tuple[str, ...]] = {}
    for key, value in table.items():
        where = f"[metrics].{key}"
        if key not in promql.METRIC_KEYS:
            raise fail(where, f"unknown metric key; known: {', '.join(promql.METRIC_KEYS)}")
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise fail(where, "must be a metric name or a non-empty list of names")
        for name in names:
            if not promql.METRIC_NAME.match(name):
                raise fail(where, f"{name!r} is not a Prometheus metric name")
        metrics[key] = tuple(names)
    return metrics


def _queries(table: dict[str, Any], fail: Any) -> dict[str, str]:
    queries: dict[str, str] = {}
    for key, value in table.items():
        where = f"[queries].{key}"
        if key not in promql.FIELD_KINDS:
            raise fail(where, f"unknown field; known: {', '.join(promql.FIELDS)}")
        if not isinstance(value, str):
            raise fail(where, 'must be a PromQL string ("" disables the query)')
        problems = promql.template_errors(value)
        if problems:
            raise fail(where, "; ".join(problems))
        queries[key] = value
    return queries


def _deployments(items: Any, fail: Any) -> tuple[StaticDeployment, ...]:
    if not isinstance(items, list):
        raise fail("[[deployments]]", "must be an array of tables ([[deployments]])")
    result: list[StaticDeployment] = []
    seen: set[DeploymentKey] = set()
    for i, item in enumerate(items):
        where = f"deployments[{i}]"
        if not isinstance(item, dict):
            raise fail(where, "must be a table with namespace, name and selector")
        unknown = set(item) - {"namespace", "name", "selector"}
        if unknown:
            raise fail(f"{where}.{sorted(unknown)[0]}", "unknown key; known: namespace, name, "
                       "selector")
        for required in ("namespace", "name"):
            if not isinstance(item.get(required), str):
                raise fail(f"{where}.{required}", "is required and must be a string")
        try:
            key = DeploymentKey(namespace=item["namespace"], name=item["name"])
        except ValidationError as exc:
            bad = str(exc.errors()[0]["loc"][0])
            raise fail(f"{where}.{bad}", f"{item[bad]!r} is not a DNS-1123 label (lower case "
                       "letters, digits and '-', at most 63)") from None
        if key in seen:
            raise fail(where, f"deployment {key} is listed twice")
        seen.add(key)
        selector = item.get("selector", "")
        if not isinstance(selector, str):
            raise fail(f"{where}.selector", "must be a string of PromQL label matchers")
        try:
            selector = promql.check_matchers(selector)
        except ValueError as exc:
            raise fail(f"{where}.selector", str(exc)) from None
        result.append(StaticDeployment(key, selector))
    return tuple(result)
