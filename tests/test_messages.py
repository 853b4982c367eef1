"""The bus contract: what is accepted, what is refused and why."""

from __future__ import annotations

import orjson
import pytest

from shared.messages import (
    BUS_MESSAGES,
    SNAPSHOT_V2_FIELDS,
    LoadForecast,
    MetricSnapshot,
    ReplicaTarget,
    ScaleEvent,
    deployment_from_subject,
    derived_id,
)

DEPLOYMENT = {"namespace": "prod", "name": "llama"}
SNAPSHOT = {"schema_version": 1, "deployment": DEPLOYMENT, "window_end": 1732345200.0,
            "window_s": 60.0, "num_requests": 118.0, "isl_avg": 3012.5, "osl_avg": 151.0}


def body(**changes: object) -> bytes:
    return orjson.dumps({**SNAPSHOT, **changes})


@pytest.mark.parametrize(
    ("raw", "reason_part"),
    [
        pytest.param(b"{not json", "invalid JSON", id="a body that is not JSON"),
        pytest.param(b"[1, 2]", "expected a JSON object", id="a JSON array instead of an object"),
        pytest.param(body(num_requests="118"), "valid number", id="a count sent as a string"),
        pytest.param(body(num_requests=-1), "greater than or equal to 0", id="a negative count"),
        pytest.param(body(num_requests=None, ttft_avg_s=-0.1), "greater than or equal to 0",
                     id="a negative latency"),
        pytest.param(body().replace(b"118.0", b"NaN"), "invalid JSON", id="NaN, which JSON lacks"),
        pytest.param(body().replace(b"118.0", b"1e999"), "invalid JSON", id="an infinite count"),
        pytest.param(body(schema_version=3), "unknown schema_version 3",
                     id="an unknown schema version"),
        pytest.param(body(window_s=0), "greater than 0", id="an empty window"),
        pytest.param(body(prefill_workers=10_001), "less than or equal to 10000",
                     id="a replica count beyond the bound"),
        pytest.param(body(prefill_workers=1.5), "valid integer", id="a fractional replica count"),
        pytest.param(body(deployment={"namespace": "prod", "name": "a.b"}), "pattern",
                     id="a name with a dot, which would break the subject"),
        pytest.param(body(surprise=1), "Extra inputs are not permitted", id="an unknown field"),
        pytest.param(body(ttft_avg_ms=400), "Extra inputs are not permitted",
                     id="milliseconds, which the bus never carries"),
    ],
)
def test_a_snapshot_is_refused_with_its_reason(raw: bytes, reason_part: str) -> None:
    with pytest.raises(ValueError, match=reason_part):
        MetricSnapshot.from_json(raw)


def test_a_typed_snapshot_with_nulls_round_trips() -> None:
    snapshot = MetricSnapshot.from_json(body(ttft_avg_s=None, gaps={"ttft_avg_s": "no samples"}))
    again = MetricSnapshot.from_json(snapshot.to_json())
    assert again == snapshot
    assert again.ttft_avg_s is None and again.gaps == {"ttft_avg_s": "no samples"}
    assert snapshot.subject() == "slaplanner.metrics.prod.llama"


def test_a_body_without_id_takes_the_default_id_so_redelivery_is_idempotent() -> None:
    first = MetricSnapshot.from_json(body(), default_id="SLAPLANNER-7")
    second = MetricSnapshot.from_json(body(), default_id="SLAPLANNER-7")
    assert first.id == second.id == "SLAPLANNER-7"
    assert derived_id("forecast", first.id) == derived_id("forecast", second.id)
    assert derived_id("forecast", first.id) != derived_id("target", first.id)


def test_the_scale_event_uses_from_on_the_wire() -> None:
    raw = orjson.dumps({"deployment": DEPLOYMENT, "window_end": 1.0, "target_id": "t",
                        "outcome": "applied", "backend": "dry-run",
                        "prefill": {"from": 2, "to": 3, "ready": 2},
                        "decode": {"from": 5, "to": 5}})
    event = ScaleEvent.from_json(raw)
    assert event.prefill.from_ == 2
    assert orjson.loads(event.to_json())["prefill"] == {"from": 2, "to": 3, "ready": 2, "via": None}
    with pytest.raises(ValueError, match="outcome"):
        ScaleEvent.from_json(raw.replace(b'"applied"', b'"maybe"'))


def test_a_forecast_upper_quantile_below_its_point_is_refused() -> None:
    step = {"window_end": 2.0, "num_requests": 10.0, "num_requests_upper": 9.0,
            "isl_avg": 1.0, "isl_avg_upper": 1.0, "osl_avg": 1.0, "osl_avg_upper": 1.0}
    raw = orjson.dumps({"deployment": DEPLOYMENT, "window_end": 1.0, "model": "constant",
                        "steps": [step]})
    with pytest.raises(ValueError, match="num_requests_upper is below num_requests"):
        LoadForecast.from_json(raw)


def test_a_target_with_a_negative_replica_count_is_refused() -> None:
    raw = orjson.dumps({"deployment": DEPLOYMENT, "window_end": 1.0, "policy": "x",
                        "prefill_replicas": -1, "decode_replicas": 1})
    with pytest.raises(ValueError, match="prefill_replicas"):
        ReplicaTarget.from_json(raw)


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("slaplanner.metrics.prod.llama", ("prod", "llama")),
        ("slaplanner.metrics.prod", None),
        ("slaplanner.metrics.prod.llama.extra", None),
        ("other.metrics.prod.llama", None),
        ("slaplanner.metrics.PROD.llama", None),
    ],
    ids=["four tokens name the deployment", "three tokens are too few",
         "five tokens are too many", "another prefix is not ours", "upper case is not a label"],
)
def test_the_deployment_is_read_from_the_subject(
    subject: str, expected: tuple[str, str] | None
) -> None:
    key = deployment_from_subject(subject)
    assert (None if key is None else (key.namespace, key.name)) == expected


def test_every_bus_message_exports_a_json_schema() -> None:
    for name, model in BUS_MESSAGES.items():
        schema = model.model_json_schema(by_alias=True)
        assert schema["type"] == "object", name
        assert "schema_version" in schema["properties"], name


def test_a_version_1_snapshot_is_read_as_it_always_was() -> None:
    snapshot = MetricSnapshot.from_json(orjson.dumps(SNAPSHOT))
    assert snapshot.schema_version == 1
    same = {"schema_version", "id"}
    assert snapshot.model_dump(exclude=same) == MetricSnapshot.model_validate(
        {**SNAPSHOT, "schema_version": 2}).model_dump(exclude=same)
    assert snapshot.arrival_dispersion is None and snapshot.ttft_under_target_share is None


def test_a_version_1_snapshot_may_not_carry_version_2_fields() -> None:
    with pytest.raises(ValueError, match="arrival_dispersion need schema_version 2"):
        MetricSnapshot.from_json(orjson.dumps({**SNAPSHOT, "arrival_dispersion": 1.4}))


def test_the_snapshot_schema_shows_the_version_2_fields_with_their_units() -> None:
    schema = MetricSnapshot.model_json_schema(by_alias=True)
    properties = schema["properties"]
    for name in SNAPSHOT_V2_FIELDS:
        assert name in properties, name
    assert properties["schema_version"]["default"] == 2
    assert "Poisson" in properties["arrival_dispersion"]["description"]
    methods = schema["$defs"]["ShareMethod"]["enum"]
    assert methods == ["bucket_edge", "interpolated", "beyond_buckets", "per_request"]
