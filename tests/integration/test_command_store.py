"""The command store on real PostgreSQL: a batch reads its activities in one query, a stale
cache is fast-forwarded, lookups probe the index, and appends are serialised without the
table lock that stalled them behind autovacuum.

Two `CommandService`s on one database stand for two command processes. Each call runs in an
event loop of its own (`asyncio.run`) and closes the service's connection after it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

import pytest
from psycopg import sql
from psycopg.rows import tuple_row

from activities_client.errors import NotFound
from events.activity import activity_uuid
from events.commands import parse_create, parse_patch
from services.application import (
    CommandRequest,
    CommandResult,
    CommandService,
)
from services.domain import Activity, Caller

CALLER = Caller("acme", "usr-1")




def execute(service: CommandService, requests: list[CommandRequest]) -> list[Any]:
    async def once() -> list[Any]:
        try:
            return await service.execute(requests)
        finally:
            await service.close()

    return asyncio.run(once())


def load_current(service: CommandService, originator_ids: list[UUID]) -> dict[UUID, Activity]:
    async def once() -> dict[UUID, Activity]:
        try:
            return await service.load_current(originator_ids)
        finally:
            await service.close()

    return asyncio.run(once())


def run(service: CommandService, *bodies: tuple[str, dict[str, Any]]) -> list[CommandResult]:
    parsers = {"create": parse_create, "patch": parse_patch}
    outcomes = execute(service, [CommandRequest(parsers[name](body), CALLER) for name, body in bodies])
    assert all(isinstance(outcome, CommandResult) for outcome in outcomes), outcomes
    return [outcome for outcome in outcomes if isinstance(outcome, CommandResult)]


def test_a_batch_of_patches_reads_the_store_once(
    make_service: Callable[[], CommandService], monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, patcher = make_service(), make_service()  # the patcher's cache knows none of them
    created = run(writer, *[("create", {"account_id": "acc_1", "subject": f"s{i}"}) for i in range(20)])
    reads: list[int] = []
    select_after = patcher.store.select_after

    async def counted(refs: Any) -> Any:
        reads.append(len(refs))
        return await select_after(refs)

    def per_activity_read(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a batch must not read activities one by one")

    monkeypatch.setattr(patcher.store, "select_after", counted)
    monkeypatch.setattr(patcher.app.activities_recorder, "select_events", per_activity_read)
    patches = [("patch", {"id": r.document["id"], "changes": {"subject": f"p{i}"}}) for i, r in enumerate(created)]
    patched = run(patcher, *patches, patches[0])  # the same activity twice in one batch
    assert reads == [20]
    assert [r.document["version"] for r in patched] == [2] * 20 + [2]  # the repeat is a no-op on version 2
    assert [r.document["subject"] for r in patched[:20]] == [f"p{i}" for i in range(20)]

    again = run(patcher, *[("patch", {**body, "changes": {"subject": "q"}}) for _, body in patches])
    assert reads == [20, 20]  # cached now, and still one read: the fast-forward of the whole batch
    assert [r.document["version"] for r in again] == [3] * 20


def test_a_stale_cache_is_fast_forwarded_before_deciding(make_service: Callable[[], CommandService]) -> None:
    first, second = make_service(), make_service()
    (created,) = run(first, ("create", {"account_id": "acc_1", "subject": "v1"}))
    activity_id = created.document["id"]
    run(first, ("patch", {"id": activity_id, "changes": {"subject": "v2 by first"}}))  # first caches version 2
    run(second, ("patch", {"id": activity_id, "changes": {"status": "held"}}))  # version 3, unseen by first

    (patched,) = run(first, ("patch", {"id": activity_id, "changes": {"subject": "v4"}, "expected_version": 3}))
    assert patched.document["version"] == 4
    assert patched.document["status"] == "held" and patched.document["subject"] == "v4"


def test_loaded_activities_are_copies_and_unknown_ids_are_absent(make_service: Callable[[], CommandService]) -> None:
    service = make_service()
    (created,) = run(service, ("create", {"account_id": "acc_1", "subject": "kept"}))
    originator_id = activity_uuid(created.document["id"])
    missing = activity_uuid("act_01KB0000000000000000000000")
    loaded = load_current(service, [originator_id, missing, originator_id])
    assert list(loaded) == [originator_id]
    loaded[originator_id].document = {"subject": "scribbled"}
    assert load_current(service, [originator_id])[originator_id].document["subject"] == "kept"

    outcomes = execute(
        service,
        [CommandRequest(parse_patch({"id": "act_01KB0000000000000000000000", "changes": {"subject": "x"}}), CALLER)],
    )
    assert isinstance(outcomes[0], NotFound)


def test_batch_lookups_probe_the_index_before_the_tables_are_analyzed(
    make_service: Callable[[], CommandService],
) -> None:
    """Right after a burst of writes PostgreSQL has no statistics of the new rows; a plain join of
    the keys with the events table was then planned as a full scan (the patch rate fell fourfold)."""
    service = make_service()
    created: list[CommandResult] = []
    for _ in range(6):
        created += run(service, *[("create", {"account_id": "acc_1"}) for _ in range(500)])
    refs = [(activity_uuid(r.document["id"]), 0) for r in created[:64]]
    recorder = service.app.activities_recorder
    lookups = {
        "events after a version": (recorder.select_after_sql, ([r[0] for r in refs], [0] * 64)),
        "positions": (recorder.select_positions_sql, ([r[0] for r in refs], [1] * 64)),
        "idempotency keys": (recorder.select_keys_sql, (["acme"] * 64, [f"k{i}" for i in range(64)], 3600.0)),
    }
    with recorder.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as cursor:
        analyzed = cursor.execute(
            "SELECT count(*) FROM pg_stat_user_tables WHERE relname LIKE 'activities_%%' "
            "AND (last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL)"
        ).fetchone()
        assert analyzed == (0,), "the point is a table without statistics"
        for name, (statement, params) in lookups.items():
            plan = "\n".join(row[0] for row in cursor.execute(sql.SQL("EXPLAIN ") + statement, params))
            assert "Seq Scan" not in plan and "Index" in plan, f"{name}:\n{plan}"


def test_appends_do_not_wait_for_a_vacuum_of_the_events_table(make_service: Callable[[], CommandService]) -> None:
    """VACUUM and ANALYZE hold SHARE UPDATE EXCLUSIVE on the table; the library's EXCLUSIVE
    table lock waited behind it (for `deadlock_timeout`, until PostgreSQL cancelled autovacuum)."""
    service = make_service()
    run(service, ("create", {"account_id": "acc_1"}))  # the tables exist
    with service.app.activities_recorder.datastore.get_connection() as vacuum:
        vacuum.execute("BEGIN")
        vacuum.execute("LOCK TABLE activities_events IN SHARE UPDATE EXCLUSIVE MODE")
        (created,) = run(service, ("create", {"account_id": "acc_2"}))
        vacuum.execute("ROLLBACK")
    assert created.document["version"] == 1


def test_appends_commit_in_the_order_of_their_positions(make_service: Callable[[], CommandService]) -> None:
    """An append that starts while another is uncommitted waits for it, so a reader that has seen
    position N never later finds an event below N (the projector and relay depend on it)."""
    first, second = make_service(), make_service()
    (earlier,) = run(first, ("create", {"account_id": "acc_1"}))
    recorder = first.app.activities_recorder
    late: list[CommandResult] = []
    with recorder.datastore.get_connection() as open_append, open_append.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute(
            "SELECT notification_id FROM activities_events_append("
            "ARRAY[gen_random_uuid()], ARRAY[1::bigint], ARRAY['events.activity:ActivityLogged'], "
            "ARRAY[convert_to('{}', 'UTF8')], '[]'::jsonb, 3600) AS append(notification_id)"
        )
        held = cursor.fetchone()
        assert held is not None
        other = threading.Thread(target=lambda: late.extend(run(second, ("create", {"account_id": "acc_2"}))))
        other.start()
        other.join(timeout=1.0)
        assert other.is_alive() and not late, "the second append must wait for the open one"
        cursor.execute("COMMIT")
    other.join(timeout=10)
    assert len(late) == 1
    assert earlier.position < held["notification_id"] < late[0].position


def test_after_a_broken_connection_the_cache_is_forgotten_so_a_lost_commit_leaves_no_gap(
    make_service: Callable[[], CommandService],
) -> None:
    """An asynchronous standby promoted without the last commit: the command path's cache holds a
    version the new server lacks. The connection broke, so the next session starts from the store:
    the next patch is stored as that version again, not after a gap (which no replay could read)."""
    import psycopg

    from projections.database import datastore_url

    service = make_service()
    url = datastore_url(service.app.activities_recorder.datastore)

    def patch(activity_id: str, subject: str) -> CommandRequest:
        return CommandRequest(parse_patch({"id": activity_id, "changes": {"subject": subject}}), CALLER)

    async def scenario() -> list[Any]:
        try:
            [created] = await service.execute([CommandRequest(parse_create({"account_id": "acc_1"}), CALLER)])
            assert isinstance(created, CommandResult)
            activity_id = created.document["id"]
            [patched] = await service.execute([patch(activity_id, "lost")])
            assert isinstance(patched, CommandResult) and patched.document["version"] == 2
            with psycopg.connect(url, autocommit=True) as conn:  # the commit lost, the session ended
                conn.execute(
                    "DELETE FROM activities_events WHERE originator_id = %s AND originator_version = 2",
                    (activity_uuid(activity_id),),
                )
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            outcomes = [await service.execute([patch(activity_id, f"after {i}")]) for i in range(3)]
            return [outcome for [outcome] in outcomes]
        finally:
            await service.close()

    outcomes = asyncio.run(scenario())
    results = [outcome for outcome in outcomes if isinstance(outcome, CommandResult)]
    assert results, outcomes  # the broken session answers `unavailable` once at most, then it works
    assert [result.document["version"] for result in results] == list(range(2, 2 + len(results)))
    assert results[0].document["subject"] == f"after {len(outcomes) - len(results)}"


def test_recording_idempotency_keys_probes_their_index_not_the_whole_table(
    make_service: Callable[[], CommandService],
) -> None:
    """Every append records its batch's keys. It once deleted the expired ones first with a join
    that PL/pgSQL planned, and cached, as a full scan of the keys table: every append read every
    key of the last day."""
    service = make_service()
    batches, size = 8, 100

    async def appends() -> None:
        try:
            for b in range(batches):
                requests = [
                    CommandRequest(parse_create({"account_id": "acc_1"}), CALLER, f"key-{b}-{i}", f"fp-{b}-{i}")
                    for i in range(size)
                ]
                outcomes = await service.execute(requests)
                assert all(isinstance(outcome, CommandResult) for outcome in outcomes), outcomes
        finally:
            await service.close()

    asyncio.run(appends())
    with service.app.activities_recorder.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as cursor:
        for _ in range(50):  # the closed session's statistics arrive shortly after it ends
            counts = cursor.execute(
                "SELECT n_tup_ins, seq_tup_read FROM pg_stat_user_tables WHERE relname = 'activities_idempotency'"
            ).fetchone()
            if counts is not None and counts[0] >= batches * size:
                break
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            time.sleep(0.1)
    assert counts is not None and counts[0] == batches * size, counts
    assert counts[1] == 0, f"appends read {counts[1]} rows of the keys table by scanning it"
