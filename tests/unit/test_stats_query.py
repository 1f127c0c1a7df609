"""Stats parameters and SQL (docs/contract.md section 5, `/stats`), without a database."""

from __future__ import annotations

from typing import Any

import pytest

from activities_client.errors import ValidationError
from activities_client.filters import LIST_FILTERS, STATS_GROUPS
from activities_client.wire import StatsBody
from events.queries import QUERIES
from projections.queries import (
    GROUP_BY_SQL,
    StatsQuery,
    build_stats_sql,
    params_from_json,
    params_from_pairs,
    parse_stats_query,
)
from services.domain import Caller

ACME = Caller(tenant_id="acme", sub="usr-1")
ACME_APP = Caller(tenant_id="acme", sub="usr-1", app_id="app_a")


def field_of(error: pytest.ExceptionInfo[ValidationError]) -> str:
    return error.value.details[0]["field"]


def test_every_group_has_its_sql_and_the_body_lists_the_groups() -> None:
    assert set(GROUP_BY_SQL) == set(STATS_GROUPS)
    schema = StatsBody.model_json_schema()
    assert schema["properties"]["group_by"]["enum"] == list(STATS_GROUPS)
    assert "group_by" in schema["required"]
    assert {spec.name for spec in LIST_FILTERS} <= set(schema["properties"])
    assert not {"sort", "limit", "cursor"} & set(schema["properties"])
    assert QUERIES["stats"].body is StatsBody


def test_stats_parses_group_by_every_filter_and_min_position() -> None:
    query = parse_stats_query(
        params_from_pairs(
            [
                ("group_by", "owner_id"),
                ("type", "call"),
                ("type", "email"),
                ("tag", "vip"),
                ("account_id", "acc_1"),
                ("activity_date_from", "2026-01-01T00:00:00Z"),
                ("include_deleted", "true"),
                ("min_position", "7"),
            ]
        )
    )
    assert query.group_by == "owner_id"
    assert query.filters["type"] == ("call", "email") and query.filters["tag"] == ("vip",)
    assert query.filters["account_id"] == "acc_1" and "activity_date_from" in query.filters
    assert query.include_deleted and query.min_position == 7
    assert parse_stats_query(params_from_json({"group_by": "type"})) == StatsQuery("type")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "group_by"),
        ({"type": ["call"]}, "group_by"),
        ({"group_by": ["subject"]}, "group_by"),
        ({"group_by": ["type", "status"]}, "group_by"),
        ({"group_by": ["type"], "sort": ["-activity_date"]}, "sort"),
        ({"group_by": ["type"], "limit": ["5"]}, "limit"),
        ({"group_by": ["type"], "cursor": ["abc"]}, "cursor"),
        ({"group_by": ["type"], "colour": ["red"]}, "colour"),
        ({"group_by": ["type"], "type": ["meal"]}, "type"),
        ({"group_by": ["type"], "min_position": ["-1"]}, "min_position"),
        ({"group_by": ["type"], "include_deleted": ["maybe"]}, "include_deleted"),
    ],
)
def test_stats_rejects(params: dict[str, list[Any]], field: str) -> None:
    with pytest.raises(ValidationError) as error:
        parse_stats_query(params)
    assert field_of(error) == field
    assert error.value.code == "validation_error"


def test_stats_sql_is_scoped_filtered_grouped_and_ordered() -> None:
    statement, params = build_stats_sql("activities", StatsQuery("owner_id"), ACME)
    sql = str(statement.as_string(None))
    assert "tenant_id = %s" in sql and "app_id" not in sql and "NOT is_deleted" in sql
    assert 'GROUP BY 1 ORDER BY count(*) DESC, ("owner_id") COLLATE "C" ASC NULLS LAST' in sql
    assert params == ["acme"]

    query = StatsQuery("priority", filters={"type": ("call",), "status": "open"}, include_deleted=True)
    statement, params = build_stats_sql("activities", query, ACME_APP)
    sql = str(statement.as_string(None))
    assert '"priority" AS key' in sql and "app_id = %s" in sql and "NOT is_deleted" not in sql
    assert params == ["acme", "app_a", ["call"], "open"]
