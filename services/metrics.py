"""Prometheus metrics and health of one service process (`/metrics`, `/healthz`, `/readyz`).

Counters and histograms are recorded where things happen (the command gateway, the batcher, the
HTTP middleware); positions, lag and pool usage are read when scraped, from PostgreSQL.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from projections.database import conninfo

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)

class Metrics:
    """The process's metrics, in a registry of its own (several runtimes may share a process in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.commands = Counter(
            "activities_commands_total",
            "Commands by command and outcome (ok, an error code, or refused: at capacity, not parsed).",
            ["command", "outcome"], registry=self.registry,
        )
        self.command_seconds = Histogram(
            "activities_command_seconds", "Command latency from receipt to reply.", ["command"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "activities_batch_size", "Commands saved per transaction (group commit).",
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.http_requests = Counter(
            "activities_http_requests_total", "HTTP requests by method, route and status.",
            ["method", "route", "status"], registry=self.registry,
        )
        self.http_seconds = Histogram(
            "activities_http_request_seconds", "HTTP request latency.", ["method", "route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.position = Gauge(
            "activities_position", "Global log position: head of the store, and how far each reader got.",
            ["reader"], registry=self.registry,
        )
        self.lag = Gauge("activities_lag_events", "Events the reader is behind the head.", ["reader"],
                         registry=self.registry)
        self.pool = Gauge("activities_db_pool", "Connection pool usage.", ["pool", "stat"], registry=self.registry)
        self.firings = Counter(
            "activities_scheduler_firings_total",
            "Scheduler firings (reminder, overdue) by outcome (ok: decided on the current state, which may "
            "append nothing; or an error code, retried).",
            ["kind", "outcome"], registry=self.registry,
        )
        self.firing_lateness = Histogram(
            "activities_scheduler_lateness_seconds", "From a row's due time to its firing's reply.", ["kind"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self._command_counters: dict[tuple[str, str], Any] = {}
        self._command_timers: dict[str, Any] = {}

    def command_done(self, command: str, outcome: str, started: float) -> None:
        """Count a command by outcome and time it. The labelled children are looked up once and
        kept: prometheus-client's `labels()` costs microseconds a call, on every command."""
        key = (command, outcome)
        counter = self._command_counters.get(key)
        if counter is None:
            counter = self._command_counters[key] = self.commands.labels(command, outcome)
        timer = self._command_timers.get(command)
        if timer is None:
            timer = self._command_timers[command] = self.command_seconds.labels(command)
        counter.inc()
        timer.observe(time.perf_counter() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True)
class Positions:
    head: int
    projector: int | None
    relay: int | None


async def _scalar(conn: psycopg.AsyncConnection[Any], statement: str, params: tuple[Any, ...] = ()) -> int | None:
    try:
        row = await (await conn.execute(statement, params)).fetchone()
    except psycopg.errors.UndefinedTable:  # that reader has not run against this store yet
        return None
    return None if row is None or row[0] is None else int(row[0])


async def read_positions(database_url: str, application_name: str) -> Positions:
    """Head of the log and the readers' tracked positions (None where a reader never ran)."""
    url = conninfo(database_url, connect_timeout=3)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        head = await _scalar(conn, "SELECT coalesce(max(notification_id), 0) FROM activities_events")
        projector = await _scalar(
            conn,
            "SELECT notification_id FROM activities_projection_tracking WHERE application_name = %s",
            (application_name,),
        )
        relay = await _scalar(conn, "SELECT position FROM activities_relay_tracking WHERE name = 'jetstream'")
    return Positions(head or 0, projector, relay)


def record_positions(metrics: Metrics, positions: Positions) -> None:
    metrics.position.labels("head").set(positions.head)
    for reader, value in (("projector", positions.projector), ("relay", positions.relay)):
        if value is not None:
            metrics.position.labels(reader).set(value)
            metrics.lag.labels(reader).set(max(positions.head - value, 0))


def record_pool(metrics: Metrics, name: str, stats: dict[str, Any]) -> None:
    for stat in ("pool_size", "pool_available", "requests_waiting"):
        if stat in stats:
            metrics.pool.labels(name, stat).set(stats[stat])


class Operations:
    """What /metrics, /healthz and /readyz need to know about the running process."""

    def __init__(self, metrics: Metrics, database_url: str, application_name: str, max_lag: int = 10_000) -> None:
        self.metrics = metrics
        self._database_url = database_url
        self._application_name = application_name
        self._max_lag = max_lag
        self.pools: dict[str, Any] = {}  # name -> object with get_stats()
        self.nats_connected: Any = lambda: True

    async def scrape(self) -> bytes:
        with contextlib.suppress(psycopg.OperationalError):  # positions keep their last value; /readyz says why
            record_positions(self.metrics, await read_positions(self._database_url, self._application_name))
        for name, pool in self.pools.items():
            record_pool(self.metrics, name, pool.get_stats())
        return self.metrics.render()

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, checks): the database and NATS answer, and the projection is not far behind."""
        checks: dict[str, Any] = {"nats": "ok" if self.nats_connected() else "down"}
        try:
            positions = await read_positions(self._database_url, self._application_name)
            checks["database"] = "ok"
            lag = positions.head - positions.projector if positions.projector is not None else None
            checks["projection_lag"] = lag
            checks["relay_lag"] = positions.head - positions.relay if positions.relay is not None else None
        except psycopg.OperationalError as exc:
            checks["database"] = f"down: {exc}".splitlines()[0]
            lag = None
        ready = checks["database"] == "ok" and checks["nats"] == "ok" and (lag is None or lag <= self._max_lag)
        return ready, checks
