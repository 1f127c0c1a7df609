"""Reminders at scale: many reminders due within the same minute in a big tenant, fired by the
`scheduler` role. How late are they, and what does a firing cost?

    .venv/bin/python -m bench.reminders                                   # 1,000,000 activities, 100,000 reminders
    .venv/bin/python -m bench.reminders --activities 50000 --reminders 5000   # a smoke run

What it does, in order, on its own embedded PostgreSQL (fsync on) and NATS (bench/run.py's):

1. `--activities - --reminders` activities of one tenant without a reminder, appended through the
   real command path (`CommandService.execute`, batches of 500 creates) in this process;
2. `activities serve --role scheduler` as its own process: its due-time index reads the whole log
   from the start (timed: the index build rate);
3. `--reminders` activities with `remind_at` spread evenly over `--window` seconds that start
   `--lead` seconds after the last of them is expected to be written, through the same command
   path; the CPU time of this process per create is the baseline of the same write path;
4. the firing: until every reminder fired, then a pause for any second firing. Lateness of each
   `ActivityReminderDue` = its `occurred_at` (the event's timestamp) - `remind_at`, read from the
   event store: p50 / p99 / max; every activity checked to have exactly one;
5. CPU: the scheduler process's CPU time (user + system, /proc/<pid>/stat) over the firing, per
   firing, less its idle rate measured before; PostgreSQL's (the postmaster and its children,
   reaped ones included) per firing; the create baseline of step 3;
6. bench/results/<YYYY-MM-DD-HHMM>-reminders/results.json and results.md, with /proc/loadavg
   before and after every phase (the machine is shared: say so when it was loaded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from bench.run import RESULTS, bench_servers, machine, progress, service
from events.commands import parse_create
from services.application import ActivitiesApplication, CommandRequest, CommandService, application_env
from services.domain import Caller

TENANT = "bench"
CALLER = Caller(TENANT, "usr-bench")
BATCH = 500
TICK = os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def postgres_cpu_s(data_dir: Path) -> float:
    """CPU seconds of the PostgreSQL server: the postmaster, its reaped children and its live ones."""
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICK
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == postmaster:
            total += (int(stat[11]) + int(stat[12])) / TICK
    return total


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def create(service_: CommandService, bodies: list[dict[str, Any]], label: str) -> float:
    """Append creates in batches of BATCH; the rate."""
    started = time.perf_counter()
    for i in range(0, len(bodies), BATCH):
        requests = [CommandRequest(parse_create(body), CALLER) for body in bodies[i : i + BATCH]]
        outcomes = await service_.execute(requests)
        assert all(hasattr(outcome, "document") for outcome in outcomes), outcomes[:3]
        if (i // BATCH) % 200 == 0:
            done = i + len(requests)
            progress(f"  {label}: {done}/{len(bodies)} ({done / (time.perf_counter() - started):.0f}/s)")
    return len(bodies) / (time.perf_counter() - started)


def body(i: int, remind_at: str | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "account_id": f"acc_{i % 1000}",
        "type": "task",
        "subject": f"Follow up {i}",
        "activity_date": "2026-12-01T09:00:00Z",
    }
    if remind_at is not None:
        fields["remind_at"] = remind_at
    return fields


def fired(database_url: str) -> list[tuple[datetime, datetime]]:
    """(remind_at, occurred_at) of every ActivityReminderDue in the store."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT s->'document'->>'remind_at', s->'timestamp'->>'_data_', s->'document'->>'id' FROM ("
            " SELECT convert_from(state, 'UTF8')::jsonb AS s FROM activities_events"
            " WHERE topic = 'events.activity:ActivityReminderDue') AS e"
        ).fetchall()
    ids = [row[2] for row in rows]
    assert len(ids) == len(set(ids)), "a reminder fired twice"
    return [(datetime.fromisoformat(r[0].replace("Z", "+00:00")), datetime.fromisoformat(r[1])) for r in rows]


