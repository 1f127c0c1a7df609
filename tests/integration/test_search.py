"""`q`, full-text search of subject, description and notes, and the v1.1 filters, over real servers."""

from __future__ import annotations

from typing import Any

import psycopg

from services.bootstrap import Runtime

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
    second = await request_command("list", {"q": "pric", "limit": 1, "cursor": first["meta"]["next_cursor"]}, kind="query")
    assert second["error"]["code"] == "validation_error"  # a cursor is bound to its filters and sort
    second = await request_command(
        "list", {"q": "pric", "limit": 1, "sort": "created_at", "cursor": first["meta"]["next_cursor"]}, kind="query"
    )
    assert [first["data"][0]["subject"], second["data"][0]["subject"]] == ["Pricing call", "Renewal"]
    assert second["meta"]["next_cursor"] is None

    refused = await request_command("list", {"q": "  -- !"}, kind="query")
    assert refused["error"]["code"] == "validation_error" and refused["error"]["details"][0]["field"] == "q"


async def test_search_and_the_new_filters_use_their_indexes(runtime: Runtime) -> None:
    assert runtime.servers is not None
    with psycopg.connect(runtime.servers.database_url) as conn:
        conn.execute("SET enable_seqscan = off")  # a small table: ask whether an index can serve at all
        plans = {
            name: "\n".join(row[0] for row in conn.execute(f"EXPLAIN SELECT id FROM activities WHERE {condition}"))
            for name, condition in {
                "search": "search @@ to_tsquery('simple', 'pric:*')",
                "participant": "participant_ids @> ARRAY['con_9']",
                "priority": "tenant_id = 'acme' AND priority = 'high'",
            }.items()
        }
    assert "activities_search" in plans["search"], plans["search"]
    assert "activities_participants" in plans["participant"], plans["participant"]
    assert "activities_priority" in plans["priority"], plans["priority"]
