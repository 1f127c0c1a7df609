"""The benchmark: the service against its baselines and limits, side by side, in ONE run.

    .venv/bin/python -m bench.run            # full run (about 10 minutes on 2 cores)
    .venv/bin/python -m bench.run --quick    # a short smoke run of every phase

It starts its own embedded PostgreSQL (fsync on) and NATS, runs each phase with progress on
stderr, and writes bench/results/<date-time>.json, .md (the table for the README) and .png
(throughput against latency). Every result is printed as a ratio to its baseline or limit.
The last phase measures the service's CPU per create at a fixed load for this tree only; to compare
two source trees (before and after a change) use `python -m bench.cpu_per_create` (see its docstring).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import uvloop
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench.load import Headers, Stats, closed_loop, open_loop
from bench.machine_probe import machine_probe
from bench.nats_client import LeanNatsClient
from services.auth import mint_token
from services.embedded import EmbeddedNats, EmbeddedPostgres

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SECRET = "bench-secret-" + "x" * 32
ACTIVITIES = str(Path(sys.executable).parent / "activities")


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Durations:
    load_s: float
    latency_s: float
    projection_events: int
    read_model_rows: int
    cpu_creates: int


FULL = Durations(load_s=15, latency_s=10, projection_events=200_000, read_model_rows=1_000_000, cpu_creates=10_000)
QUICK = Durations(load_s=3, latency_s=3, projection_events=10_000, read_model_rows=20_000, cpu_creates=1_000)


# ---------------------------------------------------------------------------------------------
# Servers and processes
# ---------------------------------------------------------------------------------------------


@dataclass
class BenchServers:
    admin_url: str
    nats_url: str

    def fresh_database(self) -> str:
        name = f"bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        parts = conninfo_to_dict(self.admin_url)
        parts["dbname"] = name
        return make_conninfo(**parts)


@contextmanager
def bench_servers(root: Path, shared_buffers: str | None = None) -> Iterator[BenchServers]:
    postgres = EmbeddedPostgres(root / "pg", fsync=True, shared_buffers=shared_buffers)
    nats_server = EmbeddedNats(root / "nats", port=None)
    url = postgres.start()
    try:
        nats_url = nats_server.start()
        try:
            yield BenchServers(url.replace("/activities?", "/postgres?"), nats_url)
        finally:
            nats_server.stop()
    finally:
        postgres.stop()


def service_env(database_url: str, nats_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTIVITIES_")}
    env.update({
        "ACTIVITIES_DATABASE_URL": database_url,
        "ACTIVITIES_NATS_URL": nats_url,
        "ACTIVITIES_DATA_DIR": str(data_dir),
        "ACTIVITIES_JWT_SECRET": SECRET,
        "ACTIVITIES_HTTP_PORT": "0",
        "ACTIVITIES_LOG_LEVEL": "WARNING",
        "ACTIVITIES_SUBJECT_PREFIX": "crm.activities",
    })
    env.update(extra)
    return env


@contextmanager
def service(database_url: str, nats_url: str, roles: str, data_dir: Path, **extra: str) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    """`activities serve --role ROLES` as its own process; yields it and its endpoints."""
    data_dir.mkdir(parents=True, exist_ok=True)
    endpoints_file = data_dir / "endpoints.json"
    endpoints_file.unlink(missing_ok=True)
    log = (data_dir / "service.log").open("ab")
    process = subprocess.Popen(
        [ACTIVITIES, "serve", "--role", roles],
        env=service_env(database_url, nats_url, data_dir, **extra),
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 60
        while not endpoints_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"service did not start; see {data_dir / 'service.log'}")
            time.sleep(0.05)
        yield process, json.loads(endpoints_file.read_text())
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def headers(tenant: str = "bench") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, tenant, 'usr-bench')}"}


def keyed_headers(phase: str, tenant: str = "bench") -> Callable[[int], dict[str, str]]:
    """Every request with its own Idempotency-Key, as the client library sends commands (the
    inbox and the overload's retrying clients too): baselines measured on the same requests."""
    authorization = headers(tenant)
    return lambda i: {**authorization, "Idempotency-Key": f"{phase}-{i}"}


def create_body(i: int) -> dict[str, Any]:
    return {
        "account_id": f"acc_{i % 1000}",
        "type": ("call", "email", "meeting", "note", "task")[i % 5],
        "subject": f"Follow-up {i}",
        "owner_id": f"usr-{uuid.UUID(int=i % 500):}",
        "activity_date": "2026-11-27T10:00:00Z",
        "tags": ["bench"],
    }


# ---------------------------------------------------------------------------------------------
# Phase 1: the limit — raw batched inserts of the same event rows
# ---------------------------------------------------------------------------------------------


def sample_state() -> bytes:
    """The stored state of one create of `create_body`, made and encoded as the service does it."""
    from eventsourcing.persistence import Mapper

    from activities_client.document import new_activity_id
    from events.activity import activity_uuid
    from events.commands import parse_create
    from services.application import event_transcoder
    from services.domain import Activity, Caller, decide

    activity_id = new_activity_id()
    now = datetime.now(UTC)
    decision = decide(None, parse_create(create_body(1)), Caller("bench", "usr-bench"), now, activity_id)
    assert decision is not None
    (event,) = Activity.log(activity_uuid(activity_id), decision, now).collect_events()
    return Mapper(transcoder=event_transcoder()).to_stored_event(event).state


def raw_insert_limit(database_url: str, rows: int, batch: int = 500) -> dict[str, Any]:
    state = sample_state()
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "CREATE TABLE raw_events (originator_id uuid NOT NULL, originator_version bigint NOT NULL, "
            "topic text, state bytea, notification_id bigserial, PRIMARY KEY (originator_id, originator_version))"
        )
        conn.execute("CREATE UNIQUE INDEX ON raw_events (notification_id)")
        conn.commit()
        started = time.perf_counter()
        for offset in range(0, rows, batch):
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO raw_events (originator_id, originator_version, topic, state) VALUES (%s, 1, %s, %s)",
                    [(uuid.uuid4(), "events.activity:ActivityLogged", state) for _ in range(batch)],
                )
            conn.commit()
        elapsed = time.perf_counter() - started
    return {"rows": rows, "batch": batch, "elapsed_s": round(elapsed, 3), "rows_per_s": round(rows / elapsed, 1)}


