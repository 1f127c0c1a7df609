"""Overload: three times the maximum rate of creates, from clients that retry, for 20 seconds.

    .venv/bin/python -m bench.overload                                   # this tree only
    .venv/bin/python -m bench.overload --compare /path/to/other/checkout  # and another, side by side
    .venv/bin/python -m bench.overload --rounds 3 --unthrottled-too --compare /path/to/other/checkout

For each source tree (this one, and the one given with --compare, e.g. a worktree of an older
commit), in turn and on the same servers: start `activities serve --role commands` from that tree,
find its maximum rate of creates (256 in flight, as bench/run.py does), then offer three times the
first tree's maximum for 20 s as an open loop of logical creates. Each logical create is a client
that retries like the client library (services/client.py's RetryPolicy: 4 attempts, 5 s timeout,
full-jitter backoff after `unavailable` or a timeout) with the same Idempotency-Key. Then 5 s at
half the maximum shows whether the service recovered.

Reported, as ratios to the maximum: goodput (creates acknowledged per second during the 20 s),
the p99 of answered requests, what the store holds against what was acknowledged, and the
service process's resident memory over time. Everything runs on 127.0.0.1 (embedded PostgreSQL
with fsync on, embedded NATS) and takes about a minute and a half per tree. Writes
bench/results/<date-time>-overload.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import heapq
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import uvloop

from activities_client.throttle import AdaptiveThrottle
from bench.load import Stats, closed_loop, open_loop
from bench.nats_client import LeanNatsClient, Reply, encode_headers
from bench.run import RESULTS, ROOT, bench_servers, create_body, headers, keyed_headers, machine, progress, service_env
from services.client import RetryPolicy

SUBJECT = "crm.activities.cmd.create"
SUBJECT_BYTES = SUBJECT.encode()
OVERLOAD_FACTOR = 3.0
REQUEST_TIMEOUT_S = 5.0  # the client library's default
CLIENT_PROCESSES = 1  # --clients; more keep the schedule better but take CPU from the service on 2 cores


@dataclass
class Durations:
    max_s: float = 8.0
    overload_s: float = 20.0
    recovery_s: float = 5.0


QUICK = Durations(max_s=3.0, overload_s=5.0, recovery_s=2.0)


@dataclass(frozen=True)
class Cores:
    """The CPUs of the system under test (PostgreSQL, NATS, the service) and of the load clients.

    On one machine the clients that offer three times the maximum take CPU from the service they
    measure (here about 0.6 of a core at 3x), as clients on other machines would not. Unless
    `--no-pin`, the clients get the last CPU and the system all the others, in every phase and for
    every tree alike, so that the maximum and the overload are measured on the same CPUs."""

    system: frozenset[int] | None
    clients: frozenset[int] | None

    @classmethod
    def split(cls, pin: bool) -> Cores:
        cpus = sorted(os.sched_getaffinity(0))
        if not pin or len(cpus) < 2:
            return cls(None, None)
        return cls(frozenset(cpus[:-1]), frozenset(cpus[-1:]))

    def describe(self) -> str:
        if self.system is None or self.clients is None:
            return "not pinned: clients and system share every CPU"
        return f"system on CPU {sorted(self.system)}, load clients on CPU {sorted(self.clients)}"


@contextmanager
def on_cpus(cpus: frozenset[int] | None) -> Iterator[None]:
    """This thread, and the processes it starts meanwhile, on `cpus` (None: unchanged)."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# ---------------------------------------------------------------------------------------------
# The service process of one source tree, and its memory over time
# ---------------------------------------------------------------------------------------------


