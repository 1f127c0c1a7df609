"""Pure parts of the read side: parameter parsing, cursors, SQL building, If-Match, batching."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from activities_client.errors import ValidationError
from activities_client.filters import LIST_FILTERS
from projections.queries import (
    FILTER_SQL,
    CursorCodec,
    Keyset,
    ListQuery,
    Sort,
    build_get_sql,
    build_list_sql,
    build_upsert_sql,
    params_from_json,
    params_from_pairs,
    parse_get_query,
    parse_list_query,
    schema_statements,
)
from projections.migrations import schema_template
from projections.read_model import latest_rows
from services.domain import Caller
from services.http_app import parse_if_match

ACME = Caller(tenant_id="acme", sub="usr-1")
ACME_APP = Caller(tenant_id="acme", sub="usr-1", app_id="app_a")
ACTIVITY_ID = "act_01ARZ3NDEKTSV4RRFFQ69G5FAV"


def field_of(error: pytest.ExceptionInfo[ValidationError]) -> str:
    return error.value.details[0]["field"]


def text(statement: Any) -> str:
    return str(statement.as_string(None))


# parsing -------------------------------------------------------------------------------------


def test_list_defaults() -> None:
    query = parse_list_query({})
    assert query == ListQuery()
    assert (query.sort, query.limit, query.include_deleted) == (Sort("activity_date", True), 50, False)


def test_list_parses_every_parameter_from_a_query_string() -> None:
    query = parse_list_query(
        params_from_pairs(
            [
                ("account_id", "acc_1"),
                ("deal_id", "deal_1"),
                ("contact_id", "con_1"),
                ("owner_id", "usr-x"),
                ("type", "call"),
                ("type", "email"),
                ("status", "done"),
                ("tag", "a"),
                ("tag", "b"),
                ("activity_date_from", "2026-01-01T00:00:00+01:00"),
                ("activity_date_to", "2026-02-01T00:00:00Z"),
                ("updated_since", "2026-01-15T00:00:00Z"),
                ("include_deleted", "true"),
                ("sort", "due_date"),
                ("limit", "200"),
                ("cursor", "c"),
                ("min_position", "7"),
            ]
        )
    )
    assert query.filters["type"] == ("call", "email") and query.filters["tag"] == ("a", "b")
    assert query.filters["activity_date_from"] == datetime(2025, 12, 31, 23, 0, tzinfo=UTC)
    assert query.include_deleted is True and query.sort == Sort("due_date", False)
    assert (query.limit, query.cursor, query.min_position) == (200, "c", 7)


def test_list_from_json_takes_lists_and_natives() -> None:
    query = parse_list_query(
        params_from_json({"type": ["call"], "tag": "a", "limit": 3, "include_deleted": True, "cursor": None})
    )
    assert (query.filters["type"], query.filters["tag"], query.limit, query.include_deleted, query.cursor) == (
        ("call",),
        ("a",),
        3,
        True,
        None,
    )


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"unknown": ["1"]}, "unknown"),
        ({"offset": ["10"]}, "offset"),
        ({"limit": ["0"]}, "limit"),
        ({"limit": ["201"]}, "limit"),
        ({"limit": ["ten"]}, "limit"),
        ({"limit": [True]}, "limit"),
        ({"sort": ["subject"]}, "sort"),
        ({"sort": ["--activity_date"]}, "sort"),
        ({"type": ["fax"]}, "type"),
        ({"status": ["a", "b"]}, "status"),
        ({"activity_date_from": ["2026-01-01T00:00:00"]}, "activity_date_from"),
        ({"updated_since": ["yesterday"]}, "updated_since"),
        ({"include_deleted": ["maybe"]}, "include_deleted"),
        ({"min_position": ["-1"]}, "min_position"),
        ({"account_id": [""]}, "account_id"),
    ],
)
def test_list_rejects(params: dict[str, list[Any]], field: str) -> None:
    with pytest.raises(ValidationError) as error:
        parse_list_query(params)
    assert field_of(error) == field


def test_get_parameters() -> None:
    query = parse_get_query({"id": [ACTIVITY_ID], "version": ["2"], "include_deleted": ["1"], "min_position": [3]})
    assert (query.id, query.version, query.include_deleted, query.min_position) == (ACTIVITY_ID, 2, True, 3)
    for params, field in (
        ({"id": ["x"]}, "id"),
        ({}, "id"),
        ({"id": [ACTIVITY_ID], "version": ["0"]}, "version"),
        ({"id": [ACTIVITY_ID], "sort": ["x"]}, "sort"),
    ):
        with pytest.raises(ValidationError) as error:
            parse_get_query(params)
        assert field_of(error) == field


@pytest.mark.parametrize(("header", "expected"), [(None, None), ("*", None), ('"3"', 3), ("3", 3), ('W/"12"', 12)])
def test_if_match(header: str | None, expected: int | None) -> None:
    assert parse_if_match(header) == expected


def test_if_match_rejects_garbage() -> None:
    with pytest.raises(ValidationError):
        parse_if_match('"v3"')


# cursors -------------------------------------------------------------------------------------


CODEC = CursorCodec(b"k" * 32)


def test_cursor_round_trip_and_limit_may_change() -> None:
    query = ListQuery(filters={"account_id": "acc_1"}, limit=5)
    cursor = CODEC.encode(Keyset("2026-01-01T00:00:00+00:00", ACTIVITY_ID), query, ACME)
    assert CODEC.decode(cursor, ListQuery(filters={"account_id": "acc_1"}, limit=50), ACME) == Keyset(
        "2026-01-01T00:00:00+00:00", ACTIVITY_ID
    )
    assert CODEC.decode(CODEC.encode(Keyset(None, ACTIVITY_ID), query, ACME), query, ACME).value is None


@pytest.mark.parametrize(
    ("query", "caller"),
    [
        (ListQuery(filters={"account_id": "acc_1"}), Caller(tenant_id="other", sub="usr-1")),
        (ListQuery(filters={"account_id": "acc_1"}), ACME_APP),
        (ListQuery(filters={"account_id": "acc_2"}), ACME),
        (ListQuery(filters={"account_id": "acc_1"}, sort=Sort("activity_date", False)), ACME),
        (ListQuery(filters={"account_id": "acc_1"}, include_deleted=True), ACME),
        (ListQuery(filters={"account_id": "acc_1", "tag": ("x",)}), ACME),
    ],
)
def test_cursor_is_bound_to_tenant_app_filters_and_sort(query: ListQuery, caller: Caller) -> None:
    cursor = CODEC.encode(Keyset(None, ACTIVITY_ID), ListQuery(filters={"account_id": "acc_1"}), ACME)
    with pytest.raises(ValidationError) as error:
        CODEC.decode(cursor, query, caller)
    assert field_of(error) == "cursor"


def test_tampered_foreign_or_garbage_cursors_are_refused() -> None:
    query = ListQuery()
    cursor = CODEC.encode(Keyset(None, ACTIVITY_ID), query, ACME)
    payload, signature = cursor.split(".")
    forged_payload = CODEC.encode(Keyset(None, "act_01ARZ3NDEKTSV4RRFFQ69G5FAW"), query, ACME).split(".")[0]
    other_key = CursorCodec(b"K" * 32).encode(Keyset(None, ACTIVITY_ID), query, ACME)
    for bad in (f"{forged_payload}.{signature}", other_key, "garbage", "a.b.c", payload, f"{payload}.!!!", ""):
        with pytest.raises(ValidationError):
            CODEC.decode(bad, query, ACME)


# SQL -----------------------------------------------------------------------------------------


def test_list_sql_scopes_filters_and_never_offsets() -> None:
    statement, params = build_list_sql("activities", ListQuery(), ACME)
    sql = text(statement)
    assert "tenant_id = %s" in sql and "app_id" not in sql and "NOT is_deleted" in sql
    assert 'ORDER BY "activity_date" DESC NULLS LAST, id DESC LIMIT %s' in sql and "OFFSET" not in sql.upper()
    assert params == ["acme", 51]

    statement, params = build_list_sql(
        "activities",
        ListQuery(include_deleted=True, filters={"contact_id": "c", "type": ("call",), "tag": ("a", "b")}),
        ACME_APP,
    )
    sql = text(statement)
    assert "app_id = %s" in sql and "NOT is_deleted" not in sql
    assert "(contact_id = %s OR contact_ids @> ARRAY[%s]::text[])" in sql and "tags @> %s::text[]" in sql
    assert params == ["acme", "app_a", "c", "c", ["call"], ["a", "b"], 51]


@pytest.mark.parametrize(
    ("sort", "order", "after"),
    [
        (
            Sort("activity_date", True),
            '"activity_date" DESC NULLS LAST, id DESC',
            '(("activity_date", id) < (%s::timestamptz, %s))',
        ),
        (
            Sort("due_date", False),
            '"due_date" ASC NULLS LAST, id ASC',
            '(("due_date", id) > (%s::timestamptz, %s))',
        ),
        (
            Sort("created_at", False),
            '"created_at" ASC NULLS FIRST, id ASC',
            '(("created_at", id) > (%s::timestamptz, %s))',
        ),
        (
            Sort("updated_at", True),
            '"updated_at" DESC NULLS LAST, id DESC',
            '(("updated_at", id) < (%s::timestamptz, %s))',
        ),
    ],
)
def test_keyset_order_and_condition(sort: Sort, order: str, after: str) -> None:
    statement, params = build_list_sql(
        "activities", ListQuery(sort=sort, limit=2), ACME, Keyset("2026-01-01T00:00:00+00:00", "act_X")
    )
    sql = text(statement)
    assert f"ORDER BY {order}" in sql and after in sql and " OR " not in sql
    assert params[1:4] == ["2026-01-01T00:00:00+00:00", "act_X", 3]


def test_keyset_on_a_nullable_sort_is_two_index_ranges_merged() -> None:
    """The values after the keyset, then the rows without a value: each a range of the index."""
    statement, params = build_list_sql(
        "activities", ListQuery(limit=2), ACME, Keyset("2026-01-01T00:00:00+00:00", "act_X")
    )
    sql = text(statement)
    assert "FROM (SELECT * FROM ((SELECT id, " in sql
    assert '(("activity_date", id) < (%s::timestamptz, %s)) ORDER BY "activity_date" DESC NULLS LAST' in sql
    assert " UNION ALL (SELECT " in sql and '("activity_date" IS NULL) ORDER BY' in sql
    assert ') AS ranges ORDER BY "sort_value" DESC NULLS LAST, id DESC LIMIT %s) AS page' in sql
    assert sql.endswith('JOIN "activities" USING (id) ORDER BY page.sort_value DESC NULLS LAST, id DESC')
    assert params == ["acme", "2026-01-01T00:00:00+00:00", "act_X", 3, "acme", 3, 3]


def test_a_page_reads_documents_only_for_its_own_keys() -> None:
    """The keys of the page are chosen first; the documents are joined to those rows alone."""
    sql = text(build_list_sql("activities", ListQuery(limit=5), ACME)[0])
    keys = sql[sql.index("FROM (") : sql.index(") AS page")]
    assert "document" not in keys and "LIMIT %s" in keys
    assert sql.startswith("SELECT id, page.sort_value, (CASE WHEN") and ") AS page JOIN " in sql


def test_keyset_after_a_null_sort_value_stays_among_the_nulls() -> None:
    statement, params = build_list_sql("activities", ListQuery(), ACME, Keyset(None, "act_X"))
    assert '("activity_date" IS NULL AND id < %s)' in text(statement)
    assert params[-2:] == ["act_X", 51]


def test_get_sql_is_scoped() -> None:
    statement, params = build_get_sql("activities", ACTIVITY_ID, ACME_APP)
    assert "WHERE id = %s AND tenant_id = %s AND app_id = %s" in text(statement)
    assert params == [ACTIVITY_ID, "acme", "app_a"]


def test_table_names_are_checked() -> None:
    with pytest.raises(ValueError):
        build_list_sql("activities; DROP TABLE x", ListQuery(), ACME)
    assert "WHERE" in text(build_upsert_sql("activities_rebuild")) and "version < EXCLUDED.version" in text(
        build_upsert_sql("activities")
    )


def test_schema_template_names_indexes_after_the_table() -> None:
    statements = schema_statements(schema_template(), "activities_rebuild")
    assert statements[0].startswith('CREATE TABLE IF NOT EXISTS "activities_rebuild"')
    index_names = [s.split()[5] for s in statements if s.startswith("CREATE INDEX")]
    assert len(index_names) >= 10 and all(name.startswith('"activities_rebuild_') for name in index_names)
    assert not any("{table}" in s or "--" in s for s in statements)


def test_a_batch_keeps_the_latest_version_of_each_activity() -> None:
    def event(activity_id: str, version: int) -> Any:
        return SimpleNamespace(document={"id": activity_id, "version": version})

    rows = latest_rows([(event("a", 1), 10), (event("b", 1), 11), (event("a", 3), 13), (event("a", 2), 12)])
    assert {(r.document["id"], r.document["version"], r.position) for r in rows} == {("a", 3, 13), ("b", 1, 11)}


def test_every_list_filter_has_its_sql() -> None:
    assert set(FILTER_SQL) == {spec.name for spec in LIST_FILTERS}
