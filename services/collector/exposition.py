"""Direct-scrape windows (pure): a dialect's recipes evaluated over /metrics expositions.

The Prometheus source has Prometheus evaluate each field's query; this module computes the same
fields, with the same recipes (``promql``), the same arithmetic (``window``) and the same reasons
for a ``null``, from two scrapes of each endpoint: one at the window's start, one at its end.

An endpoint is a frontend, a prefill worker or a decode worker: the role of a worker is the list
its URL was given in (``--scrape-prefill-urls``, ``--scrape-decode-urls``), not a label. The
deployment's label matchers (``--scrape-labels``) select a frontend's series (a frontend may
serve several models); a worker's series are its deployment's by configuration.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from services.collector import promql, window
from services.collector.promql import Kind, Recipe, Role

Labels = tuple[tuple[str, str], ...]


class Endpoint(StrEnum):
    FRONTEND = "frontend"
    PREFILL = "prefill"
    DECODE = "decode"


# The endpoints a recipe of each role reads.
ENDPOINTS = {Role.ALL: frozenset(Endpoint), Role.PREFILL: frozenset({Endpoint.PREFILL}),
             Role.DECODE: frozenset({Endpoint.DECODE})}


@dataclass(frozen=True)
class Exposition:
    """One scrape of one endpoint: each sample's value by name and label set."""

    samples: Mapping[tuple[str, Labels], float] = field(default_factory=dict)

    def names(self) -> set[str]:
        """The metric names present, histograms by their base name and with their suffixes."""
        names = {name for name, _ in self.samples}
        return names | {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def parse(text: str) -> Exposition:
    """A text exposition (Prometheus or OpenMetrics); ``ValueError`` if it is not one."""
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return Exposition(samples)


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.label, "")
        if self.op in ("=", "!="):
            # the frontend lower-cases its model label, the engines keep the model's spelling
            same = (actual.casefold() == self.value.casefold()
                    if self.label in promql.CASELESS_LABELS else actual == self.value)
            return same if self.op == "=" else not same
        found = re.fullmatch(self.value, actual) is not None
        return found if self.op == "=~" else not found


def matchers(text: str) -> tuple[Matcher, ...]:
    return tuple(Matcher(*part) for part in promql.matcher_parts(text))


@dataclass(frozen=True)
class Target:
    """An endpoint's scrapes at the window's start and end. ``before`` is None when there is no
    start to count from (its scrape before failed): its counters count nothing this window."""

    url: str
    endpoint: Endpoint
    after: Exposition
    before: Exposition | None


@dataclass(frozen=True)
class Selection:
    """What a recipe reads: the metric names, the endpoints, the series' label matchers."""

    names: tuple[str, ...]
    endpoints: frozenset[Endpoint]
    frontend: tuple[Matcher, ...]  # on a frontend: the deployment's and the recipe's own
    worker: tuple[Matcher, ...]  # on a worker: the recipe's own

    def series(self, target: Target, exposition: Exposition | None, suffix: str = ""
               ) -> dict[Labels, float]:
        """The target's series of the metric (any of its names) that match, by label set."""
        if exposition is None or target.endpoint not in self.endpoints:
            return {}
        wanted = {n + suffix for n in self.names}
        match = self.frontend if target.endpoint is Endpoint.FRONTEND else self.worker
        out: dict[Labels, float] = {}
        for (name, labels), value in exposition.samples.items():
            if name in wanted and labels not in out:
                as_dict = dict(labels)
                if all(m.matches(as_dict) for m in match):
                    out[labels] = value
        return out


def select(recipe: Recipe, names: Sequence[str], selector: str) -> Selection:
    deployment = promql.without_model(selector) if recipe.no_model_label else selector
    own = matchers(recipe.extra)
    return Selection(tuple(names), ENDPOINTS[recipe.role], matchers(deployment) + own, own)


def _increases(selection: Selection, targets: Sequence[Target], suffix: str
               ) -> dict[Labels, float] | None:
    """Each series' increase over the window, summed over the targets by label set (the
    ``le`` of a bucket kept, the rest dropped); None if no target has the series."""
    found = False
    out: dict[Labels, float] = {}
    for target in targets:
        now = selection.series(target, target.after, suffix)
        found = found or bool(now)
        if target.before is None:
            continue
        then = selection.series(target, target.before, suffix)
        for labels, value in now.items():
            # a series absent from a scrape that succeeded was not there yet: it started at 0
            key = tuple((k, v) for k, v in labels if k == "le")
            out[key] = out.get(key, 0.0) + window.counter_increase(then.get(labels, 0.0), value)
    return out if found else None


def _buckets(increases: Mapping[Labels, float]) -> dict[float, float]:
    return {float(dict(labels)["le"]): value for labels, value in increases.items()}


@dataclass(frozen=True)
class Answer:
    values: dict[str, Any]
    reason: str = ""  # why the field is null


