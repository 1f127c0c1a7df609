"""`q`, full-text search of subject, description and notes, and the v1.1 filters, over real servers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from projections.queries import (
    Keyset,
    ListPlan,
    ListQuery,
    Sort,
    StatsQuery,
    build_list_sql,
    build_sort_span_sql,
    build_stats_sql,
    scoped_view,
    search_words,
)
from services.bootstrap import Runtime
from services.domain import Caller

Send = Any


async def ids(send: Send, **params: Any) -> set[str]:
    reply = await send("list", {"limit": 200, **params}, kind="query")
    assert "data" in reply, reply
    return {document["subject"] for document in reply["data"]}


async def test_every_word_must_match_by_prefix_ignoring_case(request_command: Send) -> None:
    bodies = [
        {"subject": "Pricing call", "description": "talked about the budget", "priority": "high"},
        {"subject": "Renewal", "notes": "PRICE list sent", "priority": "low", "direction": "outbound"},
        {"subject": "Intro", "description": "no numbers yet", "outcome": "won", "source": "gong"},
        {
            "subject": "Kick-off",
            "performed_by_user_id": "usr-a",
            "participants": [{"type": "user", "id": "usr-a"}, {"type": "contact", "id": "con_9"}],
        },
    ]
    position = 0
    for body in bodies:
        reply = await request_command("create", {"account_id": "acc_1", **body})
        position = reply["meta"]["position"]
    at = {"min_position": position}
    assert await ids(request_command, q="pric", **at) == {"Pricing call", "Renewal"}  # prefix, any field, any case
    assert await ids(request_command, q="PRICING", **at) == {"Pricing call"}
    assert await ids(request_command, q="pric budget", **at) == {"Pricing call"}  # every word
    assert await ids(request_command, q="ricing", **at) == set()  # a prefix, not a substring
    assert await ids(request_command, q="kick off", **at) == {"Kick-off"}
    assert await ids(request_command, q="pric", priority="low", **at) == {"Renewal"}
    assert await ids(request_command, direction="outbound", **at) == {"Renewal"}
    assert await ids(request_command, outcome="won", source="gong", **at) == {"Intro"}
    assert await ids(request_command, performed_by_user_id="usr-a", **at) == {"Kick-off"}
    assert await ids(request_command, participant="con_9", **at) == {"Kick-off"}

    first = await request_command("list", {"q": "pric", "limit": 1, "sort": "created_at"}, kind="query")
    second = await request_command(
        "list", {"q": "pric", "limit": 1, "cursor": first["meta"]["next_cursor"]}, kind="query"
    )
    assert second["error"]["code"] == "validation_error"  # a cursor is bound to its filters and sort
    second = await request_command(
        "list", {"q": "pric", "limit": 1, "sort": "created_at", "cursor": first["meta"]["next_cursor"]}, kind="query"
    )
    assert [first["data"][0]["subject"], second["data"][0]["subject"]] == ["Pricing call", "Renewal"]
    assert second["meta"]["next_cursor"] is None

    refused = await request_command("list", {"q": "  -- !"}, kind="query")
    assert refused["error"]["code"] == "validation_error" and refused["error"]["details"][0]["field"] == "q"


def reader_plan(conn: psycopg.Connection[Any], filters: dict[str, Any], plan: ListPlan = ListPlan()) -> str:
    """The plan of a list page exactly as the service reads it: the reader role, the caller's scope
    set in the transaction, through the caller-scoped view (row-level security still on the table)."""
    caller = Caller("acme", "usr-1")
    statement, params = build_list_sql(scoped_view("activities", caller), ListQuery(filters=filters), caller,
                                       plan=plan)
    with conn.transaction():
        conn.execute("SET LOCAL activities.reader = 'on'")
        conn.execute("SET LOCAL ROLE activities_reader")
        conn.execute(
            "SELECT set_config('activities.tenant_id', 'acme', true), set_config('activities.app_id', '', true)"
        )
        rows = conn.execute(sql.SQL("EXPLAIN ") + statement, params).fetchall()
    return "\n".join(row[0] for row in rows)


CLONES = """
INSERT INTO activities
SELECT (jsonb_populate_record(NULL::activities, to_jsonb(a) || jsonb_build_object(
    'id', a.id || '_' || g,
    'document', a.document || jsonb_build_object(
        'subject', 'filler number ' || g, 'description', NULL, 'notes', NULL, 'priority', 'low',
        'participants', jsonb_build_array(jsonb_build_object('type', 'contact', 'id', 'con_x' || g))
    )))).*
