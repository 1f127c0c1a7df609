"""The write side: an eventsourcing Application over PostgreSQL, group commit and idempotency.

`CommandService.execute(requests)` decides a batch of commands and saves all their events in
one transaction (group commit), on the service's event loop: its reads and its append go
through `CommandStore`, an asyncio connection of its own. If that transaction conflicts
(another process wrote the same activity, or the same Idempotency-Key), the commands that touched
what it wrote are retried on their own and the rest of the batch together at once, so only a
conflicting command can fail. Idempotency records are written in the same transaction as the
events, so a retry after a crash never appends twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, cast
from uuid import UUID, uuid4

import orjson
import psycopg
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    IntegrityError,
    InterfaceError,
    JSONTranscoder,
    OperationalError,
    PersistenceError,
    ProgrammingError,
    StoredEvent,
    Transcoder,
    UUIDAsHex,
)
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.utils import Environment, retry
from psycopg.sql import SQL, Identifier, Literal

from activities_client.errors import ActivitiesError, Gone, IdempotencyConflict, InternalError, NotFound, Unavailable
from events.activity import (
    ActivityErased,
    ActivityEvent,
    activity_id_of,
    activity_uuid,
    erased_copy,
    new_activity_ref,
)
from events.commands import Command, CreateActivity, UpsertActivity, target_id
from projections import erasure as erasure_tables
from projections.consumer import lock_key, schema_lock
from projections.database import URL_KEY, conninfo, datastore_url
from projections.errors import describe
from projections.queries import READ_MODEL_TABLE, build_upsert_sql
from services.cache import SizedLRUCache, estimated_size
from services.deadlines import Deadlines
from services.domain import Activity, Caller, decide
from services.logs import correlation_id

log = logging.getLogger("activities.application")

APP_NAME = "Activities"
IDEMPOTENCY_TABLE = "activities_idempotency"
EXTERNAL_KEYS_TABLE = "activities_external_keys"
EVENTS_SCHEMA_LOCK: Final = 7_146_501_220  # advisory lock key of event-store schema changes


DEFAULT_CACHE_BYTES: Final = 64 * 1024 * 1024
_BATCH_ATTEMPTS = 3
_SOLO_ATTEMPTS = 12


@dataclass  # never changed, yet not frozen: one per command, and a frozen __init__ costs 3.5x
class CommandRequest:
    """One command from one caller, as received on NATS or HTTP."""

    command: Command
    caller: Caller
    idempotency_key: str | None = None
    fingerprint: str = ""
    traceparent: str | None = None  # W3C trace context, stored on the event and published with it


@dataclass  # never changed, yet not frozen: one per command, and a frozen __init__ costs 3.5x
class CommandResult:
    """The activity after the command and the store position of its last event."""

    document: dict[str, Any]
    position: int
    created: bool | None = None  # an upsert's: whether it created the activity (`meta.created`)
    wrote: bool = True  # False for a no-op (nothing appended)

    def envelope(self) -> dict[str, Any]:
        if self.created is not None:
            return {"data": self.document, "meta": {"position": self.position, "created": self.created}}
        return {"data": self.document, "meta": {"position": self.position}}


ExternalKey = tuple[str, str, str]
"""An upsert's key in its scope: (tenant id, app id or "", external key)."""


def external_key_of(request: CommandRequest) -> ExternalKey:
    """The scope of an upsert's key: the caller's tenant and app ("" for a token without one)."""
    assert isinstance(request.command, UpsertActivity)
    return (request.caller.tenant_id, request.caller.app_id or "", request.command.external_key)


ERASED_FINGERPRINT: Final = "erased"
"""What an erasure leaves of the fingerprint of an Idempotency-Key of the erased activity (a digest of
the body, which held client content): a retry with that key gets `gone`, and never writes again."""


@dataclass(frozen=True)
class ErasureWrite:
    """What an erasing append also writes, in its transaction: the earlier events of the erased
    activities rewritten to skeletons (same id and version, new state), and the erased activities
    (id and the version of their `ActivityErased`)."""

    rewrites: list[StoredEvent]
    erased: list[tuple[UUID, int]]


Outcome = CommandResult | ActivitiesError


