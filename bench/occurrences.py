"""The occurrences query (docs/contract.md section 9) over a month, for an owner with 500 recurring
activities in a tenant with many other activities, against a plain list of the same owner, over HTTP.

    .venv/bin/python -m bench.occurrences                           # 200,000 other activities, 20 rounds
    .venv/bin/python -m bench.occurrences --rows 20000 --rounds 3   # a smoke run

What it does, on its own embedded PostgreSQL (fsync on) and NATS (bench/run.py's):

1. the read model with every migration, then `--rows` activities of one tenant (bench/search_reads.py's
   documents: 500 owners, realistic text) spread over 2020-2026, 5% of them recurring, written
   through the projector's own upsert; then the measured owner's 500 recurring activities (weekly on
   one or two days, every weekday, every other week, monthly by day or by weekday, some with COUNT or
   UNTIL; Europe/Berlin, America/New_York or UTC; started up to two years before the window; a few
   with exdates) and 1,000 one-offs over 2020-2026;
2. VACUUM (FREEZE, ANALYZE), a checkpoint, a pause (bench/read_side.py's `settle`);
3. the service (`activities serve --role http`) and, in `--rounds` rounds of one second per class,
   taking turns so that the machine's load falls on every class alike, HTTP requests one at a time
   (`--concurrency`): the baselines (a list page of the owner's activities; the same with the
   month as activity_date bounds) and the occurrences (the month's first page of 50; a random later
   page of 50, by its cursor; a first page of 200); p50/p95/p99/max of each, and p99 as a ratio of
   the baseline's and of the 25 ms aim;
4. in this process, where a page's time goes: the candidates' SQL (EXPLAIN ANALYZE as the reader)
   and the expansion (`page_of`) with the series cache cold and warm;
5. bench/results/<YYYY-MM-DD-HHMM>-occurrences/results.json and results.md, with /proc/loadavg before
   and after every phase: the machine is shared (other processes may be busy during a run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import uvloop
from psycopg.rows import dict_row

from bench.http_client import KeepAliveClient
from bench.read_side import settle
from bench.run import RESULTS, SECRET, bench_servers, machine, peak_rss_mb, progress, service
from bench.search_reads import Documents, loadavg, vocabulary
from events import recurrence
from projections.migrations import migrate
from projections.occurrences import build_candidates_sql, page_of, parse_occurrences_query
from projections.queries import READ_MODEL_TABLE, build_upsert_sql, params_from_pairs
from projections.read_model import READER_ROLE, grant_reader
from services.auth import mint_token
from services.domain import Caller

TENANT = "bench"
OWNER = "usr-0000beef-0000-4000-8000-000000000000"
SERIES = 500
ONE_OFFS = 1000
WINDOW = ("2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z")  # both daylight-saving switches of New York
SPAN_START = datetime(2020, 1, 1, tzinfo=UTC)
SPAN_END = datetime(2026, 12, 31, tzinfo=UTC)
BATCH = 5000
PAGE = 50
AIM_MS = 25.0
LIST = "/api/v1/crm/activities"
OCCURRENCES = LIST + "/occurrences"
ZONES = ("Europe/Berlin", "America/New_York", "UTC")
DAYS = ("MO", "TU", "WE", "TH", "FR")


def stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def a_rule(rng: random.Random) -> dict[str, Any]:
    """A recurrence as calendars have them (the mix of the module docstring)."""
    kind = rng.random()
    if kind < 0.40:
        rule = "FREQ=WEEKLY;BYDAY=" + ",".join(sorted(rng.sample(DAYS, rng.choice((1, 1, 2)))))
    elif kind < 0.60:
        rule = "FREQ=DAILY;BYDAY=MO,TU,WE,TH,FR"
    elif kind < 0.75:
        rule = f"FREQ=WEEKLY;INTERVAL=2;BYDAY={rng.choice(DAYS)}"
    elif kind < 0.85:
        rule = f"FREQ=MONTHLY;BYMONTHDAY={rng.randint(1, 28)}"
    else:
        rule = f"FREQ=MONTHLY;BYDAY={rng.choice(('1', '2', '-1'))}{rng.choice(DAYS)}"
    ending = rng.random()
    if ending < 0.10:
        rule += f";COUNT={rng.randint(10, 200)}"
    elif ending < 0.20:
        rule += f";UNTIL={rng.choice(('20260315', '20261231T235959Z', '20250101'))}"
    value: dict[str, Any] = {"rrule": rule, "timezone": rng.choice(ZONES)}
    if rng.random() < 0.1:
        value["exdates"] = ["2026-03-16T09:00:00Z", "2026-03-17T08:00:00Z"]
    return value


def documents(rows: int, words: list[str]) -> list[dict[str, Any]]:
    """The other activities (5% recurring, of other owners), then the measured owner's."""
    source = Documents(words)
    rng = random.Random(17)
    span = (SPAN_END - SPAN_START) / max(1, rows)
    out = []
    for i in range(1, rows + 1):
        document = source.document(i)
        at = SPAN_START + span * i
        document["activity_date"] = stamp(at)
        if rng.random() < 0.05:
            document["recurrence"] = a_rule(rng)
        out.append(document)
    window_start = datetime.fromisoformat(WINDOW[0].replace("Z", "+00:00"))
    for j in range(SERIES + ONE_OFFS):
        document = source.document(rows + 1 + j)
        document["owner_id"] = OWNER
        if j < SERIES:
            hour = rng.choice((8, 9, 10, 14, 16))
            start = (window_start - timedelta(days=rng.randint(0, 730))).replace(hour=hour, minute=rng.choice((0, 30)))
            document["activity_date"] = stamp(start)
            document["recurrence"] = a_rule(rng)
            document["type"] = "meeting"
        else:
            document["activity_date"] = stamp(SPAN_START + (SPAN_END - SPAN_START) * rng.random())
        out.append(document)
    return out


