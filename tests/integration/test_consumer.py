"""The tracked-consumer core against a real event store: a toy handler that records what it saw
and its position in one transaction sees every event once and in order across a restart, wakes
on NOTIFY without waiting for its poll, backs off and resumes after failing, and runs as the one
active instance of its name, a standby taking over when the active one stops or loses its session."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from activities_client.document import new_activity_id
from events.activity import activity_uuid
from events.commands import parse_create
from projections.consumer import ConsumerSettings, Entry, TrackedConsumer
from services.application import ActivitiesApplication
from services.bootstrap import build_application
from services.config import Settings
from services.domain import Activity, Caller, decide

CALLER = Caller(tenant_id="acme", sub="usr-1")

TABLES = (
    "CREATE TABLE IF NOT EXISTS toy_seen (seq bigserial PRIMARY KEY, position bigint NOT NULL UNIQUE, "
    "activity_id text NOT NULL, version int NOT NULL, seen_by text NOT NULL)",
    "CREATE TABLE IF NOT EXISTS toy_tracking (name text PRIMARY KEY, position bigint NOT NULL)",
)


class ToyHandler:
    """Records each event it is given and its position in one transaction (like the read model)."""

    def __init__(self, database_url: str, label: str = "toy", name: str = "toy") -> None:
        self.database_url = database_url
        self.label = label
        self.name = name
        self.fail_next = 0
        self.resumes: list[int] = []
        self.attempts: list[float] = []  # monotonic time of every call of handle
        self.closed = 0
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def resume(self) -> int:
        if self._conn is None:
            self._conn = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
        for statement in TABLES:
            await self._conn.execute(statement)
        cursor = await self._conn.execute("SELECT position FROM toy_tracking WHERE name = %s", (self.name,))
        row = await cursor.fetchone()
        position = int(row[0]) if row else 0
        self.resumes.append(position)
        return position

    async def handle(self, page: Sequence[Entry]) -> int:
        self.attempts.append(time.monotonic())
        if self.fail_next > 0:
            self.fail_next -= 1
            raise RuntimeError("the toy handler fails on purpose")
        assert self._conn is not None
        async with self._conn.transaction():
            async with self._conn.cursor() as curs:
                await curs.executemany(
                    "INSERT INTO toy_seen (position, activity_id, version, seen_by) VALUES (%s, %s, %s, %s)",
                    [(e.position, e.event.document["id"], e.event.originator_version, self.label) for e in page],
                )
            await self._conn.execute(
                "INSERT INTO toy_tracking (name, position) VALUES (%s, %s) "
                "ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position",
                (self.name, page[-1].position),
            )
        return page[-1].position

    async def close(self) -> None:
        self.closed += 1
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


FAST = ConsumerSettings(
    name="toy", page_size=7, poll_interval_s=0.2, initial_backoff_s=0.2, max_backoff_s=1.0,
    leader_retry_s=0.2, heartbeat_s=0.2, stop_timeout_s=5.0,
)  # fmt: skip


@pytest.fixture
def store(make_settings: Callable[..., Settings]) -> Iterator[tuple[ActivitiesApplication, str]]:
    settings = make_settings()
    assert settings.database_url is not None
    app = build_application(settings, settings.database_url)
    try:
        yield app, settings.database_url
    finally:
        app.close()


@pytest_asyncio.fixture
async def consumers() -> AsyncIterator[list[TrackedConsumer[ToyHandler]]]:
    """Consumers a test starts; all stopped at its end."""
    started: list[TrackedConsumer[ToyHandler]] = []
    yield started
    for consumer in started:
        await consumer.stop()


def append(app: ActivitiesApplication, count: int) -> list[int]:
    """`count` new activities in the store; their positions."""
    positions = []
    for _ in range(count):
        now = datetime.now(UTC)
        activity_id = new_activity_id()
        decision = decide(None, parse_create({"account_id": "acc_toy"}), CALLER, now, activity_id)
        assert decision is not None
        recordings = app.save(Activity.log(activity_uuid(activity_id), decision, now))
        positions.append(recordings[-1].notification.id)
    return positions


async def append_async(app: ActivitiesApplication, count: int) -> list[int]:
    return await asyncio.to_thread(append, app, count)


def seen(database_url: str) -> list[tuple[int, str]]:
    """(position, seen by) of every recorded event, in the order they were recorded."""
    with psycopg.connect(database_url) as conn:
        return [(int(r[0]), str(r[1])) for r in conn.execute("SELECT position, seen_by FROM toy_seen ORDER BY seq")]


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> float:
    """Wait for a predicate; the seconds it took."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def reached(consumer: TrackedConsumer[ToyHandler], position: int) -> Callable[[], bool]:
    return lambda: consumer.position == position


def consumer_of(
    app: ActivitiesApplication, database_url: str, label: str = "toy", **settings: Any
) -> TrackedConsumer[ToyHandler]:
    return TrackedConsumer(app, database_url, ToyHandler(database_url, label), _settings(**settings))


def _settings(**changes: Any) -> ConsumerSettings:
    return dataclasses.replace(FAST, **changes)