class ActivitiesRecorder(PostgresApplicationRecorder):
    """The events table plus the idempotency table, written in the same transaction.

    A batch is appended by one statement, `SELECT * FROM <events>_append(...)`, a PL/pgSQL
    function that serialises the appends (so that the order of notification ids is the order of
    commits), notifies the projector and relay, records the idempotency keys and inserts the
    events: one round trip instead of seven (BEGIN, SET, LOCK, NOTIFY, INSERT, key writes,
    COMMIT), which were most of the CPU of a small batch.

    A key is recorded by one insert that replaces it only when it expired (`ON CONFLICT ... DO
    UPDATE ... WHERE`); a live key, another process's meanwhile, fails the append with a unique
    violation (a conflict, retried). Every key is one probe of the primary key whatever the plan:
    a `DELETE` of the expired keys joined with the batch's keys, its plan cached by PL/pgSQL while
    the table was small, read the whole table on every append (at 3x the maximum rate the
    connection's CPU doubled within 20 s; with a day of keys it would have been millions of rows).

    Appends are serialised by a transaction advisory lock, not by the library's
    `LOCK TABLE ... IN EXCLUSIVE MODE`: that table lock conflicts with autovacuum's, so every
    autovacuum or autoanalyze of the events table stalled all appends for `deadlock_timeout`
    (1 s) until PostgreSQL cancelled it, and the table was never vacuumed nor analyzed. (An
    append of an older version of this function, still holding that table lock, is serialised
    with these too: its EXCLUSIVE lock conflicts with the ROW EXCLUSIVE lock of any INSERT.)
    """

    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events") -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        schema = Identifier(self.datastore.schema)
        table = Identifier(IDEMPOTENCY_TABLE)
        events = Identifier(self.events_table_name)
        append = Identifier(self.events_table_name + "_append")
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {schema}.{table} ("
                "tenant_id text NOT NULL, key text NOT NULL, fingerprint text NOT NULL, "
                "originator_id uuid NOT NULL, originator_version bigint NOT NULL, "
                "created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (tenant_id, key))"
            ).format(schema=schema, table=table)
        )
        # every append takes this advisory lock: notification ids commit in order (see the docstring)
        self.append_lock_key = lock_key(f"{self.datastore.schema}.{self.events_table_name}:append")
        self.sql_create_statements.append(
            SQL(
                "CREATE OR REPLACE FUNCTION {schema}.{append}("
                "ids uuid[], versions bigint[], topics text[], states bytea[], keys jsonb, key_ttl_s float8) "
                "RETURNS SETOF bigint LANGUAGE plpgsql AS $body$ "
                "DECLARE written bigint; "
                "BEGIN "
                "  PERFORM set_config('lock_timeout', {lock_timeout}, true); "
                "  PERFORM pg_advisory_xact_lock({append_lock}); "
                "  PERFORM pg_notify({channel}, ''); "
                "  IF jsonb_array_length(keys) > 0 THEN "
                "    INSERT INTO {schema}.{table} AS k "
                "     (tenant_id, key, fingerprint, originator_id, originator_version) "
                "     SELECT * FROM jsonb_to_recordset(keys) AS q(tenant_id text, key text, fingerprint text, "
                "       originator_id uuid, originator_version bigint) "
                "     ON CONFLICT (tenant_id, key) DO UPDATE SET fingerprint = excluded.fingerprint, "
                "       originator_id = excluded.originator_id, originator_version = excluded.originator_version, "
                "       created_at = now() "
                "     WHERE k.created_at < now() - make_interval(secs => key_ttl_s); "
                "    GET DIAGNOSTICS written = ROW_COUNT; "
                "    IF written < jsonb_array_length(keys) THEN "
                "      RAISE unique_violation USING MESSAGE = 'an Idempotency-Key of the batch is already recorded'; "
                "    END IF; "
                "  END IF; "
                "  RETURN QUERY INSERT INTO {schema}.{events} (originator_id, originator_version, topic, state) "
                "   SELECT * FROM unnest(ids, versions, topics, states) RETURNING notification_id; "
                "END $body$"
            ).format(
                schema=schema,
                append=append,
                events=events,
                table=table,
                channel=Literal(self.channel_name),
                lock_timeout=Literal(f"{self.datastore.lock_timeout}s"),
                append_lock=Literal(self.append_lock_key),
            )
        )
        self.append_sql = SQL(
            "SELECT notification_id FROM {schema}.{append}("
            "%b::uuid[], %b::bigint[], %b::text[], %b::bytea[], %s::text::jsonb, %s::float8) AS notification_id"
        ).format(schema=schema, append=append)
        # Upserts' keys (docs/architecture.md, "Upserts"): unique per tenant and app, written in the
        # same transaction as the creating event, before the append lock, so that a second process
        # creating the same key fails on the primary key (an IntegrityError, retried as an update).
        external_keys = Identifier(EXTERNAL_KEYS_TABLE)
        append_keyed = Identifier(self.events_table_name + "_append_keyed")
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {schema}.{keys} ("
                "tenant_id text NOT NULL, app_id text NOT NULL, external_key text NOT NULL, "
                "originator_id uuid NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), "
                "PRIMARY KEY (tenant_id, app_id, external_key))"
            ).format(schema=schema, keys=external_keys)
        )
        self.sql_create_statements.append(
            SQL(
                "CREATE OR REPLACE FUNCTION {schema}.{append_keyed}("
                "ids uuid[], versions bigint[], topics text[], states bytea[], keys jsonb, key_ttl_s float8, "
                "external_keys jsonb) RETURNS SETOF bigint LANGUAGE plpgsql AS $body$ "
                "BEGIN "
                "  PERFORM set_config('lock_timeout', {lock_timeout}, true); "
                "  INSERT INTO {schema}.{keys} (tenant_id, app_id, external_key, originator_id) "
                "   SELECT * FROM jsonb_to_recordset(external_keys) "
                "    AS q(tenant_id text, app_id text, external_key text, originator_id uuid); "
                "  RETURN QUERY SELECT * FROM {schema}.{append}(ids, versions, topics, states, keys, key_ttl_s); "
                "END $body$"
            ).format(
                schema=schema,
                append_keyed=append_keyed,
                append=append,
                keys=external_keys,
                lock_timeout=Literal(f"{self.datastore.lock_timeout}s"),
            )
        )
        self.append_keyed_sql = SQL(
            "SELECT notification_id FROM {schema}.{append_keyed}("
            "%b::uuid[], %b::bigint[], %b::text[], %b::bytea[], %s::text::jsonb, %s::float8, %s::text::jsonb) "
            "AS notification_id"
        ).format(schema=schema, append_keyed=append_keyed)
        self.select_external_keys_sql = SQL(
            "SELECT k.tenant_id, k.app_id, k.external_key, k.originator_id "
            "FROM unnest(%b::text[], %b::text[], %b::text[]) AS q(tenant_id, app_id, external_key) "
            "CROSS JOIN LATERAL (SELECT * FROM {schema}.{keys} WHERE tenant_id = q.tenant_id "
            " AND app_id = q.app_id AND external_key = q.external_key OFFSET 0) AS k"
        ).format(schema=schema, keys=external_keys)
        # Lookups of many rows by key are written `unnest(...) CROSS JOIN LATERAL (... OFFSET 0)`:
        # one index probe per key whatever the table's statistics say. As a plain join, a table
        # not yet analyzed after a burst of writes was hash-joined by a full scan (32 ms instead
        # of 0.5 ms for 64 keys in 130,000 events, measured).
        self.select_keys_sql = SQL(
            "SELECT k.tenant_id, k.key, k.fingerprint, k.originator_id, k.originator_version "
            "FROM unnest(%b::text[], %b::text[]) AS q(tenant_id, key) CROSS JOIN LATERAL ("
            " SELECT * FROM {schema}.{table} WHERE tenant_id = q.tenant_id AND key = q.key "
            " AND created_at >= now() - make_interval(secs => %s) OFFSET 0) AS k"
        ).format(schema=schema, table=table)
        self._purge_keys = SQL(
            "DELETE FROM {schema}.{table} WHERE created_at < now() - make_interval(secs => %s)"
        ).format(schema=schema, table=table)
        self.select_after_sql = SQL(
            "SELECT e.originator_id, e.originator_version, e.topic, e.state "
            "FROM unnest(%b::uuid[], %b::bigint[]) AS q(originator_id, after_version) CROSS JOIN LATERAL ("
            " SELECT * FROM {schema}.{events} WHERE originator_id = q.originator_id "
            " AND originator_version > q.after_version OFFSET 0) AS e "
            "ORDER BY e.originator_id, e.originator_version"
        ).format(schema=schema, events=events)
        self.select_positions_sql = SQL(
            "SELECT e.originator_id, e.originator_version, e.notification_id "
            "FROM unnest(%b::uuid[], %b::bigint[]) AS q(originator_id, originator_version) CROSS JOIN LATERAL ("
            " SELECT * FROM {schema}.{events} WHERE originator_id = q.originator_id "
            " AND originator_version = q.originator_version OFFSET 0) AS e"
        ).format(schema=schema, events=events)
        self.idempotency_ttl_s = 24 * 3600.0
        # Erasure (docs/contract.md section 11): the keys of an activity are found by its id, and the
        # erasure tables (projections/erasure.py) live beside the events.
        self.sql_create_statements.append(
            SQL("CREATE INDEX IF NOT EXISTS {index} ON {schema}.{table} (originator_id)").format(
                index=Identifier(IDEMPOTENCY_TABLE + "_originator"), schema=schema, table=table
            )
        )
        self.sql_create_statements.extend(erasure_tables.create_statements(self.datastore.schema))
        self.rewrite_sql = SQL(
            "UPDATE {schema}.{events} AS e SET state = r.state "
            "FROM unnest(%b::uuid[], %b::bigint[], %b::bytea[]) AS r(originator_id, originator_version, state) "
            "WHERE e.originator_id = r.originator_id AND e.originator_version = r.originator_version"
        ).format(schema=schema, events=events)
        self.forget_keys_sql = SQL(
            "UPDATE {schema}.{table} AS k SET fingerprint = {erased} "
            "FROM unnest(%b::uuid[], %b::bigint[]) AS q(originator_id, erased_version) "
            "WHERE k.originator_id = q.originator_id AND k.originator_version < q.erased_version"
        ).format(schema=schema, table=table, erased=Literal(ERASED_FINGERPRINT))
        self.forget_external_keys_sql = SQL(  # an upsert's key was the client's: erased with the activity
            "DELETE FROM {schema}.{keys} WHERE originator_id = ANY(%b::uuid[])"
        ).format(schema=schema, keys=Identifier(EXTERNAL_KEYS_TABLE))
        self.record_erasures_sql = erasure_tables.record_erasures_sql(self.datastore.schema)
        self.erase_rows_sql = build_upsert_sql(READ_MODEL_TABLE)

    def create_table(self) -> None:
        """Idempotent. Serialised by an advisory lock: processes starting together would collide
        replacing the append function ("tuple concurrently updated")."""
        with schema_lock(self.datastore, EVENTS_SCHEMA_LOCK):
            super().create_table()

    @retry((InterfaceError, OperationalError), max_attempts=3, wait=0.2)
    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        """Append a batch of events and its idempotency keys (kwarg `idempotency`: tuples of tenant,
        key, fingerprint, originator id, version) atomically; the events' notification ids.

        The arrays go in binary (`%b`): as text (`%s` picks text for lists) psycopg quoted every
        element in Python and PostgreSQL parsed every state as hex, 3.8 ms and 7.6 ms per batch of
        200 against 0.4 and 0.7 ms (a text array of composites, the library's way, was a fifth of
        the service's CPU per create). The connection is in autocommit, so the one statement is
        its own transaction."""
        if not stored_events:
            return []
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self.append_sql, self.append_params(stored_events, kwargs.get("idempotency", ())), binary=True)
            return [row["notification_id"] for row in curs.fetchall()]

    def append_params(
        self, stored_events: Sequence[StoredEvent], keys: Sequence[tuple[str, str, str, UUID, int]]
    ) -> tuple[Any, ...]:
        """The parameters of `append_sql` for events and their idempotency keys."""
        return (
            [event.originator_id for event in stored_events],
            [event.originator_version for event in stored_events],
            [event.topic for event in stored_events],
            [event.state for event in stored_events],
            orjson.dumps(
                [
                    {"tenant_id": t, "key": k, "fingerprint": f, "originator_id": str(i), "originator_version": v}
                    for t, k, f, i, v in keys
                ]
            ).decode(),
            self.idempotency_ttl_s,
        )

    def purge_expired_keys(self) -> int:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._purge_keys, (self.idempotency_ttl_s,))
            return curs.rowcount


