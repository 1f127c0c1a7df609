"""Finding activities on a big read model: `q` search, the v1.1 filters and stats by owner, over HTTP.

    .venv/bin/python -m bench.search_reads                  # 1,000,000 activities, 15 s per query class
    .venv/bin/python -m bench.search_reads --rows 50000 --seconds 3   # a smoke run

What it does, in order, on its own embedded PostgreSQL (fsync on) and NATS (bench/run.py's):

1. the read model with migrations 1-3 only (the table before search), then `--rows` activities of
   one tenant written through the projector's own upsert (`build_upsert_sql`), in batches of 5,000,
   in activity_date order (one a minute from 2020-01-01, as bench/read_side.py seeds). Each
   document is a whole activity document with realistic text: subject (3-9 words), description
   (80% of rows, 10-60 words) and notes (50%, 5-40 words) drawn from a vocabulary of up to 4,000 English
   words (3,898 on Python 3.11.7: the docstrings of its standard library, about 120 CRM words mixed in) with a
   Zipf distribution (rank r drawn with weight 1/r); and the v1.1 fields: priority (4 values, 90%
   of rows), direction (2, calls and emails), outcome (5, calls, meetings and tasks), source (4),
   performed_by_user_id (50 users, Zipf 0.7) and 0-3 participants of 2,000 contacts (Zipf 0.8);
2. sizes "before": pg_relation_size of the heap, its TOAST and each index, after VACUUM;
3. read-model migration 4 applied in place, as a deployment applies it (`migrate`: the columns,
   the trigger, the batched backfill through the trigger, the indexes built CONCURRENTLY), timed;
   a check that every row's derived columns equal what the document says; sizes "after in place"
   (VACUUM), the bytes of the new columns (pg_column_size), and with `--compact` (the default)
   sizes "after compaction" (VACUUM FULL: the same table as a rebuild would lay it out);
4. the service (`activities serve --role http`) and, for each query class, `--seconds` of HTTP
   requests with 4 in flight (bench/read_side.py's client and concurrency): p50/p99/max, and for
   every distinct query of the class the rows it matches (count(*) in SQL) and returns (a page of 50);
5. EXPLAIN (ANALYZE, BUFFERS) of the slowest query of every class, run as the service runs it
   (the reader role, the caller's scope, the parameters bound on the client);
6. bench/results/<YYYY-MM-DD-HHMM>-search/results.json and results.md, with /proc/loadavg
   before and after every phase.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import logging
import os
import queue
import random
import re
import shutil
import statistics
import sys
import sysconfig
import tempfile
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import orjson
import psycopg
import uvloop

from bench.http_client import KeepAliveClient
from bench.read_side import QUERY_CONCURRENCY, settle
from bench.run import RESULTS, SECRET, bench_servers, machine, peak_rss_mb, progress, service
from projections.migrations import MIGRATIONS, migrate
from projections.queries import (
    MATCHES_FIRST_FILTERS,
    READ_MODEL_TABLE,
    ListPlan,
    PlannedList,
    build_list_sql,
    build_sort_span_sql,
    build_stats_sql,
    build_upsert_sql,
    params_from_pairs,
    parse_list_query,
    parse_stats_query,
    scoped_view,
    search_words,
    searches_by_month_index,
    searches_by_prefix_index,
)
from projections.read_model import READER_ROLE, grant_reader
from services.auth import mint_token
from services.domain import Caller

TENANT = "bench"
START = datetime(2020, 1, 1, tzinfo=UTC)
BATCH = 5000
VOCABULARY_SIZE = 4000
PAGE = 50

CRM_WORDS = (  # noqa: SIM905
    "call customer meeting follow up pricing proposal contract renewal demo discount quote invoice "
    "budget decision stakeholder onboarding training support ticket escalation feedback requirements "
    "integration migration security compliance legal procurement signature deadline timeline rollout "
    "pilot trial license seats upgrade downgrade cancellation churn expansion upsell referral partner "
    "reseller competitor evaluation shortlist champion sponsor executive manager director engineer "
    "finance approval purchase order payment terms shipping delivery warehouse product roadmap feature "
    "request bug outage incident apology credit refund voicemail callback agenda minutes summary "
    "presentation slides workshop webinar conference booth lead prospect opportunity pipeline forecast "
    "quarter annual monthly weekly kickoff handover review negotiation objection concern risk blocker "
    "next steps email thread intro introduction reminder schedule reschedule availability calendar "
    "lunch dinner visit site office headquarters region"
).split()


# ---------------------------------------------------------------------------------------------
# The vocabulary and the documents
# ---------------------------------------------------------------------------------------------


def vocabulary(size: int = VOCABULARY_SIZE) -> list[str]:
    """`size` English words, most frequent first: the words of the standard library's docstrings
    that appear in at least two modules (prose, not identifiers), ranked by frequency, with the CRM
    words put in at every 17th rank from rank 5 (so some are common, some rare). Deterministic for
    one Python version."""
    root = Path(sysconfig.get_path("stdlib"))
    counts: Counter[str] = Counter()
    modules: defaultdict[str, set[Path]] = defaultdict(set)
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if any(part in ("test", "tests", "idlelib", "lib2to3") for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                for word in re.findall(r"(?<![\w.])[a-z]{2,}(?![\w(])", doc or ""):
                    counts[word] += 1
                    modules[word].add(path)
    crm = list(dict.fromkeys(CRM_WORDS))
    words = [w for w, _ in counts.most_common() if len(modules[w]) >= 2 and w not in crm]
    for i, word in enumerate(crm):
        words.insert(min(5 + 17 * i, len(words)), word)
    return words[:size]


def zipf_cumulative(n: int, s: float) -> list[float]:
    total, out = 0.0, []
    for rank in range(1, n + 1):
        total += 1 / rank**s
        out.append(total)
    return out


OWNERS = [f"usr-{i:08x}-0000-4000-8000-000000000000" for i in range(500)]
USERS = [f"usr-{i:08x}-1111-4000-8000-000000000000" for i in range(50)]
CONTACTS = [f"ctc_{i:05d}" for i in range(2000)]
PRIORITIES = (("low", 20), ("normal", 55), ("high", 20), ("urgent", 5))
DIRECTIONS = (("inbound", 40), ("outbound", 60))
OUTCOMES = (("completed", 35), ("connected", 25), ("no_answer", 20), ("left_voicemail", 12), ("rescheduled", 8))
SOURCES = (("edm", 50), ("gmail", 25), ("outlook", 15), ("mobile", 10))
TYPES = (("call", 30), ("email", 30), ("meeting", 15), ("note", 15), ("task", 10))


def _weighted(pairs: tuple[tuple[str, int], ...]) -> tuple[list[str], list[float]]:
    values = [v for v, _ in pairs]
    cumulative, total = [], 0.0
    for _, weight in pairs:
        total += weight
        cumulative.append(total)
    return values, cumulative


class Documents:
    """The seeded documents, deterministic for a seed: document `i` is activity `i` (1-based)."""

    def __init__(self, words: list[str], seed: int = 20261206) -> None:
        self.rng = random.Random(seed)
        self.words = words
        self.word_cum = zipf_cumulative(len(words), 1.0)
        self.user_cum = zipf_cumulative(len(USERS), 0.7)
        self.contact_cum = zipf_cumulative(len(CONTACTS), 0.8)
        self.priority = _weighted(PRIORITIES)
        self.direction = _weighted(DIRECTIONS)
        self.outcome = _weighted(OUTCOMES)
        self.source = _weighted(SOURCES)
        self.type = _weighted(TYPES)
        self.template = self._template()

    @staticmethod
    def _template() -> dict[str, Any]:
        from activities_client.document import ActivityFields

        return ActivityFields().to_json()

    def _text(self, low: int, high: int) -> str:
        k = self.rng.randint(low, high)
        text = " ".join(self.rng.choices(self.words, cum_weights=self.word_cum, k=k))
        return text[0].upper() + text[1:]

    def _pick(self, choice: tuple[list[str], list[float]]) -> str:
        return self.rng.choices(choice[0], cum_weights=choice[1])[0]

    def document(self, i: int) -> dict[str, Any]:
        rng = self.rng
        at = START + timedelta(minutes=i, seconds=rng.randrange(60))
        stamp = at.strftime("%Y-%m-%dT%H:%M:%SZ")
        kind = self._pick(self.type)
        participants = []
        for contact in dict.fromkeys(rng.choices(CONTACTS, cum_weights=self.contact_cum,
                                                 k=rng.choices((0, 1, 2, 3), (40, 30, 20, 10))[0])):
            participants.append({"type": "contact", "id": contact})
        owner = OWNERS[i % len(OWNERS)]
        return {
            **self.template,
            "id": "act_" + format(i, "X").rjust(26, "0"),
            "tenant_id": TENANT,
            "app_id": None,
            "account_id": f"acc_{i % 1000}",
            "type": kind,
            "status": "completed" if rng.random() < 0.7 else "open",
            "subject": self._text(3, 9),
            "description": self._text(10, 60) if rng.random() < 0.8 else None,
            "notes": self._text(5, 40) if rng.random() < 0.5 else None,
            "priority": self._pick(self.priority) if rng.random() < 0.9 else None,
            "direction": self._pick(self.direction) if kind in ("call", "email") else None,
            "outcome": self._pick(self.outcome) if kind in ("call", "meeting", "task") else None,
            "source": self._pick(self.source),
            "performed_by_user_id": rng.choices(USERS, cum_weights=self.user_cum)[0] if rng.random() < 0.95 else None,
            "participants": participants,
            "owner_id": owner,
            "tags": ["bench"],
            "activity_date": stamp,
            "created_at": stamp,
            "updated_at": stamp,
            "created_by": owner,
            "updated_by": owner,
            "is_deleted": False,
            "deleted_at": None,
            "deleted_by": None,
            "schema_version": 2,
            "version": 1,
            "external_key": None,
            "is_erased": False,
        }


def seed(database_url: str, rows: int, words: list[str]) -> dict[str, Any]:
    """`rows` documents through the projector's upsert, batches made on a thread meanwhile."""
    documents = Documents(words)
    batches: queue.Queue[tuple[str, str] | None] = queue.Queue(maxsize=3)

    def produce() -> None:
        for start in range(1, rows + 1, BATCH):
            numbers = range(start, min(start + BATCH, rows + 1))
            body = orjson.dumps([documents.document(i) for i in numbers]).decode()
            batches.put((body, orjson.dumps(list(numbers)).decode()))
        batches.put(None)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    upsert = build_upsert_sql(READ_MODEL_TABLE)
    started = time.perf_counter()
    done = 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        while (batch := batches.get()) is not None:
            conn.execute(upsert, batch)
            done += BATCH
            if done % 100_000 < BATCH:
                progress(f"  seeded {min(done, rows)}/{rows} ({done / (time.perf_counter() - started):.0f}/s)")
    elapsed = time.perf_counter() - started
    return {"rows": rows, "elapsed_s": round(elapsed, 1), "rows_per_s": round(rows / elapsed)}


