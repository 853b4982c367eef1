"""Hostile input on every subject the services read, with the four services as real processes.

Hypothesis builds a corpus of a few thousand malformed and extreme bodies (broken JSON, wrong
types, missing and unknown fields, out-of-range and non-finite numbers, huge integers, deep
nesting, bodies over the size limit, unicode junk, a deployment key that is not the subject's),
each one invalid by construction and checked against the message models here first. The corpus
is then published on a real nats-server at full speed, with valid snapshots (some at the edges
of their ranges) in between. Each hostile body must come back as exactly one Rejected with a
reason from every service that reads its subject (matched on reader, subject, size and the head
of the body that the Rejected keeps); each valid snapshot must still become a
forecast, a target and a scale event; no service may die, and none may grow by more than a few
tens of MB.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared import bus, embedded_nats
from shared.messages import (
    DNS_LABEL,
    MAX_OBSERVED,
    MAX_REPLICAS,
    MIN_WINDOW_S,
    SUBJECT_PREFIX,
    Envelope,
    LoadForecast,
    MetricSnapshot,
    Outcome,
    Rejected,
    ReplicaTarget,
    ScaleEvent,
    deployment_from_subject,
    derived_id,
)
from shared.service_settings import ServiceSettings
from tests.conftest import ServiceProcess

# Small, so that oversized bodies are cheap to send (the rule is the same at the default 1 MiB),
# yet above a forecast of 1 s windows over the default 300 s horizon (about 72 kB).
MAX_BODY_BYTES = 128 * 1024
# The stream stores no body larger than this (ServiceSettings.stream_max_msg_bytes), so such a
# body never reaches a service to be rejected.
STREAM_MAX_MSG_BYTES = ServiceSettings().stream_max_msg_bytes
HOSTILE_COUNT = 2400
# One valid snapshot after every this many hostile bodies.
VALID_EVERY = 60
BATCH = 200
# Generous: the machine is shared, and a service's first messages warm up its allocator.
RSS_GROWTH_LIMIT_KB = 40 * 1024

NAMESPACE, NAME = "fuzz", "llama"
KEY = {"namespace": NAMESPACE, "name": NAME}
T0 = 1_732_345_200.0

MODELS: dict[str, type[Envelope]] = {
    "metrics": MetricSnapshot, "forecast": LoadForecast, "target": ReplicaTarget,
    "scaled": ScaleEvent,
}
# Who reads each subject family: the decider's default policy uses snapshots (its fast path) and
# scale events (to learn worker startup) as well as forecasts.
READERS: dict[str, tuple[str, ...]] = {
    "metrics": ("forecaster", "decider"), "forecast": ("decider",), "target": ("actuator",),
    "scaled": ("decider",),
}
CONSUMERS = {"forecaster", "decider", "actuator"}


def subject_of(family: str, namespace: str = NAMESPACE, name: str = NAME) -> str:
    return f"{SUBJECT_PREFIX}.{family}.{namespace}.{name}"


STEP = {"window_end": T0 + 60, "num_requests": 100.0, "num_requests_upper": 120.0,
        "isl_avg": 3000.0, "isl_avg_upper": 3100.0, "osl_avg": 300.0, "osl_avg_upper": 310.0}
ROLE = {"from": 1, "to": 2, "ready": 1}
# One valid body per family, the starting point of every mutation.
VALID_BODIES: dict[str, dict[str, Any]] = {
    "metrics": {"schema_version": 1, "id": "m-1", "deployment": KEY, "window_end": T0,
                "window_s": 60.0, "num_requests": 100.0, "isl_avg": 3000.0, "osl_avg": 300.0,
                "prefill_workers": 1, "decode_workers": 1, "kv_cache_usage": 0.5,
                "gaps": {"ttft_p99_s": "no samples"}},
    "forecast": {"schema_version": 1, "id": "f-1", "deployment": KEY, "window_end": T0,
                 "window_s": 60.0, "model": "constant", "fit_s": 0.001, "steps": [STEP]},
    "target": {"schema_version": 1, "id": "t-1", "deployment": KEY, "window_end": T0,
               "window_s": 60.0, "policy": "slaplanner", "prefill_replicas": 2,
               "decode_replicas": 3, "explanation": {"reason": "fuzz"}},
    "scaled": {"schema_version": 1, "id": "s-1", "deployment": KEY, "window_end": T0,
               "window_s": 60.0, "target_id": "t-1", "outcome": "dry-run", "backend": "dry-run",
               "prefill": ROLE, "decode": ROLE},
}

FieldPath = tuple[str | int, ...]
# Numeric fields, with what lies outside their range besides negative numbers.
NUMBERS: dict[str, list[FieldPath]] = {
    "metrics": [("window_end",), ("window_s",), ("num_requests",), ("isl_avg",), ("osl_avg",),
                ("ttft_p99_s",), ("requests_waiting",), ("kv_cache_usage",),
                ("prefill_workers",), ("decode_workers",)],
    "forecast": [("window_end",), ("window_s",), ("fit_s",), ("steps", 0, "num_requests"),
                 ("steps", 0, "osl_avg_upper"), ("steps", 0, "window_end")],
    "target": [("window_end",), ("window_s",), ("prefill_replicas",), ("decode_replicas",)],
    "scaled": [("window_end",), ("window_s",), ("prefill", "to"), ("decode", "from")],
}
# A snapshot's measured quantities, bounded above.
OBSERVED = {"num_requests", "isl_avg", "osl_avg", "ttft_p99_s", "requests_waiting"}
COUNTS = {"prefill_workers", "decode_workers", "prefill_replicas", "decode_replicas", "to",
          "from"}
STRINGS: dict[str, list[FieldPath]] = {
    "metrics": [("id",), ("source",), ("deployment", "name"), ("deployment", "namespace")],
    "forecast": [("id",), ("model",), ("deployment", "name")],
    "target": [("id",), ("policy",), ("deployment", "namespace")],
    "scaled": [("id",), ("target_id",), ("backend",), ("outcome",), ("deployment", "name")],
}
# The longest text each string field takes.
STRING_LIMITS = {"id": 128, "source": 64, "model": 64, "policy": 64, "target_id": 128,
                 "backend": 64, "name": 63, "namespace": 63, "outcome": 16}
RAW = "__raw__"  # stands for a literal that orjson cannot write (NaN, 1e400, deep nesting)


def set_path(body: dict[str, Any], path: FieldPath, value: Any) -> dict[str, Any]:
    """A deep copy of ``body`` with ``value`` at ``path``."""
    copy: dict[str, Any] = orjson.loads(orjson.dumps(body))
    node: Any = copy
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return copy


def encode(body: dict[str, Any], raw: bytes = b"") -> bytes:
    return orjson.dumps(body).replace(orjson.dumps(RAW), raw, 1)


@dataclass(frozen=True)
class Hostile:
    family: str
    subject: str
    body: bytes
    kind: str


def refused_by_the_models(family: str, subject: str, body: bytes) -> bool:
    """What every reader must conclude, worked out here from the models themselves."""
    if len(body) > MAX_BODY_BYTES:
        return True
    try:
        message = MODELS[family].from_json(body, default_id="stream-1")
    except (ValueError, RecursionError):
        return True
    return deployment_from_subject(subject) != message.deployment


# --------------------------------------------------------------------------- strategies

json_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=16))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=8)
junk_text = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40)
# A NATS subject token: anything but separators, wildcards and whitespace.
subject_tokens = st.text(
    st.characters(exclude_categories=["Cs", "Cc", "Zs", "Zl", "Zp"], exclude_characters=".*>"),
    min_size=1, max_size=20)
dns_labels = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?\Z")
negative = (st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False)
            | st.integers(-(2**63), -1))


def above_range(field: str) -> st.SearchStrategy[Any]:
    if field in COUNTS:
        return (st.integers(MAX_REPLICAS + 1, 2**63 - 1)
                | st.floats(0.5, 1e6).filter(lambda v: not v.is_integer()))
    if field == "window_end":
        return st.floats(1.0e11 * (1 + 1e-9), 1e300)
    if field == "window_s":
        return (st.floats(0.0, MIN_WINDOW_S, exclude_max=True)
                | st.floats(86_400.0 * (1 + 1e-9), 1e300))
    if field in OBSERVED:
        return st.floats(MAX_OBSERVED * (1 + 1e-9), 1.7976931348623157e308)
    if field == "kv_cache_usage":
        return st.floats(1.0 + 1e-9, 1e300)
    return st.nothing()


@st.composite
def hostile(draw: st.DrawFn, family: str) -> Hostile:
    base = VALID_BODIES[family]
    subject = subject_of(family)
    kind = draw(st.sampled_from([
        "not JSON", "not an object", "wrong type", "missing field", "unknown field",
        "out of range", "non-finite or huge literal", "deep nesting", "oversized", "bad string",
        "bad schema version", "subject of another deployment", "bad subject tokens",
        "broken nested part",
    ]))
    if kind == "not JSON":
        body = draw(st.binary(max_size=300)
                    | st.integers(1, len(encode(base)) - 1).map(lambda n: encode(base)[:n])
                    | st.just(encode(base)[:-1] + b"\xff}"))
        return Hostile(family, subject, body, kind)
    if kind == "not an object":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return Hostile(family, subject, orjson.dumps(value), kind)
    if kind == "wrong type":
        which = draw(st.sampled_from(["number", "string", "object"]))
        if which == "number":
            path = draw(st.sampled_from(NUMBERS[family]))
            value = draw(st.text(max_size=10) | st.booleans()
                         | st.lists(st.integers(0, 9), min_size=1, max_size=3)
                         | st.dictionaries(st.text(max_size=4), st.integers(0, 9), max_size=2))
        elif which == "string":
            path = draw(st.sampled_from(STRINGS[family]))
            value = draw(st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False,
                                                                       allow_infinity=False)
                         | st.booleans() | st.lists(st.text(max_size=4), max_size=3)
                         | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
        else:
            path = ("deployment",)
            value = draw(st.text(max_size=20) | st.integers(-(2**63), 2**63 - 1)
                         | st.lists(st.text(), max_size=2)
                         | st.none())
        body = encode(set_path(base, path, value))
        return Hostile(family, subject, body, f"{kind} at {'.'.join(map(str, path))}")
    if kind == "missing field":
        required = sorted(n for n, f in MODELS[family].model_fields.items() if f.is_required())
        field = draw(st.sampled_from(required))
        return Hostile(family, subject, encode({k: v for k, v in base.items() if k != field}),
                       f"{kind} {field}")
    if kind == "unknown field":
        known = set(MODELS[family].model_fields) | {"from"}
        name = draw(st.text(min_size=1, max_size=24).filter(lambda n: n not in known))
        where = draw(st.sampled_from([(name,), ("deployment", name)]))
        return Hostile(family, subject, encode(set_path(base, where, draw(json_values))), kind)
    if kind == "out of range":
        path = draw(st.sampled_from(NUMBERS[family]))
        value = draw(negative | above_range(str(path[-1])))
        return Hostile(family, subject, encode(set_path(base, path, value)),
                       f"{kind} at {'.'.join(map(str, path))}")
    if kind == "non-finite or huge literal":
        path = draw(st.sampled_from(NUMBERS[family]))
        literal = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"nan", b"1e400",
                                        b"-1e400", b"1" + b"0" * 400]))
        if str(path[-1]) in {"window_end", "window_s"} | COUNTS:
            # Finite in a float, but beyond these fields' bounds.
            literal = draw(st.sampled_from([literal, b"1" + b"0" * 30, b"1e308",
                                            b"18446744073709551616"]))
        body = encode(set_path(base, path, RAW), literal)
        return Hostile(family, subject, body, kind)
    if kind == "deep nesting":
        depth = draw(st.integers(2, 3000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        nested = opener * depth + b"1" + closer * depth
        place = draw(st.sampled_from([("deployment",), ("nested-" + family,)]
                                     + ([("gaps", "ttft_p99_s")] if family == "metrics" else [])))
        return Hostile(family, subject, encode(set_path(base, place, RAW), nested),
                       f"{kind} {depth}")
    if kind == "oversized":
        size = draw(st.integers(MAX_BODY_BYTES + 1, MAX_BODY_BYTES + 64 * 1024))
        padded = draw(st.booleans())
        if padded:  # valid JSON and a valid message, only too big
            body = encode(base)
            body = body[:-1] + b" " * (size - len(body)) + b"}"
        else:
            body = encode(set_path(base, ("reason",), "x" * size))
        return Hostile(family, subject, body, kind)
    if kind == "bad string":
        path = draw(st.sampled_from(STRINGS[family]))
        field = str(path[-1])
        too_long = st.text(min_size=STRING_LIMITS[field] + 1, max_size=STRING_LIMITS[field] + 300)
        if field == "id":
            value = draw(junk_text.filter(lambda t: re.fullmatch(r"[A-Za-z0-9._:-]+", t) is None)
                         | st.text("abc", min_size=129, max_size=400))
        elif field in {"name", "namespace"}:
            value = draw(junk_text.filter(lambda t: re.fullmatch(DNS_LABEL, t) is None)
                         | st.text("ab", min_size=64, max_size=300))
        elif field == "outcome":
            value = draw(junk_text.filter(lambda t: t not in {o.value for o in Outcome}))
        else:  # only a length cap
            value = draw(too_long)
        return Hostile(family, subject, encode(set_path(base, path, value)),
                       f"{kind} at {field}")
    if kind == "bad schema version":
        version = draw(st.sampled_from([0, 3, 99, -1, "1", 1.5, None, [1], 2**62]))
        return Hostile(family, subject, encode(set_path(base, ("schema_version",), version)),
                       kind)
    if kind == "subject of another deployment":
        namespace, name = draw(dns_labels), draw(dns_labels)
        if (namespace, name) == (NAMESPACE, NAME):
            name += "-x"
        if draw(st.booleans()):  # the body names another deployment than the subject
            body = encode(set_path(base, ("deployment",), {"namespace": namespace, "name": name}))
            return Hostile(family, subject, body, kind)
        return Hostile(family, subject_of(family, namespace, name), encode(base), kind)
    if kind == "bad subject tokens":
        tokens = draw(st.lists(subject_tokens, min_size=1, max_size=4).filter(
            lambda ts: ts != [NAMESPACE, NAME]))
        return Hostile(family, ".".join([SUBJECT_PREFIX, family, *tokens]), encode(base), kind)
    # broken nested part: forecast steps, a scale event's roles, too many gaps, a list as the
    # explanation
    if family == "forecast":
        steps = draw(st.sampled_from([
            [], [dict(STEP, num_requests_upper=50.0)], [dict(STEP, isl_p90=10.0)],
            [STEP] * 10_001, [dict(STEP, window_end=None)],
        ]))
        return Hostile(family, subject, encode(set_path(base, ("steps",), steps)), kind)
    if family == "scaled":
        return Hostile(family, subject, encode(set_path(base, ("prefill",), {"to": 1})), kind)
    if family == "metrics":
        gaps = {f"f{i}": "x" for i in range(draw(st.integers(65, 500)))}
        return Hostile(family, subject, encode(set_path(base, ("gaps",), gaps)), kind)
    return Hostile(family, subject, encode(set_path(base, ("explanation",), [1, 2])), kind)


def edge_floats(limit: float) -> st.SearchStrategy[float]:
    return st.sampled_from([0.0, 5e-324, 1e-300, limit]) | st.floats(0.0, limit)


# From 1 s: a forecast of shorter windows over the 300 s horizon outgrows MAX_BODY_BYTES here.
SHORTEST_VALID_WINDOW_S = 1.0


def edge_windows() -> st.SearchStrategy[float]:
    return (st.sampled_from([SHORTEST_VALID_WINDOW_S, 86_400.0])
            | st.floats(SHORTEST_VALID_WINDOW_S, 86_400.0))


@st.composite
def valid_snapshot(draw: st.DrawFn, index: int) -> bytes:
    """A valid snapshot of the fuzzed deployment, some of its numbers at their edges."""
    body = dict(VALID_BODIES["metrics"], id=f"valid-{index}", window_end=T0 + 60.0 * index)
    if draw(st.booleans()):
        for field in ("num_requests", "isl_avg", "osl_avg", "ttft_p99_s", "requests_waiting"):
            body[field] = draw(edge_floats(MAX_OBSERVED) | st.none())
        body["kv_cache_usage"] = draw(edge_floats(1.0))
        body["prefill_workers"] = draw(st.integers(0, MAX_REPLICAS))
        body["window_s"] = draw(st.just(60.0) | edge_windows())
    return orjson.dumps(body)


def build_corpus(count: int) -> tuple[list[Hostile], list[bytes]]:
    """``count`` hostile bodies over all families, and the valid snapshots to interleave."""
    families = sorted(MODELS)
    hostiles: list[Hostile] = []
    valids: list[bytes] = []

    @settings(max_examples=count, phases=[Phase.generate, Phase.shrink], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(families).flatmap(hostile))
    def one_hostile(item: Hostile) -> None:
        assert refused_by_the_models(item.family, item.subject, item.body), item
        hostiles.append(item)

    @settings(max_examples=count // VALID_EVERY + 1, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one_valid(data: st.DataObject) -> None:
        body = data.draw(valid_snapshot(len(valids)))
        assert not refused_by_the_models("metrics", subject_of("metrics"), body), body
        valids.append(body)

    one_hostile()
    one_valid()
    return hostiles, valids


# --------------------------------------------------------------------------- the bus side


def rejected_key(stage: str, subject: str, raw: bytes) -> tuple[str, str, int, str]:
    """What identifies a rejected body: reader, subject, size, and the head bus.rejected keeps."""
    kept = bus.rejected(stage, subject, raw, "")
    return stage, subject, kept.raw_size_bytes, kept.raw


class Watch:
    """What the services publish: rejections by key, and the ids of everything else."""

    def __init__(self) -> None:
        self.rejected: collections.Counter[tuple[str, str, int, str]] = collections.Counter()
        self.reasons: list[Rejected] = []
        self.ids: set[str] = set()

    async def on_message(self, msg: Msg) -> None:
        family = msg.subject.split(".")[1]
        if family == "rejected":
            found = Rejected.model_validate_json(msg.data)
            self.reasons.append(found)
            self.rejected[(found.stage, found.subject, found.raw_size_bytes, found.raw)] += 1
            return
        with contextlib.suppress(ValueError, RecursionError):
            self.ids.add(MODELS[family].from_json(msg.data).id)


@contextlib.asynccontextmanager
async def watching(nc: NATS) -> AsyncIterator[Watch]:
    watch = Watch()
    sub = await nc.subscribe(f"{SUBJECT_PREFIX}.>", cb=watch.on_message)
    try:
        yield watch
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def rss_kb(proc: ServiceProcess) -> int:
    assert proc.process is not None
    status = Path(f"/proc/{proc.process.pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None, status
    return int(match.group(1))


async def eventually(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    for _ in range(int(timeout_s / 0.1)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s: {what}")


@pytest.fixture
def corpus() -> tuple[list[Hostile], list[bytes]]:
    return build_corpus(HOSTILE_COUNT)


async def test_thousands_of_hostile_bodies_are_each_rejected_once_and_valid_ones_still_flow(
    nc: NATS, services: dict[str, ServiceProcess], corpus: tuple[list[Hostile], list[bytes]],
) -> None:
    hostiles, valids = corpus
    assert len(hostiles) == HOSTILE_COUNT
    assert {h.family for h in hostiles} == set(MODELS)
    closed_port = embedded_nats.free_port()
    for proc in services.values():
        proc.env["SLAPLANNER_MAX_BODY_BYTES"] = str(MAX_BODY_BYTES)
        proc.env["SLAPLANNER_LOG_LEVEL"] = "ERROR"
    # The collector reads nothing from the bus; it runs to show it lives through the storm too,
    # publishing a stale snapshot of an unreachable endpoint every second.
    services["collector"].env.update({
        "SLAPLANNER_SOURCE": "scrape", "SLAPLANNER_INTERVAL_S": "1s",
        "SLAPLANNER_SCRAPE_URLS": f"http://127.0.0.1:{closed_port}/metrics",
        "SLAPLANNER_NAMESPACE": "fuzz-collector", "SLAPLANNER_SCRAPE_TIMEOUT_S": "200ms"})
    for proc in services.values():
        proc.start()
    js = nc.jetstream()
    for _ in range(400):
        with contextlib.suppress(Exception):
            if {c.name for c in await js.consumers_info("SLAPLANNER")} >= CONSUMERS:
                break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("services not ready:\n" + "\n".join(
            f"--- {p.name}\n{p.log()[-2000:]}" for p in services.values()))

    expected: collections.Counter[tuple[str, str, int, str]] = collections.Counter()
    async with watching(nc) as watch:
        baseline: dict[str, int] = {}
        valid_sent = 0
        for start in range(0, len(hostiles), BATCH):
            for offset, item in enumerate(hostiles[start:start + BATCH]):
                await nc.publish(item.subject, item.body)
                if len(item.body) > STREAM_MAX_MSG_BYTES:
                    continue  # refused by the stream itself (its max_msg_size): nothing to read
                for stage in READERS[item.family]:
                    expected[rejected_key(stage, item.subject, item.body)] += 1
                if (start + offset) % VALID_EVERY == 0 and valid_sent < len(valids):
                    await nc.publish(subject_of("metrics"), valids[valid_sent])
                    valid_sent += 1
            if start + BATCH >= len(hostiles):
                for body in valids[valid_sent:]:
                    await nc.publish(subject_of("metrics"), body)
                    valid_sent += 1
            await nc.flush(timeout=30)
            if start == 0:
                # The first batch warms each service up; growth is measured from here.
                await eventually(lambda: sum(watch.rejected.values()) >= sum(expected.values()),
                                 60, "the first batch rejected")
                baseline = {name: rss_kb(proc) for name, proc in services.items()}

        total = sum(expected.values())
        await eventually(lambda: sum(watch.rejected.values()) >= total, 120,
                         f"{total} rejections (have {sum(watch.rejected.values())})")
        valid_ids = [orjson.loads(body)["id"] for body in valids[:valid_sent]]
        forecast_ids = [derived_id("forecast", i) for i in valid_ids]
        target_ids = [derived_id("target", i) for i in forecast_ids]
        scaled_ids = [derived_id("scaled", i) for i in target_ids]
        try:
            await eventually(lambda: set(scaled_ids) <= watch.ids, 60,
                             "every valid snapshot carried through to a scale event")
        except AssertionError:
            internal = [r for r in watch.reasons if r.reason.startswith("internal")]
            unanswered = [v for v, t in zip(valid_ids, target_ids, strict=True)
                          if t not in watch.ids]
            raise AssertionError(
                f"of {len(valid_ids)} valid snapshots, forecasts "
                f"{len(set(forecast_ids) & watch.ids)}, targets "
                f"{len(set(target_ids) & watch.ids)}, scale events "
                f"{len(set(scaled_ids) & watch.ids)}; handler errors: {internal[:3]}; no "
                f"target for {unanswered}; unexpected rejections: "
                f"{list((watch.rejected - expected).items())[:3]}"
            ) from None
        await asyncio.sleep(1.0)  # room for a second rejection of anything

        assert watch.rejected == expected, (
            f"missing: {list((expected - watch.rejected).items())[:5]}; "
            f"extra: {list((watch.rejected - expected).items())[:5]}")
        assert all(r.reason for r in watch.reasons)
        handler_errors = [r for r in watch.reasons if r.reason.startswith("internal")]
        assert not handler_errors, handler_errors[:3]
        assert set(forecast_ids) | set(target_ids) <= watch.ids
        assert valid_sent == len(valids) >= HOSTILE_COUNT // VALID_EVERY > 0

    for name, proc in services.items():
        assert proc.process is not None and proc.process.poll() is None, (
            f"{name} died:\n{proc.log()[-3000:]}")
        grown = rss_kb(proc) - baseline[name]
        assert grown < RSS_GROWTH_LIMIT_KB, f"{name} grew by {grown} kB"
    for proc in services.values():
        assert proc.stop() == 0, proc.log()[-3000:]