def count_fired(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM activities_events WHERE topic = 'events.activity:ActivityReminderDue'"
        ).fetchone()
    return int(row[0]) if row else 0


def due_position(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        present = conn.execute("SELECT to_regclass('activities_due_tracking') IS NOT NULL").fetchone()
        if not present or not present[0]:
            return 0
        row = conn.execute("SELECT position FROM activities_due_tracking").fetchone()
    return int(row[0]) if row else 0


def log_head(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT coalesce(max(notification_id), 0) FROM activities_events").fetchone()
    return int(row[0]) if row else 0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def run(activities: int, reminders: int, window_s: float, lead_s: float) -> dict[str, Any]:
    results: dict[str, Any] = {
        "activities": activities,
        "reminders": reminders,
        "window_s": window_s,
        "machine": machine(),
        "started": datetime.now(UTC).isoformat(),
        "loadavg": {"start": loadavg()},
    }
    with tempfile.TemporaryDirectory(prefix="bench-reminders-") as tmp, bench_servers(Path(tmp)) as servers:
        root = Path(tmp)
        url = servers.fresh_database()
        app = ActivitiesApplication(env=application_env(url, pool_size=4))
        command_service = CommandService(app)
        progress(f"seeding {activities - reminders} activities without a reminder")
        seed_rate = asyncio.run(create(command_service, [body(i) for i in range(activities - reminders)], "seed"))
        results["seed_creates_per_s"] = round(seed_rate)
        results["loadavg"]["after_seed"] = loadavg()
        head = log_head(url)
        with service(url, servers.nats_url, "scheduler", root / "scheduler") as (process, _):
            started = time.perf_counter()
            while due_position(url) < head:
                time.sleep(0.2)
            build_s = time.perf_counter() - started
            results["index_build"] = {
                "events": head,
                "seconds": round(build_s, 1),
                "events_per_s": round(head / build_s),
            }
            progress(f"the due index read {head} events in {build_s:.1f} s")
            idle_from = process_cpu_s(process.pid)
            time.sleep(5.0)
            idle_rate = (process_cpu_s(process.pid) - idle_from) / 5.0
            results["scheduler_idle_cpu_per_s"] = round(idle_rate, 4)
            # the reminders, due in one window starting after they are all written
            expected_s = reminders / max(seed_rate, 1)
            # writing them goes slower than the seed (the index reads them meanwhile): 3x the seed's time
            window_start = datetime.now(UTC) + timedelta(seconds=expected_s * 3 + lead_s)
            step = window_s / reminders
            bodies = [
                body(activities - reminders + i, (window_start + timedelta(seconds=i * step)).isoformat())
                for i in range(reminders)
            ]
            progress(f"creating {reminders} reminders due from {window_start.isoformat()} over {window_s:g} s")
            cpu_before = own_cpu_s()
            create_rate = asyncio.run(create(command_service, bodies, "reminders"))
            results["baseline_create_cpu_us"] = round((own_cpu_s() - cpu_before) / reminders * 1e6, 1)
            results["reminder_creates_per_s"] = round(create_rate)
            margin = (window_start - datetime.now(UTC)).total_seconds()
            results["lead_left_s"] = round(margin, 1)
            assert margin > 0.5, f"the reminders were written too late: {margin:.1f} s before the window (raise --lead)"
            time.sleep(max(margin - 0.5, 0))
            results["loadavg"]["before_firing"] = loadavg()
            cpu_from, pg_from = process_cpu_s(process.pid), postgres_cpu_s(root / "pg")
            wall_from = time.perf_counter()
            deadline = time.monotonic() + window_s + 300
            while count_fired(url) < reminders:
                assert time.monotonic() < deadline, "the reminders did not all fire"
                time.sleep(0.5)
            wall = time.perf_counter() - wall_from
            cpu, pg = process_cpu_s(process.pid) - cpu_from, postgres_cpu_s(root / "pg") - pg_from
            results["loadavg"]["after_firing"] = loadavg()
            time.sleep(3.0)  # any second firing would show
        pairs = fired(url)
        assert len(pairs) == reminders, f"{len(pairs)} firings of {reminders} reminders"
        lateness = [(occurred - remind).total_seconds() for remind, occurred in pairs]
        results["lateness_s"] = {
            "p50": round(statistics.median(lateness), 3),
            "p99": round(percentile(lateness, 99), 3),
            "max": round(max(lateness), 3),
            "min": round(min(lateness), 3),
            "over_1s": sum(1 for value in lateness if value > 1.0),
        }
        busy = max(cpu - idle_rate * wall, 0.0)
        results["firing"] = {
            "wall_s": round(wall, 1),
            "scheduler_cpu_s": round(cpu, 2),
            "scheduler_cpu_us_per_firing": round(busy / reminders * 1e6, 1),
            "postgres_cpu_us_per_firing": round(pg / reminders * 1e6, 1),
        }
        results["ratios"] = {
            "p99_lateness_of_1s": round(results["lateness_s"]["p99"] / 1.0, 3),
            "firing_cpu_of_create_cpu": round(
                results["firing"]["scheduler_cpu_us_per_firing"] / max(results["baseline_create_cpu_us"], 1e-9), 2
            ),
        }
        app.close()
    results["loadavg"]["end"] = loadavg()
    return results


def report(results: dict[str, Any]) -> str:
    late, firing, ratios = results["lateness_s"], results["firing"], results["ratios"]
    lines = [
        f"# Reminders: {results['reminders']:,} due within {results['window_s']:g} s in a tenant of "
        f"{results['activities']:,} activities",
        "",
        f"Machine: {results['machine']}; load averages {json.dumps(results['loadavg'])} (a shared machine: "
        "other work ran at the same time).",
        "",
        "| measure | value | ratio | aim |",
        "|---|---|---|---|",
        f"| lateness p50 / p99 / max | {late['p50']} / {late['p99']} / {late['max']} s "
        f"({late['over_1s']} over 1 s) | p99 {ratios['p99_lateness_of_1s']}x of 1 s | p99 <= 1 s |",
        f"| scheduler process CPU per firing | {firing['scheduler_cpu_us_per_firing']} µs | "
        f"{ratios['firing_cpu_of_create_cpu']}x of a create on the same write path "
        f"({results['baseline_create_cpu_us']} µs, measured in this run) | - |",
        f"| PostgreSQL CPU per firing | {firing['postgres_cpu_us_per_firing']} µs | - | - |",
        f"| firing wall time | {firing['wall_s']} s for a {results['window_s']:g} s window | - | - |",
        f"| due index build from the log | {results['index_build']['events']:,} events in "
        f"{results['index_build']['seconds']} s ({results['index_build']['events_per_s']:,}/s) | - | - |",
        f"| scheduler idle CPU | {results['scheduler_idle_cpu_per_s']} s/s | - | - |",
        "",
        f"Seeding: {results['seed_creates_per_s']:,} creates/s; the reminders {results['reminder_creates_per_s']:,}/s, "
        f"finished {results['lead_left_s']} s before the window.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--activities", type=int, default=1_000_000)
    parser.add_argument("--reminders", type=int, default=100_000)
    parser.add_argument("--window", type=float, default=60.0, help="seconds the reminders are spread over")
    parser.add_argument("--lead", type=float, default=20.0, help="seconds between the last write and the window")
    parser.add_argument("--name", default="reminders", help="suffix of the results directory")
    args = parser.parse_args(argv)
    results = run(args.activities, args.reminders, args.window, args.lead)
    directory = RESULTS / f"{datetime.now(UTC).strftime('%Y-%m-%d-%H%M')}-{args.name}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (directory / "results.md").write_text(report(results))
    progress(f"results in {directory}")
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
