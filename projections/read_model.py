"""The read model: a projection of the event store's log into the `activities` table.

Every event carries the whole document after it, so the projection is an upsert of the document
by id, guarded by version, and needs no state of its own. Rows and the tracking position are
written in one transaction (exactly once: a batch either lands with its position or not at all),
many events per transaction for throughput.

`Projector` is the projection as a handler of the tracked-consumer core (projections/consumer.py),
which pages the log after the tracked position, wakes on LISTEN/NOTIFY, backs off on failure and
runs one active instance; `PROJECTOR_SETTINGS` is how the service runs it.
`rebuild` builds a fresh copy aside while the old one keeps serving, then switches in one
transaction.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import orjson
from eventsourcing.application import Application
from eventsourcing.persistence import IntegrityError, Notification, Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from psycopg import Cursor, sql
from psycopg.rows import DictRow

from projections.consumer import ConsumerSettings, Entry, schema_lock
from projections.database import url_datastore
from projections.errors import describe
from projections.migrations import create_fresh, migrate, record_all
from projections.queries import (
    READ_MODEL_TABLE,
    TRACKING_TABLE,
    build_apply_sql,
    build_load_from_log_sql,
    build_position_sql,
    build_upsert_sql,
    scoped_views,
    table_identifier,
)

log = logging.getLogger("activities.read_model")

T = TypeVar("T")

BATCH_SIZE: Final = 500
"""Events applied per transaction at most (one page of the log)."""

POLL_INTERVAL_S: Final = 0.5
"""Fallback poll when no NOTIFY arrives (e.g. while the LISTEN connection is being re-made)."""

REBUILD_SUFFIX: Final = "_rebuild"


READER_ROLE: Final = "activities_reader"
SCHEMA_LOCK: Final = 7_146_501_221  # advisory lock key of read-model schema changes


def ensure_reader_role(datastore: PostgresDatastore, table: str) -> None:
    """The NOLOGIN role read-model queries run as, so row-level security binds them even when the
    service connects as a superuser (superusers bypass RLS, roles they switch to do not).
    Skipped, with a log line, where the service's user may not create roles."""
    try:
        with datastore.transaction(commit=True) as curs:
            curs.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (READER_ROLE,))
            if curs.fetchone() is None:
                curs.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(READER_ROLE)))
        with datastore.transaction(commit=True) as curs:
            curs.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(sql.Identifier(READER_ROLE)))
            for name in (table, *scoped_views(table), TRACKING_TABLE):
                curs.execute(
                    sql.SQL("GRANT SELECT ON {} TO {}").format(table_identifier(name), sql.Identifier(READER_ROLE))
                )
    except Exception as exc:  # e.g. no CREATEROLE: RLS still binds a non-superuser owner (FORCE)
        log.warning("read-model reader role not set up", extra={"error": describe(exc)})


def prepare_read_model(database_url: str) -> list[int]:
    """Bring the read model to the current schema: its pending migrations (projections/migrations.py),
    then the reader role's grants on it; the versions applied. When nothing is pending this only
    reads the migrations table, so every process may call it on start."""
    return migrate(database_url, after_first=grant_reader)


def grant_reader(database_url: str, table: str) -> None:
    datastore = read_model_datastore(database_url, pool_size=1)
    try:
        ensure_reader_role(datastore, table)
    finally:
        datastore.close()


def read_model_datastore(database_url: str, pool_size: int = 2) -> PostgresDatastore:
    """A small connection pool of the read model's own (separate from the command path's)."""
    return url_datastore(
        database_url,
        pool_size=pool_size,
        max_overflow=2,
        connect_timeout=5,
        lock_timeout=30,
    )


@dataclass(frozen=True)
class Row:
    """The latest document of one activity in a batch and the log position of its event."""

    document: dict[str, Any]
    position: int


