"""Paging to the end of a big tenant costs the same on every page: the keyset bounds the index
scan instead of filtering every row before it (EXPLAIN ANALYZE on real PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from projections.queries import Keyset, ListQuery, Sort, build_list_sql
from projections.read_model import prepare_read_model
from services.domain import Caller

ROWS = 20_000
CALLER = Caller("deep", "usr-1")


@pytest.fixture(scope="module")
def big_tenant(make_database: Callable[[], str]) -> Iterator[psycopg.Connection[Any]]:
    """20,000 activities of one tenant; a third without an activity date, most without a due date."""
    database_url = make_database()
    prepare_read_model(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO activities (id, tenant_id, created_at, updated_at, activity_date, due_date,"
            " is_deleted, version, position, document)"
            " SELECT 'act_' || lpad(upper(to_hex(i)), 26, '0'), 'deep', ts, ts,"
            " CASE WHEN i %% 3 = 0 THEN NULL ELSE ts END, CASE WHEN i %% 10 = 0 THEN ts END,"
            " false, 1, i, '{}'::jsonb"
            " FROM (SELECT i, timestamptz '2026-01-01' + i * interval '1 minute' AS ts"
            "       FROM generate_series(1, %s) AS i) AS s",
            (ROWS,),
        )
        conn.execute("ANALYZE activities")
        yield conn


def rows_read(plan: dict[str, Any]) -> int:
    """Rows the plan's scans produced or filtered out, over all its nodes."""
    own = plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0) if "Scan" in plan["Node Type"] else 0
    return int(own) + sum(rows_read(child) for child in plan.get("Plans", []))


@pytest.mark.parametrize("sort", [Sort("activity_date", True), Sort("activity_date", False), Sort("due_date", True),
                                  Sort("created_at", False)])
def test_a_page_deep_in_the_list_reads_about_one_page(big_tenant: psycopg.Connection[Any], sort: Sort) -> None:
    direction = sql.SQL("DESC" if sort.descending else "ASC")
    nulls = sql.SQL("NULLS FIRST" if sort.field == "created_at" and not sort.descending else "NULLS LAST")
    middle = big_tenant.execute(
        sql.SQL("SELECT id, {field}::text FROM activities ORDER BY {field} {direction} {nulls}, id {direction}"
                " OFFSET %s LIMIT 1").format(field=sql.Identifier(sort.field), direction=direction, nulls=nulls),
        (ROWS // 2,),
    ).fetchone()
    assert middle is not None
    query = ListQuery(sort=sort, limit=50)
    statement, params = build_list_sql("activities", query, CALLER, Keyset(middle[1], middle[0]))
    explained = big_tenant.execute(sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + statement, params).fetchone()
    assert explained is not None
    read = rows_read(explained[0][0]["Plan"])
    assert read <= 4 * (query.limit + 1), f"{sort}: read {read} rows for a page of {query.limit}"
    page = big_tenant.execute(statement, params).fetchall()
    assert len(page) == query.limit + 1 and page[0][0] != middle[0]
