"""Benchmark phases 4-6: projection catch-up and freshness, queries on a big read model, relay."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import psycopg
import uvloop

from bench.http_client import KeepAliveClient
from bench.load import Stats
from bench.nats_client import LeanNatsClient
from projections.queries import CURSOR_KEY_NAME, CursorCodec, Keyset, ListQuery
from projections.read_model import read_model_datastore, rebuild
from services.application import ActivitiesApplication, CommandRequest, CommandService, application_env
from services.auth import mint_token
from projections.database import shared_secret
from services.domain import Caller

if TYPE_CHECKING:
    from bench.run import BenchServers, Durations


def _progress(message: str) -> None:
    from bench.run import progress

    progress(message)


def seed_events(database_url: str, count: int) -> ActivitiesApplication:
    """`count` creates and patches appended through the real command path, in batches of 500."""
    app = ActivitiesApplication(env=application_env(database_url, pool_size=4))
    asyncio.run(_seed(CommandService(app), count))
    return app


async def _seed(service: CommandService, count: int) -> None:
    from bench.run import create_body
    from events.commands import parse_create, parse_patch

    caller = Caller("bench", "usr-bench")
    ids: list[str] = []
    done = 0
    started = time.perf_counter()
    while done < count:
        batch: list[CommandRequest] = []
        for i in range(done, min(done + 500, count)):
            if ids and i % 4 == 3:
                patch = {"id": ids[i % len(ids)], "changes": {"subject": f"p{i}"}}
                batch.append(CommandRequest(parse_patch(patch), caller))
            else:
                batch.append(CommandRequest(parse_create(create_body(i)), caller))
        for outcome in await service.execute(batch):
            document = getattr(outcome, "document", None)
            if document is not None and document["version"] == 1:
                ids.append(document["id"])
        done += len(batch)
        if done % 20_000 < 500:
            _progress(f"  seeded {done}/{count} events ({done / (time.perf_counter() - started):.0f}/s)")
    await service.close()


def projection_catch_up(database_url: str, app: ActivitiesApplication, events: int) -> dict[str, Any]:
    datastore = read_model_datastore(database_url)
    last = [0.0]

    def report(done: int, total: int) -> None:
        if time.monotonic() - last[0] > 5:
            last[0] = time.monotonic()
            _progress(f"  rebuild {done}/{total}")

    started = time.perf_counter()
    rebuild(app, datastore, report)
    elapsed = time.perf_counter() - started
    datastore.close()
    return {"events": events, "elapsed_s": round(elapsed, 3), "events_per_s": round(events / elapsed, 1)}


async def _freshness(http_url: str, nats_url: str, rate: float, seconds: float) -> dict[str, Any]:
    """Reply of a create -> the list filtered by its (unique) account shows it; via min_position."""
    import orjson

    token = mint_token(_secret(), "bench", "usr-bench")
    headers = {"Authorization": f"Bearer {token}"}
    nc = await LeanNatsClient.connect(nats_url)
    stats = Stats()
    idle = [KeepAliveClient(http_url, headers) for _ in range(16)]  # probes in flight share these

    async def one(i: int) -> None:
        account = f"fresh_{uuid.uuid4().hex[:12]}"
        body = orjson.dumps({"account_id": account, "type": "call", "activity_date": "2026-11-27T10:00:00Z"})
        reply = orjson.loads((await nc.request("crm.activities.cmd.create", body, headers=headers, timeout=30)).data)
        replied = time.perf_counter()
        if i % SAMPLE_EVERY:
            return  # the steady load; every SAMPLE_EVERY-th command is probed
        position = reply["meta"]["position"]
        http = idle.pop() if idle else KeepAliveClient(http_url, headers)
        status, body = await http.get("/api/v1/crm/activities", {"account_id": account, "min_position": position})
        idle.append(http)
        seen = status == 200 and len(orjson.loads(body)["data"]) == 1
        if seen:
            stats.ok += 1
            stats.latencies_ms.append((time.perf_counter() - replied) * 1000)
        else:
            stats.errors += 1

    tasks = []
    started = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    stats.elapsed_s = time.perf_counter() - started
    await nc.close()
    return {"rate": rate, "sampled_every": SAMPLE_EVERY, **stats.summary()}


SAMPLE_EVERY = 10
"""Freshness is probed on one command in ten, so the probe's own HTTP load does not swamp the machine."""

QUERY_CONCURRENCY = 4


def _secret() -> str:
    from bench.run import SECRET

    return SECRET


