"""The scheduler: a due-time index kept from the event log, and the loop that fires what comes due.

Contract section 9: reminders (`ActivityReminderDue` when `remind_at` passes for an open activity
whose reminder is armed) and overdue (`ActivityBecameOverdue` once per `due_date` value of an open
activity). Both are decided by the domain (services/domain.py) on the activity's current state;
this module only knows *when* to ask.

- `DueIndex` is a handler of the tracked-consumer core (projections/consumer.py). For each page of
  the log it folds the events into the rows of `activities_due` (one row per activity and kind:
  `reminder` while the reminder is armed, `overdue` while `due_date` is set and the activity is
  open or already found overdue for it) and records its position in the same transaction,
  guarded by the position it started from (exactly once; a page another instance applied is
  refused whole). The rules are the pure `next_due`, which reads the same predicates as the
  domain (`armed_reminder`, `pending_overdue` in events/activity.py), so the index says "due"
  exactly when a firing would append something.
- `FiringLoop` runs while its `DueIndex` is the active instance (the consumer's advisory lock:
  one active scheduler, standbys take over within about a second). It sleeps until the next due
  time (woken early whenever the index applies a page), takes the due rows in batches and fires
  them through `fire`, the application's one write path (injected by the composition root: this
  package never imports the service). A firing decided on a state that is no longer due appends
  nothing; one that races a patch conflicts in the store and is decided again on the new version,
  so an overlap of two instances, a repeated firing or a stale row can never fire twice.
  Fired rows stay out of the next batches until the index has applied what the firing wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, assert_never
from uuid import UUID

import psycopg
from psycopg import sql

from activities_client.document import parse_datetime
from events.activity import (
    ActivityBecameOverdue,
    ActivityDeleted,
    ActivityErased,
    ActivityEvent,
    ActivityLogged,
    ActivityPatched,
    ActivityReminderDue,
    ActivityRestored,
    armed_reminder,
    is_open,
)
from projections.consumer import ConsumerSettings, Entry, lock_key
from projections.database import conninfo
from projections.errors import describe

log = logging.getLogger("activities.scheduler")

DUE_TABLE: Final = "activities_due"
DUE_TRACKING_TABLE: Final = "activities_due_tracking"
DUE_SCHEMA_LOCK: Final = lock_key("activities:due-index:schema")

SCHEDULER_SETTINGS: Final = ConsumerSettings(name="activities:scheduler", page_size=500, poll_interval_s=0.5)
"""How the service runs the due-time index and its firing loop (one active per store, by this name)."""

FIRE_BATCH: Final = 500
"""Due rows fired together at most (they are submitted to the command batcher side by side)."""
FIRE_CONCURRENCY: Final = 2
"""Batches of firings in flight at once (the next is read while one is being saved)."""
PENDING: Final = 2**62
"""The position of an in-flight firing whose outcome is not known yet (never reached by the index)."""
MAX_SLEEP_S: Final = 5.0
"""The longest the firing loop sleeps without looking (a lost wake-up only adds this much)."""

Kind = Literal["reminder", "overdue"]


# ---------------------------------------------------------------------------------------------
# The rules of the index (pure)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DueRow:
    """One entry of the index: an activity, what comes due (`kind`) and when, the version of the
    event it was derived from. `fired` marks an overdue already appended for this `due_at` (kept,
    so that the index, like the aggregate, remembers it while `due_date` keeps that value)."""

    activity_id: UUID
    kind: Kind
    due_at: datetime
    version: int
    tenant_id: str
    fired: bool = False


@dataclass(frozen=True)
class DueState:
    """What the index holds for one activity."""

    reminder: DueRow | None = None
    overdue: DueRow | None = None

    def rows(self) -> list[DueRow]:
        return [row for row in (self.reminder, self.overdue) if row is not None]


def next_due(prior: DueState, event: ActivityEvent) -> DueState:
    """The index's rows for an activity after one of its events (the given-events / when-time-
    passes rules of contract section 9, mirrored from the aggregate):

    - `reminder` while the reminder is armed (`armed_reminder`: open, `remind_at` set,
      `reminder_sent` false), due at `remind_at`;
    - `overdue` while `due_date` is set: fired after an `ActivityBecameOverdue`, and still fired
      after later events while `due_date` keeps that value; not fired (due at `due_date`) while
      the activity is open and was not found overdue for it. A closed activity not found overdue
      has no row: reopened, it comes due again, as `pending_overdue` says.
    """
    match event:
        case ActivityBecameOverdue():
            overdue_now = True
        case (
            ActivityLogged()
            | ActivityPatched()
            | ActivityDeleted()
            | ActivityRestored()
            | ActivityReminderDue()
            | ActivityErased()  # a skeleton: not open, no due_date, so no rows
        ):
            overdue_now = False
        case _:
            assert_never(event)
    document = event.document
    originator_id = event.originator_id
    assert isinstance(originator_id, UUID)
    version = int(event.originator_version)
    tenant = str(document["tenant_id"])
    remind = armed_reminder(document)
    reminder = DueRow(originator_id, "reminder", remind, version, tenant) if remind is not None else None
    due = None if document.get("due_date") is None else parse_datetime(document["due_date"])
    overdue: DueRow | None = None
    if due is not None:
        fired = overdue_now or (prior.overdue is not None and prior.overdue.fired and prior.overdue.due_at == due)
        if fired or is_open(document):
            overdue = DueRow(originator_id, "overdue", due, version, tenant, fired)
    return DueState(reminder, overdue)


def fold(priors: dict[UUID, DueState], events: Iterable[Any]) -> dict[UUID, DueState]:
    """The index's state of every activity in a page after its events (in log order)."""
    states = dict(priors)
    for event in events:
        originator_id = event.originator_id
        states[originator_id] = next_due(states.get(originator_id, DueState()), event)
    return states