class CommandStore:
    """The command path's own connection to the event store, on the service's event loop.

    A batch's reads (its activities, its Idempotency-Keys) and its append go through here with
    the recorder's SQL. One batch runs at a time (the `CommandBatcher`'s task), so one connection
    serves it; it is opened on first use and again after it broke. On the loop, the batch's I/O
    no longer hands the GIL between the loop and a store thread several times per batch: at
    1,800 creates/s that halved the median reply time (ad hoc, 2026-12-02: p50 2.7-3.8 ms against
    6.8-8.7 ms, p99 17-31 ms against 28-53 ms when the disk did not stall).

    Errors come out as the library's persistence errors, as from its recorder: a lost race is an
    `IntegrityError`, an unreachable database an `OperationalError` or `InterfaceError`.
    """

    def __init__(
        self,
        recorder: ActivitiesRecorder,
        connect_timeout_s: float = 2.0,
        on_new_session: Callable[[], None] | None = None,
    ) -> None:
        self._recorder = recorder
        self._connect_timeout_s = connect_timeout_s
        self._connection: psycopg.AsyncConnection[Any] | None = None
        # called when a connection replaces one that broke: the server may be another one now (a
        # promoted standby, reached through a multi-host URL) that lacks what the last one had
        self._on_new_session = on_new_session
        self._broke = False
        self.resets = 0  # connections that replaced a broken one: a reader of the cache checks it did not change

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    @contextlib.asynccontextmanager
    async def _cursor(self) -> AsyncIterator[psycopg.AsyncCursor[Any]]:
        try:
            if self._connection is None or self._connection.closed:
                self._broke = self._broke or self._connection is not None  # closed under us
                url = conninfo(
                    datastore_url(self._recorder.datastore), connect_timeout=max(1, round(self._connect_timeout_s))
                )
                self._connection = await psycopg.AsyncConnection.connect(
                    url, autocommit=True  # each statement is its own transaction
                )
                if self._broke:
                    self.resets += 1
                    if self._on_new_session is not None:
                        self._on_new_session()
                self._broke = False
            async with self._connection.cursor() as cursor:
                yield cursor
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
                self._broke = True
                await self.close()  # a broken connection: the next batch opens a fresh one
            raise _persistence_error(exc) from exc

    async def append(
        self,
        stored_events: Sequence[StoredEvent],
        keys: Sequence[tuple[str, str, str, UUID, int]],
        external_keys: Sequence[tuple[str, str, str, UUID]] = (),
        erasure: ErasureWrite | None = None,
        skeletons: Sequence[dict[str, Any]] = (),
    ) -> list[int]:
        """Append events, their idempotency keys and the keys of the upserts that created
        activities (tenant, app or "", key, originator id) in one transaction; their notification ids.

        With an `erasure`, the same transaction rewrites the erased activities' earlier events to
        their skeletons, forgets the fingerprints of their keys and their external keys, records the
        erasures (for the streams' cleanup) and puts the `skeletons` (the erased documents) into the
        read model."""
        if not stored_events:
            return []
        recorder = self._recorder
        params = recorder.append_params(stored_events, keys)
        statement = recorder.append_sql
        if external_keys:
            statement = recorder.append_keyed_sql
            rows = [
                {"tenant_id": t, "app_id": a, "external_key": k, "originator_id": str(i)}
                for t, a, k, i in external_keys
            ]
            params = (*params, orjson.dumps(rows).decode())
        async with self._cursor() as cursor:
            if erasure is None:
                await cursor.execute(statement, params, binary=True)
                return [row[0] for row in await cursor.fetchall()]
            async with cursor.connection.transaction():
                await cursor.execute(statement, params, binary=True)
                ids = [row[0] for row in await cursor.fetchall()]
                written = {(e.originator_id, e.originator_version): n for e, n in zip(stored_events, ids, strict=True)}
                rewrites = erasure.rewrites
                await cursor.execute(
                    recorder.rewrite_sql,
                    ([e.originator_id for e in rewrites], [e.originator_version for e in rewrites],
                     [e.state for e in rewrites]),
                    binary=True,
                )
                erased_ids = [i for i, _ in erasure.erased]
                erased_versions = [v for _, v in erasure.erased]
                await cursor.execute(recorder.forget_keys_sql, (erased_ids, erased_versions), binary=True)
                await cursor.execute(recorder.forget_external_keys_sql, (erased_ids,), binary=True)
                positions = [written[ref] for ref in erasure.erased]
                await cursor.execute(recorder.record_erasures_sql, (erased_ids, positions))
                await self._erase_rows(cursor, skeletons, positions)
            return ids

    async def find_external_keys(self, scoped: Sequence[ExternalKey]) -> dict[ExternalKey, UUID]:
        """The activities of upserts' keys that exist: (tenant, app or "", key) -> originator id."""
        if not scoped:
            return {}
        async with self._cursor() as cursor:
            await cursor.execute(
                self._recorder.select_external_keys_sql,
                ([k[0] for k in scoped], [k[1] for k in scoped], [k[2] for k in scoped]),
                binary=True,
            )
            return {(row[0], row[1], row[2]): row[3] for row in await cursor.fetchall()}

    async def _erase_rows(
        self, cursor: psycopg.AsyncCursor[Any], skeletons: Sequence[dict[str, Any]], positions: Sequence[int]
    ) -> None:
        """The read model's rows of erased activities become their skeletons at once (guarded by
        version, so the projector's later upsert of the same event changes nothing), so that no read
        serves the content while the projector catches up. Skipped, in a savepoint, where the read
        model is not there (a process started before it was created, or another database)."""
        try:
            async with cursor.connection.transaction():
                await cursor.execute(
                    self._recorder.erase_rows_sql,
                    (orjson.dumps(list(skeletons)).decode(), orjson.dumps(list(positions)).decode()),
                )
        except psycopg.Error as exc:
            log.info(
                "read model not updated by the erasure; the projector will", extra={"error_type": type(exc).__name__}
            )

    async def select_after(self, refs: Sequence[tuple[UUID, int]]) -> list[StoredEvent]:
        """The events of many streams in one query: for each (originator id, version), the events
        after that version, ordered by stream and version."""
        if not refs:
            return []
        async with self._cursor() as cursor:
            await cursor.execute(
                self._recorder.select_after_sql, ([r[0] for r in refs], [r[1] for r in refs]), binary=True
            )
            return [StoredEvent(row[0], row[1], row[2], bytes(row[3])) for row in await cursor.fetchall()]

    async def find_keys(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], tuple[str, UUID, int]]:
        """Live idempotency records: (tenant, key) -> (fingerprint, originator id, version)."""
        if not pairs:
            return {}
        async with self._cursor() as cursor:
            await cursor.execute(
                self._recorder.select_keys_sql,
                ([p[0] for p in pairs], [p[1] for p in pairs], self._recorder.idempotency_ttl_s),
            )
            return {(row[0], row[1]): (row[2], row[3], row[4]) for row in await cursor.fetchall()}

    async def positions(self, refs: Sequence[tuple[UUID, int]]) -> dict[tuple[UUID, int], int]:
        """Global positions (notification ids) of events given by (originator id, version)."""
        if not refs:
            return {}
        async with self._cursor() as cursor:
            await cursor.execute(self._recorder.select_positions_sql, ([r[0] for r in refs], [r[1] for r in refs]))
            return {(row[0], row[1]): row[2] for row in await cursor.fetchall()}