# ---------------------------------------------------------------------------------------------
# Sizes and checks
# ---------------------------------------------------------------------------------------------


def sizes(database_url: str) -> dict[str, Any]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        sized = conn.execute(
            "SELECT pg_relation_size(c.oid), pg_table_size(c.oid), "
            "COALESCE(pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0), pg_indexes_size(c.oid), "
            "pg_total_relation_size(c.oid), (SELECT count(*) FROM activities) "
            "FROM pg_class c WHERE c.oid = %s::regclass",
            (READ_MODEL_TABLE,),
        ).fetchone()
        assert sized is not None
        heap, table, toast, indexes, total, live = sized
        index_rows = conn.execute(
            "SELECT c.relname, pg_relation_size(c.oid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = %s::regclass ORDER BY c.relname",
            (READ_MODEL_TABLE,),
        ).fetchall()
    return {"rows": live, "heap_bytes": heap, "toast_bytes": toast, "table_bytes": table, "indexes_bytes": indexes,
            "total_bytes": total, "indexes": {name: size for name, size in index_rows}}


def column_bytes(database_url: str) -> dict[str, int]:
    """The bytes the derived columns of migration 4 take in the rows (pg_column_size, summed)."""
    names = ("priority", "direction", "outcome", "source", "performed_by_user_id", "participant_ids", "search")
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT " + ", ".join(f"COALESCE(sum(pg_column_size({n})), 0)" for n in names) + " FROM activities"
        ).fetchone()
    assert row is not None
    return dict(zip(names, [int(v) for v in row], strict=True))


