"""Batches of creates against single creates and against the raw insert limit, in one run.

docs/contract.md section 8: "A batch of creates is stored in one transaction and must cost far
less per activity than single creates." Measured here, side by side in the same run on the same
embedded PostgreSQL (fsync on) and NATS:

1. **raw limit**: raw batched INSERTs (100 rows per transaction) of the same event rows (the
   stored state of one create, as the service encodes it) into a scratch table (bench/run.py's
   `raw_insert_limit`): no service, no NATS, no JSON parsing; what PostgreSQL itself takes;
2. **single creates**: `cmd.create` requests, 64 in flight, for a fixed time;
3. **batches**: `cmd.batch` requests of 100 creates each, 4 in flight, for the same time;
4. 2 and 3 again against `--processes` (default 2) command processes of the service sharing one
   database and the command subjects' queue group, as docs/operations.md scales commands out (here
   on the machine's two cores, beside PostgreSQL, NATS and the load): 64 single creates and 8
   batches in flight per process (a process waits for its batch's append about a third of the
   time; 8 batches each keep both cores busy).

Activities per second of 2-4 are reported as ratios to 1 (aim: batches at least 0.5x of the
raw limit) and to single creates. The service appends one batch at a time (an advisory lock keeps
notification ids in commit order), so the one-connection raw limit is the event store's own
ceiling for any number of command processes. The batches' bodies are encoded once before the
run (64 of them, sent in turn; creates carry no keys, so a repeated body is another activity): the
load generator shares the machine, and what it spends is not the service's.

Then the service's CPU per create, from one service process's own CPU time
(bench/cpu_per_create.py's `process_cpu_s` and `measure_load`, not a copy) over fixed loads:
`--cpu-batches` batches of 100 creates (aim: at most 80 us per create), and the same number
of single creates offered at 1,000/s (cpu_per_create's paced load) for comparison.

The service is one `activities serve --role commands` process of this tree (cpu_per_create's
`start`, which checks it imports this tree's code), and for phase 4 `--processes` more on a
database of their own (`start_beside`). The machine's load average and busy share
are recorded with each phase: on a shared machine the absolute numbers move, the ratios less.

    .venv/bin/python -m bench.batches            # about 2 minutes
    .venv/bin/python -m bench.batches --quick    # a smoke run

Results go to bench/results/<date>-<HHMM>-batches/ (batches.json and batches.md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import uvloop

from bench.cpu_per_create import (
    Running,
    Source,
    loadavg,
    machine,
    machine_meanwhile,
    measure_load,
    process_cpu_s,
    start,
    start_beside,
    stop,
    transaction_ids,
)
from bench.load import Stats, _one, closed_loop
from bench.nats_client import LeanNatsClient
from bench.run import (
    RESULTS,
    ROOT,
    BenchServers,
    bench_servers,
    create_body,
    headers,
    progress,
    raw_insert_limit,
    sample_state,
)

BATCH_SIZE = 100


@dataclass(frozen=True)
class Plan:
    rounds: int = 5  # each round measures the raw limit, single creates and batches, one after the other
    seconds: float = 4.0  # each throughput phase of a round
    singles_in_flight: int = 64
    batches_in_flight: int = 4
    raw_rows: int = 10_000  # per round and way
    cpu_batches: int = 200  # the fixed load of the CPU measure: 200 batches of 100 creates
    warmup_batches: int = 20
    processes: int = 2  # command processes of phase 4 (scaled out)
    batches_in_flight_scaled: int = 8  # per process in phase 4: the machine's two cores stay busy


QUICK = Plan(rounds=1, seconds=3.0, raw_rows=5_000, cpu_batches=40, warmup_batches=5)
BODIES = 64


def batch_body(i: int) -> dict[str, Any]:
    """A batch of 100 creates (the bodies of the single-create phase)."""
    return {"commands": [{"op": "create", **create_body(i * BATCH_SIZE + j)} for j in range(BATCH_SIZE)]}


@functools.cache
def _encoded_batches() -> tuple[bytes, ...]:
    return tuple(orjson.dumps(batch_body(i)) for i in range(BODIES))


def encoded_batch(i: int) -> bytes:
    """The i-th batch's body as sent: one of `BODIES` batches encoded once."""
    return _encoded_batches()[i % BODIES]


