"""`q` by the prefix index: which words it serves, the SQL of both shapes, and the plan reading."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from psycopg import sql

from projections.queries import (
    MONTH_WINDOW_MAX_WIDTH,
    MONTH_WINDOWS_MIN_MATCHES,
    SEARCH_PREFIX_CHARS,
    WINDOW_GROWTH,
    WINDOW_MAX_SHARE,
    WINDOW_PAGES,
    WINDOWS_MIN_MATCHES,
    Keyset,
    ListPlan,
    ListQuery,
    PlannedList,
    Sort,
    StatsQuery,
    build_list_sql,
    build_sort_span_sql,
    build_stats_sql,
    expected_matches,
    month_start,
    month_tags,
    next_month_start,
    plan_prefers_matches_first,
    prefix_lexemes,
    search_conditions,
    searches_by_prefix_index,
    sort_windows,
)
from services.domain import Caller
from services.queries import ListPlans

ACME = Caller("acme", "usr-1")


def text(statement: sql.Composable) -> str:
    return statement.as_string(None)


@pytest.mark.parametrize(
    ("word", "lexemes", "exact"),
    [
        ("pric", ["pric"], True),
        ("ärger", ["ärger"], True),
        ("x1y", ["x1y"], True),
        ("2026", ["2026"], True),
        ("a", ["a"], True),
        ("a" * SEARCH_PREFIX_CHARS, ["a" * SEARCH_PREFIX_CHARS], True),
        # longer than the prefixes kept: its first ones find a superset
        ("representations", ["representati"], False),
        # the parser splits at `_` (a phrase, which a vector without positions never matches): its parts
        ("snake_case", ["snake", "case"], False),
        ("___", [], False),
    ],
)
def test_the_prefix_index_lexemes_of_a_word(word: str, lexemes: list[str], exact: bool) -> None:
    assert prefix_lexemes(word) == (lexemes, exact)


def test_search_conditions_keep_the_vector_condition_for_the_words_the_index_does_not_find_exactly() -> None:
    terms, params = search_conditions(("pric", "snake_case", "budget", "representations"), prefix_index=True)
    assert [text(term) for term in terms] == [
        "activities_search_prefixes(search) @@ (SELECT to_tsquery('simple', %s))",
        "(search @@ to_tsquery('simple', %s)) IS TRUE",  # a filter of the prefix index's rows, no index scan
    ]
    assert params == ["pric & snake & case & budget & representati", "snake_case:* & representations:*"]
    # words without a lexeme (only `_`): the search vector's condition alone, which its index serves
    only_vector, _ = search_conditions(("___",), prefix_index=True)
    assert [text(term) for term in only_vector] == ["search @@ to_tsquery('simple', %s)"]

    terms, params = search_conditions(("pric", "budget"), prefix_index=False)
    assert [text(term) for term in terms] == ["search @@ to_tsquery('simple', %s)"]
    assert params == ["pric:* & budget:*"]
    assert searches_by_prefix_index(("___",)) is False and searches_by_prefix_index(("___", "a_b")) is True


def test_a_list_by_the_prefix_index_selects_its_matches_apart_then_sorts_them() -> None:
    query = ListQuery(filters={"q": ("pric",), "owner_id": "usr-9"})
    walked, walked_params = build_list_sql("activities", query, ACME)
    fenced, fenced_params = build_list_sql("activities", query, ACME, plan=ListPlan(True, True))
    assert "search @@" in text(walked) and "OFFSET" not in text(walked)
    # the subquery with OFFSET 0 keeps the planner from walking the date index and computing the
    # prefixes of each row it passes: the index decides which rows match
    assert (
        'FROM (SELECT id, "activity_date" AS sort_value FROM "activities" WHERE tenant_id = %s AND "owner_id" = %s '
        "AND (activities_search_prefixes(search) @@ (SELECT to_tsquery('simple', %s))) AND NOT is_deleted "
        "AND NOT is_erased "
        'OFFSET 0) AS matches ORDER BY "sort_value" DESC NULLS LAST, id DESC LIMIT %s'
    ) in text(fenced)
    assert walked_params == ["acme", "usr-9", "pric:*", 51] and fenced_params == ["acme", "usr-9", "pric", 51]


def test_stats_count_by_the_prefix_index_when_it_is_there() -> None:
    query = StatsQuery(group_by="owner_id", filters={"q": ("pric",)})
    assert "activities_search_prefixes(search) @@" in text(build_stats_sql("activities", query, ACME, True)[0])
    assert "activities_search_prefixes" not in text(build_stats_sql("activities", query, ACME)[0])


BITMAP = {
    "Plan": {
        "Node Type": "Nested Loop",
        "Plans": [
            {
                "Node Type": "Limit",
                "Plans": [
                    {
                        "Node Type": "Bitmap Heap Scan",
                        "Plans": [
                            {
                                "Node Type": "Bitmap Index Scan",
                                "Index Name": "activities_search",
                                "Index Cond": "(search @@ '''trip'':*'::tsquery)",
                            }
                        ],
                    }
                ],
            },
            {"Node Type": "Index Scan", "Index Name": "activities_pkey", "Index Cond": "(id = activities_1.id)"},
        ],
    }
}
WALK = {
    "Plan": {
        "Node Type": "Limit",
        "Plans": [
            {
                "Node Type": "Index Scan",
                "Index Name": "activities_activity_date_desc",
                "Plan Rows": 130554,
                "Filter": "(search @@ '''which'':*'::tsquery)",
            }
        ],
    }
}
OTHER_BITMAP = {
    "Plan": {"Node Type": "Bitmap Index Scan", "Index Name": "activities_owner", "Index Cond": "(owner_id = 'u')"}
}


def test_the_plan_tells_whether_the_prefix_index_serves_the_search_better() -> None:
    assert plan_prefers_matches_first([BITMAP]) is True
    assert plan_prefers_matches_first([WALK]) is False  # a common word: the walk checks each row's vector
    assert plan_prefers_matches_first([OTHER_BITMAP]) is False  # another index finds the rows
    assert plan_prefers_matches_first([]) is False
    # a walk the planner chose though it expects few matches in all: sorting them costs less
    rare_walk = {"Plan": {**WALK["Plan"], "Plans": [{**WALK["Plan"]["Plans"][0], "Plan Rows": 2730}]}}
    assert plan_prefers_matches_first([rare_walk]) is True
    assert plan_prefers_matches_first([rare_walk], max_rows=2000) is False
    participant_walk = {"Plan": {**WALK["Plan"]["Plans"][0], "Plan Rows": 2904,
                                 "Filter": "((NOT is_deleted) AND (participant_ids @> '{ctc_00038}'::text[]))"}}
    assert plan_prefers_matches_first([participant_walk]) is True
    # an index-only walk (migration 12) checks a row ten times faster: replaced for fewer matches only
    index_only = {**participant_walk["Plan"], "Node Type": "Index Only Scan"}
    assert plan_prefers_matches_first([{"Plan": index_only}]) is False
    assert plan_prefers_matches_first([{"Plan": {**index_only, "Plan Rows": 1192}}]) is True


def test_search_plans_are_kept_for_their_time_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    plans = ListPlans(ttl_s=60, kept=2)
    first, walk = PlannedList(True, 3000.0), PlannedList(False)
    plans.put("a", first)
    assert plans.get("a") is first and plans.get("b") is None
    now[0] += 61
    assert plans.get("a") is None  # decided again once a minute: the statistics move
    plans.put("a", walk)
    plans.put("b", first)
    plans.put("c", first)  # over the bound: the kept plans are dropped, not grown without end
    assert plans.get("a") is None and plans.get("c") is first


def test_the_expected_matches_are_the_rows_under_the_pages_limit() -> None:
    assert expected_matches([WALK]) == 130554
    sorted_matches = {"Plan": {"Node Type": "Nested Loop", "Plans": [
        {"Node Type": "Limit", "Plan Rows": 51, "Plans": [{"Node Type": "Sort", "Plan Rows": 2499}]}]}}
    assert expected_matches([sorted_matches]) == 2499
    assert expected_matches([OTHER_BITMAP]) is None and expected_matches([]) is None


NEWEST = datetime(2026, 12, 1, tzinfo=UTC)
OLDEST = NEWEST - timedelta(days=1000)


def test_windows_are_sized_from_the_expected_matches_and_the_span() -> None:
    # 5,100 matches over 1,000 days: the first window holds 1.5 pages (77 rows) if spread evenly
    ends = sort_windows(NEWEST, OLDEST, 5100.0, 51)
    first_share = WINDOW_PAGES * 51 / 5100
    assert ends[0] == timedelta(days=1000) * first_share
    assert ends[1] == ends[0] * WINDOW_GROWTH
    assert all(end <= timedelta(days=1000) * WINDOW_MAX_SHARE for end in ends) and len(ends) == 2
    assert sort_windows(OLDEST, NEWEST, 5100.0, 51) == ends  # ascending: the same widths
    # too few matches (their heap pages cost what a window would), no span, or a page too big
    assert sort_windows(NEWEST, OLDEST, WINDOWS_MIN_MATCHES - 1.0, 51) == ()
    assert sort_windows(None, None, 5100.0, 51) == ()
    assert sort_windows(NEWEST, OLDEST, 5100.0, 400) == ()  # the first window would span 12% of the values
    # with the month prefix index: from fewer matches, and windows up to MONTH_WINDOW_MAX_WIDTH
    assert sort_windows(NEWEST, OLDEST, 900.0, 51) == ()
    monthly = sort_windows(NEWEST, OLDEST, 900.0, 51, month_index=True)
    assert monthly == (timedelta(days=1000) * (WINDOW_PAGES * 51 / 900),)  # 85 days; the next 340 too wide
    assert all(end <= MONTH_WINDOW_MAX_WIDTH for end in monthly)
    assert sort_windows(NEWEST, OLDEST, 5100.0, 51, month_index=True) == ends  # 10% of the span is wider
    assert sort_windows(NEWEST, OLDEST, MONTH_WINDOWS_MIN_MATCHES - 1.0, 51, month_index=True) == ()
    # a span shorter than MONTH_WINDOW_MAX_WIDTH: windows up to the span, none past it
    short = sort_windows(NEWEST, NEWEST - timedelta(days=10), 5100.0, 51, month_index=True)
    assert len(short) == 4 and all(end <= timedelta(days=10) for end in short)
    assert sort_windows(NEWEST, NEWEST, 5100.0, 51, month_index=True) == sort_windows(NEWEST, NEWEST, 5100.0, 51)


def test_a_planned_list_needs_the_span_only_for_windows() -> None:
    assert PlannedList.from_plan([WALK]) == PlannedList(False)
    assert PlannedList.from_plan(None) == PlannedList(False)
    many = PlannedList(True, 5100.0)
    assert many.needs_span() and not PlannedList(True, 900.0).needs_span() and not PlannedList(False).needs_span()
    # the month prefix index's windows cost no span of the date index: from fewer matches
    assert PlannedList(True, 900.0).needs_span(month_index=True)
    assert not PlannedList(True, MONTH_WINDOWS_MIN_MATCHES - 1.0).needs_span(month_index=True)
    plan = many.with_span(NEWEST, OLDEST).plan(51, True)
    assert plan == ListPlan(True, True, sort_windows(NEWEST, OLDEST, 5100.0, 51), NEWEST)
    assert PlannedList(False).plan(51, True) == ListPlan()
    assert PlannedList(True, 900.0).plan(51, False) == ListPlan(True, False)


def test_the_span_is_two_probes_of_the_sort_index() -> None:
    statement, params = build_sort_span_sql("activities", Sort("due_date", descending=True), ACME)
    assert text(statement) == (
        'SELECT max("due_date") AS first, min("due_date") AS last FROM "activities" WHERE tenant_id = %s'
    )
    assert params == ["acme"]
    ascending, _ = build_sort_span_sql("activities", Sort("created_at", descending=False), ACME)
    assert text(ascending).startswith('SELECT min("created_at") AS first, max("created_at") AS last')


def test_a_list_in_windows_reads_them_in_sort_order_and_stops_at_its_limit() -> None:
    query = ListQuery(filters={"q": ("pric",)})
    ends = (timedelta(days=2), timedelta(days=8))
    statement, params = build_list_sql("activities", query, ACME, plan=ListPlan(True, True, ends, NEWEST))
    sql_text = text(statement)
    # three windows, the rest last and open to rows without a date; under one LIMIT, no ORDER BY
    assert sql_text.count("OFFSET 0) AS matches") == 3
    assert 'NOT is_erased AND "activity_date" > %s OFFSET 0)' in sql_text
    assert 'NOT is_erased AND "activity_date" > %s AND NOT "activity_date" > %s OFFSET 0)' in sql_text
    assert '("activity_date" > %s) IS NOT TRUE' in sql_text
    assert ") AS windows LIMIT %s) AS page" in sql_text and "AS ranges" not in sql_text
    edges = [value for value in params if isinstance(value, datetime)]
    assert edges == [NEWEST - ends[0], NEWEST - ends[1], NEWEST - ends[0], NEWEST - ends[1]]
    assert params[-1] == 51
    # a next page counts its windows from its keyset
    after = Keyset((NEWEST - timedelta(days=100)).isoformat(), "act_x")
    _, next_params = build_list_sql("activities", query, ACME, after, ListPlan(True, True, ends, NEWEST))
    start = NEWEST - timedelta(days=100)
    assert [v for v in next_params if isinstance(v, datetime)] == [start - ends[0], start - ends[1], start - ends[0],
                                                                   start - ends[1]]
    # ascending: the windows go up from the start
    up = ListQuery(filters={"q": ("pric",)}, sort=Sort("activity_date", descending=False))
    up_statement, up_params = build_list_sql("activities", up, ACME, plan=ListPlan(True, True, ends[:1], OLDEST))
    assert '"activity_date" < %s' in text(up_statement) and '("activity_date" < %s) IS NOT TRUE' in text(up_statement)
    assert [v for v in up_params if isinstance(v, datetime)] == [OLDEST + ends[0], OLDEST + ends[0]]
    # after a row without a date only the rows without one are left: no windows
    nulls = Keyset(None, "act_x")
    assert "AS windows" not in text(build_list_sql("activities", query, ACME, nulls, ListPlan(True, True, ends,
                                                                                              NEWEST))[0])
    # windows are read matches first only
    assert "AS windows" not in text(build_list_sql("activities", query, ACME, plan=ListPlan(False, False, ends,
                                                                                            NEWEST))[0])


def test_month_tags_are_the_utc_months_from_the_earlier_to_the_later_instant() -> None:
    assert month_tags(datetime(2021, 11, 20, tzinfo=UTC), datetime(2021, 11, 2, tzinfo=UTC)) == ("202111/",)
    assert month_tags(datetime(2021, 11, 30, tzinfo=UTC), datetime(2022, 2, 1, tzinfo=UTC)) == (
        "202111/", "202112/", "202201/", "202202/",
    )
    # months are UTC's: 23:30 on 31 December at UTC-2 is January in UTC
    late = datetime(2021, 12, 31, 23, 30, tzinfo=timezone(timedelta(hours=-2)))
    assert month_tags(late, late) == ("202201/",)
    assert next_month_start(datetime(2021, 12, 31, 23, 59, tzinfo=UTC)) == datetime(2022, 1, 1, tzinfo=UTC)
    assert next_month_start(late) == datetime(2022, 2, 1, tzinfo=UTC)
    assert month_start(datetime(2021, 12, 31, 23, 59, tzinfo=UTC)) == datetime(2021, 12, 1, tzinfo=UTC)


def month_windows(statement: sql.Composable) -> int:
    return text(statement).count("activities_search_month_prefixes(search, activity_date) @@")


def test_windows_of_few_months_ask_the_month_prefix_index_for_their_months() -> None:
    query = ListQuery(filters={"q": ("pric", "call")})
    start = datetime(2021, 12, 20, tzinfo=UTC)
    ends = (timedelta(days=30), timedelta(days=120), timedelta(days=480))
    plan = ListPlan(True, True, ends, start, month_index=True)
    statement, params = build_list_sql("activities", query, ACME, plan=plan)
    sql_text = text(statement)
    # the first two windows (2 and 4 months) by the month index, their date conditions no index's;
    # the third (13 months) and the rest as without it
    assert month_windows(statement) == 2 and sql_text.count("activities_search_prefixes(search) @@") == 3
    assert '("activity_date" > %s) IS TRUE' in sql_text
    assert '("activity_date" > %s AND NOT "activity_date" > %s) IS TRUE' in sql_text
    month_lists = [value for value in params if isinstance(value, list)]
    assert month_lists == [["202111/", "202112/"], ["202108/", "202109/", "202110/", "202111/"]]
    assert params.count("pric call") == 2 and params.count("pric & call") == 3
    # the open side of a first page: the rows from the month after the start's, through the date index
    assert '"activity_date" >= %s' in sql_text and datetime(2022, 1, 1, tzinfo=UTC) in params
    # a next page is bounded by its keyset: no open side
    after = Keyset(start.isoformat(), "act_x")
    next_statement, _ = build_list_sql("activities", query, ACME, after, plan)
    assert month_windows(next_statement) == 2 and '"activity_date" >= %s' not in text(next_statement)
    # ascending: the open side is before the start's month
    up = ListQuery(filters={"q": ("pric",)}, sort=Sort("activity_date", descending=False))
    up_statement, up_params = build_list_sql("activities", up, ACME, plan=plan)
    assert month_windows(up_statement) == 2 and '"activity_date" < %s' in text(up_statement)
    assert datetime(2021, 12, 1, tzinfo=UTC) in up_params
    # other sorts, plans without the month index, and words the prefix index does not serve alone
    by_due = ListQuery(filters={"q": ("pric",)}, sort=Sort("due_date", descending=True))
    assert month_windows(build_list_sql("activities", by_due, ACME, plan=plan)[0]) == 0
    without = ListPlan(True, True, ends, start)
    assert month_windows(build_list_sql("activities", query, ACME, plan=without)[0]) == 0
    assert PlannedList(True, 5100.0, NEWEST, OLDEST).plan(51, False, True).month_index is False
    assert PlannedList(True, 5100.0, NEWEST, OLDEST).plan(51, True, True).month_index is True
    long_word = ListQuery(filters={"q": ("representations",)})
    long_text = text(build_list_sql("activities", long_word, ACME, plan=plan)[0])
    assert month_windows(build_list_sql("activities", long_word, ACME, plan=plan)[0]) == 2
    assert long_text.count("(search @@ to_tsquery('simple', %s)) IS TRUE") == 5  # checked on every window's rows