def derived_check(database_url: str) -> dict[str, int]:
    """Rows whose derived columns differ from what their document says (all 0 when the trigger
    filled them), and how many rows have each filled."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            """
            SELECT count(*),
                   count(*) FILTER (WHERE search IS NULL),
                   count(*) FILTER (WHERE search IS DISTINCT FROM to_tsvector('simple', concat_ws(' ',
                       document->>'subject', document->>'description', document->>'notes'))),
                   count(*) FILTER (WHERE priority IS DISTINCT FROM document->>'priority'
                                       OR direction IS DISTINCT FROM document->>'direction'
                                       OR outcome IS DISTINCT FROM document->>'outcome'
                                       OR source IS DISTINCT FROM document->>'source'
                                       OR performed_by_user_id IS DISTINCT FROM document->>'performed_by_user_id'),
                   count(*) FILTER (WHERE cardinality(participant_ids) <> jsonb_array_length(document->'participants')),
                   count(priority), count(direction), count(outcome), count(source), count(performed_by_user_id),
                   count(*) FILTER (WHERE cardinality(participant_ids) > 0),
                   sum(cardinality(participant_ids)), avg(length(search::text))::int
            FROM activities
            """
        ).fetchone()
    keys = ("rows", "search_null", "search_differs", "filter_columns_differ", "participants_differ",
            "with_priority", "with_direction", "with_outcome", "with_source", "with_performed_by",
            "with_participants", "participants_total", "avg_tsvector_text_chars")
    assert row is not None
    return dict(zip(keys, [int(v or 0) for v in row], strict=True))


# ---------------------------------------------------------------------------------------------
# Query classes
# ---------------------------------------------------------------------------------------------

LIST = "/api/v1/crm/activities"
STATS = "/api/v1/crm/activities/stats"


def query_classes(words: list[str], rows: int, per_class: int, seed: int = 7) -> dict[str, list[dict[str, str]]]:
    """The distinct queries of each class (parameters of one request); rows: the seeded count."""
    rng = random.Random(seed)
    usable = [(rank, w) for rank, w in enumerate(words, 1) if len(w) >= 4]

    def ranked(low: int, high: int) -> list[str]:
        return [w for rank, w in usable if low <= rank <= high]

    def sample(pool: list[Any], k: int) -> list[Any]:
        return rng.sample(pool, min(k, len(pool)))

    common, mid, rare = ranked(10, 60), ranked(100, 400), ranked(1500, 4000)
    long_words = [w for _, w in usable if len(w) >= 5][:2000]
    prefixes = list(dict.fromkeys(w[: rng.choice((3, 4))] for w in sample(long_words, per_class * 2)))
    pairs = [f"{rng.choice(common)} {rng.choice(ranked(500, 3000))}" for _ in range(per_class * 2)]
    pairs += [f"{rng.choice(mid)} {rng.choice(mid)}" for _ in range(per_class * 2)]
    months = []
    last = START + timedelta(minutes=rows)
    month = datetime(2020, 2, 1, tzinfo=UTC)
    while True:
        following = (month + timedelta(days=32)).replace(day=1)
        if following > last:
            break
        months.append((month, following))
        month = following
    if not months:  # a small tenant: windows of a twelfth of its span instead
        span = (last - START) / 12
        months = [(START + span * k, START + span * (k + 1)) for k in range(12)]
    return {
        "q_common_word": [{"q": w} for w in sample(common, per_class)],
        "q_mid_word": [{"q": w} for w in sample(mid, per_class)],
        "q_rare_word": [{"q": w} for w in sample(rare, per_class * 3)],  # those matching nothing dropped later
        "q_prefix_3_4": [{"q": p} for p in prefixes],
        "q_two_words": [{"q": p} for p in pairs],
        "priority": [{"priority": v} for v, _ in PRIORITIES],
        "direction": [{"direction": v} for v, _ in DIRECTIONS],
        "outcome": [{"outcome": v} for v, _ in OUTCOMES],
        "source": [{"source": v} for v, _ in SOURCES],
        "performed_by_user_id": [{"performed_by_user_id": u} for u in sample(USERS, per_class)],
        "participant": [{"participant": c} for c in sample(CONTACTS, per_class * 2)],
        "stats_owner_month": [
            {"group_by": "owner_id", "activity_date_from": a.strftime("%Y-%m-%dT%H:%M:%SZ"),
             "activity_date_to": (b - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")}
            for a, b in sample(months, per_class)
        ],
    }


def is_stats(name: str) -> bool:
    return name.startswith("stats")


def statement(name: str, params: dict[str, str], plan: ListPlan | None = None) -> tuple[Any, list[Any]]:
    """The SQL of a request of the class (the same builders, the same caller), read as `plan` says
    (stats: `q` by the prefix index when `plan.prefix_index`)."""
    caller = Caller(TENANT, "usr-bench")
    pairs = params_from_pairs(params.items())
    view = scoped_view(READ_MODEL_TABLE, caller)
    plan = plan or ListPlan()
    if is_stats(name):
        return build_stats_sql(view, parse_stats_query(pairs), caller, plan.prefix_index)
    return build_list_sql(view, parse_list_query({**pairs, "limit": [str(PAGE)]}), caller, plan=plan)


def service_plan(conn: psycopg.Connection[Any], name: str, params: dict[str, str]) -> ListPlan:
    """How the service reads the request (services/queries.py, ReadModel._list_plan, with the same
    PlannedList): the usual statement's plan says whether matches first and in which windows,
    and `q` then reads the prefix index. `conn` reads as the caller (explain)."""
    words = search_words("q", params["q"]) if "q" in params else None
    if is_stats(name):
        return ListPlan(prefix_index=bool(words))
    if not any(key in params for key in MATCHES_FIRST_FILTERS):
        return ListPlan()
    query, values = statement(name, params)
    row = conn.execute(f"EXPLAIN (FORMAT JSON) {psycopg.ClientCursor(conn).mogrify(query, values)}").fetchone()
    planned = PlannedList.from_plan(row[0] if row else None)
    list_query = parse_list_query(params_from_pairs(params.items()))
    month_index = searches_by_month_index(list_query)  # every migration is applied: both prefix indexes
    if planned.needs_span(month_index):
        caller = Caller(TENANT, "usr-bench")
        span = conn.execute(*build_sort_span_sql(scoped_view(READ_MODEL_TABLE, caller), list_query.sort,
                                                 caller)).fetchone()
        planned = planned.with_span(*span) if span else planned
    return planned.plan(PAGE + 1, bool(words) and searches_by_prefix_index(words or ()), month_index)


def matches(database_url: str, name: str, params: dict[str, str]) -> int:
    """The rows a query matches: its WHERE clause counted (for stats: the rows counted)."""
    query, values = statement(name, params)
    with psycopg.connect(database_url, autocommit=True) as conn:
        text = psycopg.ClientCursor(conn).mogrify(query, values)
        where = re.split(r" (?:ORDER BY|GROUP BY) ", text.split(" WHERE ", 1)[1])[0]
        row = conn.execute(f"SELECT count(*) FROM activities WHERE {where}").fetchone()
        return int(row[0]) if row else 0


def explain(database_url: str, name: str, params: dict[str, str], as_reader: bool = True) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of the request's statement as the service runs it: the reader
    role, no parallel workers, the caller's scope set in the transaction, the plan it chooses
    (service_plan), the parameters bound on the client
    (`as_reader=False`: as the superuser, whom row-level security does not bind, for comparison)."""
    with psycopg.connect(database_url) as conn:
        if as_reader:
            conn.execute("SET activities.reader = 'on'")
            conn.execute(f"SET ROLE {READER_ROLE}")
        conn.execute("SET max_parallel_workers_per_gather = 0")  # as the service's readers
        conn.execute("SELECT set_config('activities.tenant_id', %s, true), set_config('activities.app_id', '', true)",
                     (TENANT,))
        query, values = statement(name, params, service_plan(conn, name, params))
        text = psycopg.ClientCursor(conn).mogrify(query, values)
        rows = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS) {text}").fetchall()
        conn.rollback()
    return "\n".join(row[0] for row in rows)


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def steal_ticks() -> tuple[int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[7], sum(fields)


async def run_class(http_url: str, name: str, queries: list[dict[str, str]], seconds: float) -> dict[str, Any]:
    token = mint_token(SECRET, TENANT, "usr-bench")
    path = STATS if is_stats(name) else LIST
    samples: list[tuple[int, float]] = []
    errors: Counter[int] = Counter()
    counter = iter(range(10**9))
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        http = KeepAliveClient(http_url, {"Authorization": f"Bearer {token}"})
        while time.perf_counter() < deadline:
            k = next(counter) % len(queries)
            params: dict[str, object] = {**queries[k]} if is_stats(name) else {**queries[k], "limit": PAGE}
            started = time.perf_counter()
            status, _ = await http.get(path, params)
            samples.append((k, (time.perf_counter() - started) * 1000))
            if status != 200:
                errors[status] += 1
        await http.close()

    steal_0, ticks_0 = steal_ticks()
    load_before = loadavg()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(QUERY_CONCURRENCY)))
    elapsed = time.perf_counter() - started
    steal_1, ticks_1 = steal_ticks()
    latencies = sorted(ms for _, ms in samples)
    per_query: defaultdict[int, list[float]] = defaultdict(list)
    for k, ms in samples:
        per_query[k].append(ms)

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))], 2)

    return {
        "requests": len(samples), "errors": dict(errors), "elapsed_s": round(elapsed, 2),
        "rate_per_s": round(len(samples) / elapsed, 1),
        "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "max_ms": round(latencies[-1], 2),
        "per_query_median_ms": [round(statistics.median(per_query[k]), 2) if per_query[k] else None
                                for k in range(len(queries))],
        "per_query_p99_ms": [round(sorted(v)[min(len(v) - 1, int(0.99 * len(v)))], 2) if (v := per_query[k]) else None
                             for k in range(len(queries))],
        "loadavg_before": load_before, "loadavg_after": loadavg(),
        "cpu_steal_share": round((steal_1 - steal_0) / max(1, ticks_1 - ticks_0), 4),
        "_latencies": latencies,
    }


