"""`q` by the prefix index: which words it serves, the SQL of both shapes, and the plan reading."""

from __future__ import annotations

import time

import pytest
from psycopg import sql

from projections.queries import (
    SEARCH_PREFIX_CHARS,
    ListPlan,
    ListQuery,
    StatsQuery,
    build_list_sql,
    build_stats_sql,
    plan_prefers_matches_first,
    prefix_lexemes,
    search_conditions,
    searches_by_prefix_index,
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
        "activities_search_prefixes(search) @@ to_tsquery('simple', %s)",
        "search @@ to_tsquery('simple', %s)",
    ]
    assert params == ["pric & snake & case & budget & representati", "snake_case:* & representations:*"]

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
        "AND (activities_search_prefixes(search) @@ to_tsquery('simple', %s)) AND NOT is_deleted AND NOT is_erased "
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
    plans.put("a", True)
    assert plans.get("a") is True and plans.get("b") is None
    now[0] += 61
    assert plans.get("a") is None  # decided again once a minute: the statistics move
    plans.put("a", False)
    plans.put("b", True)
    plans.put("c", True)  # over the bound: the kept plans are dropped, not grown without end
    assert plans.get("a") is None and plans.get("c") is True
