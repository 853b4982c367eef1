"""Settings every service shares: how to reach NATS, the stream, and its own HTTP port."""

from __future__ import annotations

from pydantic import Field

from shared.settings import CommaList, DurationS, Settings


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
    nats_tls_ca_file: str | None = Field(default=None, description="CA bundle to verify NATS TLS")
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
    max_body_bytes: int = Field(
        default=1 << 20, ge=1024, description="bodies larger than this are rejected unread"
    )
    http_host: str = Field(default="0.0.0.0", description="address of /metrics and /healthz")
    http_port: int = Field(
        default=8080, ge=0, le=65535, description="port of /metrics and /healthz (0: pick one)"
    )
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")
