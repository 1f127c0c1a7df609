"""Reads during a rebuild of the read model ("Evolution without downtime").

    .venv/bin/python -m bench.rebuild_reads                 # 200,000 events (about 5 minutes)
    .venv/bin/python -m bench.rebuild_reads --quick         # a smoke run of 20,000 events
    .venv/bin/python -m bench.rebuild_reads --events 100000

The target: during a rebuild of 200,000 events with reads running, the reads' p99 stays within
2x of their p99 without a rebuild, and no read waits more than 200 ms.

It starts an embedded PostgreSQL (fsync on) and NATS, seeds N events through the real command
path (bench.read_side.seed_events: creates and one patch in four, batches of 500), starts
`activities serve --role commands,projector,http` and waits until its projector applied them.
Then three phases of HTTP reads at a fixed rate (a mix of lists by account, lists by owner and
gets of random ids, a few in flight), every latency recorded:

  A. reads alone;
  B. reads with a modest write load (creates over NATS at a fixed rate): the baseline;
  C. the same reads and writes while `activities projections rebuild` runs as its own process,
     as an operator would start it, until it exited and a few seconds more.

Meanwhile a monitor polls pg_locks every few milliseconds for the switch's ACCESS EXCLUSIVE
lock on the live table (requested, granted, released) and the reads queued behind it, and
pg_stat_activity for autovacuum workers; /proc/stat gives the CPU each phase used.
Results: bench/results/<YYYY-MM-DD-HHMM>-rebuild[-quick]/results.json and results.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import uvloop

from bench.http_client import KeepAliveClient
from bench.load import Stats, _one
from bench.nats_client import LeanNatsClient
from bench.read_side import seed_events, settle
from bench.run import ACTIVITIES, RESULTS, bench_servers, create_body, headers, machine, progress, service, service_env
from projections.read_model import read_model_datastore, status

READ_RATE = 100.0  # reads/s in all: well below the ~1,200-2,000/s the service serves on a quiet 2-core machine
BEHIND_S = 1.0  # a connection this far behind its schedule skips the reads it missed (counted)
READ_CONCURRENCY = 4
WRITE_RATE = 50.0  # creates/s over NATS in phases B and C (--write-rate)
LIST_LIMIT = 20
SLOW_MS = 200.0
AFTER_REBUILD_S = 5.0


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------


def cpu_times() -> list[int]:
    return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def cpu_share(before: list[int], after: list[int]) -> dict[str, float]:
    """Shares of the machine's CPU time between two /proc/stat samples."""
    delta = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(delta) or 1
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    shares = {name: round(delta[i] / total, 3) for i, name in enumerate(names) if i < len(delta)}
    shares["busy"] = round(1 - shares["idle"] - shares["iowait"], 3)
    return shares


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


# ---------------------------------------------------------------------------------------------
# Reads and writes
# ---------------------------------------------------------------------------------------------


@dataclass
class Read:
    kind: str
    scheduled: float  # perf_counter time it was due
    sent: float
    latency_ms: float  # from sending it
    status: int

    @property
    def late_ms(self) -> float:
        """From when it was due: includes the time it queued behind a slow read on its connection."""
        return (self.sent - self.scheduled) * 1000 + self.latency_ms


SKIPPED = [0]
"""Reads skipped by connections more than BEHIND_S behind their schedule (the rate not kept)."""


@dataclass
class ReadPlan:
    ids: list[str]
    accounts: list[str]
    owners: list[str]

    def make(self, i: int) -> tuple[str, str, dict[str, object]]:
        choice = i % 10
        if choice < 4:
            return "list_by_account", "/api/v1/crm/activities", {"account_id": random.choice(self.accounts),
                                                                  "limit": LIST_LIMIT}
        if choice < 7:
            return "list_by_owner", "/api/v1/crm/activities", {"owner_id": random.choice(self.owners),
                                                                "limit": LIST_LIMIT}
        return "get", f"/api/v1/crm/activities/{random.choice(self.ids)}", {}