class ReadModelRecorder(PostgresTrackingRecorder):
    """The read-model table and the tracking table, written in one transaction."""

    def __init__(self, datastore: PostgresDatastore, table: str = READ_MODEL_TABLE, with_indexes: bool = True) -> None:
        super().__init__(datastore, tracking_table_name=TRACKING_TABLE)
        self.table = table
        self.with_indexes = with_indexes
        self.index_statements: list[str] = []  # left out by `with_indexes=False`: built after a bulk load
        self._upsert = build_upsert_sql(table)
        self._apply = build_apply_sql(table, TRACKING_TABLE)

    def create_indexes(self, workers: int = 1) -> None:
        """The secondary indexes left out by `with_indexes=False`, built `workers` at a time
        (index builds on one table do not block each other; each sorts on one core)."""

        def build(statement: str) -> None:
            with self.datastore.transaction(commit=True) as curs:
                curs.execute("SET LOCAL max_parallel_maintenance_workers = 0")  # the parallelism is ours
                curs.execute(sql.SQL(statement))

        builds = [statement for statement in self.index_statements if statement.upper().startswith("CREATE INDEX")]
        with ThreadPoolExecutor(workers, thread_name_prefix="rebuild-index") as pool:
            list(pool.map(build, builds))
        for statement in self.index_statements:  # the built indexes' settings (migrations' after_indexes)
            if statement not in builds:
                build(statement)

    def create_table(self) -> None:
        """A new table (a rebuild's copy aside, a test's) with every migration. The live table is
        made and changed by `prepare_read_model` instead, once. Serialised by an advisory lock: two
        processes creating tables at once collide in pg_type."""
        with schema_lock(self.datastore, SCHEMA_LOCK), self.datastore.get_connection() as conn:
            self.index_statements = create_fresh(conn, self.table, self.with_indexes)
        ensure_reader_role(self.datastore, self.table)

    def upsert(self, curs: Cursor[DictRow], rows: Sequence[Row]) -> None:
        """Upsert documents (newer versions only) inside the caller's transaction."""
        if rows:
            curs.execute(self._upsert, _as_json_arrays(rows))

    def apply(self, rows: Sequence[Row], tracking: Tracking) -> None:
        """Rows and the position they bring the model to, in one statement (one transaction);
        IntegrityError when another projector has already reached that position."""
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._apply, (*_as_json_arrays(rows), tracking.application_name, tracking.notification_id))
            if curs.fetchone() is None:
                raise IntegrityError(f"{tracking.application_name} is already at {tracking.notification_id} or beyond")

    def position(self, application_name: str) -> int:
        return self.max_tracking_id(application_name) or 0


def _as_json_arrays(rows: Sequence[Row]) -> tuple[str, str]:
    """The documents and positions of rows as two JSON arrays (the upsert's two parameters)."""
    documents = orjson.dumps([row.document for row in rows]).decode()
    positions = orjson.dumps([row.position for row in rows]).decode()
    return documents, positions


def latest_rows(events: Sequence[tuple[Any, int]]) -> list[Row]:
    """One row per activity: the document of its highest version in the batch."""
    latest: dict[str, Row] = {}
    for event, position in events:
        document = event.document
        current = latest.get(document["id"])
        if current is None or current.document["version"] < document["version"]:
            latest[document["id"]] = Row(document, position)
    return list(latest.values())


def read_page(app: Application[Any], after: int, limit: int, stop: int | None = None) -> list[Notification]:
    """The notifications of the log after a position (the library caps its own log reader at 10)."""
    return list(app.recorder.select_notifications(after + 1, limit, stop=stop))


def to_events(app: Application[Any], notifications: Sequence[Notification]) -> list[tuple[Any, int]]:
    return [(app.mapper.to_domain_event(n), n.id) for n in notifications]


# ---------------------------------------------------------------------------------------------
# The projector: a handler of the tracked-consumer core
# ---------------------------------------------------------------------------------------------


PROJECTOR_SETTINGS: Final = ConsumerSettings(
    name="activities:projector", page_size=BATCH_SIZE, poll_interval_s=POLL_INTERVAL_S
)
"""How the service runs the projector (one active per store, by this name)."""


class Projector:
    """Projects pages of the log into the read model: a `Handler` of `TrackedConsumer`.

    Each page is one transaction: the newest document of each activity in the page, upserted
    (newer versions only), and the tracking position of the page's last event. A page this
    projector has already applied (another instance got there first, or a crash after the
    commit) is refused whole by the tracking guard; the projector then moves to the recorded
    position instead. Its database work runs in `executor` (default: asyncio's).
    """

    def __init__(
        self,
        app: Application[Any],
        database_url: str,
        *,
        table: str = READ_MODEL_TABLE,
        executor: Executor | None = None,
    ) -> None:
        self.database_url = database_url
        self.table = table
        self.executor = executor
        self.application_name = app.name
        self._datastore: PostgresDatastore | None = None
        self._recorder: ReadModelRecorder | None = None

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def resume(self) -> int:
        return await self._in_thread(self._resume)

    def _resume(self) -> int:
        if self._datastore is None:
            self._datastore = read_model_datastore(self.database_url)
        recorder = ReadModelRecorder(self._datastore, self.table)  # the table: `prepare_read_model`, on start
        self._recorder = recorder
        return recorder.position(self.application_name)

    async def handle(self, page: Sequence[Entry]) -> int:
        return await self._in_thread(self._apply, page)

    def _apply(self, page: Sequence[Entry]) -> int:
        assert self._recorder is not None, "resume() first"
        last = page[-1].position
        try:
            self._recorder.apply(latest_rows(page), Tracking(self.application_name, last))
        except IntegrityError:
            # Another projector got there first: its rows are as good as ours. Re-read its position.
            return self._recorder.position(self.application_name)
        return last

    async def close(self) -> None:
        datastore, self._datastore, self._recorder = self._datastore, None, None
        if datastore is not None:  # a regained leadership opens a fresh pool
            await self._in_thread(datastore.close)


