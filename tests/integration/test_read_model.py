"""The read-model projection against real PostgreSQL: typed rows, exactly-once tracking, resuming,
surviving dropped connections, `projections status` and `projections rebuild` (a rebuilt model
equals the live one row for row, also when built while activities are being written)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from projections.consumer import TrackedConsumer
from projections.read_model import PROJECTOR_SETTINGS, Projector
from services.bootstrap import Runtime
from services.cli import main

Send = Callable[..., Any]


def projector_of(runtime: Runtime) -> TrackedConsumer[Projector]:
    """The projector role's consumer: one active projector per store (advisory lock)."""
    return next(
        c for c in runtime.components if isinstance(c, TrackedConsumer) and c.name == PROJECTOR_SETTINGS.name
    )


def new_projector(runtime: Runtime, **settings: Any) -> TrackedConsumer[Projector]:
    assert runtime.app is not None and runtime.servers is not None
    handler = Projector(runtime.app, runtime.servers.database_url)
    return TrackedConsumer(
        runtime.app, runtime.servers.database_url, handler, dataclasses.replace(PROJECTOR_SETTINGS, **settings)
    )


def db(runtime: Runtime) -> psycopg.Connection[dict[str, Any]]:
    assert runtime.servers is not None
    return psycopg.connect(runtime.servers.database_url, autocommit=True, row_factory=dict_row)


def rows(runtime: Runtime, table: str = "activities") -> list[dict[str, Any]]:
    with db(runtime) as conn:
        return conn.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()