NEXT_PAGE_SUFFIX: Final = "_next_page"
"""A class named `<class>_next_page` asks for the second page of each of its class's queries
(the cursor its first page returned): a page after a keyset."""


async def next_pages(http_url: str, queries: list[dict[str, str]]) -> list[dict[str, str]]:
    """Each query with the `cursor` of its first page (queries with one page only dropped)."""
    http = KeepAliveClient(http_url, {"Authorization": f"Bearer {mint_token(SECRET, TENANT, 'usr-bench')}"})
    out = []
    for params in queries:
        status, body = await http.get(LIST, {**params, "limit": PAGE})
        if status != 200:
            raise RuntimeError(f"{params}: HTTP {status} {body[:300]!r}")
        cursor = orjson.loads(body)["meta"].get("next_cursor")
        if cursor:
            out.append({**params, "cursor": cursor})
    await http.close()
    return out


async def returned_rows(http_url: str, name: str, queries: list[dict[str, str]]) -> list[int]:
    """Rows of a page each query returns (for stats: the groups), one request each (also a warm-up)."""
    http = KeepAliveClient(http_url, {"Authorization": f"Bearer {mint_token(SECRET, TENANT, 'usr-bench')}"})
    out = []
    for params in queries:
        wire: dict[str, object] = {**params} if is_stats(name) else {**params, "limit": PAGE}
        status, body = await http.get(STATS if is_stats(name) else LIST, wire)
        if status != 200:
            raise RuntimeError(f"{name} {params}: HTTP {status} {body[:300]!r}")
        out.append(len(orjson.loads(body)["data"]))
    await http.close()
    return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

