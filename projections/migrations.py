"""Read-model migrations: versioned changes of the read model's schema, each applied once.

The read model is a table the service serves from while it changes, so a migration is written in
steps that never stop reads:

- `ddl`: statements run in one transaction under a short `lock_timeout` (retried with backoff):
  adding a nullable column is instant, but its ACCESS EXCLUSIVE lock queues every later read
  while it waits, so it never waits long;
- `backfill`: `SET <backfill_set> WHERE <backfill_where>` over the rows, in batches of primary-key
  ranges, each its own short transaction (row locks only: reads go on);
- `concurrent`: index builds `CONCURRENTLY`, outside any transaction (they do not block writes);
- `after_indexes`: DDL on the built indexes (their settings), like `ddl`;
- `needs_rebuild`: a change that cannot be made in place says so, and `activities projections
  rebuild` builds a copy aside with every migration and switches it in.

`migrate` applies what is pending, once, in one process at a time (a session advisory lock), and
records each version in `activities_read_model_migrations`. When nothing is pending it only reads
that table: no lock and no DDL on ordinary paths (a start, a projector restart, `status`).
Migration 1 is the read model of release 1.0 (schema.sql, frozen: later changes are migrations).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import psycopg
from psycopg import sql

from projections.database import conninfo
from projections.queries import (
    READ_MODEL_TABLE,
    SEARCH_MONTH_PREFIXES_SQL,
    SEARCH_PREFIXES_SQL,
    TRACKING_TABLE,
    render_statement,
    scoped_views_sql,
    split_statements,
    table_identifier,
    upcast_sql,
)

log = logging.getLogger("activities.migrations")

MIGRATIONS_TABLE: Final = "activities_read_model_migrations"
MIGRATION_LOCK: Final = 7_146_501_224  # advisory lock key: one migrating process at a time
DDL_LOCK_TIMEOUT: Final = "100ms"
"""How long a migration's DDL may wait for its lock: reads queue behind a waiting ACCESS
EXCLUSIVE request, so it gives up quickly and tries again instead."""
DDL_ATTEMPTS: Final = 100
MIGRATIONS_TABLE_DDL: Final = (
    f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (tbl text NOT NULL, version integer NOT NULL, "
    "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (tbl, version))"
)
BACKFILL_BATCH: Final = 5000


@dataclass(frozen=True)
class Migration:
    """One versioned change of the read model; statements name the table `{table}` (see schema.sql)."""

    version: int
    description: str
    ddl: tuple[str, ...] = ()
    backfill_set: str | None = None
    backfill_where: str = "true"
    concurrent: tuple[str, ...] = ()
    after_indexes: tuple[str, ...] = ()
    needs_rebuild: bool = False


class MigrationNeedsRebuild(RuntimeError):
    """A pending migration cannot be applied in place."""


TRACKING_DDL: Final = (
    f"CREATE TABLE IF NOT EXISTS {TRACKING_TABLE} (application_name text, notification_id bigint, "
    "PRIMARY KEY (application_name)) WITH (autovacuum_enabled = true, autovacuum_vacuum_threshold = 100000000, "
    "autovacuum_vacuum_scale_factor = 0.5, autovacuum_analyze_threshold = 1000, "
    "autovacuum_analyze_scale_factor = 0.01)"
)
"""The projections' tracking table, as eventsourcing's single-row tracking recorder creates it."""


def schema_template() -> str:
    """schema.sql: the read model of release 1.0, frozen (every later change is a migration)."""
    return resources.files("projections").joinpath("schema.sql").read_text()


def _release_1_0() -> tuple[str, ...]:
    return (TRACKING_DDL, *split_statements(schema_template()))


DERIVED_COLUMNS: Final = (
    ("external_key", "text", "NEW.document->>'external_key'"),  # migration 3's column, from now on kept here
    ("priority", "text", "NEW.document->>'priority'"),
    ("direction", "text", "NEW.document->>'direction'"),
    ("outcome", "text", "NEW.document->>'outcome'"),
    ("source", "text", "NEW.document->>'source'"),
    ("performed_by_user_id", "text", "NEW.document->>'performed_by_user_id'"),
    (
        "participant_ids",
        "text[]",
        "ARRAY(SELECT p->>'id' FROM jsonb_array_elements(COALESCE(NEW.document->'participants', '[]'::jsonb)) AS p)",
    ),
    (
        "search",
        "tsvector",
        "to_tsvector('simple'::regconfig, concat_ws(' ', NEW.document->>'subject', NEW.document->>'description', "
        "NEW.document->>'notes'))",
    ),
)
"""Columns the database derives from each row's document (migration 4's trigger), whatever writes
the row: this release's projector, a rebuild's load, or an older projector during a rolling
upgrade, whose upsert does not know them."""


def _derived_columns_migration() -> Migration:
    assignments = "; ".join(f"NEW.{name} := {expression}" for name, _, expression in DERIVED_COLUMNS)
    return Migration(
        4,
        "search (full text of subject, description, notes) and the v1.1 filter columns, derived by a trigger",
        ddl=(
            *(f"ALTER TABLE {{table}} ADD COLUMN IF NOT EXISTS {name} {kind}" for name, kind, _ in DERIVED_COLUMNS),
            "CREATE OR REPLACE FUNCTION activities_read_model_derive() RETURNS trigger LANGUAGE plpgsql AS "
            f"$derive$ BEGIN {assignments}; RETURN NEW; END $derive$",
            "DROP TRIGGER IF EXISTS {table}_derive ON {table}",
            "CREATE TRIGGER {table}_derive BEFORE INSERT OR UPDATE OF document ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION activities_read_model_derive()",
        ),
        backfill_set="document = t.document",  # fires the trigger, which fills the columns
        backfill_where="t.search IS NULL",
        concurrent=(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {table}_search ON {table} USING gin (search)",
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {table}_participants ON {table} USING gin (participant_ids)",
            *(
                f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {{table}}_{name} ON {{table}} "
                f"(tenant_id, {name}, activity_date DESC NULLS LAST, id DESC) WHERE {name} IS NOT NULL"
                for name in ("priority", "direction", "outcome", "source", "performed_by_user_id")
            ),
        ),
    )


OCCURRENCES_END_SQL: Final = r"""
CREATE OR REPLACE FUNCTION activities_occurrences_end(doc jsonb) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE AS $end$
DECLARE
    rule text := upper(doc->'recurrence'->>'rrule');
    start timestamptz;
    m text[];