def seed_read_model(database_url: str, rows: int) -> None:
    """`rows` activities straight into the read model table (the projection's own shape)."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            """
            INSERT INTO activities (id, tenant_id, app_id, account_id, deal_id, contact_id, contact_ids, owner_id,
                                    type, status, tags, activity_date, due_date, created_at, updated_at,
                                    is_deleted, version, position, document)
            SELECT id, 'bench', NULL, 'acc_' || (i %% 1000), NULL, NULL, ARRAY[]::text[],
                   'usr-' || lpad(to_hex(i %% 500), 8, '0') || '-0000-4000-8000-000000000000',
                   (ARRAY['call','email','meeting','note','task'])[1 + i %% 5], 'open', ARRAY['bench'],
                   ts, NULL, ts, ts, false, 1, 0,
                   jsonb_build_object('id', id, 'tenant_id', 'bench', 'app_id', NULL, 'account_id', 'acc_' || (i %% 1000),
                                      'subject', 'Seeded ' || i, 'version', 1, 'is_deleted', false,
                                      'activity_date', to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'))
            FROM (SELECT i, 'act_' || lpad(upper(to_hex(i)), 26, '0') AS id,
                         timestamptz '2020-01-01' + (i * interval '1 minute') AS ts
                  FROM generate_series(1, %s) AS i) AS s
            """,
            (rows,),
        )
        conn.execute("ANALYZE activities")


def deep_cursors(database_url: str, rows: int, count: int = 1000) -> list[str]:
    """Cursors of the default list (-activity_date, no filter) at random depths of the seeded tenant,
    signed as the service signs them: following `next_cursor` that far would take too long."""
    codec = CursorCodec(shared_secret(database_url, CURSOR_KEY_NAME))  # the service's key
    caller = Caller("bench", "usr-bench")
    start = datetime(2020, 1, 1, tzinfo=UTC)
    cursors = []
    for _ in range(count):
        i = random.randint(100, rows)  # seed_read_model: row i has activity_date start + i minutes
        keyset = Keyset((start + timedelta(minutes=i)).isoformat(), "act_" + format(i, "X").rjust(26, "0"))
        cursors.append(codec.encode(keyset, ListQuery(), caller))
    return cursors


async def _queries(http_url: str, database_url: str, seconds: float, rows: int) -> dict[str, Any]:
    token = mint_token(_secret(), "bench", "usr-bench")
    results: dict[str, Any] = {}
    cursors = deep_cursors(database_url, rows)
    cases = {
        "get": lambda i: (f"/api/v1/crm/activities/act_{format(1 + (i * 7919) % rows, 'X').rjust(26, '0')}", {}),
        "list_by_account": lambda i: ("/api/v1/crm/activities", {"account_id": f"acc_{i % 1000}", "limit": 50}),
        "list_by_owner": lambda i: (
            "/api/v1/crm/activities",
            {"owner_id": f"usr-{format(i % 500, 'x').rjust(8, '0')}-0000-4000-8000-000000000000", "limit": 50},
        ),
        "list_deep_pages": lambda i: ("/api/v1/crm/activities", {"limit": 50, "cursor": cursors[i % len(cursors)]}),
    }
    for name, make in cases.items():
        stats = Stats()
        counter = iter(range(10**9))
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            http = KeepAliveClient(http_url, {"Authorization": f"Bearer {token}"})
            while time.perf_counter() < deadline:
                path, params = make(next(counter))
                started = time.perf_counter()
                status, _ = await http.get(path, params)
                stats.latencies_ms.append((time.perf_counter() - started) * 1000)
                if status == 200:
                    stats.ok += 1
                else:
                    stats.errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(QUERY_CONCURRENCY)))
        stats.elapsed_s = time.perf_counter() - started
        results[name] = stats.summary()
        _progress(f"  {name}: {results[name]['rate_per_s']}/s p99 {results[name]['p99_ms']} ms")
    return results


async def _stream_count(nats_url: str, stream: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(stream)
        return int(info.state.messages)
    except Exception:
        return 0
    finally:
        await nc.close()


async def _delete_stream(nats_url: str, stream: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


def relay_throughput(database_url: str, nats_url: str, root: Path, events: int) -> dict[str, Any]:
    from bench.run import service

    stream = f"BENCH_{uuid.uuid4().hex[:6].upper()}"
    with service(database_url, nats_url, "relay", root / "svc-relay", ACTIVITIES_STREAM_NAME=stream,
                 ACTIVITIES_SUBJECT_PREFIX=f"bench{uuid.uuid4().hex[:6]}.activities") as (process, _):
        started = time.perf_counter()
        count = 0
        deadline = started + 600
        last_report = started
        while count < events and time.perf_counter() < deadline:
            time.sleep(0.2)
            count = uvloop.run(_stream_count(nats_url, stream))
            if time.perf_counter() - last_report > 5:
                last_report = time.perf_counter()
                _progress(f"  relay {count}/{events}")
        elapsed = time.perf_counter() - started
        from bench.run import peak_rss_mb

        rss = peak_rss_mb(process.pid)
    uvloop.run(_delete_stream(nats_url, stream))  # measured: the later phases should not carry it
    return {"events": count, "elapsed_s": round(elapsed, 3), "events_per_s": round(count / elapsed, 1),
            "peak_rss_mb": round(rss, 1)}


def settle(database_url: str, seconds: float = 5) -> None:
    """Before a latency phase: do the maintenance the bulk phases before it made due, so that the
    phase measures the service and not that: autovacuum's first pass over the 150,000 events just
    written froze them and wrote about 150 MB of WAL in 6 s, in the middle of a latency phase;
    a checkpoint landing there did the same. Then let the background writers idle."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("VACUUM (FREEZE, ANALYZE)")
        conn.execute("CHECKPOINT")
    time.sleep(seconds)


def run_read_side(servers: BenchServers, root: Path, durations: Durations) -> dict[str, Any]:
    from bench.run import peak_rss_mb, service

    results: dict[str, Any] = {}
    database_url = servers.fresh_database()
    _progress(f"[4/8] projection: seeding {durations.projection_events} events through the command path")
    app = seed_events(database_url, durations.projection_events)
    _progress("  rebuilding the read model from the whole log")
    results["projection"] = projection_catch_up(database_url, app, durations.projection_events)
    app.close()

    _progress("[6/8] relay: publishing the same log onto a fresh stream")
    results["relay"] = relay_throughput(database_url, servers.nats_url, root, durations.projection_events)

    _progress("[4/8] freshness at 500 creates/s and [5/8] queries on a big read model")
    fresh_db = servers.fresh_database()
    settle(fresh_db)
    with service(fresh_db, servers.nats_url, "commands,projector,http", root / "svc-all") as (process, endpoints):
        results["freshness"] = uvloop.run(
            _freshness(endpoints["http_url"], endpoints["nats_url"], 500, durations.latency_s))
        _progress(f"  seeding {durations.read_model_rows} rows into the read model")
        seed_read_model(fresh_db, durations.read_model_rows)
        settle(fresh_db)
        results["queries"] = uvloop.run(
            _queries(endpoints["http_url"], fresh_db, durations.load_s, durations.read_model_rows))
        results["queries_rows"] = durations.read_model_rows
        results["read_side_rss_mb"] = [round(peak_rss_mb(process.pid), 1), results["relay"]["peak_rss_mb"]]
    return results


def read_side_table(results: dict[str, Any], limit: float) -> list[dict[str, str]]:
    """Rows of the report for phases 4-6; `limit` is the raw insert rate (rows/s)."""
    rows = []
    projection = results["projection"]
    rows.append({"measure": f"projection catch-up (rebuild of {projection['events']} events)",
                 "value": f"{projection['events_per_s']:.0f} events/s",
                 "ratio": f"{projection['events_per_s'] / limit:.2f}x limit", "target": ">= 0.5x limit"})
    fresh = results["freshness"]
    rows.append({"measure": "freshness: reply -> visible in a list, 500 creates/s",
                 "value": f"p50 {fresh['p50_ms']} / p99 {fresh['p99_ms']} ms", "ratio": f"{fresh['p99_ms'] / 100:.2f}x of 100 ms",
                 "target": "p99 <= 100 ms"})
    for name, point in results["queries"].items():
        rows.append({"measure": f"HTTP {name.replace('_', ' ')} ({results['queries_rows']} rows, {QUERY_CONCURRENCY} in flight)",
                     "value": f"{point['rate_per_s']:.0f}/s, p50 {point['p50_ms']} / p99 {point['p99_ms']} ms",
                     "ratio": f"{point['p99_ms'] / 15:.2f}x of 15 ms" if name.startswith("list") else "-",
                     "target": "list p99 <= 15 ms" if name.startswith("list") else "-"})
    relay = results["relay"]
    rows.append({"measure": "relay onto JetStream", "value": f"{relay['events_per_s']:.0f} events/s",
                 "ratio": f"{relay['events_per_s'] / limit:.2f}x limit", "target": "-"})
    return rows
