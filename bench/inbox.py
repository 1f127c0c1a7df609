"""The durable inbox against request/reply: throughput and publish-to-result latency.

    .venv/bin/python -m bench.inbox            # about 2 minutes
    .venv/bin/python -m bench.inbox --quick    # a smoke run

One `activities serve --role commands,inbox` process (embedded PostgreSQL with fsync on, embedded
NATS, all on 127.0.0.1), then, alternating for `--rounds` rounds on the same process:

- request/reply: creates over NATS request/reply with 256 in flight for `--seconds` (the baseline,
  bench/run.py's create_256 load), each with its own Idempotency-Key, as the client library sends
  every command and as every inbox command must carry one (until 2026-12-07 the baseline carried
  none, so it skipped the key lookup and write that the inbox's commands pay);
- inbox: as many create commands JetStream-published to `crm.activities.inbox.create` (1,024
  publishes awaiting their JetStream ack, each with its Idempotency-Key as Nats-Msg-Id), timed from
  the first publish to the last result received on `crm.activities.results.bench`: commands
  carried out per second.

- backlog: the service paused (SIGSTOP), as many creates published, the service resumed: the
  time from the resume to the last result (the inbox draining a backlog, as after an outage).

The ratios to request/reply of each round are reported, and their medians (aim: >= 0.8), with the
service process's CPU time per command in each phase (bench/cpu_per_create.py's `process_cpu_s`)
and their ratio: how much more the inbox does per command, a steadier figure than the rates.
Then latency at a steady 500 commands/s for `--latency-seconds`: each command published at its
scheduled time (open loop), its latency the time from the publish to its result message; and the
request/reply creates at the same rate side by side. Both load generators speak the NATS protocol
through bench/nats_client.py's lean client (a JetStream publish is a request answered by the
stream's ack), so the client's CPU is the same on both sides; the results are received by the
same lean client's subscription (they were received with nats-py, several times the CPU per
message, until 2026-12-07). The machine's load average is recorded before and after (the machine
is shared).
Results go to bench/results/<date>-<HHMM>-inbox/ (inbox.json, inbox.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import uvloop

from bench.cpu_per_create import process_cpu_s
from bench.load import Stats
from bench.nats_client import LeanNatsClient, encode_headers
from bench.run import RESULTS, bench_servers, create_body, drive, headers, keyed_headers, machine, progress, service

INBOX_SUBJECT = "crm.activities.inbox.create"
RESULTS_SUBJECT = "crm.activities.results.bench"
IN_FLIGHT = 256
PUBLISH_IN_FLIGHT = 1024  # JetStream publishes awaiting their ack (an async publisher does not wait for results)


class ResultWatcher:
    """Receives the tenant's results (a core NATS subscription on the results subject) and notes
    when each key's result arrived. `wait_for` returns once each key it waits for has one: the
    keys still missing are counted off as results arrive. (Until 2026-12-07 every result woke the
    waiter, which listed the keys still missing again: quadratic in a round's 40,000 commands,
    seconds of the client's CPU taken from the service on the same two cores.)"""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.errors: dict[str, int] = {}
        self._missing: set[str] = set()
        self._complete = asyncio.Event()

    def on_message(self, head: bytes, body: bytes) -> None:
        start = head.find(b"Idempotency-Key: ") + len(b"Idempotency-Key: ")
        key = head[start : head.find(b"\r\n", start)].decode()
        self.arrived.setdefault(key, time.perf_counter())
        if b'"error"' in body[:20]:
            code = str(orjson.loads(body)["error"]["code"])
            self.errors[code] = self.errors.get(code, 0) + 1
        if self._missing:
            self._missing.discard(key)
            if not self._missing:
                self._complete.set()

    async def wait_for(self, keys: list[str], timeout: float) -> None:
        self._missing = {k for k in keys if k not in self.arrived}
        if not self._missing:
            return
        self._complete.clear()
        try:
            await asyncio.wait_for(self._complete.wait(), timeout)
        except TimeoutError:
            missing = sorted(self._missing)
            raise RuntimeError(f"{len(missing)} results never arrived (first: {missing[0]})") from None


def inbox_heads() -> Callable[[str], bytes]:
    """The NATS headers of an inbox command by its key, with one token for the whole phase, as a
    publisher keeps its token (and as the request/reply baseline does, bench/run.py's
    `keyed_headers`). Until 2026-12-07 a token was minted per command: a quarter of the
    publisher's CPU, taken from the service on the same two cores."""
    authorization = headers()
    return lambda key: encode_headers({**authorization, "Idempotency-Key": key, "Nats-Msg-Id": key})


async def publish_all(client: LeanNatsClient, keys: list[str]) -> int:
    """JetStream-publish a create per key, PUBLISH_IN_FLIGHT awaiting their ack at a time (worker
    loops, as bench/load.py's closed loop); returns how many the stream refused."""
    head = inbox_heads()
    numbers = iter(range(len(keys)))
    refused = 0

    async def worker() -> None:
        nonlocal refused
        for i in numbers:
            reply = await client.start_request(INBOX_SUBJECT, orjson.dumps(create_body(i)), head(keys[i]), 30)
            if b'"error"' in reply.data:
                refused += 1

    await asyncio.gather(*(worker() for _ in range(PUBLISH_IN_FLIGHT)))
    return refused


async def inbox_throughput(nats_url: str, count: int, tag: str) -> dict[str, Any]:
    """Publish `count` creates (PUBLISH_IN_FLIGHT at a time) and time them to the last result."""
    watcher = ResultWatcher()
    receiver = await LeanNatsClient.connect(nats_url)
    await receiver.subscribe(RESULTS_SUBJECT, watcher.on_message)
    client = await LeanNatsClient.connect(nats_url)
    keys = [f"{tag}-{i}" for i in range(count)]
    started = time.perf_counter()
    publish_errors = await publish_all(client, keys)
    published = time.perf_counter()
    await watcher.wait_for(keys, timeout=300)
    finished = max(watcher.arrived[k] for k in keys)
    await client.close()
    await receiver.close()
    elapsed = finished - started
    return {
        "commands": count,
        "publish_s": round(published - started, 3),
        "elapsed_s": round(elapsed, 3),
        "rate_per_s": round(count / elapsed, 1),
        "publish_errors": publish_errors,
        "error_results": watcher.errors,
    }


async def backlog_drain(nats_url: str, pid: int, count: int, tag: str) -> dict[str, Any]:
    """Pause the service (SIGSTOP), publish `count` creates, resume it: time to the last result."""
    watcher = ResultWatcher()
    receiver = await LeanNatsClient.connect(nats_url)
    await receiver.subscribe(RESULTS_SUBJECT, watcher.on_message)
    client = await LeanNatsClient.connect(nats_url)
    keys = [f"{tag}-{i}" for i in range(count)]
    os.kill(pid, signal.SIGSTOP)
    try:
        await publish_all(client, keys)
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed = time.perf_counter()
    await watcher.wait_for(keys, timeout=300)
    elapsed = max(watcher.arrived[k] for k in keys) - resumed
    await client.close()
    await receiver.close()
    return {"commands": count, "elapsed_s": round(elapsed, 3), "rate_per_s": round(count / elapsed, 1),
            "error_results": watcher.errors}


async def inbox_latency(nats_url: str, rate: float, seconds: float, tag: str) -> dict[str, Any]:
    """Publish at a steady rate (open loop); latency = publish to result."""
    watcher = ResultWatcher()
    receiver = await LeanNatsClient.connect(nats_url)
    await receiver.subscribe(RESULTS_SUBJECT, watcher.on_message)
    client = await LeanNatsClient.connect(nats_url)
    total = int(rate * seconds)
    keys = [f"{tag}-{i}" for i in range(total)]
    head = inbox_heads()
    sent: dict[str, float] = {}
    acks: list[asyncio.Future[Any]] = []
    started = time.perf_counter()
    for i in range(total):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[keys[i]] = time.perf_counter()
        acks.append(client.start_request(INBOX_SUBJECT, orjson.dumps(create_body(i)), head(keys[i]), 30))
    await asyncio.gather(*acks)
    await watcher.wait_for(keys, timeout=120)
    stats = Stats(sent=total, ok=total, elapsed_s=time.perf_counter() - started)
    stats.latencies_ms = [(watcher.arrived[k] - sent[k]) * 1000 for k in keys]
    await client.close()
    await receiver.close()
    return {"target_rate": rate, **stats.summary(), "error_results": watcher.errors,
            "slowest": slowest_share([sent[k] - started for k in keys], stats.latencies_ms)}


def slowest_share(offsets_s: list[float], latencies_ms: list[float], share: float = 0.01) -> dict[str, Any]:
    """When in a phase its `share` slowest commands were sent (seconds from its start), and how slow
    they were: one stall shows as a short span of send times, a steady tail as the whole phase."""
    count = max(1, int(len(latencies_ms) * share))
    slowest = sorted(range(len(latencies_ms)), key=latencies_ms.__getitem__)[-count:]
    sent = sorted(offsets_s[i] for i in slowest)
    return {"count": count, "sent_from_s": round(sent[0], 3), "sent_to_s": round(sent[-1], 3),
            "min_ms": round(min(latencies_ms[i] for i in slowest), 2),
            "max_ms": round(max(latencies_ms[i] for i in slowest), 2)}


async def request_latency(nats_url: str, rate: float, seconds: float) -> dict[str, Any]:
    from bench.run import drive_rate

    stats = await drive_rate(nats_url, "crm.activities.cmd.create", create_body, rate, seconds,
                             keyed_headers(f"rr-latency-{uuid.uuid4().hex}"))
    return {"target_rate": rate, **stats.summary()}


class ServiceCpu:
    """The service process's CPU time (user + system, bench/cpu_per_create.py's `process_cpu_s`)
    spent during a phase."""

    def __init__(self, pid: int) -> None:
        self._pid = pid

    @contextlib.contextmanager
    def phase(self) -> Iterator[list[float]]:
        spent: list[float] = []
        before = process_cpu_s(self._pid)
        yield spent
        spent.append(process_cpu_s(self._pid) - before)


def per_command_us(spent: list[float], commands: int) -> float:
    return round(spent[0] / max(1, commands) * 1e6, 1)


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short phases (a smoke run)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each request/reply phase")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=500.0, help="the steady rate of the latency phase")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.latency_seconds = 1, 2.0, 3.0
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_before": load_average(),
        "quick": args.quick,
        "rounds": [],
    }
    root = Path(tempfile.mkdtemp(prefix="bench-inbox-"))
    progress(f"servers under {root}")
    with bench_servers(root) as servers:
        database_url = servers.fresh_database()
        with service(database_url, servers.nats_url, "commands,inbox", root / "svc") as (process, endpoints):
            url = endpoints["nats_url"]
            uvloop.run(drive(url, "crm.activities.cmd.create", create_body, 8, 1))  # warm-up
            uvloop.run(inbox_throughput(url, 500, "warm"))
            cpu = ServiceCpu(process.pid)
            for number in range(args.rounds):
                progress(f"round {number + 1}: request/reply creates, {IN_FLIGHT} in flight, {args.seconds:g} s")
                with cpu.phase() as rr_cpu:
                    baseline = uvloop.run(drive(url, "crm.activities.cmd.create", create_body, IN_FLIGHT,
                                                args.seconds, head=keyed_headers(f"rr-{number}-{uuid.uuid4().hex}")))
                count = max(500, int(baseline.rate * args.seconds))
                progress(f"round {number + 1}: {count} inbox creates, publish to last result")
                with cpu.phase() as inbox_cpu:
                    inbox = uvloop.run(inbox_throughput(url, count, f"r{number}"))
                progress(f"round {number + 1}: {count} inbox creates published while the service is paused")
                with cpu.phase() as backlog_cpu:
                    backlog = uvloop.run(backlog_drain(url, process.pid, count, f"b{number}"))
                rr_us = per_command_us(rr_cpu, baseline.ok + baseline.errors)
                inbox_us, backlog_us = per_command_us(inbox_cpu, count), per_command_us(backlog_cpu, count)
                results["rounds"].append({
                    "request_reply": {**baseline.summary(), "service_cpu_us_per_command": rr_us},
                    "inbox": {**inbox, "service_cpu_us_per_command": inbox_us},
                    "ratio": round(inbox["rate_per_s"] / baseline.rate, 3) if baseline.rate else None,
                    "backlog": {**backlog, "service_cpu_us_per_command": backlog_us},
                    "backlog_ratio": round(backlog["rate_per_s"] / baseline.rate, 3) if baseline.rate else None,
                    "cpu_ratio": round(rr_us / inbox_us, 3),
                    "backlog_cpu_ratio": round(rr_us / backlog_us, 3),
                })
            progress(f"latency: inbox at {args.rate:g}/s for {args.latency_seconds:g} s")
            results["latency_inbox"] = uvloop.run(inbox_latency(url, args.rate, args.latency_seconds, "lat"))
            progress(f"latency: request/reply creates at {args.rate:g}/s for {args.latency_seconds:g} s")
            results["latency_request_reply"] = uvloop.run(request_latency(url, args.rate, args.latency_seconds))
    results["load_average_after"] = load_average()
    ratios = [r["ratio"] for r in results["rounds"] if r["ratio"] is not None]
    results["median_ratio"] = round(statistics.median(ratios), 3) if ratios else None
    backlog_ratios = [r["backlog_ratio"] for r in results["rounds"] if r["backlog_ratio"] is not None]
    results["median_backlog_ratio"] = round(statistics.median(backlog_ratios), 3) if backlog_ratios else None
    results["median_cpu_ratio"] = round(statistics.median(r["cpu_ratio"] for r in results["rounds"]), 3)
    results["median_backlog_cpu_ratio"] = round(statistics.median(r["backlog_cpu_ratio"] for r in results["rounds"]), 3)
    path = write_report(results)
    progress(f"report: {path}")
    print(path.read_text())
    return 0