# ---------------------------------------------------------------------------------------------
# Phases 2 and 3: commands over NATS
# ---------------------------------------------------------------------------------------------


async def drive(nats_url: str, subject: str, make: Callable[[int], Any], concurrency: int, seconds: float,
                on_reply: Callable[[dict[str, Any]], None] | None = None, head: Headers | None = None) -> Stats:
    client = await LeanNatsClient.connect(nats_url)
    try:
        return await closed_loop(client, subject, make, head or headers(), concurrency, seconds, on_reply)
    finally:
        await client.close()


async def drive_rate(nats_url: str, subject: str, make: Callable[[int], Any], rate: float, seconds: float,
                     head: Headers | None = None) -> Stats:
    client = await LeanNatsClient.connect(nats_url)
    try:
        return await open_loop(client, subject, make, head or headers(), rate, seconds)
    finally:
        await client.close()


def naive_baseline(servers: BenchServers, seconds: float) -> dict[str, Any]:
    database_url = servers.fresh_database()
    subject = f"bench.naive.{uuid.uuid4().hex[:6]}.create"
    # the store's tables are made by the service's application on first use
    process = subprocess.Popen([sys.executable, "-m", "bench.naive", servers.nats_url, database_url, subject],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)
        uvloop.run(drive(servers.nats_url, subject, create_body, 8, 1))  # warm-up
        stats = uvloop.run(drive(servers.nats_url, subject, create_body, 64, seconds))
    finally:
        process.terminate()
        process.wait(10)
    return stats.summary()


