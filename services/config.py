"""Settings: the one reader of the environment. Every variable is ACTIVITIES_<NAME>."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration of one service process; see the README's settings table."""

    model_config = SettingsConfigDict(env_prefix="ACTIVITIES_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        description="libpq URL of PostgreSQL (every parameter honoured); unset starts an embedded server in data_dir",
    )
    read_database_url: str | None = Field(
        default=None,
        description="libpq URL of a PostgreSQL replica that serves get and list (the read model); unset: database_url",
    )
    nats_url: str | None = Field(
        default=None,
        description="NATS URL, or a comma-separated list of a cluster's nodes; unset starts an embedded nats-server",
    )
    embedded_nats_port: int = Field(
        default=4222, description="port of the embedded NATS; taken or 0 picks a free one"
    )
    data_dir: Path = Field(default=Path(".activities-data"), description="where embedded servers and dev secrets live")
    subject_prefix: str = Field(default="crm.activities", description="prefix of every NATS subject")

    jwt_secret: str | None = Field(
        default=None, description="HS256 secret; in dev mode one is generated into the data dir"
    )
    jwt_public_key: str | None = Field(default=None, description="RS256/ES256 public key, PEM text or a path")
    jwt_issuer: str | None = Field(default=None, description="required `iss` when set")
    jwt_audience: str | None = Field(
        default=None, description="required `aud` when set; unset: a token carrying an `aud` is refused"
    )
    jwt_jwks_url: str | None = Field(
        default=None, description="http(s) URL of a JWKS; keys chosen by the token's `kid`, fetched again every 5 min"
    )
    jwt_jwks_file: Path | None = Field(
        default=None, description="path of a JWKS file; keys chosen by the token's `kid`, re-read when it changes"
    )
    jwt_leeway_s: float = Field(default=30.0, description="clock leeway of the time claims exp, nbf and iat, seconds")

    http_host: str = Field(default="127.0.0.1", description="HTTP listen address")
    http_port: int = Field(default=8080, description="HTTP port; 0 picks a free one")
    consistency_wait_ms: int = Field(default=2000, description="longest wait of a read for min_position")

    stream_name: str = Field(default="CRM_ACTIVITIES", description="JetStream stream of the events")
    stream_replicas: int = Field(default=1, description="replicas of the stream (3 in a NATS cluster)")
    stream_retention: Literal["limits", "interest", "workqueue"] = Field(
        default="limits", description="stream retention"
    )
    stream_duplicate_window_s: float = Field(default=120.0, description="dedup window of the stream, seconds")

    batch_max_size: int = Field(default=200, description="most commands saved in one transaction (group commit)")
    db_pool_size: int = Field(default=8, description="PostgreSQL connections per process")
    read_pool_size: int | None = Field(
        default=None,
        ge=1,
        description="PostgreSQL connections of the reads (get, list, stats) per process: reads beyond them wait "
        "their turn, first come first served; unset: this machine's cores + 1 (set it to the read database's "
        "cores + 1 when it runs elsewhere)",
    )
    command_concurrency: int = Field(
        default=1024,
        description="NATS requests in hand at once per process (commands, queries apart); then `unavailable` at once",
    )
    command_queue_max: int | None = Field(
        default=None,
        description="most commands waiting for their batch; beyond it `unavailable` at once; unset: 10 batches' worth",
    )
    idempotency_ttl_hours: float = Field(default=24.0, description="how long an Idempotency-Key is remembered")
    request_timeout_s: float = Field(
        default=5.0,
        description="deadline of a command from its receipt: `unavailable` after it, never carried out if not begun",
    )

    aggregate_cache_mb: float = Field(
        default=64.0, description="memory bound of the command path's cache of activities (estimated), MB"
    )

    log_level: str = Field(default="INFO", description="log level of the JSON logs")
    cipher_key: str | None = Field(default=None, description="AES key (base64) to encrypt stored event payloads")
    purge_deleted_after_days: float | None = Field(
        default=None,
        gt=0,
        description="retention: the scheduler erases activities deleted longer ago than this many days; unset: off",
    )

    inbox_stream: str | None = Field(
        default=None, description="JetStream stream of the durable inbox; unset: <stream_name>_COMMANDS"
    )
    results_stream: str | None = Field(
        default=None, description="JetStream stream of the inbox's results (kept 7 days); unset: <stream_name>_RESULTS"
    )
    dlq_stream: str | None = Field(
        default=None, description="JetStream stream of dead-lettered inbox commands; unset: <stream_name>_DLQ"
    )
    inbox_max_deliver: int = Field(
        default=10, description="tries of an inbox command answered `unavailable`/`internal` before the DLQ"
    )
    inbox_backoff_s: float = Field(default=1.0, description="first wait before an inbox command is tried again, s")
    inbox_backoff_max_s: float = Field(
        default=120.0, description="longest wait between two tries of an inbox command (doubling), s"
    )
    inbox_concurrency: int = Field(default=1024, description="inbox commands in hand at once in the active inbox")


def default_read_pool_size() -> int:
    """The reads' connections when `read_pool_size` is unset: this machine's cores + 1.

    A read holds a core of PostgreSQL while it runs. With more reads running than cores they share
    them, and each takes as many times its own time as there are reads beside it; waiting their
    turn instead, a slow read runs at full speed once it starts. Measured side by side on 2 cores,
    4 HTTP reads in flight (bench.search_reads, 2026-12-07): searches of two words p99 25.4-27.8 ms
    with 8 connections, 23.0-25.2 with 3, 20.9-24.0 with 2; two connections also slowed the quick
    reads (786-806/s against 914-937 in most runs with 3 or 8: PostgreSQL idles while the service
    handles their rows)."""
    return (os.cpu_count() or 1) + 1