# ---------------------------------------------------------------------------------------------
# Status and rebuild
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """How far the read model is behind the log."""

    position: int
    log_position: int
    rows: int

    @property
    def lag(self) -> int:
        return max(self.log_position - self.position, 0)


def status(app: Application[Any], datastore: PostgresDatastore, table: str = READ_MODEL_TABLE) -> Status:
    """Read-only: a read model not created yet is at position 0 with no rows."""
    with datastore.transaction(commit=False) as curs:
        if not _table_exists(curs, table) or not _table_exists(curs, TRACKING_TABLE):
            return Status(0, app.recorder.max_notification_id() or 0, 0)
        curs.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(table_identifier(table)))
        row = curs.fetchone()
    rows = int(row["n"]) if row else 0
    return Status(ReadModelRecorder(datastore, table).position(app.name), app.recorder.max_notification_id() or 0, rows)


def _drop_table(curs: Cursor[DictRow], table: str) -> None:
    """Drop a read-model table with its caller-scoped views (CASCADE: they are all that depends on it)."""
    curs.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(table_identifier(table)))


def _set_tracking(curs: Cursor[DictRow], name: str, position: int) -> None:
    curs.execute(
        sql.SQL(
            "INSERT INTO {} (application_name, notification_id) VALUES (%s, %s) "
            "ON CONFLICT (application_name) DO UPDATE SET notification_id = EXCLUDED.notification_id"
        ).format(table_identifier(TRACKING_TABLE)),
        (name, position),
    )


def _delete_tracking(curs: Cursor[DictRow], name: str) -> None:
    curs.execute(
        sql.SQL("DELETE FROM {} WHERE application_name = %s").format(table_identifier(TRACKING_TABLE)), (name,)
    )


def _table_exists(curs: Cursor[DictRow], table: str) -> bool:
    curs.execute("SELECT to_regclass(%s) IS NOT NULL AS present", (f'public."{table}"',))
    row = curs.fetchone()
    return bool(row and row["present"])


REBUILD_WORKERS: Final = 1
"""Connections a rebuild works on side by side, loading and then indexing: both are CPU-bound in
PostgreSQL (parsing the events' JSON, sorting for an index), a core each. One by default, so that
the reads the live table keeps serving have a core: with two on a 2-core machine the reads' p99
was five times its usual (bench/rebuild_reads.py, 2026-12-06). `--workers` for a faster rebuild
where the reads can wait."""

CATCH_UP_GAP: Final = 50
"""Events the copy may still lack when the switch locks the live table: the switch applies them
under the lock, which every read waits for (about 0.2-0.7 ms an event measured here)."""


def rebuild(
    app: Application[Any],
    datastore: PostgresDatastore,
    progress: Callable[[int, int], None] = lambda done, total: None,
    table: str = READ_MODEL_TABLE,
    batch_size: int = 2000,
    workers: int = REBUILD_WORKERS,
) -> int:
    """Build the read model again from the whole log, aside, then switch it in; the final position.

    The live table keeps serving (and the live projector keeps applying) while the copy is built
    under `<table>_rebuild` with its own tracking row and every read-model migration, then catches
    up with the log, still outside any lock. Only then the switch, one transaction: it locks the
    live table (waiting for the projector's batch in flight), brings the copy to exactly the live
    position (the last few events), drops the live table and renames the copy and its indexes in
    its place, so reads wait for a few events' work, not for the catch-up.
    """
    aside = table + REBUILD_SUFFIX
    aside_name = app.name + REBUILD_SUFFIX
    with datastore.transaction(commit=True) as curs:
        _drop_table(curs, aside)
    recorder = ReadModelRecorder(datastore, aside, with_indexes=False)
    recorder.create_table()
    with datastore.transaction(commit=True) as curs:
        _delete_tracking(curs, aside_name)
    total = app.recorder.max_notification_id() or 0
    progress(0, total)
    if app.mapper.cipher is None:  # plain JSON in the log: project it in SQL, range by range
        position = _load_in_sql(app, datastore, aside, aside_name, total, progress, workers)
    else:
        position = 0
        for rows, last in _decoded_pages(app, batch_size):  # decoding the next page overlaps this write
            recorder.apply(rows, Tracking(aside_name, last))
            position = last
            total = max(total, position)
            progress(position, total)
    recorder.create_indexes(workers=workers)
    position = _catch_up(app, recorder, aside_name, position, batch_size, progress)
    with datastore.transaction(commit=True) as curs:  # statistics for the planner before it serves
        curs.execute(sql.SQL("ANALYZE {}").format(table_identifier(aside)))
    return _switch(app, datastore, recorder, table, aside, aside_name, position, batch_size)