def service_commands(servers: BenchServers, root: Path, durations: Durations) -> tuple[dict[str, Any], float]:
    database_url = servers.fresh_database()
    results: dict[str, Any] = {}
    ids: list[str] = []
    with service(database_url, servers.nats_url, "commands", root / "svc-commands") as (process, endpoints):
        url = endpoints["nats_url"]
        uvloop.run(drive(url, "crm.activities.cmd.create", create_body, 8, 1))
        for concurrency in (64, 256):
            progress(f"  service creates with {concurrency} in flight")
            stats = uvloop.run(drive(url, "crm.activities.cmd.create", create_body, concurrency, durations.load_s,
                                      lambda r: ids.append(r["data"]["id"])))
            results[f"create_{concurrency}"] = stats.summary()
        progress("  service patches with 64 in flight")
        counter = iter(range(10**9))

        def patch_body(i: int) -> dict[str, Any]:
            return {"id": random.choice(ids), "changes": {"subject": f"patched {next(counter)}"}}

        results["patch_64"] = uvloop.run(
            drive(url, "crm.activities.cmd.patch", patch_body, 64, durations.load_s)).summary()
        max_rate = max(results["create_64"]["rate_per_s"], results["create_256"]["rate_per_s"])
        from bench.read_side import settle

        settle(database_url)
        results["latency"] = {}
        for share in (25, 50, 90):
            rate = max_rate * share / 100
            progress(f"  latency at {share}% of max ({rate:.0f} creates/s)")
            with machine_probe(root / "pg") as machine_meanwhile:
                stats = uvloop.run(drive_rate(url, "crm.activities.cmd.create", create_body, rate, durations.latency_s))
            results["latency"][f"{share}%"] = {"target_rate": round(rate, 1), **stats.summary(), **machine_meanwhile}
        results["peak_rss_mb"] = round(peak_rss_mb(process.pid), 1)
        progress("  scale-out: a second command process in the same queue group, 256 in flight")
        with service(database_url, servers.nats_url, "commands", root / "svc-commands-2"):
            results["create_256_two_processes"] = uvloop.run(
                drive(url, "crm.activities.cmd.create", create_body, 256, durations.load_s)).summary()
    return results, max_rate


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


