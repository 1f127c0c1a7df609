"""The query gateway: get, list, stats and history, shared by the NATS query subjects and HTTP.

Lists and current documents come only from the PostgreSQL read model (async psycopg pool);
old versions (`version=n`) and histories come from the event store (synchronous, through the
store's thread pool). Every read first honours `min_position` (read-your-writes) and reports
`meta.position`, the read model's position read before the data, so the data is at least that new.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Final

import orjson
import psycopg
from eventsourcing.persistence import InterfaceError as StoreInterfaceError
from eventsourcing.persistence import Notification
from eventsourcing.persistence import OperationalError as StoreOperationalError
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from activities_client.document import format_datetime
from activities_client.errors import ActivitiesError, Gone, InternalError, NotFound, Unavailable, field_error
from events.activity import activity_uuid, event_body
from projections.database import conninfo
from projections.occurrences import (
    OccurrenceKey,
    OccurrencesQuery,
    build_candidates_sql,
    build_documents_sql,
    page_of,
    parse_occurrences_query,
)
from projections.queries import (
    MATCHES_FIRST_FILTERS,
    READ_MODEL_TABLE,
    TRACKING_TABLE,
    CursorCodec,
    GetQuery,
    ListPlan,
    ListQuery,
    Params,
    PlannedList,
    StatsQuery,
    build_get_by_key_sql,
    build_get_sql,
    build_history_sql,
    build_list_sql,
    build_position_sql,
    build_sort_span_sql,
    build_stats_sql,
    keyset_of,
    params_from_json,
    parse_get_by_key_query,
    parse_get_query,
    parse_list_query,
    parse_stats_query,
    scoped_view,
    searches_by_month_index,
    searches_by_prefix_index,
)
from projections.read_model import READER_ROLE
from services.application import ActivitiesApplication
from services.auth import TokenVerifier
from services.domain import Caller, is_visible
from services.gateway import header

log = logging.getLogger("activities.queries")

POLL_INTERVAL_S: Final = 0.01
OCCURRENCE_READ_ATTEMPTS: Final = 3
NO_ROWS: Final = sql.SQL("SELECT 1 WHERE false")
READ_LOCK_TIMEOUT: Final = "100ms"
READ_LOCK_WAITS: Final = 8
READ_LOCK_PAUSE_S: Final = 0.02
SEARCH_PLAN_TTL_S: Final = 60.0
PREFIX_INDEX: Final = "search_prefixes"  # read-model migration 11
MONTH_PREFIX_INDEX: Final = "search_month_prefixes"  # read-model migration 13
SEARCH_PLANS_KEPT: Final = 4096


class ListPlans:
    """How each list that filters by a GIN-indexed condition (`q`, `participant`, `tag`) is read,
    decided once a minute per list (its caller's scope, filters and sort), so that the pages of one
    list and the same list repeated cost one EXPLAIN.

    The planner chooses between walking a sort index, checking each row (right when matches are
    common: 51 are met soon), and finding every match in the GIN index first, then sorting (right
    for rare ones). `projections.queries.plan_prefers_matches_first` corrects its choice where it
    walks though it expects few matches, and reads `q` by the prefix index (read-model migration
    11) where it would read the search index, which finds the same rows more slowly. Matches
    first, a list of 2,000 expected matches or more is read in windows of its sort value
    (sort_windows), sized from the planner's expected matches and the scope's span of values,
    which a new activity may pass within the minute: the first window is open on that side. `q`
    sorted by `activity_date` reads windows of a few months by the month prefix index (read-model
    migration 13), and from 300 expected matches."""

    def __init__(self, ttl_s: float = SEARCH_PLAN_TTL_S, kept: int = SEARCH_PLANS_KEPT) -> None:
        self._ttl_s = ttl_s
        self._kept = kept
        self._plans: dict[Any, tuple[float, PlannedList]] = {}

    def get(self, key: Any) -> PlannedList | None:
        found = self._plans.get(key)
        if found is None or found[0] < time.monotonic():
            return None
        return found[1]

    def put(self, key: Any, planned: PlannedList) -> None:
        if len(self._plans) >= self._kept:
            self._plans.clear()  # plans are cheap to make again; a bound is what matters
        self._plans[key] = (time.monotonic() + self._ttl_s, planned)


STORE_DISCONNECTED: Final = (psycopg.OperationalError, StoreOperationalError, StoreInterfaceError, OSError)
"""A read of the event store that failed for its connection (the library wraps psycopg's errors)."""

class ReadModel:
    """Async reads of the read-model table and of its tracked position."""

    def __init__(
        self,
        database_url: str,
        pool_size: int,
        application_name: str,
        table: str = READ_MODEL_TABLE,
    ) -> None:
        self.table = table
        self.application_name = application_name
        self._pool = AsyncConnectionPool(
            conninfo(database_url),
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=5,
            kwargs={"autocommit": True, "row_factory": dict_row},
            configure=self._configure,
        )
        position_sql, _ = build_position_sql(TRACKING_TABLE, application_name)
        self._position_sql = position_sql
        self._scoped_position_sql = sql.SQL(
            "SELECT set_config('activities.tenant_id', %s, true), set_config('activities.app_id', %s, true), "
            "({}) AS notification_id"
        ).format(position_sql)
        self._opened = False
        self._open_lock = asyncio.Lock()
        self._known = 0  # highest position known to be applied (from the projector or a poll)
        self._advanced = asyncio.Condition()
        self._poller: asyncio.Task[None] | None = None
        self._waiters = 0
        self._list_plans = ListPlans()
        self._indexes_checked: dict[str, tuple[float, bool]] = {}  # index suffix: (when, whether usable)

    @staticmethod
    async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
        """Every read-model connection is a scoped reader (row-level security, schema.sql), and
        plans without parallel workers: reads are many small queries side by side, and starting
        two workers (1-3 ms) cost a search of rare words more than they saved (10.3 against 3.7 ms
        for 2,700 matches of 1,000,000). Lists read in windows rely on it too (build_list_sql)."""
        set_json_loads(orjson.loads, conn)
        await conn.execute("SET activities.reader = 'on'")
        await conn.execute("SET max_parallel_workers_per_gather = 0")
        await conn.execute(f"SET lock_timeout = '{READ_LOCK_TIMEOUT}'")  # see _fetch
        with contextlib.suppress(psycopg.Error):  # no such role, or not allowed: FORCE RLS binds the owner
            await conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(READER_ROLE)))

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        return self._pool

    async def open(self) -> None:
        async with self._open_lock:
            if not self._opened:
                await self._pool.open(wait=False)
                self._opened = True

    async def close(self) -> None:
        if self._opened:
            await self._pool.close()
            self._opened = False

    def notify_position(self, position: int) -> None:
        """Called from the in-process projector's thread: wake the readers waiting for a position."""
        try:
            loop = self._loop
        except AttributeError:
            return
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._advance(position)))

    async def _advance(self, position: int) -> None:
        """Record a position the read model has reached and let every waiter look again (always:
        reads also raise `_known` as they pass, without waking anyone)."""
        self._known = max(self._known, position)
        async with self._advanced:
            self._advanced.notify_all()

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    async def _fetch(
        self, statement: Any, params: list[Any], caller: Caller | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        """(position, rows): the read model's position, then the rows of `statement`, in one
        transaction scoped to the caller (row-level security then sees only the caller's tenant and
        app; the scope is local to the transaction, so a connection back in the pool is scoped to
        nobody, and an unscoped read sees no rows).

        Connections are not checked when they leave the pool (a round trip per read): a read on a
        connection that broke since its last use (PostgreSQL restarted) is retried once, on a
        fresh one. A read that waited READ_LOCK_TIMEOUT for a lock (a rebuild switching the table,
        a migration's DDL) gives up its locks and is tried again after a pause: waiting on, it
        could hold the view's lock that the switch needs next, a deadlock PostgreSQL breaks only
        after a second (`deadlock_timeout`), failing one side."""
        await self.open()
        reconnected = False
        for lock_wait in range(READ_LOCK_WAITS):
            try:
                async with self._pool.connection() as conn:
                    try:
                        return await self._read(conn, statement, params, caller)
                    except psycopg.errors.LockNotAvailable:
                        raise
                    except psycopg.OperationalError:
                        if reconnected or not conn.broken:
                            raise
                    # the others may be dead too (a failover): check the idle ones first
                    reconnected = True
                    await self._pool.check()
                    continue
            except psycopg.errors.UndefinedTable:
                return 0, []  # the projector has not created the read model yet: nothing is there
            except psycopg.errors.LockNotAvailable:
                await asyncio.sleep(READ_LOCK_PAUSE_S * (lock_wait + 1))  # the table is being switched
                continue
            except (psycopg.OperationalError, PoolTimeout) as exc:
                raise Unavailable("the read model is unavailable; retry") from exc
        raise Unavailable("the read model is unavailable; retry")

    async def _read(
        self, conn: psycopg.AsyncConnection[Any], statement: Any, params: list[Any], caller: Caller | None
    ) -> tuple[int, list[dict[str, Any]]]:
        """One round trip: `BEGIN; <scope and position>; <statement>; COMMIT` as a single simple
        query, its parameters bound by psycopg on the client (quoted by libpq). A prepared,
        pipelined transaction took more CPU here than the whole query: libpq sent each message
        with its own system call."""
        if caller is None:
            head, head_params = self._position_sql, [self.application_name]
        else:
            head, head_params = (
                self._scoped_position_sql,
                [caller.tenant_id, caller.app_id or "", self.application_name],
            )
        body = NO_ROWS if statement is None else sql.SQL(statement) if isinstance(statement, str) else statement
        cursor = psycopg.AsyncClientCursor(conn, row_factory=dict_row)
        try:
            await cursor.execute(sql.SQL("BEGIN; {}; {}; COMMIT").format(head, body), [*head_params, *params])
        except psycopg.Error:
            if not conn.broken and conn.info.transaction_status != TransactionStatus.IDLE:
                await conn.execute("ROLLBACK")  # the failed statement left the transaction open
            raise
        cursor.nextset()  # past BEGIN
        row = await cursor.fetchone()
        cursor.nextset()
        rows = list(await cursor.fetchall())
        position = int(row["notification_id"]) if row and row["notification_id"] is not None else 0
        self._known = max(self._known, position)
        return position, rows

    async def position(self) -> int:
        position, _ = await self._fetch(None, [])
        return position

    async def wait_for(self, min_position: int | None, timeout_s: float) -> None:
        """Return once the read model has applied `min_position`, or raise `unavailable`.

        Waiters share what is known: the in-process projector announces each position, and one
        poller (only while someone waits) reads it from PostgreSQL every 10 ms when the projector
        runs elsewhere, so a thousand waiting reads cost one query per poll, not a thousand.
        """
        if min_position is None or self._known >= min_position:
            return
        self._waiters += 1
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        try:
            async with self._advanced:
                await asyncio.wait_for(self._advanced.wait_for(lambda: self._known >= min_position), timeout_s)
        except TimeoutError:
            raise Unavailable(f"the read model has not reached position {min_position} yet; retry") from None
        finally:
            self._waiters -= 1

    async def _poll(self) -> None:
        while self._waiters > 0:
            with contextlib.suppress(Unavailable):
                await self._advance(await self.position())
            await asyncio.sleep(POLL_INTERVAL_S)

    async def get(self, activity_id: str, caller: Caller) -> tuple[int, dict[str, Any] | None]:
        statement, params = build_get_sql(scoped_view(self.table, caller), activity_id, caller)
        position, rows = await self._fetch(statement, params, caller)
        return position, (rows[0]["document"] if rows else None)

    async def get_by_key(self, external_key: str, caller: Caller) -> tuple[int, dict[str, Any] | None]:
        statement, params = build_get_by_key_sql(scoped_view(self.table, caller), external_key, caller)
        position, rows = await self._fetch(statement, params, caller)
        return position, (rows[0]["document"] if rows else None)

    async def page(
        self, query: ListQuery, caller: Caller, codec: CursorCodec
    ) -> tuple[int, list[orjson.Fragment], str | None]:
        """(position, documents, next cursor) of one page; each document is its stored JSON text,
        which `orjson.dumps` writes into the reply as it is."""
        after = codec.decode(query.cursor, query, caller) if query.cursor else None
        view = scoped_view(self.table, caller)
        plan = await self._list_plan(view, query, caller)
        statement, params = build_list_sql(view, query, caller, after, plan)
        position, rows = await self._fetch(statement, params, caller)
        next_cursor = None
        if len(rows) > query.limit:
            rows = rows[: query.limit]
            next_cursor = codec.encode(keyset_of(rows[-1], query.sort), query, caller)
        return position, [orjson.Fragment(row["document"]) for row in rows], next_cursor

    async def _list_plan(self, view: str, query: ListQuery, caller: Caller) -> ListPlan:
        """How a list is read (ListPlans): matches first when the planner's plan for it says so
        (plan_prefers_matches_first), then `q` by the prefix index when it is built, and in windows
        of the sort value when it expects many matches, by the month prefix index when it is built
        and serves the list (searches_by_month_index)."""
        if not any(name in query.filters for name in MATCHES_FIRST_FILTERS):
            return ListPlan()
        key = (caller.tenant_id, caller.app_id, orjson.dumps(query.binding(), option=orjson.OPT_SORT_KEYS))
        words = query.filters.get("q")
        prefix_index = bool(words and searches_by_prefix_index(words)) and await self._index_usable(PREFIX_INDEX)
        month_index = prefix_index and searches_by_month_index(query) and await self._index_usable(MONTH_PREFIX_INDEX)
        planned = self._list_plans.get(key)
        if planned is None:
            planned = await self._plan_list(view, query, caller, month_index)
            self._list_plans.put(key, planned)
        return planned.plan(query.limit + 1, prefix_index, month_index)

    async def _plan_list(self, view: str, query: ListQuery, caller: Caller, month_index: bool) -> PlannedList:
        statement, params = build_list_sql(view, query, caller)
        _, rows = await self._fetch(sql.SQL("EXPLAIN (FORMAT JSON) {}").format(statement), params, caller)
        planned = PlannedList.from_plan(rows[0]["QUERY PLAN"] if rows else None)
        if not planned.needs_span(month_index):
            return planned
        span_sql, span_params = build_sort_span_sql(view, query.sort, caller)
        _, span = await self._fetch(span_sql, span_params, caller)
        return planned.with_span(span[0]["first"], span[0]["last"]) if span else planned

    async def _index_usable(self, suffix: str) -> bool:
        """Whether the table's index `<table>_<suffix>` exists and is built (its read-model
        migration applied; not while another process builds it), looked up once a minute."""
        checked_at, usable = self._indexes_checked.get(suffix, (-float("inf"), False))
        if time.monotonic() - checked_at < SEARCH_PLAN_TTL_S:
            return usable
        _, rows = await self._fetch(
            "SELECT i.indisvalid AS usable FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relname = %s",
            [f"{self.table}_{suffix}"],
        )
        usable = bool(rows) and bool(rows[0]["usable"])
        self._indexes_checked[suffix] = (time.monotonic(), usable)
        return usable

    async def stats(self, query: StatsQuery, caller: Caller) -> tuple[int, list[dict[str, Any]]]:
        """(position, counts): `{"key", "count"}` rows, largest count first."""
        prefix_index = "q" in query.filters and await self._index_usable(PREFIX_INDEX)
        statement, params = build_stats_sql(scoped_view(self.table, caller), query, caller, prefix_index)
        position, rows = await self._fetch(statement, params, caller)
        return position, [{"key": row["key"], "count": int(row["count"])} for row in rows]


    async def occurrences(
        self, query: OccurrencesQuery, caller: Caller, codec: CursorCodec
    ) -> tuple[int, list[dict[str, Any]], str | None]:
        """(position, occurrences, next cursor) of one page of occurrences (projections/occurrences.py).

        Two reads: the candidates (ids, dates and recurrences), expanded here, then the documents of
        the page's activities. An activity written between the two (its version moved) makes the
        page be computed again, so every occurrence is served with the document it came from."""
        after = OccurrenceKey.from_json(codec.verify(query.cursor, query.binding(), caller)) if query.cursor else None
        for _ in range(OCCURRENCE_READ_ATTEMPTS):
            statement, params = build_candidates_sql(scoped_view(self.table, caller), query, caller, after)
            position, rows = await self._fetch(statement, params, caller)
            keys, more = page_of(rows, query, after)
            versions = {row["id"]: row["version"] for row in rows}
            ids = sorted({key.activity_id for key in keys})
            documents: dict[str, orjson.Fragment] = {}
            if ids:
                statement, params = build_documents_sql(scoped_view(self.table, caller), ids, caller)
                _, document_rows = await self._fetch(statement, params, caller)
                changed = any(row["version"] != versions[row["id"]] for row in document_rows)
                if changed or len(document_rows) != len(ids):
                    continue  # written in between: compute the page again from fresh candidates
                documents = {row["id"]: orjson.Fragment(row["document"]) for row in document_rows}
            data = [
                {
                    "activity_id": key.activity_id,
                    "occurrence_at": format_datetime(key.at),
                    "index": key.index,
                    "activity": documents[key.activity_id],
                }
                for key in keys
            ]
            next_cursor = codec.sign(keys[-1].to_json(), query.binding(), caller) if more else None
            return position, data, next_cursor
        raise Unavailable("the activities changed while the page was read; retry")


class EventStoreReads:
    """Old versions and histories, read from the event store on its thread pool."""

    def __init__(self, app: ActivitiesApplication, executor: Executor) -> None:
        self.app = app
        self._executor = executor

    async def _run(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function` on the store's thread pool. Its pooled connections may all have died at once
        (PostgreSQL restarted, or a standby promoted after a failover, which a multi-host URL then
        finds): after a failure the idle ones are checked, the dead replaced, and it is tried once more."""
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            try:
                return await loop.run_in_executor(self._executor, function, *args)
            except STORE_DISCONNECTED as exc:
                if attempt == 0:
                    with contextlib.suppress(Exception):
                        await loop.run_in_executor(self._executor, self.app.recorder.datastore.pool.check)  # type: ignore[attr-defined]
                    continue
                raise Unavailable("the event store is unavailable; retry") from exc
        raise AssertionError("unreachable")

    def _version(self, activity_id: str, version: int) -> dict[str, Any] | None:
        activity = self.app.load_version(activity_uuid(activity_id), version)
        if activity is None or activity.version != version:
            return None
        return activity.document

    async def version(self, activity_id: str, version: int) -> dict[str, Any] | None:
        """The document as it was at a version, or None when there is no such version."""
        result: dict[str, Any] | None = await self._run(self._version, activity_id, version)
        return result

    def _history(self, activity_id: str) -> list[tuple[Any, int]]:
        recorder = self.app.recorder
        statement = build_history_sql(recorder.events_table_name)  # type: ignore[attr-defined]
        with recorder.datastore.get_connection() as conn, conn.cursor() as curs:  # type: ignore[attr-defined]
            curs.execute(statement, (activity_uuid(activity_id),))
            rows = curs.fetchall()
        notifications = [
            Notification(
                id=row["notification_id"],
                originator_id=row["originator_id"],
                originator_version=row["originator_version"],
                topic=row["topic"],
                state=bytes(row["state"]),
            )
            for row in rows
        ]
        return [(self.app.mapper.to_domain_event(n), n.id) for n in notifications]

    async def history(self, activity_id: str) -> list[tuple[Any, int]]:
        """(event, position) of every stored event of an activity, oldest first."""
        result: list[tuple[Any, int]] = await self._run(self._history, activity_id)
        return result


Reply = tuple[int, dict[str, Any]]


class QueryGateway:
    """Authenticates, parses and answers queries; every outcome becomes one reply envelope."""

    def __init__(
        self,
        verifier: TokenVerifier,
        read_model: ReadModel,
        store: EventStoreReads,
        codec: CursorCodec,
        consistency_wait_ms: int,
    ) -> None:
        self._verifier = verifier
        self.read_model = read_model
        self._store = store
        self._codec = codec
        self._wait_s = consistency_wait_ms / 1000

    async def _guard(self, name: str, work: Callable[[], Any]) -> Reply:
        try:
            result: Reply = await work()
            return result
        except ActivitiesError as error:
            return error.http_status, error.to_envelope()
        except Exception:
            correlation_id = uuid.uuid4().hex
            log.exception("query failed", extra={"correlation_id": correlation_id, "query": name})
            internal = InternalError(f"internal error; correlation id {correlation_id}")
            return internal.http_status, internal.to_envelope()

    async def get(self, params: Params, authorization: str | None) -> Reply:
        """One activity: current from the read model, or `version=n` from the store."""

        async def work() -> Reply:
            caller = self._verifier.verify(authorization)
            query = parse_get_query(params)
            await self.read_model.wait_for(query.min_position, self._wait_s)
            return await self._get(query, caller)

        return await self._guard("get", work)

    async def _get(self, query: GetQuery, caller: Caller) -> Reply:
        position, document = await self.read_model.get(query.id, caller)
        if query.version is not None:
            document = await self._store.version(query.id, query.version)
            if document is not None and not is_visible(document, caller):
                document = None
        if document is None:
            suffix = f" at version {query.version}" if query.version is not None else ""
            raise NotFound(f"activity {query.id}{suffix} not found")
        if document.get("is_erased"):
            raise Gone(f"activity {query.id} was erased")
        if document["is_deleted"] and not query.include_deleted:
            raise Gone(f"activity {query.id} is deleted; restore it, or read it with include_deleted=true")
        return 200, {"data": document, "meta": {"position": position}}

    async def get_by_key(self, params: Params, authorization: str | None) -> Reply:
        """The activity an upsert created under `external_key`, from the read model."""

        async def work() -> Reply:
            caller = self._verifier.verify(authorization)
            query = parse_get_by_key_query(params)
            await self.read_model.wait_for(query.min_position, self._wait_s)
            position, document = await self.read_model.get_by_key(query.external_key, caller)
            if document is None:
                raise NotFound("no activity has this external_key")
            if document["is_deleted"] and not query.include_deleted:
                raise Gone(f"activity {document['id']} is deleted; restore it, or read it with include_deleted=true")
            return 200, {"data": document, "meta": {"position": position}}

        return await self._guard("get_by_key", work)

    async def list(self, params: Params, authorization: str | None) -> Reply:
        """One page of the caller's activities matching the filters, in the sort order."""

        async def work() -> Reply:
            caller = self._verifier.verify(authorization)
            query = parse_list_query(params)
            await self.read_model.wait_for(query.min_position, self._wait_s)
            position, documents, next_cursor = await self.read_model.page(query, caller, self._codec)
            return 200, {"data": documents, "meta": {"next_cursor": next_cursor, "position": position}}

        return await self._guard("list", work)

    async def stats(self, params: Params, authorization: str | None) -> Reply:
        """Counts of the caller's activities matching the filters, by `group_by`."""

        async def work() -> Reply:
            caller = self._verifier.verify(authorization)
            query = parse_stats_query(params)
            await self.read_model.wait_for(query.min_position, self._wait_s)
            position, counts = await self.read_model.stats(query, caller)
            return 200, {"data": counts, "meta": {"position": position}}

        return await self._guard("stats", work)

    async def occurrences(self, params: Params, authorization: str | None) -> Reply:
        """One page of the occurrences in a window of the caller's live activities matching the filters."""

        async def work() -> Reply:
            caller = self._verifier.verify(authorization)
            query = parse_occurrences_query(params)
            await self.read_model.wait_for(query.min_position, self._wait_s)
            position, data, next_cursor = await self.read_model.occurrences(query, caller, self._codec)
            return 200, {"data": data, "meta": {"next_cursor": next_cursor, "position": position}}

        return await self._guard("occurrences", work)

    async def history(self, activity_id: str, params: Params, authorization: str | None) -> Reply:
        """An activity's events, oldest first, as docs/contract.md section 4 bodies."""

        async def work() -> Reply:
            caller = self._verifier.verify(authorization)
            query = parse_get_query({**params, "id": [activity_id]})
            await self.read_model.wait_for(query.min_position, self._wait_s)
            position = await self.read_model.position()
            events = await self._store.history(query.id)
            if not events or not is_visible(events[-1][0].document, caller):
                raise NotFound(f"activity {activity_id} not found")
            return 200, {"data": [event_body(e, p) for e, p in events], "meta": {"position": position}}

        return await self._guard("history", work)

    async def handle_message(self, name: str, body: bytes, headers: dict[str, str]) -> Reply:
        """The NATS entry (`query.get`, `query.list`, `query.stats`; events.queries.QUERIES): the body is a
        JSON object of parameters."""
        authorization = header(headers, "Authorization")
        try:
            data = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            error = field_error("body", "must be a JSON object of query parameters")
            return error.http_status, error.to_envelope()
        params = params_from_json(data)
        if name == "get":
            return await self.get(params, authorization)
        if name == "stats":
            return await self.stats(params, authorization)
        if name == "get_by_key":
            return await self.get_by_key(params, authorization)
        if name == "occurrences":
            return await self.occurrences(params, authorization)
        return await self.list(params, authorization)