FROM activities AS a, generate_series(1, 3000) AS g WHERE a.id = %s
"""


async def test_search_and_the_new_filters_use_their_indexes_as_the_service_reads(
    runtime: Runtime, request_command: Send
) -> None:
    """Under row-level security PostgreSQL evaluates the policy before any condition that is not
    leakproof, and `@@` / `@>` are not: the GIN indexes went unused. Reads go through the scoped view."""
    assert runtime.servers is not None
    created = await request_command(
        "create", {"account_id": "acc_plan", "subject": "Pricing", "priority": "high", "participants": []}
    )
    projected = await request_command(
        "get", {"id": created["data"]["id"], "min_position": created["meta"]["position"]}, kind="query"
    )
    assert "data" in projected, projected
    with psycopg.connect(runtime.servers.database_url, autocommit=True) as conn:
        conn.execute(CLONES, (created["data"]["id"],))  # the trigger derives each clone's columns
        conn.execute("ANALYZE activities")
        plans = {
            name: reader_plan(conn, filters)
            for name, filters in {
                "search": {"q": ("pricing",)},
                "participant": {"participant": "con_x7"},
                "priority": {"priority": "high"},
            }.items()
        }
        # a window of this month read by the month prefix index (read-model migration 13)
        month_window = ListPlan(True, True, (timedelta(days=20),), datetime.now(UTC), month_index=True)
        by_month = reader_plan(conn, {"q": ("pric", "fill")}, month_window)
    assert "activities_search" in plans["search"], plans["search"]
    assert "Bitmap Index Scan on activities_search_month_prefixes" in by_month, by_month
    assert "activities_participants" in plans["participant"], plans["participant"]
    assert "activities_priority" in plans["priority"], plans["priority"]


def as_reader(conn: psycopg.Connection[Any], statement: sql.Composable, params: list[Any]) -> list[Any]:
    """Rows of a statement read exactly as the service reads: the reader role, the caller's scope."""
    with conn.transaction():
        conn.execute("SET LOCAL activities.reader = 'on'")
        conn.execute("SET LOCAL ROLE activities_reader")
        conn.execute(
            "SELECT set_config('activities.tenant_id', 'acme', true), set_config('activities.app_id', '', true)"
        )
        return conn.execute(statement, params).fetchall()


TEXTS = [
    {"subject": "Pricing call", "description": "talked about the e-mail budget"},
    {"subject": "x1y found 2026 issues", "notes": "pi is 3.14, abc2026 and 2026abc"},
    {"subject": "Ärger mit dem Budget", "description": "ÉTÉ Kick-off"},
    {"subject": "snake_case_name here", "notes": "supercalifragilisticexpialidocious"},
    {"subject": "Prices", "description": "a b c"},
    {"subject": "nothing in common"},
]
SEARCHES = [
    "p", "pr", "pric", "pricing", "prices", "PRICE", "x1", "x1y", "2026", "202", "3", "14", "ärg", "ÄRGER", "été",
    "e", "mail", "e mail", "kick off", "snake", "snake_case", "snake_cas", "case_name", "supercalifra",
    "supercalifragi", "supercalifragilisticexpialidociousness", "pric budget", "ricing", "a b", "budget x1y",
    "abc2", "2026a", "abc2026", "snake_case_name", "_snake", "case_", "found_issues",
    "supercalifragilisticexpialidocious",
]


async def test_the_prefix_index_finds_exactly_what_the_search_vector_finds(
    runtime: Runtime, request_command: Send
) -> None:
    """Both shapes of `q` (the search vector's `word:*`, and the prefix index with it for the words
    the index does not hold) select the same rows, for every kind of word: prefixes of 1 to 12
    characters, longer words, digits, non-ASCII letters in any case, words the parser splits."""
    assert runtime.servers is not None
    position = 0
    for body in TEXTS:
        position = (await request_command("create", {"account_id": "acc_1", **body}))["meta"]["position"]
    assert "data" in await request_command("list", {"min_position": position}, kind="query")
    caller = Caller("acme", "usr-1")
    found: dict[str, list[str]] = {}
    with psycopg.connect(runtime.servers.database_url, autocommit=True) as conn:
        for text in SEARCHES:
            query = ListQuery(filters={"q": search_words("q", text)}, limit=100)
            view = scoped_view("activities", caller)
            shapes = [build_list_sql(view, query, caller, plan=ListPlan(first, first)) for first in (False, True)]
            by_vector, by_prefixes = ([row[0] for row in as_reader(conn, *shape)] for shape in shapes)
            assert by_prefixes == by_vector, text
            counts = [
                as_reader(conn, *build_stats_sql(scoped_view("activities", caller),
                                                 StatsQuery("type", filters=query.filters), caller, by_index))
                for by_index in (False, True)
            ]
            assert counts[0] == counts[1] and sum(row[1] for row in counts[0]) == len(by_vector), text
            found[text] = by_vector
    assert len(found["pric"]) == 2 and len(found["p"]) == 3 and len(found["202"]) == 1  # the test finds things
    assert found["ricing"] == [] and found["supercalifragilisticexpialidociousness"] == []
    assert len(found["snake_cas"]) == 1 and len(found["supercalifragi"]) == 1 and len(found["été"]) == 1


