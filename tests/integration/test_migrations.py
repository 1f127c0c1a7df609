"""Read-model migrations: a column added, filled and indexed while the projector runs and reads are
served; each applied once, by one process; nothing but a read on ordinary paths; what cannot be
done in place says so."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from projections.migrations import MIGRATIONS, Migration, MigrationNeedsRebuild, migrate, pending
from projections.read_model import prepare_read_model, read_model_datastore, status
from services.bootstrap import Runtime

NEW_COLUMN = Migration(
    max(m.version for m in MIGRATIONS) + 1,
    "test: subject_text column filled from the documents, and its index",
    ddl=("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS subject_text text",),
    backfill_set="subject_text = t.document->>'subject'",
    backfill_where="t.subject_text IS DISTINCT FROM t.document->>'subject'",
    concurrent=("CREATE INDEX CONCURRENTLY IF NOT EXISTS {table}_subject_text ON {table} (tenant_id, subject_text)",),
)


async def create_many(request_command: Any, count: int, tag: str) -> list[dict[str, Any]]:
    replies: list[dict[str, Any]] = []
    for start in range(0, count, 100):  # in flight: well within the command queue's bound
        replies += await asyncio.gather(
            *(
                request_command("create", {"account_id": f"acc_{i % 7}", "subject": f"{tag} {i}"})
                for i in range(start, min(start + 100, count))
            )
        )
    assert all("data" in reply for reply in replies), [reply for reply in replies if "data" not in reply][:3]
    return replies


async def test_a_column_is_added_filled_and_indexed_while_the_projector_runs_and_reads_are_served(
    runtime: Runtime, request_command: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert runtime.servers is not None
    url = runtime.servers.database_url
    monkeypatch.setattr("projections.migrations.BACKFILL_BATCH", 100)  # many batches, each short
    before = await create_many(request_command, 1500, "before")
    await request_command("list", {"min_position": before[-1]["meta"]["position"], "limit": 1}, kind="query")

    latencies: list[float] = []
    errors: list[Any] = []
    stop = asyncio.Event()

    async def read_forever() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            reply = await request_command("list", {"account_id": "acc_3", "limit": 20}, kind="query")
            latencies.append(time.perf_counter() - started)
            if "data" not in reply:
                errors.append(reply)

    async def write_forever() -> list[dict[str, Any]]:
        written: list[dict[str, Any]] = []
        while not stop.is_set():
            written += await create_many(request_command, 20, "during")
        return written

    readers = [asyncio.create_task(read_forever()) for _ in range(3)]
    writer = asyncio.create_task(write_forever())
    await asyncio.sleep(0.3)
    applied = await asyncio.to_thread(migrate, url, migrations=(*MIGRATIONS, NEW_COLUMN))
    await asyncio.sleep(0.3)
    stop.set()
    during = await writer
    await asyncio.gather(*readers)

    assert applied == [NEW_COLUMN.version]
    assert errors == [] and len(latencies) > 20
    assert max(latencies) < 1.0, sorted(latencies)[-5:]  # reads went on: nothing held them behind the DDL
    last = during[-1]["meta"]["position"] if during else before[-1]["meta"]["position"]
    reply = await request_command("list", {"min_position": last, "limit": 1}, kind="query")
    assert reply["meta"]["position"] >= last  # the projector kept applying, during and after
    with psycopg.connect(url) as conn:
        unfilled = conn.execute(
            "SELECT count(*) FROM activities WHERE subject_text IS DISTINCT FROM document->>'subject' AND id <= %s",
            (before[-1]["data"]["id"],),
        ).fetchone()
        valid = conn.execute(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relname = 'activities_subject_text'"
        ).fetchone()
    assert unfilled == (0,)  # every row there when the migration began was filled
    assert valid == (True,)
    assert migrate(url, migrations=(*MIGRATIONS, NEW_COLUMN)) == []  # applied once


def test_each_migration_is_applied_once_by_one_process(make_database: Callable[[], str]) -> None:
    url = make_database()
    results: list[list[int]] = []

    def run() -> None:
        results.append(migrate(url))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(version for applied in results for version in applied) == [m.version for m in MIGRATIONS]
    with psycopg.connect(url) as conn:
        assert pending(conn) == []
        rows = conn.execute("SELECT count(*) FROM activities_read_model_migrations").fetchone()
    assert rows == (len(MIGRATIONS),)


def test_ordinary_paths_only_read_the_migrations_table(make_database: Callable[[], str]) -> None:
    url = make_database()
    assert prepare_read_model(url) == [m.version for m in MIGRATIONS]
    with psycopg.connect(url, autocommit=True) as holder:  # a long read holds the table
        holder.execute("BEGIN; SELECT count(*) FROM activities")
        started = time.perf_counter()
        assert prepare_read_model(url) == []  # a second start: no DDL, so it does not queue behind the read
        assert time.perf_counter() - started < 1.0
        holder.execute("ROLLBACK")


def test_status_of_a_database_without_a_read_model_creates_nothing(
    runtime: Runtime, make_database: Callable[..., str]
) -> None:
    assert runtime.app is not None
    url = make_database()
    datastore = read_model_datastore(url, pool_size=1)
    try:
        current = status(runtime.app, datastore)
    finally:
        datastore.close()
    assert (current.position, current.rows) == (0, 0)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT to_regclass('activities')").fetchone() == (None,)


def test_a_migration_that_needs_a_rebuild_says_so(make_database: Callable[[], str]) -> None:
    url = make_database()
    migrate(url)
    rebuild = Migration(max(m.version for m in MIGRATIONS) + 1, "test: a new primary key", needs_rebuild=True)
    with pytest.raises(MigrationNeedsRebuild, match="activities projections rebuild"):
        migrate(url, migrations=(*MIGRATIONS, rebuild))