async def read_load(http_url: str, plan: ReadPlan, stop: Callable[[], bool]) -> list[Read]:
    """READ_CONCURRENCY connections, each sending its share of READ_RATE at fixed times (a
    read due while the previous one on its connection is still out is sent when that one
    returns, and `late_ms` counts the wait)."""
    reads: list[Read] = []
    SKIPPED[0] = 0
    started = time.perf_counter()
    interval = READ_CONCURRENCY / READ_RATE

    async def worker(w: int) -> None:
        http = KeepAliveClient(http_url, headers())
        k = 0
        while not stop():
            due = started + (k + w / READ_CONCURRENCY) * interval
            k += 1
            delay = due - time.perf_counter()
            if delay < -BEHIND_S:  # the machine cannot keep the rate: skip, and say so
                SKIPPED[0] += 1
                continue
            if delay > 0:
                await asyncio.sleep(delay)
            kind, path, params = plan.make(k * READ_CONCURRENCY + w)
            sent = time.perf_counter()
            try:
                status_code, _ = await http.get(path, params)
            except Exception:  # a dropped connection is an error of the run
                status_code = 0
                await http.close()
            reads.append(Read(kind, due, sent, (time.perf_counter() - sent) * 1000, status_code))
        await http.close()

    await asyncio.gather(*(worker(w) for w in range(READ_CONCURRENCY)))
    return reads


async def write_load(nats_url: str, rate: float, stop: Callable[[], bool]) -> Stats:
    """Creates over NATS started at `rate` per second until `stop()`."""
    stats = Stats()
    if rate <= 0:
        return stats
    client = await LeanNatsClient.connect(nats_url)
    tasks: set[asyncio.Task[None]] = set()
    started = time.perf_counter()
    i = 0
    try:
        while not stop():
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_one(client, "crm.activities.cmd.create", orjson.dumps(create_body(10**7 + i)),
                                            headers(), stats, None))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        await asyncio.gather(*tasks)
    finally:
        await client.close()
    stats.elapsed_s = time.perf_counter() - started
    return stats


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def summarize(reads: list[Read]) -> dict[str, Any]:
    def one(subset: list[Read]) -> dict[str, Any]:
        latencies = [r.latency_ms for r in subset]
        late = [r.late_ms for r in subset]
        return {
            "reads": len(subset),
            "errors": sum(1 for r in subset if r.status != 200),
            "p50_ms": round(pct(latencies, 50), 2),
            "p99_ms": round(pct(latencies, 99), 2),
            "p999_ms": round(pct(latencies, 99.9), 2),
            "max_ms": round(max(latencies, default=float("nan")), 2),
            "over_200_ms": sum(1 for v in latencies if v > SLOW_MS),
            "max_from_due_ms": round(max(late, default=float("nan")), 2),
            "over_200_ms_from_due": sum(1 for v in late if v > SLOW_MS),
        }

    result = one(reads)
    if reads:
        span = max(r.sent for r in reads) - min(r.scheduled for r in reads)
        result["rate_per_s"] = round(len(reads) / span, 1) if span else 0.0
    result["by_kind"] = {kind: one([r for r in reads if r.kind == kind])
                         for kind in ("list_by_account", "list_by_owner", "get")}
    return result


# ---------------------------------------------------------------------------------------------
# Watching the rebuild: its output, the switch's lock, autovacuum
# ---------------------------------------------------------------------------------------------