TRIES: dict[str, dict[str, Any]] = {
    "leakproof_match_operators": {
        "why": "row-level security keeps a non-LEAKPROOF condition from being an index condition (it could "
               "see rows the policy hides), and `@@` (ts_match_vq) and `@>` (arraycontains) are not "
               "LEAKPROOF: the search and participant GIN indexes cannot be used by the reader role",
        "apply": ["ALTER FUNCTION pg_catalog.ts_match_vq(tsvector, tsquery) LEAKPROOF",
                  "ALTER FUNCTION pg_catalog.arraycontains(anyarray, anyarray) LEAKPROOF"],
        "revert": ["ALTER FUNCTION pg_catalog.ts_match_vq(tsvector, tsquery) NOT LEAKPROOF",
                   "ALTER FUNCTION pg_catalog.arraycontains(anyarray, anyarray) NOT LEAKPROOF"],
        "classes": ("q_common_word", "q_mid_word", "q_rare_word", "q_prefix_3_4", "q_two_words", "participant"),
    },
    "stats_covering_index": {
        "why": "stats by owner over a month reads every row of the month from the heap for owner_id "
               "(and app_id, is_deleted for the policy and the filter): an index with them lets it be an "
               "index-only scan",
        "apply": ["CREATE INDEX activities_activity_date_stats ON activities "
                  "(tenant_id, activity_date) INCLUDE (owner_id, app_id, is_deleted)",
                  "VACUUM (ANALYZE) activities"],
        "revert": ["DROP INDEX activities_activity_date_stats"],
        "classes": ("stats_owner_month",),
    },
}
"""Changes tried on the seeded database after the measurement (each reverted after its classes ran
again), to show the effect of what the report proposes; the service code is not changed."""