def due_now(rows: Iterable[DueRow], now: datetime) -> list[DueRow]:
    """The rows a firing loop fires at `now`: not fired, due at or before it, earliest first."""
    return sorted((row for row in rows if not row.fired and row.due_at <= now), key=lambda row: row.due_at)


# ---------------------------------------------------------------------------------------------
# The index: a handler of the tracked-consumer core
# ---------------------------------------------------------------------------------------------


def _schema() -> list[sql.Composed]:
    due, tracking = sql.Identifier(DUE_TABLE), sql.Identifier(DUE_TRACKING_TABLE)
    return [
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (activity_id uuid NOT NULL, kind text NOT NULL, "
            "due_at timestamptz NOT NULL, version bigint NOT NULL, tenant_id text NOT NULL, "
            "fired boolean NOT NULL DEFAULT false, PRIMARY KEY (activity_id, kind))"
        ).format(due),
        # the firing loop's one question: the next rows not yet fired, in key order (its sweep's keyset)
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (due_at, activity_id, kind) WHERE NOT fired").format(
            sql.Identifier(DUE_TABLE + "_sweep"), due
        ),
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, position bigint NOT NULL)").format(tracking),
    ]


Fire = Callable[[Sequence[DueRow]], Awaitable[list[int | None]]]
"""Fire rows through the application: per row, the log position of the activity's event after
the firing (what it appended, or its latest event when it decided to nothing), None on failure."""