def _evaluate(recipe: Recipe, fld: str, selection: Selection, targets: Sequence[Target],
              target_s: float | None) -> Answer | None:
    """One recipe's answer, or None when no target has its series."""
    kind = recipe.kind
    if kind is Kind.COUNT:
        increases = _increases(selection, targets, "")
        if increases is None:
            return None
        return Answer({fld: sum(increases.values())})
    if kind is Kind.AVERAGE:
        total = _increases(selection, targets, "_sum")
        count = _increases(selection, targets, "_count")
        if total is None or count is None:
            return None
        n = sum(count.values())
        if n <= 0:
            return Answer({fld: None}, window.UNDEFINED)
        return Answer({fld: max(sum(total.values()) / n, 0.0)})
    if kind in (Kind.QUANTILE, Kind.SHARE):
        increases = _increases(selection, targets, "_bucket")
        if increases is None:
            return None
        buckets = _buckets(increases)
        if kind is Kind.SHARE:
            assert target_s is not None
            filled, reason = promql.share_fields(buckets, target_s, fld)
            return Answer(filled or {fld: None}, reason)
        assert recipe.quantile is not None
        estimate = window.histogram_quantile(recipe.quantile, buckets)
        return Answer({fld: estimate}, "" if estimate is not None else window.UNDEFINED)
    series = [v for t in targets for v in selection.series(t, t.after).values()]
    if kind is Kind.WORKERS:
        if recipe.per == "instance":
            workers = sum(1 for t in targets if selection.series(t, t.after))
        else:
            workers = len({dict(labels).get(recipe.per, "") for t in targets
                           for labels in selection.series(t, t.after)})
        return Answer({fld: workers}) if workers else None
    if not series:
        return None
    value = sum(series) if kind is Kind.GAUGE_SUM else sum(series) / len(series)
    if not math.isfinite(value) or value < 0:
        return Answer({fld: None}, f"implausible value {value:g}")
    if fld == "kv_cache_usage" and value > 1.0:
        return Answer({fld: None}, f"{value:g} is not a fraction in [0, 1] (is the metric a "
                                   "percentage?)")
    return Answer({fld: value})


def _missing(kind: Kind, recipe: Recipe, fld: str, names: Sequence[str],
             selection: Selection, targets: Sequence[Target]) -> Answer:
    """The answer of a recipe whose series no target has."""
    if recipe.absent_is_zero:
        # the series appears with its first event: none yet while the metric itself is there
        base = Selection(selection.names, selection.endpoints,
                         tuple(m for m in selection.frontend if m not in matchers(recipe.extra)),
                         ())
        if _increases(base, targets, "") is not None:
            return Answer({fld: 0.0})
    return Answer({fld: None}, f"{promql.NO_SERIES[kind]}: {' or '.join(names)} on the "
                               f"{'/'.join(sorted(selection.endpoints))} endpoints")


# Kinds whose value is a total over the endpoints: one missing endpoint makes it too small.
_TOTALS = (Kind.COUNT, Kind.GAUGE_SUM)


def window_values(dialect: promql.Dialect, targets: Sequence[Target], selector: str = "",
                  latency_targets: Mapping[str, float] | None = None,
                  unanswered: Mapping[Endpoint, str] | None = None) -> window.WindowValues:
    """Every field of the dialect for the window the targets' scrapes span. ``unanswered``:
    endpoints of a role that did not answer at the window's end, and why; a total over that
    role is then unknown (the averages, quantiles and shares of the others still hold)."""
    missing = dict(unanswered or {})
    for target in targets:
        if target.before is None:
            missing.setdefault(target.endpoint, f"{target.url} has no scrape at the window's "
                                                "start to count from (the one before failed)")
    values: dict[str, Any] = {}
    gaps: dict[str, str] = {}
    for fld, kind in promql.FIELD_KINDS.items():
        recipe = dialect.recipes.get(fld)
        if kind is Kind.SHARE and fld not in (latency_targets or {}):
            continue  # no target to measure against
        if recipe is None:
            values[fld] = None
            gaps[fld] = dialect.unobserved.get(fld, f"the {dialect.name} dialect has none")
            continue
        answer: Answer | None = None
        link: Recipe | None = recipe
        while answer is None and link is not None:
            names = dialect.metrics[link.metric]
            selection = select(link, names, selector)
            answer = _evaluate(link, fld, selection, targets, (latency_targets or {}).get(fld))
            if answer is not None and kind in _TOTALS:
                short = [why for endpoint, why in missing.items()
                         if endpoint in _holders(selection, targets, link)]
                if short:
                    answer = Answer({fld: None}, f"incomplete: {short[0]}")
            link = link.then if answer is None else None
        if answer is None:
            names = dialect.metrics[recipe.metric]
            answer = _missing(kind, recipe, fld, names, select(recipe, names, selector), targets)
        values.update(answer.values)
        if answer.reason:
            gaps[fld] = answer.reason
    return window.WindowValues(values, gaps)


def _holders(selection: Selection, targets: Iterable[Target], recipe: Recipe
             ) -> set[Endpoint]:
    """The kinds of endpoint that hold a recipe's series: its role's, or for a recipe of every
    role, those where it was found (a frontend metric is not short of a worker that failed)."""
    if recipe.role is not Role.ALL:
        return set(selection.endpoints)
    return {t.endpoint for t in targets if selection.series(t, t.after)}


def counter_readings(exposition: Exposition, counter: promql.ArrivalCounter,
                     names: Sequence[str], selector: str, endpoint: Endpoint
                     ) -> dict[Labels, float]:
    """An arrival counter's series on one endpoint, by label set."""
    recipe = Recipe(Kind.COUNT, counter.metric, counter.role)
    selection = select(recipe, names, selector)
    target = Target("", endpoint, exposition, None)
    return selection.series(target, exposition, counter.suffix)