def seed(database_url: str, rows: int, words: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    docs = documents(rows, words)
    upsert = build_upsert_sql(READ_MODEL_TABLE)
    with psycopg.connect(database_url, autocommit=True) as conn:
        for start in range(0, len(docs), BATCH):
            batch = docs[start : start + BATCH]
            conn.execute(upsert, (orjson.dumps(batch).decode(), orjson.dumps(list(range(len(batch)))).decode()))
        counts = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE is_recurring), "
            "count(*) FILTER (WHERE owner_id = %s), count(*) FILTER (WHERE owner_id = %s AND is_recurring) "
            "FROM activities",
            (OWNER, OWNER),
        ).fetchone()
    assert counts is not None
    return {
        "rows": counts[0],
        "recurring": counts[1],
        "owner_rows": counts[2],
        "owner_recurring": counts[3],
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 2)


async def cursors(http_url: str, token: str) -> tuple[list[str], int, list[float]]:
    """Every page's cursor of the month's occurrences (pages of 50), how many occurrences there are,
    and each page's time on this first pass (the service's caches cold on the first page)."""
    http = KeepAliveClient(http_url, {"Authorization": f"Bearer {token}"})
    found, cursor, out, times = 0, None, [], []
    while True:
        params: dict[str, object] = {"owner_id": OWNER, "from": WINDOW[0], "to": WINDOW[1], "limit": PAGE}
        if cursor:
            params["cursor"] = cursor
        started = time.perf_counter()
        status, body = await http.get(OCCURRENCES, params)
        times.append(round((time.perf_counter() - started) * 1000, 2))
        assert status == 200, body[:300]
        page = orjson.loads(body)
        found += len(page["data"])
        cursor = page["meta"]["next_cursor"]
        if cursor is None:
            break
        out.append(cursor)
    await http.close()
    return out, found, times


def classes(later_pages: list[str]) -> dict[str, Any]:
    window = {"owner_id": OWNER, "from": WINDOW[0], "to": WINDOW[1]}
    month = {"owner_id": OWNER, "activity_date_from": WINDOW[0], "activity_date_to": WINDOW[1], "limit": PAGE}
    return {
        "list_owner (baseline)": lambda rng: (LIST, {"owner_id": OWNER, "limit": PAGE}),
        "list_owner_month (baseline)": lambda rng: (LIST, month),
        "occurrences_first_page": lambda rng: (OCCURRENCES, {**window, "limit": PAGE}),
        "occurrences_later_page": lambda rng: (
            OCCURRENCES,
            {**window, "limit": PAGE, "cursor": rng.choice(later_pages)},
        ),
        "occurrences_first_page_200": lambda rng: (OCCURRENCES, {**window, "limit": 200}),
    }