class DueIndex:
    """Keeps `activities_due` from the log (a `Handler` of `TrackedConsumer`) and, while it is the
    active instance, runs the `FiringLoop` over it."""

    def __init__(
        self,
        database_url: str,
        fire: Fire,
        *,
        name: str = SCHEDULER_SETTINGS.name,
        clock: Callable[[], datetime] | None = None,
        fire_batch: int = FIRE_BATCH,
    ) -> None:
        self.database_url = database_url
        self.name = name
        self.position = 0
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.loop = FiringLoop(database_url, fire, clock=clock, batch=fire_batch)
        self.loop.index_position = lambda: self.position

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(conninfo(self.database_url, connect_timeout=5))
        return self._conn

    async def resume(self) -> int:
        conn = await self._connection()
        await conn.rollback()
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (DUE_SCHEMA_LOCK,))
            for statement in _schema():
                await conn.execute(statement)
            await conn.execute(
                sql.SQL("INSERT INTO {} (name, position) VALUES (%s, 0) ON CONFLICT DO NOTHING").format(
                    sql.Identifier(DUE_TRACKING_TABLE)
                ),
                (self.name,),
            )
        self.position = await self._recorded(conn)
        self.loop.start()
        return self.position

    async def _recorded(self, conn: psycopg.AsyncConnection[Any]) -> int:
        cursor = await conn.execute(
            sql.SQL("SELECT position FROM {} WHERE name = %s").format(sql.Identifier(DUE_TRACKING_TABLE)),
            (self.name,),
        )
        row = await cursor.fetchone()
        await conn.commit()
        return int(row[0]) if row else 0

    async def handle(self, page: Sequence[Entry]) -> int:
        conn = await self._connection()
        last = page[-1].position
        ids = list(dict.fromkeys(entry.event.originator_id for entry in page))
        due, tracking = sql.Identifier(DUE_TABLE), sql.Identifier(DUE_TRACKING_TABLE)
        async with conn.transaction():
            cursor = await conn.execute(
                sql.SQL("UPDATE {} SET position = %s WHERE name = %s AND position = %s RETURNING position").format(
                    tracking
                ),
                (last, self.name, self.position),
            )
            if await cursor.fetchone() is None:  # another instance applied it: take its position
                moved = True
            else:
                moved = False
                cursor = await conn.execute(
                    sql.SQL(
                        "SELECT activity_id, due_at, version, tenant_id FROM {} "
                        "WHERE kind = 'overdue' AND fired AND activity_id = ANY(%s)"
                    ).format(due),
                    (ids,),
                )
                priors = {
                    row[0]: DueState(overdue=DueRow(row[0], "overdue", row[1], int(row[2]), row[3], True))
                    for row in await cursor.fetchall()
                }
                rows = [row for state in fold(priors, (entry.event for entry in page)).values() for row in state.rows()]
                await conn.execute(sql.SQL("DELETE FROM {} WHERE activity_id = ANY(%s)").format(due), (ids,))
                if rows:
                    await conn.execute(
                        sql.SQL(
                            "INSERT INTO {} (activity_id, kind, due_at, version, tenant_id, fired) "
                            "SELECT * FROM unnest(%s::uuid[], %s::text[], %s::timestamptz[], %s::bigint[], "
                            "%s::text[], %s::boolean[])"
                        ).format(due),
                        (
                            [r.activity_id for r in rows],
                            [r.kind for r in rows],
                            [r.due_at for r in rows],
                            [r.version for r in rows],
                            [r.tenant_id for r in rows],
                            [r.fired for r in rows],
                        ),
                    )
        self.position = await self._recorded(conn) if moved else last
        self.loop.wake()
        return self.position

    async def close(self) -> None:
        await self.loop.stop()
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


# ---------------------------------------------------------------------------------------------
# The firing loop
# ---------------------------------------------------------------------------------------------


def _utc_now() -> datetime:
    return datetime.now(UTC)


