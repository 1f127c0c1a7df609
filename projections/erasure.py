"""Erasure's bookkeeping outside the event store: which JetStream messages hold an activity's
content, and which erased activities still have messages to delete (docs/contract.md section 11).

The event store and the read model are cleaned in the erasing transaction itself
(services/application.py). Messages already on a stream cannot be rewritten, only deleted, and
JetStream finds a message by stream sequence only. So every publisher of activity content
remembers, per message, `(stream, sequence, activity)` in `activities_published`
(`remember_published_sql`: the relay does it in the transaction that records its position, and so
may any other publisher, such as the inbox's results), and the erasing transaction records the
erased activity in `activities_erasures` (pending). `StreamEraser`, a component of the relay role,
deletes the remembered messages of pending erasures with JetStream's secure delete (the server
overwrites the stored message) once the relay has published the `ActivityErased` event, then marks
them done. A message remembered after that (a late publish, a retried result) makes its erasure
pending again, so a publish that raced with the erasure is deleted as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any, Final
from uuid import UUID

import orjson
import psycopg
from nats.aio.client import Client as NatsClient
from psycopg.sql import SQL, Composed, Identifier

from projections.database import conninfo

log = logging.getLogger("activities.erasure")

PUBLISHED_TABLE: Final = "activities_published"
ERASURES_TABLE: Final = "activities_erasures"
SCAN_TABLE: Final = "activities_published_scan"


def create_statements(schema: str) -> list[Composed]:
    """The erasure tables, in the event store's schema (created with the event store's tables)."""
    published, erasures, scan = (_table(schema, name) for name in (PUBLISHED_TABLE, ERASURES_TABLE, SCAN_TABLE))
    return [
        SQL(
            "CREATE TABLE IF NOT EXISTS {t} (stream text NOT NULL, seq bigint NOT NULL, activity_id uuid NOT NULL, "
            "PRIMARY KEY (stream, seq))"
        ).format(t=published),
        SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} (activity_id)").format(
            i=Identifier(PUBLISHED_TABLE + "_activity"), t=published
        ),
        SQL(
            "CREATE TABLE IF NOT EXISTS {t} (activity_id uuid PRIMARY KEY, position bigint NOT NULL, "
            "erased_at timestamptz NOT NULL DEFAULT now(), pending boolean NOT NULL DEFAULT true, "
            "generation bigint NOT NULL DEFAULT 0)"
        ).format(t=erasures),
        SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} (position) WHERE pending").format(
            i=Identifier(ERASURES_TABLE + "_pending"), t=erasures
        ),
        SQL("CREATE TABLE IF NOT EXISTS {t} (stream text PRIMARY KEY, through_seq bigint NOT NULL)").format(t=scan),
    ]


def _table(schema: str, name: str) -> Composed:
    return SQL("{}.{}").format(Identifier(schema), Identifier(name))


def remember_published_sql(schema: str) -> Composed:
    """Remember published messages holding activity content (params: stream, seqs and activity
    ids as array literals, the stream's sequence they were scanned through); any of their
    activities already erased becomes pending again. Run it in the transaction that records the
    publisher's progress, so a recorded publish is always remembered."""
    return SQL(
        "WITH remembered AS ("
        " INSERT INTO {published} (stream, seq, activity_id) SELECT %(stream)s, s, a "
        " FROM unnest(%(seqs)s::text::bigint[], %(ids)s::text::uuid[]) AS m(s, a) ON CONFLICT DO NOTHING "
        " RETURNING activity_id), "
        "scanned AS ("  # a data-modifying WITH runs whether or not it is read
        " INSERT INTO {scan} AS t (stream, through_seq) VALUES (%(stream)s, %(through)s) ON CONFLICT (stream) "
        " DO UPDATE SET through_seq = GREATEST(t.through_seq, EXCLUDED.through_seq) RETURNING 1) "
        "UPDATE {erasures} SET pending = true, generation = generation + 1 "
        "WHERE activity_id IN (SELECT activity_id FROM remembered)"
    ).format(
        published=_table(schema, PUBLISHED_TABLE),
        scan=_table(schema, SCAN_TABLE),
        erasures=_table(schema, ERASURES_TABLE),
    )


def remember_published_params(
    stream: str, messages: Sequence[tuple[int, UUID | str]], through_seq: int | None = None
) -> dict[str, Any]:
    """The parameters of `remember_published_sql`: (sequence, activity) pairs of one stream, an
    activity as its UUID or the UUID's 32 hex digits (`events.activity.activity_uuid_hex`).

    The arrays go as one text literal each, read by PostgreSQL's array input: psycopg's dumping of
    a list, element by element in Python, took three times as long (5.2 against 1.8 us a message,
    measured with groups of 250)."""
    seqs = [seq for seq, _ in messages]
    return {
        "stream": stream,
        "seqs": "{" + ",".join(map(str, seqs)) + "}",
        "ids": "{" + ",".join(a if isinstance(a, str) else a.hex for _, a in messages) + "}",
        "through": through_seq if through_seq is not None else max(seqs, default=0),
    }


def remember_published(
    conn: psycopg.Connection[Any], schema: str, stream: str, messages: Sequence[tuple[int, UUID | str]]
) -> None:
    """`remember_published(stream, seq, activity_id)` for many messages, on a caller's connection
    (inside the caller's transaction): the hook for any publisher of activity content."""
    if messages:
        conn.execute(remember_published_sql(schema), remember_published_params(stream, messages))


def record_erasures_sql(schema: str) -> Composed:
    """Record erased activities as pending (params: activity ids uuid[], positions bigint[])."""
    return SQL(
        "INSERT INTO {t} AS e (activity_id, position) SELECT * FROM unnest(%s::uuid[], %s::bigint[]) "
        "ON CONFLICT (activity_id) DO UPDATE SET pending = true, generation = e.generation + 1"
    ).format(t=_table(schema, ERASURES_TABLE))


def forget_published_sql(schema: str, all_of_it: bool) -> list[Composed]:
    """Forget a stream's remembered messages (params: stream, before): those below `before`, which
    the stream no longer holds, or all of them and its scan (a stream made again from sequence 1)."""
    published, scan = _table(schema, PUBLISHED_TABLE), _table(schema, SCAN_TABLE)
    if not all_of_it:
        return [SQL("DELETE FROM {t} WHERE stream = %(stream)s AND seq < %(before)s").format(t=published)]
    return [
        SQL("DELETE FROM {t} WHERE stream = %(stream)s").format(t=published),
        SQL("DELETE FROM {t} WHERE stream = %(stream)s").format(t=scan),
    ]


def scanned_through_sql(schema: str) -> Composed:
    return SQL("SELECT through_seq FROM {t} WHERE stream = %s").format(t=_table(schema, SCAN_TABLE))


# ---------------------------------------------------------------------------------------------
# The component deleting erased activities' messages
# ---------------------------------------------------------------------------------------------

NO_MESSAGE: Final = 10057  # JetStream's error code for a sequence it does not hold (already gone)
NO_STREAM: Final = 10059


class StreamEraser:
    """Deletes the remembered JetStream messages of erased activities (secure delete), once the
    relay has published their `ActivityErased` event; a component of the relay role.

    Runs every `interval_s` (and at once on `wake`); any number may run: deletes are idempotent,
    and an erasure is marked done only if no message was remembered for it meanwhile."""

    def __init__(
        self,
        database_url: str,
        nats_url: str,
        schema: str = "public",
        relay_tracking: tuple[str, str] = ("activities_relay_tracking", "jetstream"),
        interval_s: float = 1.0,
        api_prefix: str = "$JS.API",
        batch: int = 200,
        concurrency: int = 64,
    ) -> None:
        self.database_url = database_url
        self.nats_url = nats_url
        self.schema = schema
        self.relay_tracking = relay_tracking
        self.interval_s = interval_s
        self.api_prefix = api_prefix
        self.batch = batch
        self.concurrency = concurrency
        self.deleted = 0  # counters for tests and metrics
        self.done = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._nc: NatsClient | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="stream-eraser")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None
        await self._close_connection()

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                while await self.sweep():
                    pass
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS or PostgreSQL away: try again later
                failures += 1
                self.failures += 1
                log.warning("stream erasure failed; retrying", extra={"error_type": type(exc).__name__})
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s * min(2**failures, 30))

    async def _nats(self) -> NatsClient:
        if self._nc is None or self._nc.is_closed:
            import nats

            self._nc = await nats.connect(self.nats_url, name="activities-stream-eraser", connect_timeout=2)
        return self._nc

    async def sweep(self) -> int:
        """Delete the messages of up to `batch` pending erasures the relay has got past; how many
        erasures were finished (0: nothing to do)."""
        try:
            return await self._sweep()
        except psycopg.errors.UndefinedTable:  # the relay has not started yet: nothing published
            return 0

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        """One connection kept across sweeps (a sweep a second would otherwise start a backend a second)."""
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                conninfo(self.database_url, connect_timeout=5), autocommit=True
            )
        return self._conn

    async def _sweep(self) -> int:
        try:
            return await self._sweep_on(await self._connection())
        except psycopg.OperationalError:
            await self._close_connection()  # broken: the next sweep opens a fresh one
            raise

    async def _close_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    async def _sweep_on(self, conn: psycopg.AsyncConnection[Any]) -> int:
        tracking, name = self.relay_tracking
        rows = await (
            await conn.execute(
                SQL(
                    "SELECT e.activity_id, e.generation FROM {erasures} e "
                    "WHERE e.pending "
                    "AND e.position <= COALESCE((SELECT position FROM {tracking} WHERE name = %s), 0) "
                    "ORDER BY e.position LIMIT %s"
                ).format(erasures=_table(self.schema, ERASURES_TABLE), tracking=_table(self.schema, tracking)),
                (name, self.batch),
            )
        ).fetchall()
        if not rows:
            return 0
        ids = [row[0] for row in rows]
        messages = await (
            await conn.execute(
                SQL("SELECT stream, seq FROM {t} WHERE activity_id = ANY(%s::uuid[])").format(
                    t=_table(self.schema, PUBLISHED_TABLE)
                ),
                (ids,),
            )
        ).fetchall()
        await self._delete_messages([(str(row[0]), int(row[1])) for row in messages])
        async with conn.transaction():
            await conn.execute(
                SQL(
                    "DELETE FROM {t} p USING unnest(%s::text[], %s::bigint[]) AS m(stream, seq) "
                    "WHERE p.stream = m.stream AND p.seq = m.seq"
                ).format(t=_table(self.schema, PUBLISHED_TABLE)),
                ([row[0] for row in messages], [row[1] for row in messages]),
            )
            cursor = await conn.execute(
                SQL(
                    "UPDATE {t} e SET pending = false FROM unnest(%s::uuid[], %s::bigint[]) AS d(id, generation) "
                    "WHERE e.activity_id = d.id AND e.generation = d.generation"
                ).format(t=_table(self.schema, ERASURES_TABLE)),
                (ids, [row[1] for row in rows]),
            )
            finished = cursor.rowcount
        self.done += finished
        log.info("erased activities' messages deleted", extra={"erasures": len(rows), "messages": len(messages)})
        return len(rows)

    async def _delete_messages(self, messages: Sequence[tuple[str, int]]) -> None:
        nc = await self._nats()
        limit = asyncio.Semaphore(self.concurrency)

        async def delete(stream: str, seq: int) -> None:
            async with limit:
                # no_erase false: the server overwrites the stored message, not only its index entry
                request = orjson.dumps({"seq": seq, "no_erase": False})
                reply = await nc.request(f"{self.api_prefix}.STREAM.MSG.DELETE.{stream}", request, timeout=5)
                answer = orjson.loads(reply.data)
                error = answer.get("error")
                if error and error.get("err_code") not in (NO_MESSAGE, NO_STREAM):
                    raise RuntimeError(f"JetStream refused deleting {stream}#{seq}: code {error.get('err_code')}")
                self.deleted += int(bool(answer.get("success")))

        await asyncio.gather(*(delete(stream, seq) for stream, seq in messages))