def _catch_up(
    app: Application[Any],
    recorder: ReadModelRecorder,
    tracking_name: str,
    position: int,
    batch_size: int,
    progress: Callable[[int, int], None],
) -> int:
    """Apply to the copy what was written since it was loaded, without any lock, until it is
    within CATCH_UP_GAP events of the log's head; the position reached."""
    while True:
        head = app.recorder.max_notification_id() or 0
        if head - position <= CATCH_UP_GAP:
            return position
        while position < head:
            notifications = read_page(app, position, batch_size, stop=head)
            if not notifications:
                break
            recorder.apply(latest_rows(to_events(app, notifications)), Tracking(tracking_name, notifications[-1].id))
            position = notifications[-1].id
            progress(position, head)


def _load_in_sql(
    app: Application[Any],
    datastore: PostgresDatastore,
    table: str,
    tracking_name: str,
    head: int,
    progress: Callable[[int, int], None],
    workers: int,
    chunk: int = 50_000,
) -> int:
    """Load the log up to `head` into `table` in SQL, a chunk of positions per transaction.

    The activities are split into `workers` disjoint partitions loaded side by side, so two
    workers never write the same row; the tracking position is set once all reached `head` (a
    rebuild that stops half way is started again from scratch)."""
    events_table = getattr(app.recorder, "events_table_name", "activities_events")
    statement = build_load_from_log_sql(table, events_table)
    done = [0] * workers
    lock = threading.Lock()

    def load(partition: int) -> None:
        position = 0
        while position < head:
            upto = min(position + chunk, head)
            with datastore.transaction(commit=True) as curs:
                curs.execute(statement, (position, upto, workers, partition))
            position = upto
            with lock:
                done[partition] = position
                progress(sum(done) // workers, head)

    with ThreadPoolExecutor(workers, thread_name_prefix="rebuild-load") as pool:
        for future in [pool.submit(load, partition) for partition in range(workers)]:
            future.result()
    with datastore.transaction(commit=True) as curs:
        _set_tracking(curs, tracking_name, head)
    return head


def _decoded_pages(app: Application[Any], batch_size: int) -> Iterator[tuple[list[Row], int]]:
    """(rows, last position) of each page of the whole log, read and decoded one page ahead."""
    pages: queue.Queue[tuple[list[Row], int] | BaseException | None] = queue.Queue(maxsize=2)

    def produce() -> None:
        try:
            position = 0
            while True:
                notifications = read_page(app, position, batch_size)
                if not notifications:
                    break
                position = notifications[-1].id
                pages.put((latest_rows(to_events(app, notifications)), position))
            pages.put(None)
        except BaseException as exc:  # handed to the consumer, which raises it
            pages.put(exc)

    threading.Thread(target=produce, name="rebuild-reader", daemon=True).start()
    while (item := pages.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item


def _switch(
    app: Application[Any],
    datastore: PostgresDatastore,
    recorder: ReadModelRecorder,
    table: str,
    aside: str,
    aside_name: str,
    position: int,
    batch_size: int,
) -> int:
    live = table_identifier(table)
    with datastore.transaction(commit=True) as curs:
        curs.execute("SET LOCAL lock_timeout = '30s'")
        if _table_exists(curs, table):
            curs.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(live))
        statement, params = build_position_sql(TRACKING_TABLE, app.name)
        curs.execute(statement + sql.SQL(" FOR UPDATE"), params)
        row = curs.fetchone()
        live_position = int(row["notification_id"]) if row and row["notification_id"] is not None else 0
        while position < live_position:  # catch the copy up to exactly where the live one is
            notifications = read_page(app, position, batch_size, stop=live_position)
            if not notifications:
                break
            recorder.upsert(curs, latest_rows(to_events(app, notifications)))
            position = notifications[-1].id
        final = max(position, live_position)
        _drop_table(curs, table)
        curs.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(table_identifier(aside), live))
        for aside_view, live_view in zip(scoped_views(aside), scoped_views(table), strict=True):
            # the copy's views follow its table; they take the live views' names
            curs.execute(
                sql.SQL("ALTER VIEW {} RENAME TO {}").format(table_identifier(aside_view), table_identifier(live_view))
            )
        curs.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND tablename = %s", (table,))
        for (index_name,) in [(r["indexname"],) for r in curs.fetchall()]:
            if index_name.startswith(aside):
                renamed = table + index_name[len(aside) :]
                curs.execute(
                    sql.SQL("ALTER INDEX {} RENAME TO {}").format(sql.Identifier(index_name), sql.Identifier(renamed))
                )
        _set_tracking(curs, app.name, final)
        _delete_tracking(curs, aside_name)
        record_all(curs, table)  # the copy was made with every migration
    log.info("read model rebuilt and switched", extra={"position": final})
    return final