class FiringLoop:
    """Fires due rows of the index through `fire`, sleeping until the next due time.

    Runs only while its index is the active instance (`DueIndex.resume` starts it, `close`
    stops it). It sweeps the due rows in key order (`due_at`, `activity_id`, `kind`) with a keyset,
    `batch` rows at a time, up to `concurrency` batches in flight; a sweep that reaches the rows
    not yet due starts again from the earliest. `in_flight` keeps each fired row out of later
    sweeps until the index has applied the position its firing reached, so a row is fired again
    only if its firing failed. (Excluding in-flight rows in SQL instead cost PostgreSQL a
    comparison per row and in-flight id on every query: quadratic when firing fell behind.)
    """

    def __init__(
        self,
        database_url: str,
        fire: Fire,
        *,
        clock: Callable[[], datetime] | None = None,
        batch: int = FIRE_BATCH,
        concurrency: int = FIRE_CONCURRENCY,
    ) -> None:
        self.database_url = database_url
        self.fire = fire
        self.clock = clock or _utc_now
        self.batch = batch
        self.concurrency = concurrency
        self.index_position: Callable[[], int] = lambda: 0
        self.in_flight: dict[tuple[UUID, str], int] = {}
        self.fired = 0  # firings handed to the application (counters for tests and the benchmark)
        self.failures = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(concurrency)
        self._sweep: tuple[datetime, UUID, str] | None = None  # the last key of the sweep under way
        self._sweep_fired = False

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._sweep, self._sweep_fired = None, False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="scheduler-firing")

    async def stop(self) -> None:
        task, self._task = self._task, None
        for pending in [*self._batches, *([task] if task is not None else [])]:
            pending.cancel()
        for pending in [*self._batches, *([task] if task is not None else [])]:
            with contextlib.suppress(asyncio.CancelledError):
                await pending
        self._batches.clear()
        self._slots = asyncio.Semaphore(self.concurrency)
        self.in_flight.clear()

    def wake(self) -> None:
        """Look again now (the index changed)."""
        self._wake.set()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    conninfo(self.database_url, connect_timeout=5), autocommit=True
                ) as conn:
                    delay = 0.1
                    while True:
                        await self._step(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: try again, backing off
                self.failures += 1
                log.warning("firing loop failed; retrying", extra={"error": describe(exc), "retry_in_s": delay})
                self._sweep = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_SLEEP_S)

    async def _step(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._wake.clear()  # before reading: a wake-up during the read is not lost
        self._prune()
        now = self.clock()
        rows = await self._due(conn, now)
        if rows:
            last = rows[-1]
            self._sweep = (last.due_at, last.activity_id, last.kind)
            fresh = [row for row in rows if (row.activity_id, row.kind) not in self.in_flight]
            if fresh:
                self._sweep_fired = True
                for row in fresh:
                    self.in_flight[(row.activity_id, row.kind)] = PENDING
                await self._slots.acquire()
                batch = asyncio.get_running_loop().create_task(self._fire(fresh), name="scheduler-fire-batch")
                self._batches.add(batch)
                batch.add_done_callback(self._batches.discard)
            return
        swept, fired = self._sweep is not None, self._sweep_fired
        self._sweep, self._sweep_fired = None, False
        if swept and fired:
            return  # sweep again at once: more may have come due meanwhile
        cursor = await conn.execute(
            sql.SQL("SELECT min(due_at) FROM {} WHERE NOT fired AND due_at > %s").format(sql.Identifier(DUE_TABLE)),
            (now,),
        )
        earliest = await cursor.fetchone()
        sleep = MAX_SLEEP_S
        if earliest is not None and earliest[0] is not None:
            sleep = min(sleep, max((earliest[0] - self.clock()).total_seconds(), 0.0))
        if sleep > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), sleep)

    async def _due(self, conn: psycopg.AsyncConnection[Any], now: datetime) -> list[DueRow]:
        """The next rows of the sweep that are due at `now`, in key order."""
        after, params = sql.SQL(""), list[Any]([now])
        if self._sweep is not None:
            after = sql.SQL("AND (due_at, activity_id, kind) > (%s, %s, %s) ")
            params += [*self._sweep]
        cursor = await conn.execute(
            sql.SQL(
                "SELECT activity_id, kind, due_at, version, tenant_id FROM {} WHERE NOT fired AND due_at <= %s "
                "{}ORDER BY due_at, activity_id, kind LIMIT %s"
            ).format(sql.Identifier(DUE_TABLE), after),
            [*params, self.batch],
        )
        return [DueRow(r[0], r[1], r[2], int(r[3]), r[4]) for r in await cursor.fetchall()]

    async def _fire(self, rows: list[DueRow]) -> None:
        try:
            try:
                positions = await self.fire(rows)
            except Exception as exc:  # a bug or the store: every row of the batch is retried
                log.warning("firing a batch failed", extra={"error": describe(exc), "rows": len(rows)})
                positions = [None] * len(rows)
            reached = self.index_position()
            failed = 0
            for row, position in zip(rows, positions, strict=True):
                key = (row.activity_id, row.kind)
                if position is None:
                    failed += 1
                    self.in_flight.pop(key, None)  # fired again by the next sweep
                else:
                    # one that decided to nothing stays out until the index's next page
                    self.in_flight[key] = max(position, reached + 1)
            self.fired += len(rows) - failed
            if failed:
                log.warning("firings failed; retrying", extra={"failed": failed, "fired": len(rows)})
                await asyncio.sleep(0.2)  # the store or the batcher is in trouble: do not spin
                self._wake.set()
        finally:
            self._slots.release()

    def _prune(self) -> None:
        reached = self.index_position()
        if self.in_flight:
            self.in_flight = {key: position for key, position in self.in_flight.items() if position > reached}