BEGIN
    start := (doc->>'activity_date')::timestamptz;
    IF jsonb_typeof(doc->'recurrence') IS DISTINCT FROM 'object' THEN
        RETURN start;
    END IF;
    m := regexp_match(rule, '(?:^|;)\s*UNTIL=(\d{8})');
    IF m IS NOT NULL THEN
        RETURN to_date(m[1], 'YYYYMMDD')::timestamp AT TIME ZONE 'UTC' + interval '2 days';
    END IF;
    IF rule ~ '^(RRULE:)?FREQ=(DAILY|WEEKLY)(;(INTERVAL|COUNT|WKST|BYHOUR|BYMINUTE|BYSECOND)=[0-9A-Z,]+)*$'
       OR rule ~ '^(RRULE:)?FREQ=WEEKLY(;(INTERVAL|COUNT|WKST|BYHOUR|BYMINUTE|BYSECOND|BYDAY)=[0-9A-Z,]+)*$'
          AND NOT rule ~ 'BYDAY=[^;]*[0-9]' THEN
        m := regexp_match(rule, ';COUNT=(\d{1,7})(;|$)');
        IF m IS NOT NULL THEN
            RETURN start + (m[1]::int * coalesce((regexp_match(rule, ';INTERVAL=(\d{1,4})(;|$)'))[1]::int, 1))
                * (CASE WHEN rule ~ 'FREQ=WEEKLY' THEN interval '7 days' ELSE interval '1 day' END)
                + interval '2 days';
        END IF;
    END IF;
    RETURN NULL;
EXCEPTION WHEN others THEN
    RETURN NULL;