async def measure(http_url: str, token: str, makers: dict[str, Any], rounds: int, concurrency: int) -> dict[str, Any]:
    """Rounds of one second per class, the classes taking turns; latencies per class."""
    samples: dict[str, list[float]] = {name: [] for name in makers}
    errors: dict[str, int] = dict.fromkeys(makers, 0)
    clients = [KeepAliveClient(http_url, {"Authorization": f"Bearer {token}"}) for _ in range(concurrency)]
    rng = random.Random(5)
    for number in range(rounds):
        for name, make in makers.items():
            deadline = time.perf_counter() + 1.0

            async def worker(http: KeepAliveClient, name: str = name, make: Any = make, end: float = deadline) -> None:
                while time.perf_counter() < end:
                    path, params = make(rng)
                    started = time.perf_counter()
                    status, _ = await http.get(path, params)
                    samples[name].append((time.perf_counter() - started) * 1000)
                    if status != 200:
                        errors[name] += 1

            await asyncio.gather(*(worker(http) for http in clients))
        if number % 5 == 4:
            progress(f"  round {number + 1}/{rounds}; load {loadavg()}")
    for http in clients:
        await http.close()
    return {
        name: {
            "requests": len(values),
            "errors": errors[name],
            "p50_ms": percentile(values, 50),
            "p95_ms": percentile(values, 95),
            "p99_ms": percentile(values, 99),
            "max_ms": round(max(values), 2),
        }
        for name, values in samples.items()
    }