async def test_a_search_the_planner_would_find_in_the_search_index_reads_the_prefix_index(
    runtime: Runtime, request_command: Send
) -> None:
    """The service asks the planner (EXPLAIN) how it would read the search vector's condition; when
    it would find the matches in the search index (rare words), the list reads the prefix index."""
    assert runtime.servers is not None
    created = await request_command("create", {"account_id": "acc_plan", "subject": "Pricing", "participants": []})
    at = {"min_position": created["meta"]["position"]}
    assert "data" in await request_command("get", {"id": created["data"]["id"], **at}, kind="query")
    with psycopg.connect(runtime.servers.database_url, autocommit=True) as conn:
        conn.execute(CLONES, (created["data"]["id"],))
        conn.execute("ANALYZE activities")

        def prefix_index_scans() -> int:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'activities_search_prefixes'"
            ).fetchone()
            assert row is not None, "read-model migration 11 made the prefix index"
            return int(row[0])

        before = prefix_index_scans()
        rare = await request_command("list", {"q": "pric", **at}, kind="query")
        assert [d["subject"] for d in rare["data"]] == ["Pricing"]
        deadline = asyncio.get_running_loop().time() + 20
        while prefix_index_scans() == before and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)  # a backend reports its statistics when idle, within about 10 s
        assert prefix_index_scans() > before
        common = await request_command("list", {"q": "filler", "limit": 5, **at}, kind="query")
        assert len(common["data"]) == 5


def every_page(conn: psycopg.Connection[Any], query: ListQuery, plan: ListPlan) -> list[str]:
    """The ids of every page of a list read as `plan` says, following the keysets."""
    caller = Caller("acme", "usr-1")
    view = scoped_view("activities", caller)
    found: list[str] = []
    after: Keyset | None = None
    while True:
        rows = as_reader(conn, *build_list_sql(view, query, caller, after, plan))
        found += [row[0] for row in rows[: query.limit]]
        if len(rows) <= query.limit:
            return found
        last = rows[query.limit - 1]
        after = Keyset(last[1].isoformat() if last[1] is not None else None, last[0])


async def test_a_list_read_in_windows_finds_every_match_once_in_order(runtime: Runtime, request_command: Send) -> None:
    """Windows only cut the reading (sort_windows): every sort, direction and window size gives
    the same pages as the usual statement, rows without a value (due_date) last, a row newer than
    the plan's start (written after it was made) first; and so do windows by the month prefix
    index (read-model migration 13), with rows in months beyond the plan's start's."""
    assert runtime.servers is not None
    start = datetime(2026, 6, 3, 6, tzinfo=UTC)  # activity dates from 5 May to 3 June
    commands = [
        {"op": "create", "account_id": "acc_1", "subject": f"pricing {i}" if i % 3 else f"other {i}",
         "activity_date": (start - timedelta(hours=7 * i + i % 5)).isoformat(),
         **({"due_date": (start + timedelta(hours=i % 11)).isoformat()} if i % 4 else {})}
        for i in range(90)
    ]
    reply = await request_command("batch", {"commands": commands})
    assert all("data" in item for item in reply["data"]), reply
    assert "data" in await request_command("list", {"min_position": reply["meta"]["position"]}, kind="query")
    caller = Caller("acme", "usr-1")
    with psycopg.connect(runtime.servers.database_url, autocommit=True) as conn:
        for wire in ("-activity_date", "activity_date", "-due_date", "due_date", "-created_at"):
            sort = Sort(wire.lstrip("-"), wire.startswith("-"))
            query = ListQuery(filters={"q": ("pric",)}, sort=sort, limit=7)
            expected = every_page(conn, query, ListPlan())
            assert len(expected) == 60, wire  # the test reads many pages
            first, _ = as_reader(conn, *build_sort_span_sql(scoped_view("activities", caller), sort, caller))[0]
            later = first - timedelta(days=2) if sort.descending else first + timedelta(days=2)
            other_month = first - timedelta(days=25) if sort.descending else first + timedelta(days=25)
            for ends in [(timedelta(hours=5),), (timedelta(hours=1), timedelta(hours=4), timedelta(hours=16)),
                         (timedelta(days=30),), (timedelta(days=3), timedelta(days=12))]:
                for window_start in (first, later, other_month):
                    for month_index in (False, True):
                        plan = ListPlan(True, True, ends, window_start, month_index)
                        assert every_page(conn, query, plan) == expected, (wire, ends, window_start, month_index)