END $end$
"""
"""An upper bound of an activity's last occurrence (docs/contract.md section 9), NULL when none is
known: `activity_date` for a one-off; for a series, its UNTIL date plus two days (a local UNTIL is
at most a day from UTC), or, for a daily or weekly rule whose every period holds an occurrence, its
COUNT periods plus two days. Garbage (a recurrence stored before it was checked) gives NULL, never
an error: the occurrences query then expands it, or serves it as a one-off."""

OCCURRENCE_COLUMNS: Final = (
    ("is_recurring", "boolean", "coalesce(jsonb_typeof(NEW.document->'recurrence') = 'object', false)"),
    ("occurrences_end", "timestamptz", "activities_occurrences_end(NEW.document)"),
    (
        "recurrence",
        "jsonb",
        "CASE WHEN jsonb_typeof(NEW.document->'recurrence') = 'object' THEN NEW.document->'recurrence' END",
    ),
)
"""Columns derived from the document by migration 9's trigger, for the occurrences query's
candidates: a one-off whose activity_date is in the window, a series started by its end that has
not ended before its start. `recurrence` is the series' recurrence on its own, so that the query
reads it from the index (below) instead of taking it out of every candidate's document."""


def _occurrences_migration() -> Migration:
    assignments = "; ".join(f"NEW.{name} := {expression}" for name, _, expression in OCCURRENCE_COLUMNS)
    return Migration(
        9,
        "is_recurring, occurrences_end and recurrence, derived by a trigger, and the recurring activities' indexes",
        ddl=(
            *(f"ALTER TABLE {{table}} ADD COLUMN IF NOT EXISTS {name} {kind}" for name, kind, _ in OCCURRENCE_COLUMNS),
            OCCURRENCES_END_SQL.strip(),
            "CREATE OR REPLACE FUNCTION activities_read_model_occurrences() RETURNS trigger LANGUAGE plpgsql AS "
            f"$derive$ BEGIN {assignments}; RETURN NEW; END $derive$",
            "DROP TRIGGER IF EXISTS {table}_occurrences ON {table}",
            "CREATE TRIGGER {table}_occurrences BEFORE INSERT OR UPDATE OF document ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION activities_read_model_occurrences()",
        ),
        backfill_set="document = t.document",  # fires the triggers, which fill the columns
        backfill_where="t.is_recurring IS NULL",
        concurrent=(
            # Covering (INCLUDE) what the query and the row-level security policy read, for
            # index-only scans: the series' rows are read without their documents.
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {table}_recurring ON {table} (tenant_id, activity_date) "
            "INCLUDE (id, version, app_id, owner_id, is_deleted, occurrences_end, recurrence) WHERE is_recurring",
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {table}_recurring_owner ON {table} (tenant_id, owner_id, "
            "activity_date) INCLUDE (id, version, app_id, is_deleted, occurrences_end, recurrence) "
            "WHERE is_recurring AND owner_id IS NOT NULL",
        ),
    )


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "the read model of release 1.0: table, indexes, row-level security", ddl=_release_1_0()),
    Migration(
        2,
        "documents in schema 2 (remind_at, external_key, is_erased)",
        backfill_set=sql.SQL("document = {}")
        .format(upcast_sql(sql.SQL("t.document")))
        .as_string(None),
        backfill_where="(t.document->>'schema_version')::int < 2",
    ),
    Migration(
        3,
        "external_key column, filled from the documents, and its index",
        ddl=("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS external_key text",),
        backfill_set="external_key = t.document->>'external_key'",
        backfill_where="t.external_key IS DISTINCT FROM t.document->>'external_key'",
        concurrent=(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {table}_external_key "
            "ON {table} (tenant_id, external_key) WHERE external_key IS NOT NULL",
        ),
    ),
    _derived_columns_migration(),
    Migration(
        5,
        "reads through caller-scoped views instead of row-level security on the owner",
        # The views (queries.scoped_views_sql) are (re)made after every migration run, with every column.
        # Their owner, the table's, must read the table unbound by the policy: the policy keeps binding
        # the reader role, which reads through the views.
        ddl=("ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY",),
    ),
    Migration(
        6,
        "completed_at column (the overdue and completed filters), derived by a trigger of its own, and its indexes",
        ddl=(
            "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS completed_at timestamptz",
            "CREATE OR REPLACE FUNCTION activities_read_model_derive_time() RETURNS trigger LANGUAGE plpgsql AS "
            "$derive$ BEGIN NEW.completed_at := (NEW.document->>'completed_at')::timestamptz; RETURN NEW; END $derive$",
            "DROP TRIGGER IF EXISTS {table}_derive_time ON {table}",
            "CREATE TRIGGER {table}_derive_time BEFORE INSERT OR UPDATE OF document ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION activities_read_model_derive_time()",
        ),
        backfill_set="completed_at = (t.document->>'completed_at')::timestamptz",
        backfill_where="t.document->>'completed_at' IS NOT NULL AND t.completed_at IS NULL",
        concurrent=(
            # overdue=true: open ones by due date (a range below now())
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {table}_open_due ON {table} "
            "(tenant_id, due_date DESC NULLS LAST, id DESC) WHERE completed_at IS NULL AND due_date IS NOT NULL",
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {table}_completed_at ON {table} "
            "(tenant_id, completed_at DESC, id DESC) WHERE completed_at IS NOT NULL",
        ),
    ),
    Migration(
        8,
        "is_erased column: erased activities' skeletons are left out of lists and stats",
        # no backfill: no activity was erased before this column existed
        ddl=("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS is_erased boolean NOT NULL DEFAULT false",),
        concurrent=(  # retention's sweep: deleted, not yet erased, by deletion time (= updated_at)
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {table}_deleted ON {table} (updated_at) "
            "WHERE is_deleted AND NOT is_erased",
        ),
    ),
    _occurrences_migration(),
    Migration(
        10,
        "a covering index for counts by date (stats of a period read the index alone)",
        concurrent=(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {table}_counts ON {table} (tenant_id, activity_date) "
            "INCLUDE (owner_id, type, status, priority, outcome, app_id, is_deleted, is_erased)",
        ),
    ),
    Migration(
        11,
        "the prefix index (every prefix of up to 12 characters of every word of the search text) and "
        "finer statistics of the search text, for `q`",
        # An index on an expression of `search`, not a column: the prefixes would take 1.2 KB a row
        # in the heap. Reads use it once it is valid (services/queries.py looks), so building it
        # CONCURRENTLY while the service serves is safe; until then `q` reads `search` as before.
        ddl=(
            SEARCH_PREFIXES_SQL.strip(),
            # The planner decides between walking the date index and finding the matches in an
            # index from the most common lexemes of `search`: with the default 1,000 (down to
            # 0.5% of the rows) it took a word of 0.8% for one of 0.25% and read 8,000 heap pages
            # where a walk reads 6,000 rows in order. 4,000 lexemes: right for those words, for
            # an ANALYZE of 3.3 s per million rows instead of 0.7 (10,000 lexemes took 8.6 s).
            "ALTER TABLE {table} ALTER COLUMN search SET STATISTICS 400",
        ),
        concurrent=(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {table}_search_prefixes ON {table} "
            "USING gin (activities_search_prefixes(search))",
        ),
        # No statistics of the index's expression: ANALYZE would compute the prefixes of every row
        # it samples (22.9 s per million rows, against 3.3 without, with `search` at 400), after
        # every tenth of the table written. Reads decide from `search`'s statistics instead.
        after_indexes=("ALTER INDEX {table}_search_prefixes ALTER COLUMN 1 SET STATISTICS 0",),
    ),
    Migration(
        12,
        "a covering date index for the participant filter (its walks read the index alone)",
        concurrent=(
            # A contact in 0.3% of the activities: a walk of the date index checks 17,000 rows for
            # a page, each a heap page (12 ms); in this index each is an index tuple.
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {table}_participants_by_date ON {table} "
            "(tenant_id, activity_date DESC NULLS LAST, id DESC) "
            "INCLUDE (app_id, is_deleted, is_erased, participant_ids)",
        ),
    ),
    Migration(
        13,
        "the month prefix index (the prefix index's lexemes tagged with the month of activity_date), "
        "for `q` read in windows of activity_date",
        # Beside the prefix index, not instead: a read over all time would ask every month's lexemes
        # (24 months: 75 ms against 10-15). Reads use it once it is valid, as the prefix index.
        ddl=(SEARCH_MONTH_PREFIXES_SQL.strip(),),
        concurrent=(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {table}_search_month_prefixes ON {table} "
            "USING gin (activities_search_month_prefixes(search, activity_date))",
        ),
        # no statistics of the expression, as for the prefix index (ANALYZE would compute it)
        after_indexes=("ALTER INDEX {table}_search_month_prefixes ALTER COLUMN 1 SET STATISTICS 0",),
    ),
)
"""Every migration, in order. Append; never edit one that has shipped."""


