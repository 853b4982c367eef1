"""Settings every service shares: how to reach NATS, the stream, and its own HTTP port."""

from __future__ import annotations

import re
from typing import Any, Literal, Self

from pydantic import Field, model_validator

from shared.settings import CommaList, DurationS, Settings

# Each service's own port for /metrics and /healthz, so that the four run side by side on one
# machine as the README starts them. In Kubernetes every pod sets 8080 (deploy/base/planner.env).
DEFAULT_HTTP_PORTS = {"collector": 8081, "forecaster": 8082, "decider": 8083, "actuator": 8084}
# nats-py's own reply prefix, for a connection without a user name to derive one from.
DEFAULT_INBOX_PREFIX = "_INBOX"
# A literal subject: dot-separated tokens, none empty, no wildcard and no whitespace.
_LITERAL_SUBJECT = re.compile(r"[^\s.*>]+(\.[^\s.*>]+)*")


def http_port_field(default: int) -> Any:
    """The ``http_port`` field with a service's own default (a pydantic ``Field``)."""
    return Field(
        default=default, ge=0, le=65535,
        description="port of /metrics, /healthz and /readyz (0: pick one)",
    )


class ServiceSettings(Settings):
    nats_url: CommaList = Field(
        default_factory=lambda: ["nats://127.0.0.1:4222"],
        description="NATS server URL(s), comma separated; reconnects cycle through them",
    )
    nats_user: str | None = Field(default=None, description="NATS user name")
    nats_password: str | None = Field(default=None, description="NATS password")
    nats_token: str | None = Field(default=None, description="NATS token")
    nats_nkey_seed_file: str | None = Field(default=None, description="file with an NKey seed")
    nats_creds_file: str | None = Field(default=None, description="NATS credentials (JWT) file")
    nats_inbox_prefix: str | None = Field(
        default=None,
        description=(
            "subject prefix of this connection's replies (JetStream deliveries and API answers); "
            "default _INBOX_<nats user> with a user, else _INBOX. The NATS user may subscribe "
            "to <prefix>.> and no other user to it (deploy/base/nats/auth.conf)"
        ),
    )
    nats_tls_ca_file: str | None = Field(
        default=None,
        description=(
            "CA bundle that verifies the NATS server's certificate (default: the system's CAs); "
            "with it, or with tls:// URLs, the service speaks TLS only and refuses a server "
            "that does not (deploy/ mounts cert-manager's ca.crt)"
        ),
    )
    nats_tls_cert_file: str | None = Field(default=None, description="client certificate (mTLS)")
    nats_tls_key_file: str | None = Field(default=None, description="client key (mTLS)")
    nats_reconnect_wait_s: DurationS = Field(
        default=2.0, description="first wait between reconnect attempts (grows with backoff)"
    )
    stream_name: str = Field(default="SLAPLANNER", description="JetStream stream for slaplanner.>")
    stream_max_age_s: DurationS = Field(
        default=7 * 86_400.0, description="oldest message the stream keeps, seconds (7 days)"
    )
    stream_max_bytes: int = Field(
        default=1 << 30, ge=1 << 20, description="bytes the stream keeps at most (1 GiB)"
    )
    stream_duplicate_window_s: DurationS = Field(
        default=600.0, description="JetStream drops a repeated Nats-Msg-Id within this window"
    )
    stream_max_msg_bytes: int = Field(
        default=1 << 20, ge=1024,
        description=(
            "largest body the stream stores (its max_msg_size; a larger publication is refused "
            "by JetStream); keep it at or below the server's max_payload"
        ),
    )
    stream_replicas: int = Field(
        default=1, ge=1, le=5, description="copies of the streams in a NATS cluster (1: one node)"
    )
    decisions_stream_name: str = Field(
        default="SLAPLANNER-DECISIONS",
        description=(
            "stream that keeps a copy of the targets and ScaleEvents for operators to replay; "
            "its own limits, so nothing published on other subjects can evict a decision"
        ),
    )
    decisions_max_age_s: DurationS = Field(
        default=7 * 86_400.0, description="oldest decision the decisions stream keeps (7 days)"
    )
    decisions_max_bytes: int = Field(
        default=1 << 30, ge=1 << 20, description="bytes the decisions stream keeps at most (1 GiB)"
    )
    bus_setup: Literal["service", "admin"] = Field(
        default="service",
        description=(
            "who creates the streams and the durable consumers: `service` (each service creates "
            "what is missing; a server without users) or `admin` (`slaplanner bus setup` as the "
            "NATS admin, as deploy/ runs it); either way a service verifies what it finds and "
            "refuses a stream configured otherwise"
        ),
    )
    bus_check_interval_s: DurationS = Field(
        default=5.0,
        description=(
            "how often the streams and the consumers are checked, seconds: a lost JetStream "
            "store is noticed (/readyz fails) and recovered within about this time"
        ),
    )
    msg_id_key_file: str | None = Field(
        default=None,
        description=(
            "file with the secret that keys this service's Nats-Msg-Id headers, so that no other "
            "NATS user can predict them and pre-publish a duplicate; default: derived from this "
            "service's own NATS credential (password, token, NKey seed or creds file)"
        ),
    )
    max_window_ahead_s: DurationS = Field(
        default=60.0,
        description=(
            "a body whose window_end lies further than this ahead of this service's clock is "
            "refused (a collector whose clock jumped, or a forged body) and never enters a "
            "history, seconds"
        ),
    )
    connect_deadline_s: DurationS = Field(
        default=5.0,
        description=(
            "how long a service tries to reach NATS at start before it exits with one line "
            "naming the URL (its supervisor restarts it), seconds"
        ),
    )
    max_body_bytes: int = Field(
        default=1 << 20, ge=1024, description="bodies larger than this are rejected unread"
    )
    http_host: str = Field(
        default="0.0.0.0", description="address of /metrics, /healthz and /readyz"
    )
    http_port: int = http_port_field(8080)
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")

    @model_validator(mode="after")
    def _tls_for_every_server_or_none(self) -> Self:
        # nats-py cycles through the list on reconnect: one nats:// among tls:// URLs would be
        # a way back to plaintext.
        schemes = {url.partition("://")[0].lower() for url in self.nats_url}
        if "tls" in schemes and schemes - {"tls"}:
            raise ValueError(
                "SLAPLANNER_NATS_URL mixes tls:// with other schemes; a reconnect could go "
                "plaintext: give every server as tls://"
            )
        return self

    def wants_tls(self) -> bool:
        """Whether the connection must be TLS: tls:// URLs, or a CA or client certificate."""
        return (any(url.lower().startswith("tls://") for url in self.nats_url)
                or self.nats_tls_ca_file is not None or self.nats_tls_cert_file is not None)

    @model_validator(mode="after")
    def _inbox_prefix_is_a_literal_subject(self) -> Self:
        prefix = self.inbox_prefix()
        if not _LITERAL_SUBJECT.fullmatch(prefix):
            raise ValueError(
                f"NATS reply prefix {prefix!r} is not a literal subject (tokens separated by "
                "'.', without '*', '>' or whitespace); set SLAPLANNER_NATS_INBOX_PREFIX"
            )
        return self

    def durable_name(self) -> str | None:
        """This instance's durable consumer, if its service names it itself (the forecaster's
        replicas do); None: the service's name."""
        return None

    def inbox_prefix(self) -> str:
        """Where this connection's replies come back: a prefix per user, so that no service's
        user may subscribe to the replies of another (JetStream delivers a fetch there)."""
        if self.nats_inbox_prefix is not None:
            return self.nats_inbox_prefix
        if self.nats_user is not None:
            return f"{DEFAULT_INBOX_PREFIX}_{self.nats_user}"
        return DEFAULT_INBOX_PREFIX