def write_report(results: dict[str, Any], stem: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    lines = [f"Benchmark run {results['date']} on {results['machine']}", "", "| measure | value | ratio | target |",
             "|---|---|---|---|"]
    for row in results["table"]:
        lines.append(f"| {row['measure']} | {row['value']} | {row['ratio']} | {row['target']} |")
    markdown = "\n".join(lines) + "\n"
    (RESULTS / f"{stem}.md").write_text(markdown)
    chart(results, RESULTS / f"{stem}.png")
    return RESULTS / f"{stem}.md"


def chart(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("matplotlib not installed: no chart (pip install -e '.[bench]')")
        return
    latency = results["service"]["latency"]
    rates = [v["rate_per_s"] for v in latency.values()]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
        axis.plot(rates, [v[key] for v in latency.values()], style, label=f"service create {key[:3]}")
    naive = results["naive"]
    axis.plot([naive["rate_per_s"]], [naive["p99_ms"]], "rx", markersize=10, label="naive baseline p99 (64 in flight)")
    for concurrency in (64, 256):
        point = results["service"][f"create_{concurrency}"]
        axis.plot([point["rate_per_s"]], [point["p99_ms"]], "kD", label=f"service p99, {concurrency} in flight")
    axis.set_xlabel("creates per second")
    axis.set_ylabel("latency (ms)")
    axis.set_yscale("log")
    axis.set_title(f"Creates over NATS: throughput against latency ({results['date']})")
    axis.legend(fontsize=8)
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def machine() -> str:
    return f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short phases and small data sets (a smoke run)")
    args = parser.parse_args(argv)
    durations = QUICK if args.quick else FULL
    root = Path(tempfile.mkdtemp(prefix="activities-bench-"))
    started = datetime.now(UTC)
    results: dict[str, Any] = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
                               "quick": args.quick}
    try:
        with bench_servers(root) as servers:
            progress("[1/8] raw batched inserts of event rows (the limit)")
            results["raw_insert"] = raw_insert_limit(servers.fresh_database(), durations.projection_events // 2)
            progress("[2/8] naive baseline: FastStream subscriber, one eventsourcing save per command")
            results["naive"] = naive_baseline(servers, durations.load_s)
            progress("[3/8] the service: creates and patches over NATS")
            results["service"], _ = service_commands(servers, root, durations)
            results.update(read_side_phases(servers, root, durations))
            progress(f"[8/8] CPU per create: {durations.cpu_creates} creates at 1,000/s (bench/cpu_per_create.py)")
            from bench.cpu_per_create import cpu_per_create_phase

            results["cpu_per_create"] = cpu_per_create_phase(servers, root, durations.cpu_creates, 1_000)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["table"] = table(results)
    stem = started.strftime("%Y-%m-%d-%H%M") + ("-quick" if args.quick else "")
    report = write_report(results, stem)
    print(report.read_text())
    return 0


def machine_floor(point: dict[str, Any]) -> str:
    """What the machine did during a latency phase (bench/machine_probe.py): the floor under its replies."""
    fsync = point.get("disk_fsync", {})
    steal = point.get("cpu_steal_share")
    parts = []
    if fsync.get("fsyncs"):
        parts.append(f"disk fsync meanwhile p99 {fsync['p99_ms']} / max {fsync['max_ms']} ms, holding "
                     f"{fsync['share_held_over_50_ms']:.1%} of replies past 50 ms")
    if steal is not None:
        parts.append(f"{steal:.1%} of the CPU stolen by the hypervisor")
    return "; ".join(parts) or "machine not probed"


def table(results: dict[str, Any]) -> list[dict[str, str]]:
    limit = results["raw_insert"]["rows_per_s"]
    naive = results["naive"]["rate_per_s"]
    service = results["service"]
    rows = [
        {"measure": "raw batched inserts (limit)", "value": f"{limit:.0f} rows/s", "ratio": "1.00x limit", "target": "-"},
        {"measure": "naive baseline creates (64 in flight)", "value": f"{naive:.0f}/s",
         "ratio": ratio(naive, limit) + " limit", "target": "-"},
    ]
    for concurrency in (64, 256):
        point = service[f"create_{concurrency}"]
        rows.append({"measure": f"service creates ({concurrency} in flight)", "value": f"{point['rate_per_s']:.0f}/s",
                     "ratio": f"{ratio(point['rate_per_s'], naive)} naive, {ratio(point['rate_per_s'], limit)} limit",
                     "target": ">= 5x naive"})
    two = service["create_256_two_processes"]
    rows.append({"measure": "service creates, two command processes (256 in flight)",
                 "value": f"{two['rate_per_s']:.0f}/s",
                 "ratio": ratio(two["rate_per_s"], service["create_256"]["rate_per_s"]) + " one process",
                 "target": "-"})
    patch = service["patch_64"]
    rows.append({"measure": "service patches (64 in flight)", "value": f"{patch['rate_per_s']:.0f}/s",
                 "ratio": ratio(patch["rate_per_s"], naive) + " naive", "target": "-"})
    for share, point in service["latency"].items():
        against_target = ratio(point["p99_ms"], 50) + " of 50 ms; " if share == "50%" else ""
        rows.append({"measure": f"create latency at {share} of max ({point['rate_per_s']:.0f}/s)",
                     "value": f"p50 {point['p50_ms']} / p95 {point['p95_ms']} / p99 {point['p99_ms']} ms",
                     "ratio": against_target + machine_floor(point),
                     "target": "p99 <= 50 ms at 50%" if share == "50%" else "-"})
    from bench.read_side import read_side_table

    rows.extend(read_side_table(results, limit))
    if "cpu_per_create" in results:
        cpu = results["cpu_per_create"]
        rows.append({"measure": f"service CPU per create ({cpu['creates']:,} creates at {cpu['rate']:,.0f}/s)",
                     "value": f"{cpu['cpu_us_per_create']:.0f} µs",
                     "ratio": f"{cpu['service_cpu_s'] / cpu['load']['elapsed_s']:.2f} of one core",
                     "target": "no higher than before a change (bench/cpu_per_create.py --source OLD --source NEW)"})
    memory = max([service["peak_rss_mb"], *results.get("read_side_rss_mb", [])])
    rows.append({"measure": "peak memory of a service process", "value": f"{memory:.0f} MB",
                 "ratio": ratio(memory, 400) + " of 400 MB", "target": "< 400 MB"})
    return rows


def read_side_phases(servers: BenchServers, root: Path, durations: Durations) -> dict[str, Any]:
    """Phases 4-6 (projection, queries, relay); filled in bench/read_side.py."""
    from bench.read_side import run_read_side

    return run_read_side(servers, root, durations)


if __name__ == "__main__":
    sys.exit(main())