def render(statement: str, table: str) -> str:
    """A migration statement for a table: `{table}` and `{table}_suffix` become quoted identifiers."""
    return render_statement(statement, table)


def applied_versions(conn: psycopg.Connection[Any], table: str = READ_MODEL_TABLE) -> set[int]:
    """The versions applied to `table` (none when the migrations table does not exist yet)."""
    present = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (MIGRATIONS_TABLE,)).fetchone()
    if not present or not present[0]:
        return set()
    rows = conn.execute(f"SELECT version FROM {MIGRATIONS_TABLE} WHERE tbl = %s", (table,)).fetchall()
    return {int(row[0]) for row in rows}


def pending(
    conn: psycopg.Connection[Any], table: str = READ_MODEL_TABLE, migrations: Sequence[Migration] = MIGRATIONS
) -> list[Migration]:
    done = applied_versions(conn, table)
    return [migration for migration in migrations if migration.version not in done]


def migrate(
    database_url: str,
    table: str = READ_MODEL_TABLE,
    migrations: Sequence[Migration] = MIGRATIONS,
    after_first: Callable[[str, str], None] | None = None,
    wait_s: float = 300.0,
) -> list[int]:
    """Apply the pending migrations to `table`, once, one process at a time; the versions applied.

    `after_first(database_url, table)` runs after any migration was applied (the reader role's
    grants, which need the table). Waits up to `wait_s` for another process that is migrating."""
    with psycopg.connect(conninfo(database_url, connect_timeout=5), autocommit=True) as conn:
        if not pending(conn, table, migrations):
            return []
        _lock(conn, wait_s)
        try:
            conn.execute(MIGRATIONS_TABLE_DDL)
            applied: list[int] = []
            for migration in pending(conn, table, migrations):  # again: another process may have done some
                if migration.needs_rebuild:
                    raise MigrationNeedsRebuild(
                        f"read-model migration {migration.version} ({migration.description}) cannot be applied in "
                        "place: run `activities projections rebuild`, which builds the read model aside and switches"
                    )
                apply(conn, migration, table)
                conn.execute(
                    f"INSERT INTO {MIGRATIONS_TABLE} (tbl, version, description) VALUES (%s, %s, %s)",
                    (table, migration.version, migration.description),
                )
                applied.append(migration.version)
                log.info("read-model migration applied", extra={"version": migration.version, "table": table})
            if applied:  # new columns have no statistics: the planner would guess at their selectivity
                refresh_scoped_views(conn, table)
                conn.execute(sql.SQL("ANALYZE {}").format(table_identifier(table)))
            if applied and after_first is not None:
                after_first(database_url, table)
            return applied
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