@contextmanager
def service_from(source: Path, database_url: str, nats_url: str, data_dir: Path,
                 settings: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m services.cli serve --role commands` with `source` first on the path."""
    data_dir.mkdir(parents=True, exist_ok=True)
    endpoints = data_dir / "endpoints.json"
    env = service_env(database_url, nats_url, data_dir, PYTHONPATH=str(source), **(settings or {}))
    with (data_dir / "service.log").open("ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--role", "commands"],
                                   cwd=source, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not endpoints.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"service did not start; see {data_dir / 'service.log'}")
            time.sleep(0.05)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class MemorySampler:
    """The process's resident memory every half second, tagged with the phase running."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.phase = "start"
        self.samples: list[tuple[float, str, float]] = []
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                elapsed = round(time.monotonic() - self._started, 1)
                self.samples.append((elapsed, self.phase, round(rss_mb(self.pid), 1)))
            except OSError:
                return
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def during(self, *phases: str) -> list[float]:
        return [mb for _, phase, mb in self.samples if phase in phases]


# ---------------------------------------------------------------------------------------------
# Retrying clients
# ---------------------------------------------------------------------------------------------


@dataclass
class OverloadStats:
    """What the retrying clients saw during an overload phase."""

    started: float = 0.0
    logical: int = 0  # creates begun
    attempts: int = 0  # requests sent, retries included
    held_back: int = 0  # attempts the client's adaptive throttle kept from the service
    ok_times: list[float] = field(default_factory=list)  # when each acknowledged create completed
    ok_latencies_ms: list[float] = field(default_factory=list)  # from the first attempt to the success
    answered_ms: list[float] = field(default_factory=list)  # every request that got a reply
    timeouts: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    failed: int = 0  # creates given up after the last attempt
    offer_s: float = 0.0  # when the last logical create was started (the schedule's end: `seconds`)
    cpu_s: float = 0.0  # CPU seconds of the load client process(es)


class LogicalCreate:
    """One logical create: retried like the client library does, with one Idempotency-Key."""

    __slots__ = ("attempt", "first", "i", "load", "request", "sent", "token")

    def __init__(self, load: RetryingLoad, i: int) -> None:
        self.load = load
        self.i = i
        self.request: tuple[bytes, bytes] | None = None  # body and headers, made when first sent
        self.first = time.perf_counter()
        self.attempt = 0
        self.sent = 0.0
        self.token = b""

    def send(self) -> None:
        self.attempt += 1
        if self.load.throttle is not None and not self.load.throttle.admits():
            self.load.stats.held_back += 1  # the client library holds it back: like an `unavailable` reply
            self.load.retry_or_give_up(self)
            return
        self.sent = time.perf_counter()
        self.load.stats.attempts += 1
        if self.request is None:
            key = f"{self.load.run}-{self.i}"
            self.request = orjson.dumps(create_body(self.i)), encode_headers(
                {"Authorization": self.load.authorization, "Idempotency-Key": key})
        self.token = self.load.client.send(SUBJECT_BYTES, *self.request, self.on_reply)
        self.load.in_flight[self.token] = self
        self.load.deadlines.append((self.sent + REQUEST_TIMEOUT_S, self.token))

    def on_reply(self, reply: Reply | None) -> None:
        load, stats = self.load, self.load.stats
        load.in_flight.pop(self.token, None)
        if reply is None:  # no responders: the client library retries it like a timeout
            stats.timeouts += 1
            if load.throttle is not None:
                load.throttle.unanswered()
            load.retry_or_give_up(self)
            return
        now = time.perf_counter()
        stats.answered_ms.append((now - self.sent) * 1000)
        body = orjson.loads(reply.data)
        if load.throttle is not None and body.get("error", {}).get("code") != "unavailable":
            load.throttle.accepted()
        if "data" in body:
            stats.ok_times.append(now - stats.started)
            stats.ok_latencies_ms.append((now - self.first) * 1000)
            return
        code = body["error"]["code"]
        stats.codes[code] = stats.codes.get(code, 0) + 1
        if code == "unavailable":
            load.retry_or_give_up(self)
        else:
            stats.failed += 1

    def timed_out(self) -> None:
        self.load.stats.timeouts += 1
        if self.load.throttle is not None:
            self.load.throttle.unanswered()
        self.load.retry_or_give_up(self)


class RetryingLoad:
    """Logical creates started on an open-loop schedule, each retried with the client library's
    policy (services/client.py RetryPolicy: 4 attempts, 5 s timeout, full-jitter backoff).

    One loop ticks every `TICK_S`: it starts the creates now due, sends the retries whose backoff
    has passed and expires the requests past their timeout. Replies arrive as callbacks from the
    connection's reader. No task, future or timer per request: the schedule has to hold at three
    times what the service takes, on the same two cores, for the run to measure the service."""

    TICK_S = 0.002

    def __init__(self, client: LeanNatsClient, authorization: str, run: str, stats: OverloadStats,
                 policy: RetryPolicy) -> None:
        self.client = client
        self.authorization = authorization
        self.run = run
        self.stats = stats
        self.policy = policy
        self.throttle = AdaptiveThrottle(policy.throttle_ratio) if policy.throttle_ratio else None  # as one client
        self.in_flight: dict[bytes, LogicalCreate] = {}
        self.deadlines: collections.deque[tuple[float, bytes]] = collections.deque()  # in send order
        self.backoffs: list[tuple[float, int, LogicalCreate]] = []  # a heap by due time
        self._sequence = itertools.count()

    def retry_or_give_up(self, create: LogicalCreate) -> None:
        if create.attempt >= self.policy.attempts:
            self.stats.failed += 1
            return
        due = time.perf_counter() + self.policy.delay(create.attempt)
        heapq.heappush(self.backoffs, (due, next(self._sequence), create))

    def _expire(self, now: float) -> None:
        while self.deadlines and self.deadlines[0][0] <= now:
            _, token = self.deadlines.popleft()
            if (create := self.in_flight.pop(token, None)) is not None:
                self.client.forget(token)
                create.timed_out()

    def _resend_due(self, now: float) -> None:
        while self.backoffs and self.backoffs[0][0] <= now:
            heapq.heappop(self.backoffs)[2].send()

    async def drive(self, rate: float, seconds: float) -> None:
        started, total, i = self.stats.started, int(rate * seconds), 0
        while True:
            now = time.perf_counter()
            elapsed = now - started
            while i < total and i / rate <= elapsed and elapsed <= seconds:
                self.stats.logical += 1
                LogicalCreate(self, i).send()
                i += 1
            if i < total and elapsed > seconds:
                total = i  # a client behind its schedule offers less, never for longer (the report says how much)
            if i >= total and not self.stats.offer_s:
                self.stats.offer_s = elapsed
            self._resend_due(now)
            self._expire(now)
            if i >= total and not self.in_flight and not self.backoffs:
                return
            await asyncio.sleep(self.TICK_S)


async def overload(nats_url: str, rate: float, seconds: float, run: str, start_at: float,
                   throttle_ratio: float | None) -> OverloadStats:
    """Logical creates started at `rate` for `seconds` from `start_at` (a `perf_counter` time, the
    same clock in every process); returns once every one has finished. One token for all, as one
    calling service would have (the service caches verified tokens)."""
    client = await LeanNatsClient.connect(nats_url)
    authorization = headers()["Authorization"]
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    stats = OverloadStats(started=start_at)
    try:
        policy = dataclasses.replace(RetryPolicy(), throttle_ratio=throttle_ratio)
        await RetryingLoad(client, authorization, run, stats, policy).drive(rate, seconds)
    finally:
        await client.close()
    stats.cpu_s = time.process_time()
    return stats


def overload_process(nats_url: str, rate: float, seconds: float, run: str, start_at: float,
                     throttle_ratio: float | None) -> OverloadStats:
    return uvloop.run(overload(nats_url, rate, seconds, run, start_at, throttle_ratio))


def overload_in_processes(nats_url: str, rate: float, seconds: float, run: str, processes: int,
                          throttle_ratio: float | None) -> OverloadStats:
    """The offered load split over `processes` client processes, merged into one `OverloadStats`.
    On a busy 2-core machine one Python client may not keep to the schedule at three times the
    maximum (the report gives the rate achieved); more clients take CPU from the service."""
    start_at = time.perf_counter() + 3.0  # the spawned processes have imported everything by then
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        parts = list(pool.map(overload_process, *zip(*[
            (nats_url, rate / processes, seconds, f"{run}-{n}", start_at, throttle_ratio) for n in range(processes)
        ], strict=True)))
    merged = OverloadStats(started=start_at)
    for part in parts:
        merged.logical += part.logical
        merged.attempts += part.attempts
        merged.held_back += part.held_back
        merged.ok_times += part.ok_times
        merged.ok_latencies_ms += part.ok_latencies_ms
        merged.answered_ms += part.answered_ms
        merged.timeouts += part.timeouts
        merged.failed += part.failed
        merged.offer_s = max(merged.offer_s, part.offer_s)
        merged.cpu_s += part.cpu_s
        for code, count in part.codes.items():
            merged.codes[code] = merged.codes.get(code, 0) + count
    return merged


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 1)


def summarize(stats: OverloadStats, seconds: float, maximum: float) -> dict[str, Any]:
    in_window = sum(1 for t in stats.ok_times if t <= seconds)
    per_second = [0] * (int(seconds) + 1)
    for t in stats.ok_times:
        if t < len(per_second):
            per_second[int(t)] += 1
    goodput = in_window / seconds
    return {
        "offered_in_s": round(stats.offer_s, 1),
        "offered_achieved_per_s": round(stats.logical / seconds, 1),
        "logical_creates": stats.logical,
        "attempts": stats.attempts,
        "attempts_per_s": round(stats.attempts / seconds, 1),
        "held_back_by_clients": stats.held_back,
        "acknowledged": len(stats.ok_times),
        "acknowledged_in_window": in_window,
        "goodput_per_s": round(goodput, 1),
        "goodput_ratio": round(goodput / maximum, 3),
        "goodput_per_second": per_second[: int(seconds)],
        "failed_after_retries": stats.failed,
        "timeouts": stats.timeouts,
        "error_codes": stats.codes,
        "answered_p50_ms": percentile(stats.answered_ms, 50),
        "answered_p99_ms": percentile(stats.answered_ms, 99),
        "acknowledged_p99_ms": percentile(stats.ok_latencies_ms, 99),
        "last_acknowledged_s": round(max(stats.ok_times, default=0.0), 1),
    }


# ---------------------------------------------------------------------------------------------
# One source tree
# ---------------------------------------------------------------------------------------------


def stored_events(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM activities_events").fetchone()
    return int(row[0]) if row else 0


async def drive_closed(nats_url: str, concurrency: int, seconds: float, phase: str) -> Stats:
    client = await LeanNatsClient.connect(nats_url)
    try:
        return await closed_loop(client, SUBJECT, create_body, keyed_headers(phase), concurrency, seconds)
    finally:
        await client.close()


async def drive_open(nats_url: str, rate: float, seconds: float, phase: str) -> Stats:
    client = await LeanNatsClient.connect(nats_url)
    try:
        return await open_loop(client, SUBJECT, create_body, keyed_headers(phase), rate, seconds)
    finally:
        await client.close()


def maximum_rate(nats_url: str, seconds: float, phase: str) -> dict[str, Any]:
    uvloop.run(drive_closed(nats_url, 8, 1, f"{phase}-warm-up"))
    return uvloop.run(drive_closed(nats_url, 256, seconds, phase)).summary()


@dataclass(frozen=True)
class Tree:
    """A source tree to run, and whether its clients throttle themselves (its client library's way)."""

    name: str
    source: Path
    throttle_ratio: float | None

    @classmethod
    def of(cls, name: str, source: Path, ratio: float | None = None) -> Tree:
        throttles = (source / "client" / "activities_client" / "throttle.py").exists()
        return cls(name, source, (ratio or RetryPolicy().throttle_ratio) if throttles else None)


def run_tree(tree: Tree, servers: Any, root: Path, durations: Durations,
             offered_rate: float | None, clients: int, cores: Cores,
             service_settings: dict[str, str] | None = None) -> dict[str, Any]:
    """Maximum, overload and recovery of one source tree's service; `offered_rate` None: 3x its own maximum."""
    name, source = tree.name, tree.source
    database_url = servers.fresh_database()
    result: dict[str, Any] = {"source": str(source), "commit": commit_of(source),
                              "clients_throttle_ratio": tree.throttle_ratio}
    data_dir = root / f"svc-{name.replace(' ', '-').replace(',', '')}"
    with service_from(source, database_url, servers.nats_url, data_dir, service_settings) as process:
        memory = MemorySampler(process.pid)
        try:
            memory.phase = "maximum"
            progress(f"  {name}: maximum rate of creates (256 in flight, {durations.max_s:g} s)")
            run = f"{name}-{os.getpid()}"
            service_cpu = cpu_s(process.pid)
            with on_cpus(cores.clients):
                result["maximum"] = maximum_rate(servers.nats_url, durations.max_s, f"{run}-maximum")
            result["maximum"]["service_cpu_us_per_create"] = round(
                1e6 * (cpu_s(process.pid) - service_cpu) / max(1, result["maximum"]["ok"]), 1)
            maximum = result["maximum"]["rate_per_s"]
            rate = offered_rate or OVERLOAD_FACTOR * maximum
            result["reference_maximum_per_s"] = round(rate / OVERLOAD_FACTOR, 1)
            time.sleep(2)
            before_overload = stored_events(database_url)
            memory.phase = "overload"
            progress(f"  {name}: {rate:.0f} creates/s offered for {durations.overload_s:g} s by retrying clients")
            started, service_cpu = time.monotonic(), cpu_s(process.pid)
            with on_cpus(cores.clients):
                stats = overload_in_processes(servers.nats_url, rate, durations.overload_s, run,
                                              clients, tree.throttle_ratio)
            overload_cpu = cpu_s(process.pid) - service_cpu
            wall = time.monotonic() - started - 3.0  # less the clients' start
            result["overload_wall_s"] = round(wall, 1)
            result["overload_cpu_share"] = {"service": round(overload_cpu / wall, 2),
                                            "load_clients": round(stats.cpu_s / wall, 2)}
            result["overload"] = {"offered_per_s": round(rate, 1),
                                  **summarize(stats, durations.overload_s, rate / OVERLOAD_FACTOR)}
            time.sleep(1)  # anything still being saved
            result["overload"]["stored"] = stored_events(database_url) - before_overload
            result["overload"]["service_cpu_us_per_create"] = round(
                1e6 * overload_cpu / max(1, result["overload"]["acknowledged"]), 1)
            memory.phase = "recovery"
            progress(f"  {name}: recovery at half the maximum ({durations.recovery_s:g} s)")
            with on_cpus(cores.clients):
                result["recovery"] = uvloop.run(drive_open(servers.nats_url, rate / OVERLOAD_FACTOR / 2,
                                                           durations.recovery_s, f"{run}-recovery")).summary()
            memory.phase = "end"
            time.sleep(1)
        finally:
            memory.stop()
    result["rss_mb"] = {
        "before_overload": memory.during("maximum")[-1] if memory.during("maximum") else None,
        "max_during_overload": max(memory.during("overload"), default=None),
        "end": memory.samples[-1][2] if memory.samples else None,
        "series": memory.samples,
    }
    return result


def commit_of(source: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for name, tree in results["trees"].items():
        ratio = tree.get("clients_throttle_ratio")
        label = f"{name} ({tree['commit']}, clients {f'throttle at {ratio:g}x accepts' if ratio else 'never throttle'})"
        maximum = tree["reference_maximum_per_s"]
        own = tree["maximum"]["rate_per_s"]
        o = tree["overload"]
        rss = tree["rss_mb"]
        recovery = tree["recovery"]
        rows += [
            {"measure": f"{label}: maximum creates/s (256 in flight)", "value": f"{own:.0f}/s",
             "ratio": f"{own / maximum:.2f}x reference maximum ({maximum:.0f}/s)", "target": "-"},
            {"measure": f"{label}: offered, retrying clients", "value":
                f"{o['offered_per_s']:.0f} creates/s scheduled, {o['offered_achieved_per_s']:.0f}/s started; "
             f"{o['attempts_per_s']:.0f} requests/s sent with retries, "
             f"{o.get('held_back_by_clients', 0) / results['overload_s']:.0f}/s held back by the clients' throttle",
             "ratio": f"{o['offered_achieved_per_s'] / maximum:.2f}x maximum achieved", "target": "3x"},
            {"measure": f"{label}: goodput (creates acknowledged/s during the {results['overload_s']:g} s)",
             "value": f"{o['goodput_per_s']:.0f}/s", "ratio": f"{o['goodput_ratio']:.2f}x maximum",
             "target": ">= 0.8x"},
            {"measure": f"{label}: goodput per second", "value": " ".join(str(v) for v in o["goodput_per_second"]),
             "ratio": "-", "target": "flat"},
            {"measure": f"{label}: answered requests (any reply)", "value":
                f"p50 {o['answered_p50_ms']} / p99 {o['answered_p99_ms']} ms; {o['timeouts']} timeouts",
             "ratio": f"p99 {o['answered_p99_ms'] / (REQUEST_TIMEOUT_S * 1000):.2f}x the 5 s timeout",
             "target": "-"},
            {"measure": f"{label}: acknowledged creates, first attempt to success", "value":
                f"p99 {o['acknowledged_p99_ms']} ms; {o['failed_after_retries']} of {o['logical_creates']} "
                f"given up after 4 attempts", "ratio": "-", "target": "-"},
            {"measure": f"{label}: stored during overload against acknowledged", "value":
                f"{o['stored']} events, {o['acknowledged']} acknowledged",
             "ratio": f"{o['stored'] / max(1, o['acknowledged']):.2f}x", "target": "1.00x"},
            {"measure": f"{label}: recovery at half the maximum", "value":
                f"{recovery['rate_per_s']:.0f}/s, p99 {recovery['p99_ms']} ms, {recovery['errors']} errors",
             "ratio": f"{recovery['rate_per_s'] / (maximum / 2):.2f}x offered", "target": "1.00x"},
            {"measure": f"{label}: CPU during the overload phase (cores)", "value":
                f"service {tree['overload_cpu_share']['service']}, load clients "
                f"{tree['overload_cpu_share']['load_clients']}; phase lasted {tree['overload_wall_s']} s",
             "ratio": "-", "target": "-"},
            {"measure": f"{label}: service CPU per acknowledged create, at the maximum / during the overload",
             "value": f"{tree['maximum'].get('service_cpu_us_per_create', '-')} / "
                      f"{o.get('service_cpu_us_per_create', '-')} us",
             "ratio": "-", "target": "-"},
            {"measure": f"{label}: service RSS before / max during / after", "value":
                f"{rss['before_overload']} / {rss['max_during_overload']} / {rss['end']} MB",
             "ratio": f"{(rss['max_during_overload'] or 0) / (rss['before_overload'] or 1):.2f}x before",
             "target": "flat"},
        ]
    return rows


def write_report(results: dict[str, Any], stem: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    lines = [f"Overload run {results['date']} on {results['machine']}: {OVERLOAD_FACTOR:g}x the maximum rate "
             f"of creates for {results['overload_s']:g} s from retrying clients ({results['cpus']})", "",
             "| measure | value | ratio | target |", "|---|---|---|---|"]
    lines += [f"| {r['measure']} | {r['value']} | {r['ratio']} | {r['target']} |" for r in results["table"]]
    lines += ["", "Median goodput over the rounds, as a ratio to each round's maximum: " + "; ".join(
        f"{name} {ratio:.2f}x" for name, ratio in results.get("median_goodput_ratio", {}).items())]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return RESULTS / f"{stem}.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", type=Path, action="append", default=[],
                        help="another source tree (e.g. a worktree of an older commit) to run the same phases on")
    parser.add_argument("--quick", action="store_true", help="short phases (a smoke run)")
    parser.add_argument("--clients", type=int, default=CLIENT_PROCESSES, help="load client processes")
    parser.add_argument("--throttle-ratio", type=float, default=None,
                        help="this tree's clients' throttle ratio (default: the client library's RetryPolicy)")
    parser.add_argument("--set", action="append", default=[], metavar="ACTIVITIES_X=VALUE",
                        help="a setting of the service processes (e.g. ACTIVITIES_COMMAND_CONCURRENCY=256)")
    parser.add_argument("--unthrottled-too", action="store_true",
                        help="also run this tree with clients that never throttle themselves")
    parser.add_argument("--no-pin", action="store_true",
                        help="let the load clients share the system's CPUs (see Cores)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every tree's phases; the report gives each round and the median goodput")
    args = parser.parse_args(argv)
    cores = Cores.split(pin=not args.no_pin)
    durations = QUICK if args.quick else Durations()
    trees = [Tree.of("this", ROOT, args.throttle_ratio)]
    if args.unthrottled_too:
        trees.append(Tree("this, clients without throttle", ROOT, None))
    trees += [Tree.of(f"compare-{i + 1}" if len(args.compare) > 1 else "compare", path.resolve())
              for i, path in enumerate(args.compare)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers and the service on SIGTERM too
    root = Path(tempfile.mkdtemp(prefix="activities-overload-"))
    started = datetime.now(UTC)
    results: dict[str, Any] = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
                               "quick": args.quick, "overload_s": durations.overload_s,
                               "client_processes": args.clients, "cpus": cores.describe(),
                               "service_settings": args.set, "trees": {}}
    try:
        with on_cpus(cores.system), bench_servers(root) as servers:  # the servers and services inherit it
            for round_ in range(1, args.rounds + 1):
                offered: float | None = None  # each round: 3x the maximum of its first tree, for every tree
                for tree in trees:
                    name = tree.name if args.rounds == 1 else f"{tree.name}, round {round_}"
                    progress(f"[{name}] {tree.source}, clients' throttle ratio {tree.throttle_ratio}")
                    results["trees"][name] = run_tree(tree, servers, root, durations, offered, args.clients, cores,
                                                      dict(setting.split("=", 1) for setting in args.set))
                    offered = offered or results["trees"][name]["overload"]["offered_per_s"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["median_goodput_ratio"] = {
        tree.name: statistics.median(
            result["overload"]["goodput_ratio"] for name, result in results["trees"].items()
            if name == tree.name or name.startswith(f"{tree.name}, round ")
        )
        for tree in trees
    }
    results["table"] = table(results)
    stem = started.strftime("%Y-%m-%d-%H%M") + "-overload" + ("-quick" if args.quick else "")
    print(write_report(results, stem).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