def tracked(runtime: Runtime, name: str = "Activities") -> int | None:
    with db(runtime) as conn:
        try:
            row = conn.execute(
                "SELECT notification_id FROM activities_projection_tracking WHERE application_name = %s", (name,)
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            return None  # the projector has not created its tables yet
        return None if row is None else row["notification_id"]


def log_position(runtime: Runtime) -> int:
    with db(runtime) as conn:
        row = conn.execute("SELECT max(notification_id) AS n FROM activities_events").fetchone()
        return int(row["n"] or 0) if row else 0


async def caught_up(runtime: Runtime, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (tracked(runtime) or 0) < log_position(runtime):
        assert asyncio.get_running_loop().time() < deadline, "the projector did not catch up"
        await asyncio.sleep(0.02)


async def test_rows_have_typed_columns_and_the_whole_document(runtime: Runtime, request_command: Send) -> None:
    created = await request_command(
        "create",
        {
            "account_id": "acc_1",
            "contact_id": "con_1",
            "contact_ids": ["con_2", "con_3"],
            "owner_id": "usr-0f0e0d0c-0b0a-4909-8807-060504030201",
            "type": "meeting",
            "status": "planned",
            "tags": ["vip", "q3"],
            "activity_date": "2026-05-01T10:00:00+02:00",
            "due_date": "2026-05-02T00:00:00Z",
        },
    )
    patched = await request_command(
        "patch", {"id": created["data"]["id"], "changes": {"status": "held", "deal_id": "deal_7"}}
    )
    await caught_up(runtime)
    [row] = rows(runtime)
    document = patched["data"]
    assert row["document"] == document
    assert (row["id"], row["tenant_id"], row["app_id"]) == (document["id"], "acme", None)
    assert (row["account_id"], row["deal_id"], row["contact_id"]) == ("acc_1", "deal_7", "con_1")
    assert row["contact_ids"] == ["con_2", "con_3"] and row["tags"] == ["vip", "q3"]
    assert (row["owner_id"], row["type"], row["status"]) == (document["owner_id"], "meeting", "held")
    assert row["activity_date"] == datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
    assert row["due_date"] == datetime(2026, 5, 2, tzinfo=UTC)
    assert row["updated_at"] == datetime.fromisoformat(document["updated_at"].replace("Z", "+00:00"))
    assert (row["version"], row["is_deleted"], row["position"]) == (2, False, patched["meta"]["position"])
    assert tracked(runtime) == patched["meta"]["position"]


async def test_projector_resumes_from_its_tracked_position_exactly_once(
    runtime: Runtime, request_command: Send
) -> None:
    assert runtime.app is not None and runtime.servers is not None
    first = await request_command("create", {"account_id": "acc_1"})
    await caught_up(runtime)
    projector = projector_of(runtime)
    await projector.stop()
    stopped_at = tracked(runtime)
    replies = [await request_command("create", {"account_id": "acc_r"}) for _ in range(25)]
    patched = await request_command("patch", {"id": first["data"]["id"], "changes": {"status": "late"}})
    await asyncio.sleep(0.3)
    assert tracked(runtime) == stopped_at and len(rows(runtime)) == 1  # nothing applied while stopped

    resumed = new_projector(runtime, page_size=7)  # several batches
    await resumed.start()
    try:
        await caught_up(runtime)
        table = {row["id"]: row for row in rows(runtime)}
        assert len(table) == 26
        assert table[first["data"]["id"]]["document"] == patched["data"]
        assert all(table[r["data"]["id"]]["document"] == r["data"] for r in replies)
        position = tracked(runtime)
        assert position == patched["meta"]["position"]

        # A projector that lost its place (e.g. crashed after committing) re-reads a page it already
        # applied: the tracking guard refuses the whole transaction, and nothing moves backwards.
        stale = new_projector(runtime)  # not started: at position 0, and not the active instance
        await stale.handler.resume()
        applied = await stale.step()
        await stale.handler.close()
        assert applied > 0 and stale.position == position
        assert tracked(runtime) == position
        assert {row["id"]: row for row in rows(runtime)} == table
    finally:
        await resumed.stop()


async def test_projector_and_reads_survive_dropped_connections(runtime: Runtime, request_command: Send) -> None:
    await request_command("create", {"account_id": "acc_1"})
    await caught_up(runtime)
    with db(runtime) as conn:
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert killed and killed["n"] >= 2
    reply: dict[str, Any] = {}
    for _ in range(50):
        reply = await request_command("create", {"account_id": "acc_after"})
        if "data" in reply:
            break
        await asyncio.sleep(0.2)
    assert "data" in reply, reply
    for _ in range(50):
        listed = await request_command(
            "list", {"account_id": "acc_after", "min_position": reply["meta"]["position"]}, kind="query"
        )
        if "data" in listed:
            break
        await asyncio.sleep(0.2)
    assert [d["id"] for d in listed["data"]] == [reply["data"]["id"]]


async def write_mix(request_command: Send, count: int, tenant_token: str | None = None) -> list[dict[str, Any]]:
    """Creates, patches, deletes and restores: the latest reply of each activity."""
    latest: dict[str, dict[str, Any]] = {}
    for i in range(count):
        created = await request_command(
            "create",
            {
                "account_id": f"acc_{i % 3}",
                "tags": ["t"] if i % 2 else [],
                "activity_date": f"2026-01-{1 + i % 28:02d}T00:00:00Z",
            },
            bearer=tenant_token,
        )
        reply = created
        if i % 3 == 0:
            reply = await request_command(
                "patch", {"id": created["data"]["id"], "changes": {"status": "done"}}, bearer=tenant_token
            )
        if i % 4 == 0:
            reply = await request_command("delete", {"id": created["data"]["id"]}, bearer=tenant_token)
        if i % 8 == 0:
            reply = await request_command("restore", {"id": created["data"]["id"]}, bearer=tenant_token)
        latest[created["data"]["id"]] = reply
    return list(latest.values())


def statistics_targets(conn: Any) -> dict[str, int]:
    """The statistics targets set on the read model's columns and index expressions (read-model
    migration 11: finer for `search`, none for the prefix index's expression; 13: none for the month
    prefix index's)."""
    rows = conn.execute(
        "SELECT c.relname || '.' || a.attname AS name, a.attstattarget AS target FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid WHERE c.relname IN ('activities', 'activities_search_prefixes', "
        "'activities_search_month_prefixes') "
        "AND a.attnum > 0 AND a.attstattarget IS NOT NULL AND a.attstattarget >= 0"
    ).fetchall()
    return {row["name"]: row["target"] for row in rows}


async def test_rebuild_equals_live_row_for_row(
    runtime: Runtime, request_command: Send, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert runtime.servers is not None
    await write_mix(request_command, 40)
    await caught_up(runtime)
    live = rows(runtime)
    with db(runtime) as conn:
        indexes_before = {
            r["indexname"] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'activities'")
        }
        statistics_before = statistics_targets(conn)
    assert statistics_before == {
        "activities.search": 400,
        "activities_search_prefixes.activities_search_prefixes": 0,
        "activities_search_month_prefixes.activities_search_month_prefixes": 0,
    }
    monkeypatch.setenv("ACTIVITIES_DATABASE_URL", runtime.servers.database_url)
    code = await asyncio.get_running_loop().run_in_executor(None, main, ["projections", "rebuild"])
    assert code == 0
    captured = capsys.readouterr()
    assert "rebuilding read model [" in captured.err and "switched" in captured.out
    rebuilt = rows(runtime)
    assert rebuilt == live
    with db(runtime) as conn:
        indexes_after = {
            r["indexname"] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'activities'")
        }
        assert conn.execute("SELECT to_regclass('activities_rebuild') AS t").fetchone() == {"t": None}
        views = conn.execute("SELECT viewname FROM pg_views WHERE viewname LIKE 'activities%' ORDER BY 1").fetchall()
        assert [row["viewname"] for row in views] == ["activities_of_app", "activities_of_tenant"]
        assert statistics_targets(conn) == statistics_before  # migrations' settings of the built indexes too
    assert indexes_after == indexes_before and len(indexes_before) >= 10
    assert tracked(runtime, "Activities_rebuild") is None
    # the service keeps serving and projecting on the switched table
    reply = await request_command("create", {"account_id": "acc_new"})
    listed = await request_command(
        "list", {"account_id": "acc_new", "min_position": reply["meta"]["position"]}, kind="query"
    )
    assert [d["id"] for d in listed["data"]] == [reply["data"]["id"]]


async def test_rebuild_while_activities_are_being_written(
    runtime: Runtime, request_command: Send, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert runtime.servers is not None
    before = await write_mix(request_command, 30)
    for _ in range(8):  # past psycopg's prepare threshold: prepared statements must follow the switch
        listed = await request_command("list", {"account_id": "acc_1", "limit": 200}, kind="query")
    monkeypatch.setenv("ACTIVITIES_DATABASE_URL", runtime.servers.database_url)
    rebuild = asyncio.get_running_loop().run_in_executor(None, main, ["projections", "rebuild", "--quiet"])
    during = await write_mix(request_command, 30)
    assert await rebuild == 0
    after = await write_mix(request_command, 5)
    await caught_up(runtime)
    expected = {reply["data"]["id"]: reply["data"] for reply in before + during + after}
    table = {row["id"]: row["document"] for row in rows(runtime)}
    assert table == expected
    for _ in range(3):
        listed = await request_command("list", {"account_id": "acc_1", "limit": 200}, kind="query")
        live_ids = {i for i, doc in expected.items() if doc["account_id"] == "acc_1" and not doc["is_deleted"]}
        assert {doc["id"] for doc in listed["data"]} == live_ids
    # and it equals a fresh rebuild, row for row
    live = rows(runtime)
    assert await asyncio.get_running_loop().run_in_executor(None, main, ["projections", "rebuild", "--quiet"]) == 0
    assert rows(runtime) == live


async def test_projections_status(
    runtime: Runtime, request_command: Send, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    assert runtime.servers is not None
    for _ in range(3):
        await request_command("create", {"account_id": "acc_s"})
    await caught_up(runtime)
    monkeypatch.setenv("ACTIVITIES_DATABASE_URL", runtime.servers.database_url)
    assert await asyncio.get_running_loop().run_in_executor(None, main, ["projections", "status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == {"position": log_position(runtime), "log_position": log_position(runtime), "lag": 0, "rows": 3}

    await projector_of(runtime).stop()
    await request_command("create", {"account_id": "acc_s"})
    assert await asyncio.get_running_loop().run_in_executor(None, main, ["projections", "status"]) == 0
    text = capsys.readouterr().out
    assert "lag: 1" in text and "rows: 3" in text


async def test_a_read_waiting_on_a_switch_gives_its_locks_up_instead_of_deadlocking(
    runtime: Runtime, request_command: Send
) -> None:
    """A rebuild's switch locks the live table, then drops it with the views that depend on it. A
    read that arrives meanwhile has locked its view and waits for the table: the switch then waits
    for the read, a deadlock PostgreSQL breaks only after `deadlock_timeout` (1 s) by failing one
    side. A read gives up after READ_LOCK_TIMEOUT instead, releasing its view, and is tried again
    once the switch is done: the switch waits about that long, and the read is answered."""
    assert runtime.servers is not None
    created = await request_command("create", {"account_id": "acc_switch"})
    at = {"account_id": "acc_switch", "min_position": created["meta"]["position"]}
    assert len((await request_command("list", at, kind="query"))["data"]) == 1
    loop = asyncio.get_running_loop()
    with psycopg.connect(runtime.servers.database_url) as switch:
        switch.execute("LOCK TABLE activities IN ACCESS EXCLUSIVE MODE")  # as _switch does first
        read = asyncio.ensure_future(request_command("list", at, kind="query"))
        await asyncio.sleep(0.3)  # the read has locked its view and waits for the table

        def lock_the_view() -> float:
            started = time.perf_counter()
            switch.execute("LOCK TABLE activities_of_tenant IN ACCESS EXCLUSIVE MODE")  # as the drop does
            return time.perf_counter() - started

        waited = await loop.run_in_executor(None, lock_the_view)
        await asyncio.sleep(0.2)
        switch.commit()
    reply = await read
    assert waited < 0.5, f"the switch waited {waited:.3f} s for the read's view lock"
    assert [d["account_id"] for d in reply["data"]] == ["acc_switch"], reply