def refresh_scoped_views(conn: psycopg.Connection[Any], table: str) -> None:
    """(Re)make the caller-scoped views that readers query, with every column of the table as it is now
    (a view's `*` is fixed when it is made, so every change of the table's columns makes them again)."""
    _ddl(conn, [statement.as_string(conn) for statement in scoped_views_sql(table)])


def _lock(conn: psycopg.Connection[Any], wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (MIGRATION_LOCK,)).fetchone()
        if row and row[0]:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"another process has been migrating the read model for over {wait_s:g} s")
        log.info("waiting for another process migrating the read model")
        time.sleep(0.5)


def apply(conn: psycopg.Connection[Any], migration: Migration, table: str) -> None:
    """Apply one migration's steps to `table` on an autocommit connection (no record kept)."""
    if migration.ddl:
        _ddl(conn, [render(statement, table) for statement in migration.ddl])
    if migration.backfill_set is not None:
        _backfill(conn, migration, table)
    for statement in migration.concurrent:
        _drop_if_invalid(conn, statement, table)
        conn.execute(render(statement, table))
    if migration.after_indexes:
        _ddl(conn, [render(statement, table) for statement in migration.after_indexes])


def _ddl(conn: psycopg.Connection[Any], statements: list[str]) -> None:
    for attempt in range(DDL_ATTEMPTS):
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'")
                for statement in statements:
                    conn.execute(statement)
            return
        except psycopg.errors.LockNotAvailable:
            time.sleep(min(0.05 * 2**attempt, 2.0))
    raise TimeoutError(f"could not take the read model's lock in {DDL_ATTEMPTS} tries; try again when it is quieter")


