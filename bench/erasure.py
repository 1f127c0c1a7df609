"""Erasure by contact in a big tenant, and what it costs the command path meanwhile.

    .venv/bin/python -m bench.erasure                            # 1,000,000 activities, 10,000 erased
    .venv/bin/python -m bench.erasure --rows 200000 --targets 10000   # scaled down (the shared machine)

What it does, on its own embedded PostgreSQL (fsync on) and NATS (bench/run.py's):

1. seeds one tenant with `--rows` activities straight into the event store, through the service's own
   decide and mapper (one `ActivityLogged` each; the `--targets` that name the contact `c-erase`, in
   `contact_id`, in `contact_ids` or as a participant, also have an `ActivityPatched`), then starts the
   service (`activities serve`, every role) and waits until the projector and the relay have the whole
   log (the read model and the JetStream stream hold every activity);
2. baseline: a steady client (`--concurrency` creates in flight, closed loop) for `--seconds`;
3. the same client while `crm.activities.cmd.erase {"contact_id": "c-erase"}` runs: the erase's
   time (request to reply), then the time until the stream eraser has deleted every erased activity's
   messages, and the creates/s of the client during the erase;
4. baseline again (`--seconds`), so the ratio is against the mean of the runs on either side;
5. checks: the read model has `--targets` skeletons, none of them names the contact, the stream holds
   no message of theirs but their ActivityErased;
6. bench/results/<YYYY-MM-DD-HHMM>-erasure/results.json and results.md, /proc/loadavg at each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg

from activities_client.document import new_activity_id
from bench.load import Stats, closed_loop
from bench.nats_client import LeanNatsClient
from bench.run import RESULTS, bench_servers, create_body, headers, machine, progress, service
from events.activity import activity_uuid
from events.commands import parse_create, parse_patch
from services.application import ActivitiesApplication, application_env
from services.domain import Activity, Caller, decide

TENANT = "bench"
CONTACT = "c-erase"
BATCH = 5000


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def target_body(i: int) -> dict[str, Any]:
    """An activity naming the contact, one of three ways."""
    body = create_body(i)
    match i % 3:
        case 0:
            body["contact_id"] = CONTACT
        case 1:
            body["contact_ids"] = ["c-other", CONTACT]
        case _:
            body["participants"] = [{"type": "contact", "id": CONTACT, "name": "Jane Doe"}]
    return body


def seed(database_url: str, rows: int, targets: int) -> dict[str, Any]:
    """`rows` activities of one tenant in the event store, `targets` of them naming the contact."""
    app = ActivitiesApplication(env=application_env(database_url, pool_size=2))
    caller = Caller(tenant_id=TENANT, sub="usr-bench")
    every = max(rows // targets, 1)
    started = time.perf_counter()
    events = 0
    try:
        for offset in range(0, rows, BATCH):
            stored = []
            now = datetime.now(UTC)
            for i in range(offset, min(offset + BATCH, rows)):
                is_target = i % every == 0 and i // every < targets
                activity_id = new_activity_id()
                decision = decide(None, parse_create(target_body(i) if is_target else create_body(i)), caller, now,
                                  activity_id)
                assert decision is not None
                activity = Activity.log(activity_uuid(activity_id), decision, now)
                if is_target:
                    patch = parse_patch({"id": activity_id, "changes": {"notes": f"Spoke with Jane Doe about {i}"}})
                    change = decide(activity.document, patch, caller, now)
                    assert change is not None
                    activity.record(change, now)
                stored += [app.mapper.to_stored_event(event) for event in activity.collect_events()]
            app.recorder.insert_events(stored)
            events += len(stored)
            if offset % (BATCH * 20) == 0:
                progress(f"seeded {offset + BATCH:,} of {rows:,} activities")
    finally:
        app.close()
    elapsed = time.perf_counter() - started
    return {"rows": rows, "targets": targets, "events": events, "elapsed_s": round(elapsed, 1)}


def positions(database_url: str) -> tuple[int, int, int, int]:
    """(log head, projector, relay, pending erasures)."""
    with psycopg.connect(database_url) as conn:
        def one(statement: str) -> int:
            try:
                row = conn.execute(statement).fetchone()
            except psycopg.errors.UndefinedTable:
                conn.rollback()
                return 0
            return int(row[0]) if row and row[0] is not None else 0

        return (
            one("SELECT max(notification_id) FROM activities_events"),
            one("SELECT max(notification_id) FROM activities_projection_tracking"),
            one("SELECT max(position) FROM activities_relay_tracking"),
            one("SELECT count(*) FROM activities_erasures WHERE pending"),
        )


def wait_settled(database_url: str, timeout_s: float, label: str) -> float:
    started = time.monotonic()
    last = 0.0
    while True:
        head, projected, relayed, pending = positions(database_url)
        if projected >= head and relayed >= head and pending == 0:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{label}: head {head}, projected {projected}, relayed {relayed}, pending {pending}")
        if time.monotonic() - last > 15:
            progress(f"{label}: head {head:,}, projected {projected:,}, relayed {relayed:,}, pending {pending}")
            last = time.monotonic()
        time.sleep(0.2)


async def steady(nats_url: str, concurrency: int, seconds: float) -> Stats:
    client = await LeanNatsClient.connect(nats_url)
    try:
        return await closed_loop(client, "crm.activities.cmd.create", create_body, headers(TENANT), concurrency,
                                 seconds)
    finally:
        await client.close()


async def erase_during(nats_url: str, database_url: str, concurrency: int) -> dict[str, Any]:
    """The steady client while the erase runs: the erase's reply time, the streams' cleanup time, and
    the client's creates/s over the erase's time."""
    client = await LeanNatsClient.connect(nats_url)
    load_client = await LeanNatsClient.connect(nats_url)
    stop = asyncio.Event()
    stats = Stats()

    async def load() -> None:
        nonlocal stats
        while not stop.is_set():  # chunks of a second, so the load ends with the erase
            chunk = await closed_loop(load_client, "crm.activities.cmd.create", create_body, headers(TENANT),
                                      concurrency, 1.0)
            stats.ok += chunk.ok
            stats.errors += chunk.errors
            stats.elapsed_s += chunk.elapsed_s
            stats.latencies_ms += chunk.latencies_ms

    task = asyncio.create_task(load())
    await asyncio.sleep(1.0)  # the load is steady before the erase
    stats = Stats()
    started = time.perf_counter()
    reply = await client.request(
        "crm.activities.cmd.erase", orjson.dumps({"contact_id": CONTACT}), headers=headers(TENANT), timeout=1800
    )
    erase_s = time.perf_counter() - started
    stop.set()
    await task
    await client.close()
    await load_client.close()
    envelope = orjson.loads(reply.data)
    cleanup_started = time.perf_counter()
    await asyncio.to_thread(wait_settled, database_url, 1800, "stream cleanup")
    return {
        "reply": envelope,
        "erase_s": round(erase_s, 2),
        "streams_cleaned_after_reply_s": round(time.perf_counter() - cleanup_started, 2),
        "load": stats.summary(),
    }


def checks(database_url: str, nats_url: str, targets: int) -> dict[str, Any]:
    with psycopg.connect(database_url) as conn:
        erased = conn.execute("SELECT count(*) FROM activities WHERE is_erased").fetchone()
        naming = conn.execute(
            "SELECT count(*) FROM activities WHERE contact_id = %s OR contact_ids @> ARRAY[%s] "
            "OR participant_ids @> ARRAY[%s]",
            (CONTACT, CONTACT, CONTACT),
        ).fetchone()
        remembered = conn.execute(
            "SELECT count(*) FROM activities_published p JOIN activities_erasures e USING (activity_id)"
        ).fetchone()
        in_store = conn.execute(
            "SELECT count(*) FROM activities_events WHERE position('Jane Doe' in convert_from(state, 'UTF8')) > 0"
        ).fetchone()
    return {
        "skeletons_in_read_model": erased[0] if erased else None,
        "expected": targets,
        "rows_still_naming_the_contact": naming[0] if naming else None,
        "erased_messages_still_remembered": remembered[0] if remembered else None,
        "events_still_holding_the_name": in_store[0] if in_store else None,
    }


def report(results: dict[str, Any]) -> str:
    during = results["during_erase"]
    lines = [
        f"# Erasure by contact: {results['rows']:,} activities, {results['targets']:,} erased",
        "",
        f"Run {results['started']} on {results['machine']}. {results['note']}",
        "",
        "| what | value |",
        "|---|---|",
        f"| erase reply (all {results['targets']:,} erased in the store and the read model) | "
        f"{during['erase_s']} s ({results['targets'] / during['erase_s']:.0f} activities/s) |",
        f"| JetStream messages deleted, after the reply | {during['streams_cleaned_after_reply_s']} s |",
        f"| creates/s without erasure (before, after) | {results['baseline_before']['rate_per_s']}, "
        f"{results['baseline_after']['rate_per_s']} |",
        f"| creates/s during the erasure | {during['load']['rate_per_s']} |",
        f"| **ratio during / without** | **{results['ratio']:.2f}** |",
        f"| create p50 / p99 without (before) | {results['baseline_before']['p50_ms']} / "
        f"{results['baseline_before']['p99_ms']} ms |",
        f"| create p50 / p99 during | {during['load']['p50_ms']} / {during['load']['p99_ms']} ms |",
        "",
        "Checks: " + json.dumps(results["checks"]),
        "",
        "Load average: " + json.dumps(results["loadavg"]),
        "",
        f"Seeding: {json.dumps(results['seed'])}; the service caught up in {results['caught_up_s']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def run(rows: int, targets: int, seconds: float, concurrency: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-erasure-"))
    stamp = time.strftime("%Y-%m-%d-%H%M")
    results: dict[str, Any] = {
        "started": stamp,
        "machine": machine(),
        "rows": rows,
        "targets": targets,
        "concurrency": concurrency,
        "loadavg": {"start": loadavg()},
        "note": (
            "A shared 2-core machine: the load average of each phase is below; the ratio compares runs "
            "taken side by side."
            + ("" if rows >= 1_000_000 else f" Scaled down to {rows:,} activities to fit the time.")
        ),
    }
    try:
        with bench_servers(root) as servers:
            database_url = servers.fresh_database()
            progress(f"seeding {rows:,} activities, {targets:,} naming the contact")
            results["seed"] = seed(database_url, rows, targets)
            results["loadavg"]["seeded"] = loadavg()
            with service(database_url, servers.nats_url, "commands,projector,relay,http,scheduler", root / "svc"):
                progress("waiting for the projector and the relay")
                results["caught_up_s"] = wait_settled(database_url, 7200, "catching up")
                results["loadavg"]["caught_up"] = loadavg()
                progress("baseline")
                results["baseline_before"] = asyncio.run(steady(servers.nats_url, concurrency, seconds)).summary()
                wait_settled(database_url, 600, "settling")
                progress("erasing by contact under the same load")
                results["loadavg"]["before_erase"] = loadavg()
                results["during_erase"] = asyncio.run(erase_during(servers.nats_url, database_url, concurrency))
                results["loadavg"]["after_erase"] = loadavg()
                progress("baseline again")
                results["baseline_after"] = asyncio.run(steady(servers.nats_url, concurrency, seconds)).summary()
                wait_settled(database_url, 600, "settling")
                results["checks"] = checks(database_url, servers.nats_url, targets)
        without = (results["baseline_before"]["rate_per_s"] + results["baseline_after"]["rate_per_s"]) / 2
        results["ratio"] = results["during_erase"]["load"]["rate_per_s"] / without if without else float("nan")
        results["loadavg"]["end"] = loadavg()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = RESULTS / f"{stamp}-erasure"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(report(results))
    progress(f"results in {out}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="activities of the tenant")
    parser.add_argument("--targets", type=int, default=10_000, help="activities naming the contact (erased)")
    parser.add_argument("--seconds", type=float, default=15.0, help="each baseline run")
    parser.add_argument("--concurrency", type=int, default=16, help="creates in flight of the steady client")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    results = run(args.rows, args.targets, args.seconds, args.concurrency)
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