def _persistence_error(exc: psycopg.Error) -> PersistenceError:
    """The library's error for a psycopg error (what its recorder raises for the same)."""
    for psycopg_class, library_class in (
        (psycopg.IntegrityError, IntegrityError),
        (psycopg.OperationalError, OperationalError),
        (psycopg.InterfaceError, InterfaceError),
        (psycopg.ProgrammingError, ProgrammingError),
    ):
        if isinstance(exc, psycopg_class):
            return library_class(str(exc))
    return PersistenceError(str(exc))


class EventTranscoder(JSONTranscoder):
    """eventsourcing's JSON transcoder, with orjson, and typed values revived only at the top level.

    The library's decoder revives any nested object shaped `{"_type_": ..., "_data_": ...}`, so a
    client could store such an object in `custom_fields` and make every later read of that event
    fail (a poison pill for the projector and the relay). Events keep their typed values (the
    timestamp) at the top level of their state, and documents are plain JSON, so only the top level
    is revived here. orjson also makes decoding about five times faster.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last_encoded: tuple[Any, dict[str, Any]] = (None, {})

    def encode(self, obj: Any) -> bytes:
        return orjson.dumps(obj, default=self._encode_typed, option=orjson.OPT_PASSTHROUGH_DATETIME)

    def _encode_typed(self, value: Any) -> dict[str, Any]:
        """A typed value's transcoding, the last one remembered by identity: the events of a batch
        share one time stamp object (the library's lookup and `isoformat` were 1.4 us an event).
        The value is held, so its identity cannot pass to another object."""
        last, encoded = self._last_encoded
        if value is not last:
            encoded = self._encode_obj(value)
            self._last_encoded = (value, encoded)
        return encoded

    def decode(self, data: bytes) -> Any:
        state = orjson.loads(data)
        if isinstance(state, dict):
            for key, value in state.items():
                if isinstance(value, dict) and len(value) == 2 and "_type_" in value and "_data_" in value:
                    state[key] = self._decode_obj(value)
        return state


def event_transcoder() -> EventTranscoder:
    """The transcoder of stored event states, with the library's transcodings (UUID, Decimal, datetime)."""
    transcoder = EventTranscoder()
    for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):
        transcoder.register(transcoding)
    return transcoder