def try_changes(url: str, nats_url: str, root: Path, counted: dict[str, list[dict[str, Any]]],
                seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for change, spec in TRIES.items():
        classes = [c for c in spec["classes"] if c in counted]
        if not classes:
            continue
        progress(f"[try] {change}: {'; '.join(spec['apply'])}")
        with psycopg.connect(url, autocommit=True) as conn:
            for sql_text in spec["apply"]:
                conn.execute(sql_text)
        entry: dict[str, Any] = {"why": spec["why"], "applied": spec["apply"], "classes": {}}
        if change == "stats_covering_index":
            entry["index_bytes"] = sizes(url)["indexes"].get("activities_activity_date_stats")
        try:
            settle(url, 2)
            with service(url, nats_url, "http", root / f"svc-{change}") as (_, endpoints):
                for name in classes:
                    queries = [k["params"] for k in counted[name]]
                    uvloop.run(returned_rows(endpoints["http_url"], name, queries))
                    point = uvloop.run(run_class(endpoints["http_url"], name, queries, seconds))
                    medians = point.pop("per_query_median_ms")
                    point.pop("per_query_p99_ms")
                    point.pop("_latencies")
                    point["aim_ms"] = aim_of(name)
                    slowest = counted[name][max(range(len(medians)), key=lambda k: medians[k] or 0)]
                    point["explain"] = {"params": slowest["params"], "matches": slowest["matches"],
                                        "plan": explain(url, name, slowest["params"])}
                    entry["classes"][name] = point
                    progress(f"  {name}: p50 {point['p50_ms']} p99 {point['p99_ms']} max {point['max_ms']} ms")
        finally:
            with psycopg.connect(url, autocommit=True) as conn:
                for sql_text in spec["revert"]:
                    conn.execute(sql_text)
        out[change] = entry
    return out


AIMS = {"q": 25.0, "filter": 15.0, "stats": 50.0}


def aim_of(name: str) -> float:
    return AIMS["q"] if name.startswith("q_") else AIMS["stats"] if is_stats(name) else AIMS["filter"]


SHARED_BUFFERS: Final = "4GB"
"""PostgreSQL's shared buffers for this benchmark: room for the read model of a million activities
(3.5 GB with its indexes), as a production server of that size has (PostgreSQL's own advice: a
quarter of the machine's memory, 6 GB on this one). With the default 128 MB every match read
came from the operating system's cache: `q` with a rare word p99 144 ms against 75 ms (same
code, same data, 2026-12-07)."""

PREPARED_KEYS = ("seed", "size_before", "migration_4", "size_after_in_place", "derived_columns",
                 "new_column_bytes", "size_after_compacted")


def run(rows: int, seconds: float, per_class: int, compact: bool, only: list[str] | None,
        tries: bool, save: Any, keep: Path | None = None) -> dict[str, Any]:
    root = keep or Path(tempfile.mkdtemp(prefix="activities-search-"))
    prepared = root / "prepared.json"  # with --keep: the seeded, migrated read model of an earlier run
    started = datetime.now(UTC)
    raw: dict[str, list[float]] = {}
    results: dict[str, Any] = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
                               "rows": rows, "seconds_per_class": seconds, "concurrency": QUERY_CONCURRENCY,
                               "page_limit": PAGE, "loadavg": {"start": loadavg()}}
    try:
        with bench_servers(root, shared_buffers=SHARED_BUFFERS) as servers:
            url = json.loads(prepared.read_text())["database_url"] if prepared.exists() else servers.fresh_database()
            words = vocabulary()
            results["vocabulary"] = {"size": len(words), "top_20": words[:20], "zipf_s": 1.0}
            if prepared.exists():
                progress(f"[1-3/6] reusing the read model prepared in {root}")
                results.update({k: v for k, v in json.loads(prepared.read_text()).items() if k in PREPARED_KEYS})
            else:
                progress(f"[1/6] read model with migrations 1-3 (and 8, whose column the projector's upsert writes); "
                         f"seeding {rows} activities through the projector's upsert")
                before_search = [m for m in MIGRATIONS if m.version in (1, 2, 3, 8)]
                migrate(url, migrations=before_search, after_first=grant_reader)
                results["seed"] = seed(url, rows, words)
                results["loadavg"]["after_seed"] = loadavg()
                progress("[2/6] sizes before migration 4")
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("VACUUM (ANALYZE) activities")
                results["size_before"] = sizes(url)
                progress("[3/6] migration 4 in place (columns, trigger, backfill, indexes CONCURRENTLY)")
                t0 = time.perf_counter()
                applied = migrate(url, after_first=grant_reader)
                results["migration_4"] = {"applied": applied, "elapsed_s": round(time.perf_counter() - t0, 1)}
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("VACUUM (ANALYZE) activities")
                results["size_after_in_place"] = sizes(url)
                results["derived_columns"] = derived_check(url)
                save(results)
                results["new_column_bytes"] = column_bytes(url)
                if compact:
                    t0 = time.perf_counter()
                    with psycopg.connect(url, autocommit=True) as conn:
                        conn.execute("VACUUM (FULL, ANALYZE) activities")
                    compacted_s = round(time.perf_counter() - t0, 1)
                    results["size_after_compacted"] = {**sizes(url), "vacuum_full_s": compacted_s}
                if keep:
                    prepared.write_text(json.dumps({"database_url": url,
                                                    **{k: results[k] for k in PREPARED_KEYS if k in results}}))
            progress(f"  derived columns: {results['derived_columns']}")
            classes = query_classes(words, rows, per_class)
            if only:
                classes = {k: v for k, v in classes.items() if k in only}
            progress("[4/6] rows each query matches")
            counted: dict[str, list[dict[str, Any]]] = {}
            for name, candidates in classes.items():
                kept: list[dict[str, Any]] = []
                for params in candidates:
                    n = matches(url, name, params)
                    if n > 0:
                        kept.append({"params": params, "matches": n})
                if name == "q_rare_word":
                    kept = kept[:per_class]
                counted[name] = kept
            if "q_rare_word" in counted and (not only or f"q_rare_word{NEXT_PAGE_SUFFIX}" in only):
                counted[f"q_rare_word{NEXT_PAGE_SUFFIX}"] = counted["q_rare_word"]
            settle(url)
            results["loadavg"]["before_queries"] = loadavg()
            progress("[5/6] the service over HTTP, 4 in flight per class")
            results["classes"] = {}
            with service(url, servers.nats_url, "http", root / "svc-http") as (process, endpoints):
                http_url = endpoints["http_url"]
                for name, kept in counted.items():
                    queries: list[dict[str, str]] = [k["params"] for k in kept]
                    if name.endswith(NEXT_PAGE_SUFFIX):
                        queries = uvloop.run(next_pages(http_url, queries))
                        kept = [k for k in kept if k["params"] in [{"q": q["q"]} for q in queries]]
                    returned = uvloop.run(returned_rows(http_url, name, queries))
                    point = uvloop.run(run_class(http_url, name, queries, seconds))
                    point["queries"] = [{**k, "returned": r, "median_ms": m, "p99_ms": p}
                                        for k, r, m, p in zip(kept, returned, point.pop("per_query_median_ms"),
                                                              point.pop("per_query_p99_ms"), strict=True)]
                    point["aim_ms"] = aim_of(name)
                    raw[name] = point.pop("_latencies")
                    results["classes"][name] = point
                    save(results)
                    progress(f"  {name}: {point['rate_per_s']}/s p50 {point['p50_ms']} p99 {point['p99_ms']} "
                             f"max {point['max_ms']} ms (aim {point['aim_ms']:g}); load {point['loadavg_after']}")
                results["service_peak_rss_mb"] = round(peak_rss_mb(process.pid), 1)
                results["groups"] = groups(raw)
                save(results)
            progress("[6/6] EXPLAIN (ANALYZE, BUFFERS) of each class's slowest query")
            for name, point in results["classes"].items():
                slowest = max(point["queries"], key=lambda q: q["median_ms"] or 0)
                point["explain"] = {"params": slowest["params"], "matches": slowest["matches"],
                                    "plan": explain(url, name, slowest["params"])}
            for name in [n for n in results["classes"] if n.startswith("q_") or n == "participant"]:
                point = results["classes"][name]
                point["explain"]["plan_without_rls"] = explain(url, name, point["explain"]["params"], as_reader=False)
            save(results)
            if tries:
                results["tried"] = try_changes(url, servers.nats_url, root, counted, seconds)
            results["loadavg"]["end"] = loadavg()
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    results["slowest_class"] = max(results["classes"], key=lambda n: results["classes"][n]["p99_ms"] / aim_of(n))
    return results