def write_report(results: dict[str, Any]) -> Path:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    directory = RESULTS / f"{stamp}-inbox"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "inbox.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# Inbox vs request/reply ({results['started_at']})",
        "",
        f"Machine: {results['machine']}; load average before {results['load_average_before']}, "
        f"after {results['load_average_after']} (a shared machine: other work ran meanwhile)."
        + (" QUICK run (smoke only)." if results["quick"] else ""),
        "",
        "## Throughput (creates/s)",
        "",
        "| round | request/reply (256 in flight) | inbox: first publish to last result | ratio "
        "| inbox: backlog drained | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for number, round_ in enumerate(results["rounds"], 1):
        lines.append(
            f"| {number} | {round_['request_reply']['rate_per_s']} | {round_['inbox']['rate_per_s']} "
            f"({round_['inbox']['commands']} commands) | {round_['ratio']} | {round_['backlog']['rate_per_s']} "
            f"| {round_['backlog_ratio']} |"
        )
    lines += [
        "",
        f"Median ratio inbox / request-reply: **{results['median_ratio']}** (aim >= 0.8); "
        f"a backlog drained (published while the service was paused): **{results['median_backlog_ratio']}**.",
        "The first includes publishing the commands (1,024 JetStream publishes in flight) on the same two "
        "cores while the inbox works; the second is the inbox alone, as after an outage.",
        "",
        "## The service's CPU per command (its process's CPU time over each phase)",
        "",
        "| round | request/reply create, us | inbox command, us | ratio | inbox command in a backlog, us | ratio |",
        "|---|---|---|---|---|---|",
        *(
            f"| {number} | {r['request_reply']['service_cpu_us_per_command']} | "
            f"{r['inbox']['service_cpu_us_per_command']} | {r['cpu_ratio']} | "
            f"{r['backlog']['service_cpu_us_per_command']} | {r['backlog_cpu_ratio']} |"
            for number, r in enumerate(results["rounds"], 1)
        ),
        "",
        "Median ratio of request/reply's CPU per create to the inbox's per command: "
        f"**{results['median_cpu_ratio']}**, in a backlog **{results['median_backlog_cpu_ratio']}**. "
        "The inbox does more per command than request/reply (the result's JetStream publish and its ack, taking "
        "and acking the command, remembering the result for erasure); how much more is this ratio, which moves "
        "less with the machine's swings than the rates do. The throughput ratio can be higher: request/reply "
        "does not keep the service's process busy all the time.",
        "",
    ]
    inbox, request = results["latency_inbox"], results["latency_request_reply"]
    lines += [
        f"## Latency at a steady {inbox['target_rate']:g} commands/s",
        "",
        "| path | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|",
        f"| inbox: publish to result | {inbox['p50_ms']} | {inbox['p95_ms']} | {inbox['p99_ms']} "
        f"| {inbox['error_results'] or 0} |",
        f"| request/reply create | {request['p50_ms']} | {request['p95_ms']} | {request['p99_ms']} "
        f"| {request['errors']} |",
        "",
        "Aim: inbox p99 <= 100 ms.",
    ]
    if "slowest" in inbox:
        slow = inbox["slowest"]
        lines += [
            "",
            f"The inbox's {slow['count']} slowest commands ({slow['min_ms']}-{slow['max_ms']} ms) were published "
            f"{slow['sent_from_s']}-{slow['sent_to_s']} s into the phase.",
        ]
    (directory / "inbox.md").write_text("\n".join(lines) + "\n")
    return directory / "inbox.md"


if __name__ == "__main__":
    sys.exit(main())