class ActivitiesApplication(Application[UUID]):
    """The event store of activities (table `activities_events`)."""

    name = APP_NAME

    def __init__(self, env: Any = None, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        super().__init__(env)
        # The command path's cache of current activities, bounded in (estimated) bytes: the
        # library's cache counts aggregates, and 10,000 of them near the 256 KiB document limit
        # were 2.5 GB. Keyed by originator id; each entry is the activity after its latest event.
        self.activity_cache: SizedLRUCache[UUID, Activity] = SizedLRUCache(cache_bytes)

    def construct_transcoder(self) -> Transcoder:
        return event_transcoder()

    def construct_env(self, name: str, env: Any = None) -> Environment:
        """Only the given settings: Settings is the one reader of the process environment."""
        return Environment(name, dict(env or {}))

    @property
    def activities_recorder(self) -> ActivitiesRecorder:
        assert isinstance(self.recorder, ActivitiesRecorder)
        return self.recorder

    def cached(self, originator_ids: Iterable[UUID]) -> dict[UUID, Activity | None]:
        """The cached state of each activity (None when not cached), to be brought up to date by
        `fast_forward` with the events after it, read for a whole batch in one query (the library's
        `repository.get` reads once per activity, even on a cache hit)."""
        cache = self.activity_cache
        return {originator_id: cache.get(originator_id) for originator_id in dict.fromkeys(originator_ids)}

    def fast_forward(self, known: dict[UUID, Activity | None], later: Sequence[StoredEvent]) -> dict[UUID, Activity]:
        """The current state of activities from their cached state and the events after it (another
        command process may have written them); uncached ones are replayed from their first event.
        Callers get copies, as from `repository.get`: a batch that fails leaves the cache as it was.
        Activities that do not exist are absent from the result."""
        current = dict(known)
        for originator_id, events in itertools.groupby(later, key=lambda event: event.originator_id):
            assert isinstance(originator_id, UUID)
            activity = current[originator_id]
            for event in events:
                domain_event = cast(ActivityEvent, self.mapper.to_domain_event(event))
                activity = cast(Activity, domain_event.mutate(activity))
            current[originator_id] = activity
            # the latest event carries the whole document: its stored JSON sizes the entry
            self.activity_cache.put(originator_id, cast(Activity, activity), estimated_size(event.state))
        return {originator_id: activity.detached_copy() for originator_id, activity in current.items() if activity}

    def pending_events(self, activities: Iterable[Activity]) -> tuple[list[ActivityEvent], list[StoredEvent]]:
        """The new events of activities, as domain events and as stored events (the library's
        `save` without its per-object protocol checks, which cost more than the mapping)."""
        events = [cast(ActivityEvent, event) for activity in activities for event in activity.collect_events()]
        return events, [self.mapper.to_stored_event(event) for event in events]

    def remember(self, activities: Iterable[Activity], saved: Sequence[StoredEvent]) -> None:
        """Cache the activities whose events were saved, sized by their latest saved event (the
        others, unchanged, are cached as they were read), but not those that were only created:
        most activities are never changed after they are logged, and caching each new one cost
        about a tenth of a create's CPU in batches (bench/ and docs/performance.md). The first
        command on a new activity reads its one event and caches it then."""
        latest = {event.originator_id: event.state for event in saved if event.originator_version > 1}
        for activity in activities:
            state = latest.get(activity.id)
            if state is not None:
                self.activity_cache.put(activity.id, activity, estimated_size(state))

    def load_version(self, originator_id: UUID, version: int) -> Activity | None:
        """An activity as it was at a version (its current state comes from `load_current`)."""
        try:
            activity: Any = self.repository.get(originator_id, version=version)
        except AggregateNotFoundError:
            return None
        assert isinstance(activity, Activity)
        return activity


def application_env(database_url: str, pool_size: int, cipher_key: str | None = None) -> dict[str, str]:
    """The eventsourcing environment for a libpq URL (every parameter of it is honoured)."""
    env = {
        "PERSISTENCE_MODULE": "projections.database:EventStoreFactory",
        "APPLICATION_RECORDER_TOPIC": "services.application:ActivitiesRecorder",
        URL_KEY: database_url,
        # required by the library's factory, unused: its pool connects with the URL above
        "POSTGRES_DBNAME": "",
        "POSTGRES_HOST": "",
        "POSTGRES_USER": "",
        "POSTGRES_PASSWORD": "",
        "POSTGRES_POOL_SIZE": str(pool_size),
        "POSTGRES_MAX_OVERFLOW": "4",
        "POSTGRES_CONNECT_TIMEOUT": "2",
        "POSTGRES_LOCK_TIMEOUT": "5",
        # no AGGREGATE_CACHE_MAXSIZE: the library's cache is bounded by count; the command path has
        # its own, bounded in bytes (ActivitiesApplication.activity_cache)
    }
    if cipher_key:
        env["CIPHER_TOPIC"] = "eventsourcing.cryptography:AESCipher"
        env["CIPHER_KEY"] = cipher_key
    return env


@dataclass
class _Pending:
    """What a batch has decided so far, before it is saved."""

    current: dict[UUID, Activity]  # the activities the batch changes, as they were before it
    aggregates: dict[UUID, Activity] = field(default_factory=dict)
    refs: dict[int, tuple[UUID, int, bool]] = field(default_factory=dict)  # index -> (id, version, wrote)
    keys: list[tuple[str, str, str, UUID, int]] = field(default_factory=list)
    keyed: dict[int, UUID] = field(default_factory=dict)  # upserts whose key existed: index -> activity
    new_keys: dict[ExternalKey, UUID] = field(default_factory=dict)  # keys this batch creates
    created: set[int] = field(default_factory=set)  # the upserts that create their activity


class CommandService:
    """Decides and saves commands, one batch at a time (the `CommandBatcher` runs them in turn)."""

    def __init__(self, app: ActivitiesApplication, clock: Any = None) -> None:
        self.app = app
        # After a reconnect the cache may be ahead of the server: an asynchronous standby promoted
        # without the last commits. Deciding on it would append after a gap in the versions, which
        # no replay can read; so a new session starts with an empty cache.
        self.store = CommandStore(app.activities_recorder, on_new_session=app.activity_cache.clear)
        self._clock = clock or (lambda: datetime.now(UTC))

    async def close(self) -> None:
        await self.store.close()

    # The public entry ---------------------------------------------------------------------

    async def execute(self, requests: Sequence[CommandRequest]) -> list[Outcome]:
        """Outcomes in the order of the requests; the events of the batch are saved together."""
        try:
            return await self._execute(requests)
        except (OperationalError, InterfaceError) as exc:
            log.warning("event store unavailable", extra={"error": describe(exc)})
            error = Unavailable("the event store is unavailable; retry with the same Idempotency-Key")
            return [error for _ in requests]

    async def _execute(self, requests: Sequence[CommandRequest]) -> list[Outcome]:
        """The batch in one transaction. When another process wrote one of its activities or one of
        its Idempotency-Keys meanwhile, only the commands that touched those run again alone; the
        rest are retried together at once (a hot activity no longer makes a whole batch of
        unrelated commands run one by one)."""
        outcomes: list[Outcome | None] = [None] * len(requests)
        group, alone = _split_repeated_keys(requests)
        for attempt in range(_BATCH_ATTEMPTS):
            if not group:
                break
            conflicting = await self._attempt(requests, group, outcomes)
            if conflicting is None:
                group = []
            elif conflicting:
                alone += conflicting
                group = [i for i in group if i not in conflicting]
            else:  # the store could not tell which (not seen so far): the whole group again, later
                await _jitter(attempt)
        if group:
            log.info("batch kept conflicting; retrying its commands one by one", extra={"size": len(group)})
            alone += group
        for i in sorted(alone):
            await self._alone(requests, i, outcomes)
        return [o if o is not None else InternalError("no outcome") for o in outcomes]

    # Steps ----------------------------------------------------------------------------------

    async def _alone(self, requests: Sequence[CommandRequest], i: int, outcomes: list[Outcome | None]) -> None:
        """One command in its own transaction, read again and retried with jitter while it conflicts."""
        for attempt in range(_SOLO_ATTEMPTS):
            if await self._attempt(requests, [i], outcomes) is None:
                return
            await _jitter(attempt)
        outcomes[i] = Unavailable("the activity is being changed concurrently; retry")

    async def _attempt(
        self, requests: Sequence[CommandRequest], indexes: list[int], outcomes: list[Outcome | None]
    ) -> set[int] | None:
        """Decide and save `indexes` in one transaction: None when saved, else (a write conflict:
        another process wrote one of the activities, or one of the keys, since they were read) the
        indexes that touched what it wrote, their outcomes cleared for the next attempt."""
        for i in indexes:
            outcomes[i] = None
        await self._replay_known_keys(requests, indexes, outcomes)
        try:
            await self._decide_and_save(requests, [i for i in indexes if outcomes[i] is None], outcomes)
        except _Conflict as conflict:  # the next attempt fast-forwards what the other writer wrote
            for i in indexes:
                outcomes[i] = None
            return conflict.indexes
        return None

    async def _replay_known_keys(
        self, requests: Sequence[CommandRequest], indexes: Sequence[int], outcomes: list[Outcome | None]
    ) -> None:
        keyed = [i for i in indexes if requests[i].idempotency_key]
        if not keyed:
            return
        pairs = [(requests[i].caller.tenant_id, str(requests[i].idempotency_key)) for i in keyed]
        known = await self.store.find_keys(pairs)
        for i, pair in zip(keyed, pairs, strict=True):
            if pair not in known:
                continue
            fingerprint, originator_id, version = known[pair]
            if fingerprint == ERASED_FINGERPRINT:
                outcomes[i] = Gone(f"activity {activity_id_of(originator_id)} was erased")
            elif fingerprint != requests[i].fingerprint:
                outcomes[i] = IdempotencyConflict(
                    "this Idempotency-Key was used with a different command or body; use a new key"
                )
            else:
                outcomes[i] = await self._result_at(originator_id, version)
                if isinstance(requests[i].command, UpsertActivity):  # it created iff it wrote version 1
                    outcomes[i] = dataclasses.replace(cast(CommandResult, outcomes[i]), created=version == 1)

    async def _result_at(self, originator_id: UUID, version: int) -> CommandResult:
        # a replay is rare: the library's versioned read, in a thread so as not to block the loop
        activity = await asyncio.to_thread(self.app.load_version, originator_id, version)
        if activity is None:
            raise NotFound(f"activity {activity_id_of(originator_id)} not found")
        position = (await self.store.positions([(originator_id, version)]))[(originator_id, version)]
        return CommandResult(activity.document, position)

    async def _decide_and_save(
        self, requests: Sequence[CommandRequest], indexes: Sequence[int], outcomes: list[Outcome | None]
    ) -> None:
        now = self._clock()
        changed = [requests[i].command for i in indexes]
        upserts = {i: external_key_of(requests[i]) for i in indexes if isinstance(requests[i].command, UpsertActivity)}
        found = await self.store.find_external_keys(list(dict.fromkeys(upserts.values())))
        keyed = {i: found[key] for i, key in upserts.items() if key in found}
        pending = _Pending(
            await self.load_current(
                [*(activity_uuid(target) for c in changed if (target := target_id(c)) is not None), *keyed.values()]
            ),
            keyed=keyed,
        )
        read = {originator_id: activity.version for originator_id, activity in pending.current.items()}
        for i in indexes:
            try:
                self._decide_one(requests[i], i, pending, now)
            except ActivitiesError as error:
                outcomes[i] = error
            except PersistenceError:
                raise  # the store's trouble concerns the whole batch (unavailable, or a conflict to retry)
            except Exception:  # a bug tripped by one command fails that command only, not its batch
                outcomes[i] = internal_error("deciding a command failed")
        events, stored = self.app.pending_events(pending.aggregates.values())
        external_keys = [(*key, originator_id) for key, originator_id in pending.new_keys.items()]
        erased = [event for event in events if isinstance(event, ActivityErased)]
        erasure = None
        if erased:
            stored, erasure = await self._erasure(erased, stored)
        try:
            if erasure is not None:
                skeletons = [event.document for event in erased]
                notification_ids = await self.store.append(
                    stored, pending.keys, external_keys, erasure=erasure, skeletons=skeletons
                )
            elif external_keys:
                notification_ids = await self.store.append(stored, pending.keys, external_keys)
            else:  # (the two-argument form: what tests that stand in for the store's append wrap)
                notification_ids = await self.store.append(stored, pending.keys)
        except IntegrityError:
            conflicting = await self._conflicting(requests, indexes, read)
            raise _Conflict(conflicting | await self._conflicting_upserts(upserts, keyed, read)) from None
        self.app.remember(pending.aggregates.values(), stored)
        written: dict[tuple[UUID, int], tuple[int, dict[str, Any]]] = {
            (cast(UUID, saved.originator_id), saved.originator_version): (position, event.document)
            for saved, position, event in zip(stored, notification_ids, events, strict=True)
        }
        unwritten = [(ref[0], ref[1]) for ref in pending.refs.values() if (ref[0], ref[1]) not in written]
        earlier = await self.store.positions(unwritten)  # no-ops: their activity's position as it is
        for i, (originator_id, version, wrote) in pending.refs.items():
            ref = (originator_id, version)
            saved = written.get(ref)
            if saved is not None:
                position, document = saved
            else:
                position, document = earlier[ref], await self._document_at(pending, originator_id, version)
            created = (i in pending.created) if i in upserts else None
            outcomes[i] = CommandResult(document, position, created=created, wrote=wrote)

    async def _conflicting_upserts(
        self, upserts: dict[int, ExternalKey], keyed: dict[int, UUID], read: dict[UUID, int]
    ) -> set[int]:
        """After a lost race, the upserts another writer got in the way of: those whose key it
        created (theirs now updates it) and those whose keyed activity it wrote."""
        if not upserts:
            return set()
        taken = await self.store.find_external_keys([key for i, key in upserts.items() if i not in keyed])
        moved = {
            cast(UUID, event.originator_id)
            for event in await self.store.select_after([(k, read[k]) for k in set(keyed.values()) if k in read])
        }
        return {i for i, key in upserts.items() if key in taken or keyed.get(i) in moved}

    async def _erasure(
        self, erased: Sequence[ActivityErased], stored: list[StoredEvent]
    ) -> tuple[list[StoredEvent], ErasureWrite]:
        """The batch's events with those of erased activities before their erasure reduced to
        skeletons, and the rewrite of their events already stored (read here, decoded with their
        upcasters, and encoded again by the mapper: compressed and encrypted as configured)."""
        versions = {event.originator_id: event.originator_version for event in erased}

        def skeleton_of(event: StoredEvent) -> StoredEvent:
            domain_event = cast(ActivityEvent, self.app.mapper.to_domain_event(event))
            return self.app.mapper.to_stored_event(erased_copy(domain_event))

        def earlier(event: StoredEvent) -> bool:
            version = versions.get(cast(UUID, event.originator_id))
            return version is not None and event.originator_version < version

        batch = [skeleton_of(event) if earlier(event) else event for event in stored]
        already = await self.store.select_after([(originator_id, 0) for originator_id in versions])
        rewrites = [skeleton_of(event) for event in already if earlier(event)]
        return batch, ErasureWrite(rewrites, list(versions.items()))

    async def _conflicting(
        self, requests: Sequence[CommandRequest], indexes: Sequence[int], read: dict[UUID, int]
    ) -> set[int]:
        """After a lost race, which commands touched what the other writer wrote: two batched reads,
        the events after the versions this batch decided on, and its keys that now exist."""
        moved = {cast(UUID, event.originator_id) for event in await self.store.select_after(list(read.items()))}
        keys = {
            i: (requests[i].caller.tenant_id, requests[i].idempotency_key)
            for i in indexes
            if requests[i].idempotency_key
        }
        taken = set(await self.store.find_keys([(tenant, str(key)) for tenant, key in keys.values()]))
        targets = {
            i: activity_uuid(target) for i in indexes if (target := target_id(requests[i].command)) is not None
        }
        return conflicting_commands(targets, {i: (t, str(k)) for i, (t, k) in keys.items()}, moved, taken)

    async def load_current(self, originator_ids: Iterable[UUID]) -> dict[UUID, Activity]:
        """Activities as they are now (copies; the absent do not exist): one read for a whole batch.
        Read again when the store's connection was replaced after a break meanwhile (which empties
        the cache): what was taken from the cache may be ahead of the server now reached."""
        ids = list(originator_ids)
        while True:
            resets = self.store.resets
            known = self.app.cached(ids)
            later = await self.store.select_after(
                [(originator_id, activity.version if activity else 0) for originator_id, activity in known.items()]
            )
            if self.store.resets == resets:
                return self.app.fast_forward(known, later)

    async def _document_at(self, pending: _Pending, originator_id: UUID, version: int) -> dict[str, Any]:
        activity = pending.aggregates.get(originator_id)
        if activity is not None and activity.version == version:
            return activity.document
        loaded = await asyncio.to_thread(self.app.load_version, originator_id, version)
        assert loaded is not None
        return loaded.document

    def _decide_one(self, request: CommandRequest, i: int, pending: _Pending, now: datetime) -> None:
        command = request.command
        if isinstance(command, UpsertActivity):
            activity, wrote = self._decide_upsert(request, command, i, pending, now)
        elif isinstance(command, CreateActivity):
            activity, wrote = _log_new(request, command, now), True
        else:
            target = target_id(command)
            if target is None:  # an erasure by contact: carried out one activity at a time (services/erasure.py)
                raise internal_error("a command without one activity reached the batcher")
            originator_id = activity_uuid(target)
            loaded = pending.aggregates.get(originator_id) or pending.current.get(originator_id)
            overdue_for = loaded.overdue_for if loaded else None  # the aggregate's memory (section 9)
            decision = decide(
                loaded.document if loaded else None, command, request.caller, now, overdue_for=overdue_for
            )
            assert loaded is not None  # decide() raised NotFound otherwise
            activity = loaded
            if decision is not None:
                activity.record(decision, now, request.traceparent)
            wrote = decision is not None
        self._note(request, i, pending, activity, wrote)

    def _decide_upsert(
        self, request: CommandRequest, command: UpsertActivity, i: int, pending: _Pending, now: datetime
    ) -> tuple[Activity, bool]:
        """An upsert: an update of the activity its key names (found in the key table, or created
        earlier in this batch), else a create that records the key with its event."""
        key = external_key_of(request)
        originator_id = pending.keyed.get(i) or pending.new_keys.get(key)
        if originator_id is None:
            activity = _log_new(request, command, now)
            pending.new_keys[key] = activity.id
            pending.created.add(i)
            return activity, True
        loaded = pending.aggregates.get(originator_id) or pending.current.get(originator_id)
        if loaded is None:  # a key is written with its activity's first event: never seen
            raise InternalError("the keyed activity has no events")
        decision = decide(loaded.document, command, request.caller, now)
        if decision is not None:
            loaded.record(decision, now, request.traceparent)
        return loaded, decision is not None

    @staticmethod
    def _note(request: CommandRequest, i: int, pending: _Pending, activity: Activity, wrote: bool) -> None:
        """Record a decided command in the batch: its activity, its result's ref, its key."""
        pending.aggregates[activity.id] = activity
        pending.refs[i] = (activity.id, activity.version, wrote)
        if request.idempotency_key and wrote:
            pending.keys.append(
                (request.caller.tenant_id, request.idempotency_key, request.fingerprint, activity.id, activity.version)
            )


def _log_new(request: CommandRequest, command: CreateActivity | UpsertActivity, now: datetime) -> Activity:
    """A new activity, with a fresh id, from a create or from an upsert of a key not yet taken."""
    activity_id, originator_id = new_activity_ref()
    decision = decide(None, command, request.caller, now, activity_id)
    assert decision is not None
    return Activity.log(originator_id, decision, now, request.traceparent)


class _Conflict(Exception):
    """A batch's append lost a race with another writer; `indexes` are the commands that touched
    what that writer wrote (their activities, or their Idempotency-Keys)."""

    def __init__(self, indexes: set[int]) -> None:
        super().__init__(f"{len(indexes)} conflicting command(s)")
        self.indexes = indexes


def conflicting_commands(
    targets: dict[int, UUID],
    keys: dict[int, tuple[str, str]],
    moved: set[UUID],
    taken: set[tuple[str, str]],
) -> set[int]:
    """The commands of a batch that conflicted: those on an activity another writer moved on
    (`targets`: command index -> activity), and those whose (tenant, key) another writer took."""
    return {i for i, target in targets.items() if target in moved} | {i for i, key in keys.items() if key in taken}


async def _jitter(attempt: int) -> None:
    """A growing random pause before retrying a conflict, so that two writers stop colliding."""
    await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))