def groups(raw: dict[str, list[float]]) -> dict[str, Any]:
    """p50/p99/max over every request of the `q` classes together, and of the filter classes
    (each class ran for the same time, so a class that serves more requests weighs more)."""
    out = {}
    for group, names in (("all q classes", [n for n in raw if n.startswith("q_")]),
                         ("all filter classes", [n for n in raw if not n.startswith("q_") and not is_stats(n)])):
        latencies = sorted(ms for n in names for ms in raw[n])
        if latencies:
            def pct(p: float, values: list[float] = latencies) -> float:
                return round(values[min(len(values) - 1, int(p / 100 * len(values)))], 2)
            aim = AIMS["q" if group.startswith("all q") else "filter"]
            out[group] = {"classes": names, "requests": len(latencies), "p50_ms": pct(50), "p99_ms": pct(99),
                          "max_ms": round(latencies[-1], 2), "aim_ms": aim}
    return out


def mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def report(results: dict[str, Any]) -> str:
    lines = [f"# Finding activities: search, v1.1 filters, stats ({results['date']})", "",
             f"{results['machine']}; {results['rows']:,} activities of one tenant; "
             f"{results['seconds_per_class']:g} s per class, {results['concurrency']} requests in flight over HTTP "
             f"(`activities serve --role http`), page limit {results['page_limit']}.",
             f"/proc/loadavg: start {results['loadavg']['start']}; before the queries "
             f"{results['loadavg'].get('before_queries')}; end {results['loadavg'].get('end')}.", "",
             "| class | p50 / p99 / max ms | aim (p99) | rate | distinct queries | rows matched (min / median / max) "
             "| rows returned (min-max) | loadavg after | CPU stolen |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, p in results["classes"].items():
        m = [q["matches"] for q in p["queries"]]
        r = [q["returned"] for q in p["queries"]]
        verdict = "met" if p["p99_ms"] <= p["aim_ms"] else "MISSED"
        lines.append(
            f"| {name} | {p['p50_ms']} / {p['p99_ms']} / {p['max_ms']} | <= {p['aim_ms']:g} ms: {verdict} "
            f"({p['p99_ms'] / p['aim_ms']:.2f}x) | {p['rate_per_s']:.0f}/s | {len(m)} | "
            f"{min(m):,} / {int(statistics.median(m)):,} / {max(m):,} | {min(r)}-{max(r)} | "
            f"{p['loadavg_after']} | {p['cpu_steal_share']:.1%} |")
    for group, g in results.get("groups", {}).items():
        lines.append(f"| {group} (together) | {g['p50_ms']} / {g['p99_ms']} / {g['max_ms']} | <= {g['aim_ms']:g} ms: "
                     f"{'met' if g['p99_ms'] <= g['aim_ms'] else 'MISSED'} ({g['p99_ms'] / g['aim_ms']:.2f}x) | - | "
                     f"{g['requests']:,} requests | - | - | - | - |")
    before, after = results["size_before"], results["size_after_in_place"]
    compacted = results.get("size_after_compacted")
    lines += ["", "## Read model size", "",
              "Before: the table with migrations 1-3 only, as the seeding's inserts left it (VACUUM). After in "
              f"place: migration 4 applied by `migrate` ({results['migration_4']['elapsed_s']} s), then VACUUM. "
              + ("After compaction: VACUUM FULL of that table (the layout a rebuild gives)." if compacted else ""), "",
              "| relation | before | after in place | " + ("after compaction |" if compacted else ""),
              "|---|---|---|" + ("---|" if compacted else "")]
    names = sorted(set(before["indexes"]) | set(after["indexes"]))
    for label, key in (("heap", "heap_bytes"), ("TOAST", "toast_bytes"), ("all indexes", "indexes_bytes"),
                       ("total (pg_total_relation_size)", "total_bytes")):
        lines.append(f"| {label} | {mb(before[key])} | {mb(after[key])} | "
                     + (f"{mb(compacted[key])} |" if compacted else ""))
    for name in names:
        lines.append(f"| {name} | {mb(before['indexes'][name]) if name in before['indexes'] else '-'} | "
                     f"{mb(after['indexes'].get(name, 0))} | "
                     + (f"{mb(compacted['indexes'].get(name, 0))} |" if compacted else ""))
    cols = results["new_column_bytes"]
    lines += ["", "Bytes of the new columns in the rows (sum of pg_column_size): "
              + ", ".join(f"{k} {mb(v)}" for k, v in cols.items()) + f"; total {mb(sum(cols.values()))}.",
              "", f"Derived columns check: {results['derived_columns']}", ""]
    slow = results["slowest_class"]
    e = results["classes"][slow]["explain"]
    lines += ["## EXPLAIN (ANALYZE, BUFFERS) of the slowest class", "",
              f"Class `{slow}` (p99 furthest over its aim), its slowest query {e['params']} ({e['matches']:,} rows "
              "matched), run as the service runs it (reader role, caller scope, parameters bound on the client):", "",
              "```", e["plan"], "```", ""]
    if "plan_without_rls" in e:
        lines += ["The same statement as the superuser, whom row-level security does not bind (for comparison):", "",
                  "```", e["plan_without_rls"], "```", ""]
    for name, p in results["classes"].items():
        if name != slow:
            top = "\n".join(p["explain"]["plan"].splitlines()[:12])
            lines += [f"### {name}: {p['explain']['params']} ({p['explain']['matches']:,} rows matched)", "",
                      "```", top, "```", ""]
    for change, entry in results.get("tried", {}).items():
        lines += [f"## Tried: {change} (on the seeded database, reverted after)", "", entry["why"] + ".", "",
                  "Applied: " + "; ".join(f"`{a}`" for a in entry["applied"])
                  + (f" (index {mb(entry['index_bytes'])})" if entry.get("index_bytes") else "") + ".", "",
                  "| class | before: p50 / p99 / max ms | with the change: p50 / p99 / max ms | aim (p99) |",
                  "|---|---|---|---|"]
        for name, p in entry["classes"].items():
            b = results["classes"][name]
            lines.append(f"| {name} | {b['p50_ms']} / {b['p99_ms']} / {b['max_ms']} | "
                         f"{p['p50_ms']} / {p['p99_ms']} / {p['max_ms']} | <= {p['aim_ms']:g} ms |")
        for name, p in entry["classes"].items():
            lines += ["", f"{name} with the change, slowest query {p['explain']['params']} "
                      f"({p['explain']['matches']:,} rows matched):", "", "```", p["explain"]["plan"], "```"]
        lines.append("")
    return "\n".join(lines) + "\n"


class MigrationProgress(logging.Handler):
    """The read-model migrations' own log records (projections/migrations.py) as progress lines:
    each migration applied, and its backfill every 100,000 rows changed (migration 4 in place
    takes minutes on 1,000,000 rows, which printed nothing until 2026-12-07)."""

    EVERY: Final = 100_000

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._shown: dict[Any, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        version = getattr(record, "version", None)
        if record.getMessage() == "read-model backfill":
            steps = int(getattr(record, "changed", 0)) // self.EVERY
            if steps > self._shown.get(version, 0):
                self._shown[version] = steps
                progress(f"  migration {version}: backfilled {steps * self.EVERY:,} rows")
        elif record.getMessage() == "read-model migration applied":
            progress(f"  migration {version} applied")


def show_migration_progress() -> None:
    logger = logging.getLogger("activities.migrations")
    logger.setLevel(logging.INFO)
    logger.addHandler(MigrationProgress())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--per-class", type=int, default=16, help="distinct queries per class (about)")
    parser.add_argument("--no-compact", action="store_true", help="skip VACUUM FULL after the migration")
    parser.add_argument("--no-tries", action="store_true", help="skip the changes tried after the measurement")
    parser.add_argument("--only", nargs="*", help="run only these classes")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the servers' data in this directory and, when it already holds a prepared "
                             "read model (an earlier --keep run), skip seeding and migrating (steps 1-3)")
    parser.add_argument("--out", default=None, help="results directory name (default <date-time>-search)")
    args = parser.parse_args(argv)
    show_migration_progress()
    started = datetime.now(UTC)
    directory = RESULTS / (args.out or started.strftime("%Y-%m-%d-%H%M") + "-search")
    directory.mkdir(parents=True, exist_ok=True)

    def save(partial: dict[str, Any]) -> None:  # as it goes: a run cut short keeps what it measured
        (directory / "results.partial.json").write_text(json.dumps(partial, indent=2))

    results = run(args.rows, args.seconds, args.per_class, not args.no_compact, args.only, not args.no_tries, save,
                  args.keep)
    (directory / "results.partial.json").unlink(missing_ok=True)
    (directory / "results.json").write_text(json.dumps(results, indent=2))
    (directory / "results.md").write_text(report(results))
    print((directory / "results.md").read_text())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
