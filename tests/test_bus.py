"""The bus helper against a real nats-server: auth forms, the stream, deduplication."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from pydantic import ValidationError

from shared import bus, embedded_nats
from shared.messages import DeploymentKey, MetricSnapshot
from shared.service_settings import ServiceSettings


@pytest.fixture
def password_server() -> Iterator[embedded_nats.NatsServer]:
    with tempfile.TemporaryDirectory() as tmp:
        server = embedded_nats.start(
            Path(tmp), extra_config='authorization { user: "planner", password: "s3cret" }\n'
        )
        yield server
        server.stop()


async def test_user_and_password_connect_and_a_wrong_password_is_refused(
    password_server: embedded_nats.NatsServer,
) -> None:
    good = ServiceSettings(nats_url=[password_server.url], nats_user="planner",
                           nats_password="s3cret")
    client = await bus.connect(good, "test")
    assert client.is_connected
    assert client.new_inbox().startswith("_INBOX_planner."), "replies on the user's own prefix"
    await client.close()

    bad = bus.connect_options(
        ServiceSettings(nats_url=[password_server.url], nats_user="planner",
                        nats_password="wrong"), "test")
    bad["max_reconnect_attempts"] = 0
    bad["allow_reconnect"] = False
    with pytest.raises((nats.errors.Error, OSError)):
        await nats.connect(**bad)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        pytest.param({"nats_token": "t0k"}, {"token": "t0k"}, id="a token"),
        pytest.param({"nats_nkey_seed_file": "/run/seed.nk"}, {"nkeys_seed": "/run/seed.nk"},
                     id="an NKey seed file"),
        pytest.param({"nats_creds_file": "/run/svc.creds"},
                     {"user_credentials": "/run/svc.creds"}, id="a credentials file"),
        pytest.param({"nats_url": "nats://a:4222,nats://b:4222"},
                     {"servers": ["nats://a:4222", "nats://b:4222"]}, id="a list of servers"),
    ],
)
def test_each_auth_form_reaches_the_client(settings: dict[str, str],
                                           expected: dict[str, object]) -> None:
    options = bus.connect_options(ServiceSettings.model_validate(settings), "test")
    for key, value in expected.items():
        assert options[key] == value
    assert options["max_reconnect_attempts"] == -1, "a service never stops reconnecting"


@pytest.mark.parametrize(
    ("settings", "prefix"),
    [
        pytest.param({}, "_INBOX", id="without a user, nats-py's own"),
        pytest.param({"nats_user": "actuator"}, "_INBOX_actuator", id="a user's own"),
        pytest.param({"nats_user": "actuator", "nats_inbox_prefix": "_R.actuator"}, "_R.actuator",
                     id="one set explicitly"),
        pytest.param({"nats_creds_file": "/run/svc.creds", "nats_inbox_prefix": "_INBOX_svc"},
                     "_INBOX_svc", id="one set for a credentials file, which names no user"),
    ],
)
def test_each_connection_gets_the_reply_prefix_its_user_may_read(
    settings: dict[str, str], prefix: str
) -> None:
    options = bus.connect_options(ServiceSettings.model_validate(settings), "test")
    assert options["inbox_prefix"] == prefix


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"nats_inbox_prefix": "_INBOX.>"}, id="a wildcard"),
        pytest.param({"nats_inbox_prefix": "_INBOX."}, id="an empty last token"),
        pytest.param({"nats_inbox_prefix": ""}, id="nothing"),
        pytest.param({"nats_user": "ops team"}, id="a user name with a space"),
    ],
)
def test_a_reply_prefix_that_is_no_literal_subject_is_refused(settings: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="SLAPLANNER_NATS_INBOX_PREFIX"):
        ServiceSettings.model_validate(settings)


async def test_the_stream_drops_a_message_published_twice_with_the_same_id(
    nats_server: object, nc: NATS
) -> None:
    settings = ServiceSettings()
    js = nc.jetstream()
    await bus.ensure_stream(js, settings)
    await bus.ensure_stream(js, settings)  # idempotent: a second service starting
    snapshot = MetricSnapshot(deployment=DeploymentKey(namespace="prod", name="llama"),
                              window_end=60.0, num_requests=3.0)
    await bus.publish(js, snapshot)
    await bus.publish(js, snapshot)
    info = await js.stream_info(settings.stream_name)
    assert info.state.messages == 1
    assert info.config.max_age == settings.stream_max_age_s
    assert info.config.max_bytes == settings.stream_max_bytes