def _backfill(conn: psycopg.Connection[Any], migration: Migration, table: str) -> None:
    """`backfill_set` on the rows matching `backfill_where`, a primary-key range per transaction."""
    ident = table_identifier(table)
    statement = sql.SQL(
        "WITH batch AS (SELECT id FROM {table} WHERE id > %s ORDER BY id LIMIT %s), "
        "done AS (UPDATE {table} AS t SET {set} FROM batch WHERE t.id = batch.id AND ({where}) RETURNING 1) "
        "SELECT (SELECT max(id) FROM batch), (SELECT count(*) FROM done)"
    ).format(table=ident, set=sql.SQL(migration.backfill_set or ""), where=sql.SQL(migration.backfill_where))
    after, changed = "", 0
    while True:
        row = conn.execute(statement, (after, BACKFILL_BATCH)).fetchone()
        if row is None or row[0] is None:
            break
        after, changed = row[0], changed + int(row[1])
        log.info("read-model backfill", extra={"version": migration.version, "after": after, "changed": changed})


def _drop_if_invalid(conn: psycopg.Connection[Any], statement: str, table: str) -> None:
    """An index build CONCURRENTLY that failed leaves an invalid index, which IF NOT EXISTS would keep."""
    name = render(statement, table).split(" IF NOT EXISTS ", 1)[1].split()[0].strip('"')
    row = conn.execute(
        "SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = %s",
        (name,),
    ).fetchone()
    if row and row[0]:
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name)))


def record_all(curs: psycopg.Cursor[Any], table: str) -> None:
    """Record every migration as applied to `table` (a rebuilt copy switched in under its name)."""
    curs.execute(MIGRATIONS_TABLE_DDL)
    for migration in MIGRATIONS:
        curs.execute(
            f"INSERT INTO {MIGRATIONS_TABLE} (tbl, version, description) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (table, migration.version, migration.description),
        )


def create_fresh(conn: psycopg.Connection[Any], table: str, with_indexes: bool = True) -> list[str]:
    """Every migration's DDL on a new, empty `table` (for a rebuild aside); the index statements,
    built now or returned to be built after a bulk load (`with_indexes=False`). The statements
    that do not build an index (`after_indexes`) are to run once every index is built."""
    indexes: list[str] = []
    for migration in MIGRATIONS:
        statements = [render(statement, table) for statement in migration.ddl]
        later = [s for s in statements if s.upper().startswith("CREATE INDEX")]
        _ddl(conn, [s for s in statements if s not in later])
        later += [render(statement, table).replace(" CONCURRENTLY", "") for statement in migration.concurrent]
        later += [render(statement, table) for statement in migration.after_indexes]  # after every build
        indexes += later
    refresh_scoped_views(conn, table)
    if with_indexes:
        for statement in indexes:
            conn.execute(statement)
        return []
    return indexes