class ItemCount:
    """Counts the items of batch replies that succeeded and those that failed."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0

    def __call__(self, reply: dict[str, Any]) -> None:
        for item in reply["data"]:
            if "data" in item:
                self.ok += 1
            else:
                self.failed += 1


async def closed_batches(nats_url: str, subject: str, in_flight: int, seconds: float, items: ItemCount) -> Stats:
    client = await LeanNatsClient.connect(nats_url)
    try:
        return await closed_loop(client, subject, encoded_batch, headers(), in_flight, seconds, items)
    finally:
        await client.close()


async def closed_singles(nats_url: str, subject: str, in_flight: int, seconds: float) -> Stats:
    client = await LeanNatsClient.connect(nats_url)
    try:
        return await closed_loop(client, subject, create_body, headers(), in_flight, seconds)
    finally:
        await client.close()


async def fixed_batches(nats_url: str, subject: str, count: int, in_flight: int, first: int,
                        items: ItemCount) -> Stats:
    """Exactly `count` batches, `in_flight` at a time."""
    client = await LeanNatsClient.connect(nats_url)
    stats = Stats()
    numbers = itertools.count(first)
    remaining = iter(range(count))
    auth = headers()

    async def worker() -> None:
        for _ in remaining:
            await _one(client, subject, encoded_batch(next(numbers)), auth, stats, items)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        stats.elapsed_s = time.perf_counter() - started
    finally:
        await client.close()
    return stats


def raw_unnest_limit(database_url: str, rows: int, batch: int = BATCH_SIZE) -> dict[str, Any]:
    """The raw limit as the service writes: one `INSERT ... SELECT FROM unnest(<binary arrays>)` of
    `batch` rows per transaction (bench/run.py's `raw_insert_limit` sends the rows with
    `executemany`), into the same scratch table shape, with the same stored state per row."""
    state = sample_state()
    topic = "events.activity:ActivityLogged"
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "CREATE TABLE raw_events_unnest (originator_id uuid NOT NULL, originator_version bigint NOT NULL, "
            "topic text, state bytea, notification_id bigserial, PRIMARY KEY (originator_id, originator_version))"
        )
        conn.execute("CREATE UNIQUE INDEX ON raw_events_unnest (notification_id)")
        conn.commit()
        started = time.perf_counter()
        for _ in range(0, rows, batch):
            conn.execute(
                "INSERT INTO raw_events_unnest (originator_id, originator_version, topic, state) "
                "SELECT * FROM unnest(%b::uuid[], %b::bigint[], %b::text[], %b::bytea[])",
                ([uuid.uuid4() for _ in range(batch)], [1] * batch, [topic] * batch, [state] * batch),
                binary=True,
            )
            conn.commit()
        elapsed = time.perf_counter() - started
    return {"rows": rows, "batch": batch, "elapsed_s": round(elapsed, 3), "rows_per_s": round(rows / elapsed, 1)}


def raw_limit(servers: BenchServers, plan: Plan) -> dict[str, Any]:
    """The raw limit, the faster of two ways (the service is compared with the best PostgreSQL does)."""
    database_url = servers.fresh_database()
    with machine_meanwhile() as meanwhile:
        executemany = raw_insert_limit(database_url, plan.raw_rows, BATCH_SIZE)
    executemany.update(meanwhile)
    with machine_meanwhile() as meanwhile:
        unnest = raw_unnest_limit(database_url, plan.raw_rows, BATCH_SIZE)
    unnest.update(meanwhile)
    fastest = max((executemany, unnest), key=lambda found: found["rows_per_s"])
    return {**fastest, "way": "unnest" if fastest is unnest else "executemany",
            "executemany": executemany, "unnest": unnest}


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds of each rate and of each round's ratios (the phases of a round ran
    within seconds of each other, so its ratios share that moment's load of the machine)."""

    def median(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    raw = [r["raw_limit"]["rows_per_s"] for r in rounds]
    summary: dict[str, Any] = {
        "raw_limit_per_s": median(raw),
        "raw_executemany_per_s": median([r["raw_limit"]["executemany"]["rows_per_s"] for r in rounds]),
        "raw_unnest_per_s": median([r["raw_limit"]["unnest"]["rows_per_s"] for r in rounds]),
    }
    for deployment in ("one", "scaled"):
        singles = [r[deployment]["singles"]["activities_per_s"] for r in rounds]
        batches = [r[deployment]["batches"]["activities_per_s"] for r in rounds]
        summary[deployment] = {
            "singles_per_s": median(singles),
            "batches_per_s": median(batches),
            "batches_to_raw": median([b / r for b, r in zip(batches, raw, strict=True)]),
            "singles_to_raw": median([s / r for s, r in zip(singles, raw, strict=True)]),
            "batches_to_singles": median([b / s for b, s in zip(batches, singles, strict=True)]),
            "batches_to_raw_per_round": [round(b / r, 3) for b, r in zip(batches, raw, strict=True)],
            "machine_busy_share": median([r[deployment]["batches"]["machine_busy_share"] for r in rounds]),
            "batch_p50_ms": median([r[deployment]["batches"]["p50_ms"] for r in rounds]),
            "batch_p99_ms": median([r[deployment]["batches"]["p99_ms"] for r in rounds]),
            "single_p50_ms": median([r[deployment]["singles"]["p50_ms"] for r in rounds]),
            "single_p99_ms": median([r[deployment]["singles"]["p99_ms"] for r in rounds]),
        }
    return summary


def throughput(running: Running, plan: Plan, processes: int = 1) -> dict[str, Any]:
    """Single creates, then batches, for a fixed time each, against the command process(es) that
    serve `running`'s subjects (scaled out: more processes, with more batches in flight each)."""
    batch_subject = running.subject.removesuffix(".create") + ".batch"
    singles_in_flight = plan.singles_in_flight * processes
    batches_in_flight = plan.batches_in_flight if processes == 1 else plan.batches_in_flight_scaled * processes
    serving = f"{processes} command process{'es' if processes > 1 else ''}"
    progress(f"  {serving}: single creates, {singles_in_flight} in flight, {plan.seconds:g} s; loadavg {loadavg()}")
    with machine_meanwhile() as singles_machine:
        singles = uvloop.run(closed_singles(running.nats_url, running.subject, singles_in_flight, plan.seconds))
    progress(f"  {serving}: batches of {BATCH_SIZE} creates, {batches_in_flight} in flight, {plan.seconds:g} s")
    items = ItemCount()
    with machine_meanwhile() as batches_machine:
        batches = uvloop.run(closed_batches(running.nats_url, batch_subject, batches_in_flight, plan.seconds, items))
    if singles.errors or batches.errors or items.failed:
        raise RuntimeError(f"failed: singles {singles.error_codes}, batches {batches.error_codes}, "
                           f"{items.failed} batch items")
    return {
        "processes": processes,
        "singles": {**singles.summary(), "activities_per_s": round(singles.rate, 1), "in_flight": singles_in_flight,
                    **singles_machine},
        "batches": {**batches.summary(), "activities_per_s": round(items.ok / batches.elapsed_s, 1),
                    "items_ok": items.ok, "in_flight": batches_in_flight, **batches_machine},
    }


def cpu_per_create(running: Running, servers: BenchServers, plan: Plan, first: int) -> dict[str, Any]:
    """The service process's CPU time over fixed loads, per create: batches, then single creates."""
    batch_subject = running.subject.removesuffix(".create") + ".batch"
    creates = plan.cpu_batches * BATCH_SIZE
    progress(f"  CPU: {plan.cpu_batches} batches of {BATCH_SIZE} ({creates} creates), "
             f"{plan.batches_in_flight} in flight")
    items = ItemCount()
    xid_before = transaction_ids(servers.admin_url)
    with machine_meanwhile() as meanwhile:
        cpu_before = process_cpu_s(running.process.pid)
        stats = uvloop.run(fixed_batches(running.nats_url, batch_subject, plan.cpu_batches, plan.batches_in_flight,
                                         first, items))
        cpu_s = process_cpu_s(running.process.pid) - cpu_before
    commits = transaction_ids(servers.admin_url) - xid_before - 1
    if stats.errors or items.failed or items.ok != creates:
        raise RuntimeError(f"CPU load failed: {stats.error_codes}, {items.failed} items")
    batches = {
        "cpu_us_per_create": round(cpu_s / creates * 1e6, 1), "service_cpu_s": round(cpu_s, 3),
        "creates": creates, "commits": commits, "creates_per_commit": round(creates / commits, 1) if commits else None,
        "load": stats.summary(), **meanwhile,
    }
    progress(f"  CPU: {creates} single creates offered at 1,000/s (bench/cpu_per_create's paced load)")
    (singles,) = measure_load([running], servers.admin_url, creates, 1_000, 64, first + plan.cpu_batches * BATCH_SIZE)
    return {"batches": batches, "singles": singles}


def markdown(results: dict[str, Any]) -> str:
    summary = results["summary"]
    plan = results["plan"]
    cpu = results["cpu"]
    one, scaled = summary["one"], summary["scaled"]
    processes = plan["processes"]

    def rows(label: str, found: dict[str, Any], singles_in_flight: int, batches_in_flight: int) -> list[str]:
        return [
            f"| {label}: single creates, {singles_in_flight} in flight | {found['singles_per_s']:,.0f} | "
            f"{found['singles_to_raw']} | 1.00 | - |",
            f"| {label}: batches of {BATCH_SIZE} creates, {batches_in_flight} in flight | "
            f"{found['batches_per_s']:,.0f} | **{found['batches_to_raw']}** (rounds: "
            f"{found['batches_to_raw_per_round']}) | **{found['batches_to_singles']}** | >= 0.5x raw |",
        ]

    lines = [
        f"# Batches of creates: {results['date']}",
        "",
        f"{results['machine']}; load average at start {results['loadavg_start']}, at end {results['loadavg_end']}; "
        f"the machine was {one['machine_busy_share']:.0%} busy during the batches against one command process "
        f"and {scaled['machine_busy_share']:.0%} against {processes} (medians). "
        + ("A smoke run (--quick). " if results["quick"] else "")
        + "The machine is shared with other work: absolute rates move between runs, so each of "
        f"{plan['rounds']} rounds measures the raw limit and every load within seconds; medians of the rates and "
        "of each round's ratios. x single creates: against single creates to as many processes.",
        "",
        "| measure | activities/s (median) | x raw limit (median of rounds) | x single creates | aim |",
        "|---|---|---|---|---|",
        f"| raw limit: batched INSERT of the same event rows into a scratch table, {BATCH_SIZE} rows per "
        f"transaction, one connection (faster of unnest {summary['raw_unnest_per_s']:,.0f}/s and executemany "
        f"{summary['raw_executemany_per_s']:,.0f}/s) | {summary['raw_limit_per_s']:,.0f} | 1.00 | - | - |",
        *rows("one command process", one, plan["singles_in_flight"], plan["batches_in_flight"]),
        *rows(f"{processes} command processes", scaled, plan["singles_in_flight"] * processes,
              plan["batches_in_flight_scaled"] * processes),
        "",
        "| service CPU per create (one process's CPU time over a fixed load) | us | creates per commit | aim |",
        "|---|---|---|---|",
        f"| {cpu['batches']['creates']} creates in batches of {BATCH_SIZE}, {plan['batches_in_flight']} in flight | "
        f"**{cpu['batches']['cpu_us_per_create']}** | {cpu['batches']['creates_per_commit']} | <= 80 us |",
        f"| {cpu['singles']['creates']} single creates offered at 1,000/s | {cpu['singles']['cpu_us_per_create']} | "
        f"{cpu['singles']['creates_per_commit']} | - |",
        "",
        f"Batch replies (one process): p50 {one['batch_p50_ms']} ms, p99 {one['batch_p99_ms']} ms per batch of "
        f"{BATCH_SIZE}; single creates p50 {one['single_p50_ms']} ms, p99 {one['single_p99_ms']} ms. "
        f"With {processes} processes: batches p50 {scaled['batch_p50_ms']} ms, p99 {scaled['batch_p99_ms']} ms.",
        "",
        f"Command: `{results['command']}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=Plan.rounds)
    parser.add_argument("--seconds", type=float, default=Plan.seconds, help="each throughput phase of a round")
    parser.add_argument("--batches-in-flight", type=int, default=Plan.batches_in_flight)
    parser.add_argument("--cpu-batches", type=int, default=Plan.cpu_batches,
                        help="batches of 100 creates in the fixed load of the CPU measure")
    parser.add_argument("--processes", type=int, default=Plan.processes,
                        help="command processes of the scaled-out phases (sharing one database)")
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan(rounds=args.rounds, seconds=args.seconds,
                                         batches_in_flight=args.batches_in_flight, cpu_batches=args.cpu_batches)
    plan = dataclasses.replace(plan, processes=max(1, args.processes))
    started = datetime.now(UTC)
    results: dict[str, Any] = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "quick": args.quick,
        "command": " ".join(["python -m bench.batches", *(argv if argv is not None else sys.argv[1:])]),
        "plan": plan.__dict__, "loadavg_start": loadavg(),
    }
    source = Source(ROOT, sys.executable, ROOT.name)
    results["source"] = source.describe()
    root = Path(tempfile.mkdtemp(prefix="activities-batches-"))
    try:
        with bench_servers(root) as servers:
            processes: list[Running] = []
            try:
                processes.append(running := start(source, servers, root, 1, 0))
                processes.append(scaled := start(source, servers, root, 1, 1))
                processes.extend(start_beside(scaled, root, 1, 1 + k) for k in range(1, plan.processes))
                progress(f"warm-up (one command process, and {plan.processes} on a database of their own)")
                for serving, count in ((running, 1), (scaled, plan.processes)):
                    batch_subject = serving.subject.removesuffix(".create") + ".batch"
                    uvloop.run(fixed_batches(serving.nats_url, batch_subject, plan.warmup_batches * count, 2 * count,
                                             10**7, ItemCount()))
                    uvloop.run(closed_singles(serving.nats_url, serving.subject, 8 * count, 1))
                rounds = []
                for number in range(1, plan.rounds + 1):
                    progress(f"round {number}/{plan.rounds}: raw limit ({plan.raw_rows} rows in transactions of "
                             f"{BATCH_SIZE}, two ways), single creates and batches to 1 and {plan.processes} "
                             "command processes")
                    rounds.append({"raw_limit": raw_limit(servers, plan), "one": throughput(running, plan),
                                   "scaled": throughput(scaled, plan, plan.processes)})
                results["rounds"] = rounds
                results["cpu"] = cpu_per_create(running, servers, plan, 2 * 10**7)
            finally:
                for process in processes:
                    stop(process)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["loadavg_end"] = loadavg()
    results["summary"] = summarise(results["rounds"])
    out = RESULTS / (started.strftime("%Y-%m-%d-%H%M") + ("-batches-quick" if args.quick else "-batches"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "batches.json").write_text(json.dumps(results, indent=2))
    report = markdown(results)
    (out / "batches.md").write_text(report)
    print(report)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
