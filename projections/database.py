"""Connections to PostgreSQL: every one the service opens honours every parameter of its URL.

An operator's URL may carry `sslmode`, `sslrootcert`, `options`, `application_name`,
`target_session_attrs`, several hosts and more; a connection made from only its dbname, host,
port, user and password would silently drop them (e.g. connect without TLS). So every
connection is made from `conninfo(url)`, and eventsourcing's datastores, whose pools connect with
those five parts only, are pointed at the whole URL by `connect_by_url`.

`shared_secret` keeps the random secrets that every instance on a database must agree on.
"""

from __future__ import annotations

import secrets
from typing import Any, Final

import psycopg
from eventsourcing.postgres import PostgresDatastore, PostgresFactory
from eventsourcing.utils import Environment, EnvType
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

SECRETS_TABLE: Final = "activities_secrets"
SECRETS_LOCK: Final = 7_146_501_223  # advisory lock key of the secrets table's creation and first inserts

URL_KEY = "POSTGRES_URL"
"""The eventsourcing environment key of the event store's URL (see `EventStoreFactory`)."""


def conninfo(url: str, **defaults: Any) -> str:
    """The libpq connection string of `url`, with `defaults` only for what the URL does not set
    (a default such as `connect_timeout` never overrides the operator's own)."""
    parts = conninfo_to_dict(url)
    for name, value in defaults.items():
        parts.setdefault(name, value)
    return make_conninfo("", **parts)


def connect_by_url(datastore: PostgresDatastore, url: str) -> PostgresDatastore:
    """Make a new datastore's pool connect with the whole URL.

    The library creates its pool unopened with only dbname, host, port, user and password as
    connection arguments; replacing them before the first connection keeps everything else of
    the library's (autocommit, idle_in_transaction_session_timeout, lock_timeout, schema,
    pre_ping, sizes and lifetimes)."""
    if not datastore.pool.closed:
        raise RuntimeError("connect_by_url needs a datastore whose pool has not been opened")
    datastore.pool.conninfo = conninfo(url)
    datastore.pool.kwargs = {"row_factory": dict_row}  # the library's, without the five parts
    return datastore


def url_datastore(url: str, **options: Any) -> PostgresDatastore:
    """A `PostgresDatastore` (its keyword options) that connects with the whole URL."""
    return connect_by_url(PostgresDatastore(dbname="", host="", port="", user="", password="", **options), url)


def datastore_url(datastore: PostgresDatastore) -> str:
    """The connection string a datastore made by this module connects with."""
    url = datastore.pool.conninfo
    if not isinstance(url, str) or not url:
        raise RuntimeError("the datastore was not made by projections.database")
    return url


class EventStoreFactory(PostgresFactory):
    """eventsourcing's PostgreSQL persistence, connecting with the whole URL in POSTGRES_URL.

    The library's settings (POSTGRES_POOL_SIZE, POSTGRES_LOCK_TIMEOUT, ...) still apply."""

    def __init__(self, env: Environment | EnvType | None) -> None:
        super().__init__(env)
        url = self.env.get(URL_KEY)
        if not url:
            raise OSError(f"set {URL_KEY} in the application's environment")
        connect_by_url(self.datastore, url)


def shared_secret(database_url: str, name: str, size: int = 32) -> bytes:
    """A random secret shared by every instance on a database, created by the first that asks.

    It lives in the database (not in settings, nor derived from them) so that no configured key,
    public or secret, tells anyone what it is. Instances starting together agree: under one
    advisory lock each creates the table if missing, inserts its own candidate (only the first
    insert lands) and reads back the stored one."""
    with psycopg.connect(conninfo(database_url, connect_timeout=5), autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SECRETS_LOCK,))
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {SECRETS_TABLE} ("
            "name text PRIMARY KEY, value bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(
            f"INSERT INTO {SECRETS_TABLE} (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
            (name, secrets.token_bytes(size)),
        )
        row = conn.execute(f"SELECT value FROM {SECRETS_TABLE} WHERE name = %s", (name,)).fetchone()
    assert row is not None
    return bytes(row[0])