def breakdown(database_url: str, later_cursor_key: list[Any] | None) -> dict[str, Any]:
    """Where the first page's time goes: the candidates' SQL as the reader, the expansion cold and warm."""
    query = parse_occurrences_query(
        params_from_pairs([("owner_id", OWNER), ("from", WINDOW[0]), ("to", WINDOW[1]), ("limit", str(PAGE))])
    )
    caller = Caller(tenant_id=TENANT, sub="usr-bench")
    statement, params = build_candidates_sql(READ_MODEL_TABLE, query, caller)
    out: dict[str, Any] = {}
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("SET activities.reader = 'on'")
        conn.execute(f"SET ROLE {READER_ROLE}")
        with conn.transaction():
            scope = "SELECT set_config('activities.tenant_id', %s, true), set_config('activities.app_id', '', true)"
            conn.execute(scope, (TENANT,))
            text = psycopg.ClientCursor(conn).mogrify(statement, params)
            plan = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {text}").fetchall()  # type: ignore[call-overload]
            timings = []
            for _ in range(20):
                started = time.perf_counter()
                rows = conn.execute(statement, params).fetchall()
                timings.append((time.perf_counter() - started) * 1000)
        out["candidates"] = len(rows)
        out["candidates_sql_ms_median"] = round(sorted(timings)[len(timings) // 2], 2)
        out["candidates_plan"] = "\n".join(row["QUERY PLAN"] for row in plan)
    recurrence._series.cache_clear()
    started = time.perf_counter()
    keys, _ = page_of(rows, query, None)
    out["expansion_cold_ms"] = round((time.perf_counter() - started) * 1000, 2)
    warm = []
    for _ in range(20):
        started = time.perf_counter()
        page_of(rows, query, None)
        warm.append((time.perf_counter() - started) * 1000)
    out["expansion_warm_ms_median"] = round(sorted(warm)[len(warm) // 2], 2)
    out["first_page_occurrences"] = len(keys)
    return out


def run(rows: int, rounds: int, concurrency: int, save: Any) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="activities-occurrences-"))
    started = datetime.now(UTC)
    results: dict[str, Any] = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "rows": rows,
        "rounds": rounds,
        "concurrency": concurrency,
        "window": WINDOW,
        "aim_p99_ms": AIM_MS,
        "loadavg": {"start": loadavg()},
        "note": "the machine is shared with other work (see loadavg): latencies include its load",
    }
    try:
        with bench_servers(root) as servers:
            url = servers.fresh_database()
            progress(f"[1/5] read model; seeding {rows} activities and the owner's {SERIES} series")
            migrate(url, after_first=grant_reader)
            results["seed"] = seed(url, rows, vocabulary())
            progress(f"  {results['seed']}")
            progress("[2/5] settle (VACUUM FREEZE ANALYZE, CHECKPOINT)")
            settle(url)
            results["loadavg"]["before_queries"] = loadavg()
            save(results)
            progress("[3/5] the service over HTTP, classes taking turns")
            token = mint_token(SECRET, TENANT, "usr-bench")
            with service(url, servers.nats_url, "http", root / "svc-http") as (process, endpoints):
                http_url = endpoints["http_url"]
                later, total, first_pass = uvloop.run(cursors(http_url, token))
                results["first_pass_ms"] = {
                    "first_page_cold": first_pass[0],
                    "later_pages_median": sorted(first_pass[1:])[len(first_pass[1:]) // 2]
                    if len(first_pass) > 1
                    else None,
                }
                results["month_occurrences"] = total
                results["month_pages_of_50"] = len(later) + 1
                progress(f"  the month has {total} occurrences ({len(later) + 1} pages of {PAGE})")
                uvloop.run(measure(http_url, token, classes(later), 1, concurrency))  # warm-up
                results["classes"] = uvloop.run(measure(http_url, token, classes(later), rounds, concurrency))
                results["service_peak_rss_mb"] = round(peak_rss_mb(process.pid), 1)
            results["loadavg"]["after_queries"] = loadavg()
            save(results)
            progress("[4/5] where the time goes (in this process)")
            results["breakdown"] = breakdown(url, None)
            results["loadavg"]["end"] = loadavg()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def report(results: dict[str, Any]) -> str:
    classes = results["classes"]
    base = classes["list_owner (baseline)"]["p99_ms"]
    lines = [
        f"# Occurrences over a month, {results['date']}",
        "",
        f"Machine: {results['machine']}; loadavg {results['loadavg']} (a shared machine: other work ran too).",
        f"Tenant: {results['seed']['rows']} activities ({results['seed']['recurring']} recurring); the owner: "
        f"{results['seed']['owner_rows']} activities, {results['seed']['owner_recurring']} recurring. Window "
        f"{WINDOW[0]} .. {WINDOW[1]}: {results['month_occurrences']} occurrences of the owner "
        f"({results['month_pages_of_50']} pages of {PAGE}). {results['rounds']} rounds of 1 s per class, "
        f"{results['concurrency']} request(s) in flight, over HTTP (keep-alive).",
        "",
        "| class | requests | p50 ms | p95 ms | p99 ms | max ms | p99 / baseline | p99 / aim 25 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, point in classes.items():
        lines.append(
            f"| {name} | {point['requests']} | {point['p50_ms']} | {point['p95_ms']} | {point['p99_ms']} | "
            f"{point['max_ms']} | {point['p99_ms'] / base:.2f}x | {point['p99_ms'] / AIM_MS:.2f}x |"
        )
    b = results["breakdown"]
    cold = results.get("first_pass_ms", {})
    lines += [
        "",
        f"First pass after the service started (caches cold): the first page {cold.get('first_page_cold')} ms, "
        f"the later pages {cold.get('later_pages_median')} ms (median).",
        "",
        f"Breakdown of the first page (in the bench process): {b['candidates']} candidates, their SQL "
        f"{b['candidates_sql_ms_median']} ms (median); expansion of the page {b['expansion_cold_ms']} ms with the "
        f"series cache cold, {b['expansion_warm_ms_median']} ms warm (median).",
        "",
        "```",
        b["candidates_plan"],
        "```",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="other activities in the tenant")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of one second per class")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight")
    parser.add_argument("--out", default=None, help="results directory name (default <date-time>-occurrences)")
    args = parser.parse_args(argv)
    directory = RESULTS / (args.out or datetime.now(UTC).strftime("%Y-%m-%d-%H%M") + "-occurrences")
    directory.mkdir(parents=True, exist_ok=True)

    def save(partial: dict[str, Any]) -> None:  # as it goes: a run cut short keeps what it measured
        (directory / "results.partial.json").write_text(json.dumps(partial, indent=2))

    results = run(args.rows, args.rounds, args.concurrency, save)
    (directory / "results.partial.json").unlink(missing_ok=True)
    (directory / "results.json").write_text(json.dumps(results, indent=2))
    (directory / "results.md").write_text(report(results))
    print((directory / "results.md").read_text())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