@dataclass
class LockWatch:
    """Polls pg_locks for ACCESS EXCLUSIVE on the live table (by oid, fixed before the rebuild)."""

    database_url: str
    oid: int
    interval_s: float = 0.002
    requested: float | None = None
    granted: float | None = None
    released: float | None = None
    max_waiting: int = 0
    samples: int = 0
    autovacuum: list[tuple[float, str]] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)  # statement on the copy -> [first, last] seen
    table_stats: list[tuple[Any, ...]] = field(default_factory=list)  # (t, relname, autoanalyze, analyze, autovacuum)
    table_stats_seen: set[tuple[str, ...]] = field(default_factory=set)
    holder: list[tuple[Any, ...]] = field(default_factory=list)  # (t, state, wait_event, query) of the switch
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lock-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            last_vacuum_check = 0.0
            while not self._stop.is_set():
                now = time.perf_counter()
                rows = conn.execute(
                    "SELECT l.mode, l.granted, a.state, a.wait_event, "
                    "left(regexp_replace(a.query, '\\s+', ' ', 'g'), 70) FROM pg_locks l "
                    "LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'relation' AND l.relation = %s",
                    (self.oid,),
                ).fetchall()
                self.samples += 1
                exclusive = [granted for mode, granted, *_ in rows if mode == "AccessExclusiveLock"]
                if exclusive and self.requested is None:
                    self.requested = now
                if any(exclusive) and self.granted is None:
                    self.granted = now
                if self.granted is not None and self.released is None:
                    if any(exclusive):
                        self.max_waiting = max(self.max_waiting, sum(1 for _, g, *_ in rows if not g))
                        holder = next(tuple(r[2:]) for r in rows if r[0] == "AccessExclusiveLock" and r[1])
                        if not self.holder or self.holder[-1][1:] != holder:
                            self.holder.append((now, *holder))
                    else:
                        self.released = now
                if self.samples % 5 == 0:  # what the rebuild's connections are doing to the copy
                    for (query,) in conn.execute(
                        "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 90) FROM pg_stat_activity "
                        "WHERE state = 'active' AND query LIKE '%%activities_rebuild%%' AND pid <> pg_backend_pid()"
                    ).fetchall():
                        seen = self.stages.setdefault(query, [now, now])
                        seen[1] = now
                if now - last_vacuum_check > 0.2:
                    last_vacuum_check = now
                    for relname, *stamps in conn.execute(
                        "SELECT relname, last_autoanalyze, last_analyze, last_autovacuum FROM pg_stat_user_tables "
                        "WHERE relname IN ('activities', 'activities_rebuild')"
                    ).fetchall():
                        key = (relname, *[str(stamp) for stamp in stamps])
                        if key not in self.table_stats_seen:
                            self.table_stats_seen.add(key)
                            self.table_stats.append((now, *key))
                    for (query,) in conn.execute(
                        "SELECT query FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
                    ).fetchall():
                        self.autovacuum.append((now, query))
                time.sleep(self.interval_s)


class RebuildOutput:
    """The CLI's stderr (a \\r-redrawn progress bar and log lines), each line timestamped."""

    PROGRESS = re.compile(r"(\d+)/(\d+) events")

    def __init__(self, stream: Any) -> None:
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: Any) -> None:
        buffer = b""
        while chunk := stream.read1(4096):
            buffer += chunk
            *complete, buffer = re.split(rb"[\r\n]", buffer)
            now = time.perf_counter()
            self.lines.extend((now, line.decode(errors="replace")) for line in complete if line.strip())
        if buffer.strip():
            self.lines.append((time.perf_counter(), buffer.decode(errors="replace")))

    def progress_points(self) -> list[tuple[float, int, int]]:
        points = []
        for t, line in self.lines:
            if match := self.PROGRESS.search(line):
                points.append((t, int(match.group(1)), int(match.group(2))))
        return points

    def last_progress(self) -> str:
        points = self.progress_points()
        return f"{points[-1][1]}/{points[-1][2]} events" if points else "starting"