def _split_repeated_keys(requests: Sequence[CommandRequest]) -> tuple[list[int], list[int]]:
    """Requests whose (tenant, key) already appeared earlier in the batch run after it, alone."""
    seen: set[tuple[str, str]] = set()
    first: list[int] = []
    later: list[int] = []
    for i, request in enumerate(requests):
        if request.idempotency_key:
            pair = (request.caller.tenant_id, request.idempotency_key)
            if pair in seen:
                later.append(i)
                continue
            seen.add(pair)
        first.append(i)
    return first, later


def internal_error(what: str) -> InternalError:
    """Log the current exception with a fresh correlation id and return the error to reply with."""
    correlation = correlation_id()
    if correlation is None:  # outside a request (a batch, run by the batcher's own task): a fresh one
        correlation = uuid4().hex
        log.exception(what, extra={"correlation_id": correlation})
    else:
        log.exception(what)  # the log line carries the request's correlation id already
    return InternalError(f"internal error; correlation id {correlation}")


QUEUE_BATCHES: Final = 10  # default queue bound, in batches: about a second of work at the maximum rate


def queue_bound(configured: int | None, batch_max_size: int) -> int:
    """How many commands may wait for a batch. Ten batches' worth (about a second of work at the
    maximum rate, well inside the request timeout) absorbs a burst of callers arriving together;
    past it a request is refused at once instead of waiting for a batch that would start after
    its caller gave up. Commands whose deadline passes while queued are dropped anyway."""
    return configured if configured is not None and configured > 0 else QUEUE_BATCHES * batch_max_size