async def test_every_event_once_in_order_across_a_restart(
    store: tuple[ActivitiesApplication, str], consumers: list[TrackedConsumer[ToyHandler]]
) -> None:
    app, url = store
    before = await append_async(app, 30)
    first = consumer_of(app, url, "first")
    consumers.append(first)
    await first.start()
    await until(lambda: first.position == before[-1], what="the first consumer to catch up")
    await first.stop()
    assert first.handler.closed == 1 and not first.active

    after = await append_async(app, 20)
    second = consumer_of(app, url, "second")
    consumers.append(second)
    await second.start()
    await until(lambda: second.position == after[-1], what="the second consumer to catch up")

    assert second.handler.resumes == [before[-1]]  # it continued after what the first recorded
    records = seen(url)
    assert [position for position, _ in records] == before + after  # each once, in log order
    assert {by for position, by in records if position in before} == {"first"}
    assert {by for position, by in records if position in after} == {"second"}
    assert first.failures == second.failures == 0


async def test_wakes_on_notify_without_waiting_for_the_poll(
    store: tuple[ActivitiesApplication, str], consumers: list[TrackedConsumer[ToyHandler]]
) -> None:
    app, url = store
    consumer = consumer_of(app, url, poll_interval_s=60.0, heartbeat_s=30.0)
    consumers.append(consumer)
    await consumer.start()
    await until(lambda: consumer.active and consumer.handler.resumes != [], what="the consumer to start")
    await asyncio.sleep(0.3)  # idle: waiting on its (long) poll
    for _ in range(3):
        [position] = await append_async(app, 1)
        took = await until(reached(consumer, position), timeout_s=5.0, what="the NOTIFY")
        assert took < 2.0, took
    listened: list[int] = []
    consumer.add_listener(listened.append)
    [position] = await append_async(app, 1)
    await until(lambda: listened == [position], timeout_s=5.0, what="the listener")


async def test_backs_off_and_resumes_after_its_handler_fails(
    store: tuple[ActivitiesApplication, str], consumers: list[TrackedConsumer[ToyHandler]]
) -> None:
    app, url = store
    positions = await append_async(app, 10)
    consumer = consumer_of(app, url)
    consumer.handler.fail_next = 3
    consumers.append(consumer)
    await consumer.start()
    await until(lambda: consumer.position == positions[-1], what="recovery")

    # the error by its type only: a message may quote client content (projections/errors.py)
    assert consumer.failures == 3 and consumer.last_error == "RuntimeError"
    assert consumer.handler.resumes[:4] == [0, 0, 0, 0]  # resumed from its record after each failure
    gaps = [b - a for a, b in zip(consumer.handler.attempts, consumer.handler.attempts[1:], strict=False)][:3]
    for gap, backoff in zip(gaps, (0.2, 0.4, 0.8), strict=True):  # capped exponential back-off
        assert gap >= backoff * 0.9, gaps
    assert [position for position, _ in seen(url)] == positions
    more = await append_async(app, 3)  # and it keeps going
    await until(lambda: consumer.position == more[-1], what="the next events")
    assert consumer.failures == 3


async def test_one_of_two_instances_is_active_and_the_other_takes_over(
    store: tuple[ActivitiesApplication, str], consumers: list[TrackedConsumer[ToyHandler]]
) -> None:
    app, url = store
    a = consumer_of(app, url, "a")
    b = consumer_of(app, url, "b")
    consumers += [a, b]
    await a.start()
    await until(lambda: a.active, what="a to become active")
    await b.start()
    first = await append_async(app, 10)
    await until(lambda: a.position == first[-1], what="a to consume")
    await asyncio.sleep(0.6)  # several of b's attempts at the lock
    assert a.active and not b.active and b.handler.resumes == []

    await a.stop()
    took = await until(lambda: b.active, timeout_s=5.0, what="b to take over")
    assert took < 2.0
    second = await append_async(app, 10)
    await until(lambda: b.position == second[-1], what="b to consume")
    assert b.handler.resumes[0] == first[-1]
    records = seen(url)
    assert records == [(p, "a") for p in first] + [(p, "b") for p in second]


async def test_a_dropped_session_is_replaced_and_consuming_goes_on(
    store: tuple[ActivitiesApplication, str], consumers: list[TrackedConsumer[ToyHandler]]
) -> None:
    app, url = store
    consumer = consumer_of(app, url)
    consumers.append(consumer)
    await consumer.start()
    await until(lambda: consumer.active, what="the consumer to start")
    with psycopg.connect(url, autocommit=True) as conn:
        killed = conn.execute(  # the session holding the consumer's advisory lock (and LISTENing)
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' "
            "AND pid <> pg_backend_pid()"
        ).fetchone()
    assert killed == (1,)
    await until(lambda: not consumer.active, timeout_s=5.0, what="the lost session to be noticed")
    positions = await append_async(app, 5)
    await until(lambda: consumer.active and consumer.position == positions[-1], what="the consumer to come back")
    assert [position for position, _ in seen(url)] == positions