def live_table_oid(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT 'public.activities'::regclass::oid").fetchone()
        assert row is not None
        return int(row[0])


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------


def wait_projected(app: Any, database_url: str, timeout_s: float = 900) -> dict[str, Any]:
    datastore = read_model_datastore(database_url)
    started = time.perf_counter()
    last = 0.0
    try:
        while True:
            current = status(app, datastore)
            if current.position > 0 and current.lag == 0:
                elapsed = time.perf_counter() - started
                progress(f"  projector applied {current.position} events, {current.rows} rows ({elapsed:.1f} s)")
                return {"position": current.position, "rows": current.rows, "waited_s": round(elapsed, 1)}
            if time.perf_counter() - last > 3:
                last = time.perf_counter()
                progress(f"  projector at {current.position}/{current.log_position}")
            if time.perf_counter() - started > timeout_s:
                raise RuntimeError("the projector did not catch up")
            time.sleep(0.5)
    finally:
        datastore.close()


def read_plan(database_url: str) -> ReadPlan:
    with psycopg.connect(database_url) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM activities TABLESAMPLE SYSTEM (5) LIMIT 5000")]
        owners = [r[0] for r in conn.execute("SELECT DISTINCT owner_id FROM activities WHERE owner_id IS NOT NULL")]
        accounts = [r[0] for r in conn.execute("SELECT DISTINCT account_id FROM activities")]
    return ReadPlan(ids, accounts, owners)


async def steady_phase(http_url: str, nats_url: str, plan: ReadPlan, seconds: float,
                       write_rate: float) -> dict[str, Any]:
    deadline = time.perf_counter() + seconds
    cpu_before, load_before = cpu_times(), loadavg()

    def stop() -> bool:
        return time.perf_counter() > deadline

    reads, writes = await asyncio.gather(read_load(http_url, plan, stop), write_load(nats_url, write_rate, stop))
    result = {"seconds": seconds, "write_rate": write_rate, **summarize(reads),
              "writes": writes.summary() if write_rate else None, "reads_skipped": SKIPPED[0],
              "cpu": cpu_share(cpu_before, cpu_times()), "loadavg_before": load_before, "loadavg_after": loadavg()}
    return result


async def rebuild_phase(http_url: str, nats_url: str, plan: ReadPlan, database_url: str, root: Path,
                        nats_server_url: str) -> dict[str, Any]:
    watch = LockWatch(database_url, live_table_oid(database_url))
    watch.start()
    finished: list[float] = []
    cpu_before, load_before = cpu_times(), loadavg()

    def stop() -> bool:
        return bool(finished) and time.perf_counter() > finished[0] + AFTER_REBUILD_S

    loads = asyncio.gather(read_load(http_url, plan, stop), write_load(nats_url, WRITE_RATE, stop))
    await asyncio.sleep(2)  # the reads and writes running before the rebuild starts
    env = service_env(database_url, nats_server_url, root / "cli", ACTIVITIES_LOG_LEVEL="INFO")
    (root / "cli").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    process = subprocess.Popen([ACTIVITIES, "projections", "rebuild"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    output = RebuildOutput(process.stderr)
    last = 0.0
    while process.poll() is None:
        await asyncio.sleep(0.05)
        if time.perf_counter() - last > 2:
            last = time.perf_counter()
            progress(f"  rebuild: {output.last_progress()} ({time.perf_counter() - started:.1f} s)")
    finished.append(time.perf_counter())
    stdout = process.stdout.read().decode(errors="replace") if process.stdout else ""
    output.thread.join(5)
    progress(f"  rebuild exited {process.returncode} after {finished[0] - started:.1f} s: {stdout.strip()}")
    reads, writes = await loads
    watch.stop()
    cpu = cpu_share(cpu_before, cpu_times())

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - started, 3)

    points = output.progress_points()
    first_total = points[0][2] if points else 0
    load_done = next((t for t, done, total in points if total == first_total and done >= total > 0), None)
    lock_ms = (watch.released - watch.granted) * 1000 if watch.granted and watch.released else None
    wait_ms = (watch.granted - watch.requested) * 1000 if watch.granted and watch.requested else None
    during = [r for r in reads if started <= r.sent <= finished[0]]
    breakdown: dict[str, float] = {}
    marks = [*watch.holder, (watch.released, None, None, None)] if watch.released else []
    for (t, state, wait, query), (t_next, *_) in itertools.pairwise(marks):
        key = f"{state}{'/' + wait if wait else ''}: {query if state == 'active' else '(between statements)'}"
        breakdown[key] = round(breakdown.get(key, 0.0) + (t_next - t) * 1000, 1)
    index_times = [t for query, seen in watch.stages.items() if query.startswith("CREATE INDEX") for t in seen]
    load_times = [seen[0] for query, seen in watch.stages.items() if query.startswith("INSERT")]
    windows = {  # what the rebuild did while a read was sent (perf_counter times)
        "cli_start": (started, min(load_times, default=started)),
        "load_in_sql": (min(load_times, default=started), min(index_times, default=started)),
        "index_builds": (min(index_times, default=started), max(index_times, default=started)),
        "catch_up_and_switch": (max(index_times, default=started), finished[0]),
    }
    by_stage = {name: {"from_s": rel(a), "to_s": rel(b), **summarize([r for r in reads if a <= r.sent < b])}
                for name, (a, b) in windows.items()}
    for stage in by_stage.values():
        stage.pop("by_kind", None)
    before_final = [done for _, done, total in points if done < (points[-1][1] if points else 0)]
    switch_events = points[-1][1] - max(before_final) if before_final else None
    overlapping = [r for r in reads if watch.requested and watch.released
                   and r.sent <= watch.released and r.sent + r.latency_ms / 1000 >= watch.requested]
    slow = sorted((r for r in reads if r.latency_ms > SLOW_MS), key=lambda r: r.sent)
    vacuum_seen: dict[str, list[float]] = {}
    for t, query in watch.autovacuum:
        vacuum_seen.setdefault(query, [t, t])[1] = t
    vacuums = [f"{rel(first)}-{rel(last)} s: {query}" for query, (first, last) in
               sorted(vacuum_seen.items(), key=lambda kv: kv[1][0])]
    stages = sorted(([rel(first), rel(last), query] for query, (first, last) in watch.stages.items()),
                    key=lambda stage: stage[0] or 0)
    buckets: dict[int, list[Read]] = {}
    for r in reads:
        buckets.setdefault(int((r.sent - started) // 1), []).append(r)
    timeline = [{"second": second, "reads": len(bucket), "p50_ms": round(pct([r.latency_ms for r in bucket], 50), 1),
                 "max_ms": round(max(r.latency_ms for r in bucket), 1)} for second, bucket in sorted(buckets.items())]
    return {
        "exit_code": process.returncode,
        "stdout": stdout.strip(),
        "rebuild_s": round(finished[0] - started, 3),
        "load_s": rel(load_done),
        "events_at_start": first_total,
        "lock": {
            "requested_at_s": rel(watch.requested),
            "granted_at_s": rel(watch.granted),
            "released_at_s": rel(watch.released),
            "waited_for_lock_ms": None if wait_ms is None else round(wait_ms, 1),
            "held_ms": None if lock_ms is None else round(lock_ms, 1),
            "poll_every_ms": watch.interval_s * 1000,
            "polls": watch.samples,
            "max_requests_queued_behind": watch.max_waiting,
            "events_applied_under_lock": switch_events,
            "held_ms_by_statement": breakdown,
        },
        "reads_by_rebuild_stage": by_stage,
        "reads_outside_switch": summarize([r for r in reads if r not in overlapping]),
        "reads": summarize(reads),
        "reads_while_rebuild_ran": summarize(during),
        "reads_overlapping_switch": summarize(overlapping),
        "slow_reads": [{"at_s": rel(r.sent), "kind": r.kind, "ms": round(r.latency_ms, 1)} for r in slow[:50]],
        "writes": writes.summary(),
        "autovacuum_seen": vacuums,
        "table_stats_changes": [(rel(t), *rest) for t, *rest in watch.table_stats],
        "statements_on_the_copy": stages,
        "first_progress_s": rel(points[0][0]) if points else None,
        "timeline_per_second": timeline,
        "reads_skipped": SKIPPED[0],
        "cpu": cpu,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "output": [(rel(t), line[-160:]) for t, line in output.lines if not RebuildOutput.PROGRESS.search(line)],
        "progress": [(rel(t), done, total) for t, done, total in points[:: max(1, len(points) // 40)]],
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    alone, base, during = results["reads_alone"], results["baseline"], results["rebuild"]
    reads = during["reads"]
    ratio = reads["p99_ms"] / base["p99_ms"] if base["p99_ms"] else float("nan")
    lock = during["lock"]
    errors = alone["errors"] + base["errors"] + reads["errors"] + (base["writes"] or {}).get("errors", 0) \
        + during["writes"]["errors"] + (0 if during["exit_code"] == 0 else 1)

    def line(point: dict[str, Any]) -> str:
        return (f"{point['reads']} reads, p50 {point['p50_ms']} / p99 {point['p99_ms']} / "
                f"max {point['max_ms']} ms")

    rows = [
        ("A. reads alone (no writes, no rebuild)", line(alone), "-", "-"),
        (f"B. reads + {WRITE_RATE:.0f} creates/s (the baseline)", line(base), "1.00x", "-"),
        (f"C. reads + {WRITE_RATE:.0f} creates/s during the rebuild (from 2 s before to {AFTER_REBUILD_S:.0f} s after)",
         line(reads), f"{ratio:.2f}x", "-"),
        ("p99 during rebuild / p99 baseline", f"{reads['p99_ms']} / {base['p99_ms']} ms", f"{ratio:.2f}x",
         "<= 2.0x " + ("PASS" if ratio <= 2.0 else "MISS")),
        ("max read latency during the rebuild", f"{reads['max_ms']} ms (from due time: {reads['max_from_due_ms']} ms)",
         f"{reads['max_ms'] / SLOW_MS:.2f}x of 200 ms",
         "<= 200 ms " + ("PASS" if reads["max_ms"] <= SLOW_MS else "MISS")),
        ("reads slower than 200 ms during the rebuild", f"{reads['over_200_ms']} (from due time: "
         f"{reads['over_200_ms_from_due']})", "-", "0"),
        ("reads while the rebuild process ran only", line(during["reads_while_rebuild_ran"]), "-", "-"),
        ("rebuild duration (process start to exit)", f"{during['rebuild_s']} s for {during['events_at_start']} events",
         "-", "-"),
        ("switch: ACCESS EXCLUSIVE lock on the live table held",
         f"{lock['held_ms']} ms (waited {lock['waited_for_lock_ms']} ms to get it; polled every "
         f"{lock['poll_every_ms']:.0f} ms; up to {lock['max_requests_queued_behind']} requests queued behind it)",
         "-", "-"),
        ("reads by what the rebuild was doing (s after its start)", "; ".join(
            f"{name} {stage['from_s']}-{stage['to_s']} s: p50 {stage['p50_ms']} / p99 {stage['p99_ms']} / "
            f"max {stage['max_ms']} ms" for name, stage in during["reads_by_rebuild_stage"].items()), "-", "-"),
        ("rebuild timeline (s after its start; statements seen on the copy)",
         f"CLI first progress at {during['first_progress_s']} s; " + "; ".join(
             f"{first}-{last} s: {query[:75]}" for first, last, query in during["statements_on_the_copy"]), "-", "-"),
        ("reads skipped (a connection > 1 s behind its schedule): baseline / rebuild",
         f"{base['reads_skipped']} / {during['reads_skipped']}", "-", "0"),
        ("reads overlapping the switch", line(during["reads_overlapping_switch"]), "-", "-"),
        ("phase C reads not overlapping the switch", line(during["reads_outside_switch"]),
         f"{during['reads_outside_switch']['p99_ms'] / base['p99_ms']:.2f}x" if base["p99_ms"] else "-", "-"),
        ("switch: events applied under the lock; lock time by statement (sampled every 2 ms)",
         f"{lock['events_applied_under_lock']} events; " + "; ".join(
             f"{ms} ms {what}" for what, ms in sorted(lock["held_ms_by_statement"].items(), key=lambda kv: -kv[1])),
         "-", "-"),
        ("errors (reads, writes, rebuild)", str(errors), "-", "0 " + ("PASS" if errors == 0 else "MISS")),
        ("CPU busy: baseline / during rebuild", f"{base['cpu']['busy']:.0%} / {during['cpu']['busy']:.0%} "
         f"(steal {base['cpu'].get('steal', 0):.1%} / {during['cpu'].get('steal', 0):.1%})", "-", "-"),
        ("autovacuum seen during the rebuild", "; ".join(during["autovacuum_seen"])[:400] or "none", "-", "-"),
        ("/proc/loadavg at start / baseline / rebuild", f"{results['loadavg_start']} / {base['loadavg_before']} / "
         f"{during['loadavg_before']}", "-", "-"),
    ]
    return rows


def write_results(results: dict[str, Any], stem: str) -> Path:
    directory = RESULTS / stem
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"Reads during a rebuild of the read model, {results['date']} on {results['machine']}, "
             f"service at commit {results['service_commit']}",
             f"({results['events']} events seeded; reads: {READ_RATE:.0f}/s over HTTP, {READ_CONCURRENCY} in flight, "
             f"40% list by account / 30% list by owner (limit {LIST_LIMIT}) / 30% get of a random id; "
             f"command: `python -m bench.rebuild_reads{' --quick' if results['quick'] else ''}"
             f"{'' if results['quick'] or results['events'] == 200_000 else ' --events ' + str(results['events'])}"
             f"{'' if results['write_rate'] == 50 else ' --write-rate ' + str(results['write_rate'])}`)",
             "", "| measure | value | ratio | target |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in results["table"]]
    slow = results["rebuild"]["slow_reads"]
    if slow:
        lines += ["", "Reads slower than 200 ms (seconds after the rebuild started):", ""]
        lines += [f"- {r['at_s']} s: {r['kind']} {r['ms']} ms" for r in slow[:20]]
    busy = [b for b in results["rebuild"]["timeline_per_second"] if b["max_ms"] > 100]
    if busy:
        lines += ["", "Seconds of phase C (after the rebuild started) with a read over 100 ms:", ""]
        lines += ["- " + ", ".join(f"{b['second']} s: {b['reads']} reads, p50 {b['p50_ms']} / max {b['max_ms']} ms"
                                   for b in busy)]
    (directory / "results.md").write_text("\n".join(lines) + "\n")
    return directory / "results.md"


def git_head() -> str:
    """The commit the service ran from, "+changes" when its code differed from it in the work tree."""
    root = str(RESULTS.parent.parent)
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD", "--", "services", "projections",
                                  "events"], timeout=10).returncode != 0
        return head + (" +changes" if changed else "")
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    global WRITE_RATE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000, help="events seeded before the rebuild")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20,000 events, short phases")
    parser.add_argument("--write-rate", type=float, default=WRITE_RATE, help="creates/s in phases B and C")
    parser.add_argument("--seconds", type=float, default=None, help="length of phases A and B (default 20, quick 8)")
    args = parser.parse_args(argv)
    events = 20_000 if args.quick else args.events
    seconds = args.seconds or (8.0 if args.quick else 20.0)
    WRITE_RATE = args.write_rate
    root = Path(tempfile.mkdtemp(prefix="activities-rebuild-bench-"))
    started = datetime.now(UTC)
    results: dict[str, Any] = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
                               "quick": args.quick, "events": events, "loadavg_start": loadavg(),
                               "service_commit": git_head(),
                               "read_rate": READ_RATE, "read_concurrency": READ_CONCURRENCY, "write_rate": WRITE_RATE}
    progress(f"load average at start: {results['loadavg_start']}")
    try:
        with bench_servers(root) as servers:
            database_url = servers.fresh_database()
            progress(f"[1/5] seeding {events} events through the command path")
            seed_started = time.perf_counter()
            app = seed_events(database_url, events)
            results["seed_s"] = round(time.perf_counter() - seed_started, 1)
            with service(database_url, servers.nats_url, "commands,projector,http", root / "svc") as (_, endpoints):
                progress("  waiting for the service's projector")
                results["projected"] = wait_projected(app, database_url)
                app.close()
                plan = read_plan(database_url)
                settle(database_url)
                http_url, nats_url = endpoints["http_url"], endpoints["nats_url"]
                progress(f"[2/5] A: reads alone for {seconds:.0f} s")
                results["reads_alone"] = uvloop.run(steady_phase(http_url, nats_url, plan, seconds, 0))
                progress(f"  p99 {results['reads_alone']['p99_ms']} ms")
                progress(f"[3/5] B: reads + {WRITE_RATE:.0f} creates/s for {seconds:.0f} s (the baseline)")
                results["baseline"] = uvloop.run(steady_phase(http_url, nats_url, plan, seconds, WRITE_RATE))
                progress(f"  p99 {results['baseline']['p99_ms']} ms")
                progress("[4/5] C: the same during `activities projections rebuild`")
                results["rebuild"] = uvloop.run(
                    rebuild_phase(http_url, nats_url, plan, database_url, root, servers.nats_url))
                during = results["rebuild"]["reads"]
                progress(f"  p99 {during['p99_ms']} ms, max {during['max_ms']} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["loadavg_end"] = loadavg()
    results["table"] = table(results)
    stem = started.strftime("%Y-%m-%d-%H%M") + "-rebuild" + ("-quick" if args.quick else "")
    progress("[5/5] report")
    report = write_results(results, stem)
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