@dataclass(frozen=True)
class Waiting:
    """A submitted command, its caller's future and its deadline (event-loop time)."""

    request: CommandRequest
    future: asyncio.Future[Any]  # its Outcome; for a group, the list of its outcomes (or one error for all)
    deadline: float
    group: tuple[CommandRequest, ...] | None = None  # a batch command's items, saved in one batch

    @property
    def requests(self) -> tuple[CommandRequest, ...]:
        return self.group if self.group is not None else (self.request,)


def still_wanted(waiting: Waiting, now: float) -> bool:
    """A command is carried out only while its caller still waits for it: a command past its
    deadline, or whose caller stopped waiting (its future cancelled), has been or is about to be
    answered `unavailable`, and its caller retries; doing it anyway is work nobody asked for,
    taken from the commands that can still be answered in time."""
    return not waiting.future.done() and now < waiting.deadline


DEADLINE_SWEEP_S: Final = 0.05
"""How often the batcher answers the commands past their deadline (a tenth of the timeout when
that is shorter): a command's `unavailable` comes at most this late."""


class CommandBatcher:
    """Group commit: requests that arrive while a batch is being saved form the next batch.

    There is no artificial wait: under light load a batch holds one command and commits at once;
    under heavy load batches grow up to `max_size`, which is where the throughput comes from.
    Replies resolve only after the batch's transaction has committed.

    Overload: the queue holds at most `queue_max` commands; beyond it a command is refused with
    `unavailable` at once (its caller retries with the same Idempotency-Key). Every command has a
    deadline, its receipt plus `timeout_s`; one still queued at its deadline is answered
    `unavailable` and never carried out. So under any offered load the batcher spends its time
    on commands whose callers still wait, and goodput stays near the maximum rate.
    """

    def __init__(
        self,
        service: CommandService,
        max_size: int = 200,
        timeout_s: float = 5.0,
        on_batch: Any = None,
        queue_max: int | None = None,
    ) -> None:
        self._on_batch = on_batch or (lambda size: None)  # e.g. the batch-size histogram
        self._service = service
        self._max_size = max_size
        self._timeout_s = timeout_s
        self._queue: asyncio.Queue[Waiting] = asyncio.Queue(maxsize=queue_bound(queue_max, max_size))
        self._task: asyncio.Task[None] | None = None
        self._held: Waiting | None = None  # a group that did not fit the last batch: first in the next
        self._saving = False
        self.batches = 0  # counters for metrics, tests and the benchmark
        self.commands = 0
        self.refused = 0  # refused because the queue was full
        self.expired = 0  # dropped from the queue: past their deadline, or their caller gone
        # a command past its deadline is answered `unavailable`; its batch, if not begun, skips it
        self._deadlines = Deadlines(
            min(DEADLINE_SWEEP_S, timeout_s / 10), lambda future: future.set_result(self._timed_out())
        )

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="command-batcher")

    async def stop(self) -> None:
        """Finish what is queued and the batch being saved, then stop."""
        while not self._queue.empty() or self._saving or self._held is not None:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._deadlines.stop()

    def has_room(self) -> bool:
        """Whether a command submitted now would be queued (the NATS adapter refuses early, before
        spending CPU on parsing a command that would be refused anyway)."""
        return not self._queue.full()

    async def submit(self, request: CommandRequest, received: float | None = None) -> Outcome:
        """The outcome once its batch committed, or `unavailable` when the queue is full or the
        deadline (`received`, event-loop time, plus the timeout) passes first.

        A command whose batch began before its deadline may still commit after it; the client's
        retry with the same Idempotency-Key then gets the original reply. One whose batch had not
        begun is never carried out.
        """
        loop = asyncio.get_running_loop()
        deadline = (loop.time() if received is None else received) + self._timeout_s
        future: asyncio.Future[Outcome] = loop.create_future()
        try:
            self._queue.put_nowait(Waiting(request, future, deadline))
        except asyncio.QueueFull:
            self.refused += 1
            return Unavailable("the service is at capacity; retry shortly with the same Idempotency-Key")
        self._deadlines.add(deadline, future)
        return await future

    async def submit_group(self, requests: Sequence[CommandRequest], received: float | None = None) -> list[Outcome]:
        """The outcomes of commands that are saved in the same batch (so in one transaction, but
        for those that conflict with another writer and run again alone), in order; as `submit`
        for the queue and the deadline."""
        if not requests:
            return []
        loop = asyncio.get_running_loop()
        deadline = (loop.time() if received is None else received) + self._timeout_s
        future: asyncio.Future[Any] = loop.create_future()
        try:
            self._queue.put_nowait(Waiting(requests[0], future, deadline, tuple(requests)))
        except asyncio.QueueFull:
            self.refused += 1
            error = Unavailable("the service is at capacity; retry shortly with the same Idempotency-Key")
            return [error for _ in requests]
        self._deadlines.add(deadline, future)
        outcome = await future
        if isinstance(outcome, list):
            return outcome
        return [outcome for _ in requests]

    def _timed_out(self) -> Unavailable:
        return Unavailable(
            f"the event store did not answer within {self._timeout_s:g} s; retry with the same Idempotency-Key"
        )

    async def _next_batch(self) -> list[Waiting]:
        """Up to `max_size` commands still wanted, in arrival order; waits for the first."""
        batch: list[Waiting] = []
        size = 0
        if self._held is not None:
            waiting, self._held = self._held, None
        else:
            waiting = await self._queue.get()
        loop = asyncio.get_running_loop()
        while True:
            if not still_wanted(waiting, loop.time()):
                self.expired += 1
                if not waiting.future.done():  # its timer has not fired yet: answer it now
                    waiting.future.set_result(self._timed_out())
            elif batch and size + len(waiting.requests) > self._max_size:
                self._held = waiting  # a group is never split: it starts the next batch
                return batch
            else:
                batch.append(waiting)
                size += len(waiting.requests)
            if size >= self._max_size or self._queue.empty():
                return batch
            waiting = self._queue.get_nowait()

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            requests = [request for waiting in batch for request in waiting.requests]
            self._saving = True
            try:
                outcomes = await self._service.execute(requests)
            except Exception:  # a bug: every waiter still gets exactly one reply
                error = internal_error("command batch failed")
                outcomes = [error for _ in requests]
            finally:
                self._saving = False
            self.batches += 1
            self.commands += len(requests)
            self._on_batch(len(requests))
            start = 0
            for waiting in batch:
                count = len(waiting.requests)
                if not waiting.future.done():
                    own = outcomes[start : start + count]
                    waiting.future.set_result(own if waiting.group is not None else own[0])
                start += count
