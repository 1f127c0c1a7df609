"""Contract section 9 over real servers: reminders and overdue fired by the `scheduler` role
(in-process runtimes on the test's PostgreSQL and NATS), and the v1.1 time filters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import nats.js.errors
import orjson
import psycopg
import pytest
import pytest_asyncio

from activities_client import AsyncClient, Event
from activities_client.document import format_datetime
from activities_client.errors import ValidationError
from events.activity import activity_uuid
from projections.scheduler import DUE_TABLE
from services.bootstrap import ROLES, Runtime
from services.config import Settings
from tests.integration.test_upgrade import MANIFEST, SECRET, load_database

SERVING = tuple(role for role in ROLES if role != "scheduler")


def soon(seconds: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds))


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def of_type(events: list[Event], event_type: str) -> list[Event]:
    return [event for event in events if event.event_type == event_type]


async def start(settings: Settings, roles: tuple[str, ...], name: str) -> Runtime:
    runtime = Runtime(settings.model_copy(update={"data_dir": settings.data_dir / name}), roles)
    await runtime.start()
    return runtime


@pytest_asyncio.fixture
async def service(make_settings: Callable[..., Settings]) -> AsyncIterator[Runtime]:
    """Commands, projector, relay and HTTP, without a scheduler (each test starts its own)."""
    runtime = await start(make_settings(), SERVING, "service")
    yield runtime
    await runtime.stop()


@pytest_asyncio.fixture
async def client(service: Runtime, token: Callable[..., str]) -> AsyncIterator[AsyncClient]:
    assert service.http is not None
    async with AsyncClient(
        nats_url=service.settings.nats_url,
        token=token(),
        http_url=service.http.url,
        subject_prefix=service.settings.subject_prefix,
        stream_name=service.settings.stream_name,
    ) as activities_client:
        yield activities_client


@pytest_asyncio.fixture
async def schedulers(service: Runtime) -> AsyncIterator[list[Runtime]]:
    """Scheduler processes started by the test (in-process runtimes of role `scheduler`), stopped after."""
    started: list[Runtime] = []
    yield started
    for runtime in started:
        await runtime.stop()


async def add_scheduler(service: Runtime, schedulers: list[Runtime]) -> Runtime:
    runtime = await start(service.settings, ("scheduler",), f"scheduler-{len(schedulers)}")
    schedulers.append(runtime)
    return runtime


def history(client: AsyncClient) -> Callable[[str], Awaitable[list[Event]]]:
    return client.customer.activities.history


async def test_reminders_fire_once_on_time_with_two_scheduler_instances(
    service: Runtime, client: AsyncClient, schedulers: list[Runtime]
) -> None:
    await add_scheduler(service, schedulers)
    await add_scheduler(service, schedulers)
    activities = client.customer.activities
    created = [await activities.create(account_id="acc_1", remind_at=soon(1.5 + i * 0.05)) for i in range(20)]
    events_of = history(client)

    async def all_fired() -> bool:
        documents = [await activities.get(a.id) for a in created]
        return all(document.reminder_sent for document in documents)

    await eventually(all_fired, what="every reminder")
    await asyncio.sleep(1.5)  # time for a second firing, if there were one
    lateness = []
    for activity in created:
        events = await events_of(activity.id)
        fired = of_type(events, "ActivityReminderDue")
        assert len(fired) == 1 and len(events) == 2, [e.event_type for e in events]
        assert fired[0].actor == "system" and fired[0].changes == {} and fired[0].kind == "reminder_due"
        assert fired[0].activity.reminder_sent is True and fired[0].activity.updated_by == "system"
        assert activity.remind_at is not None
        lateness.append((fired[0].occurred_at - activity.remind_at).total_seconds())
    assert min(lateness) >= 0, lateness
    assert max(lateness) < 1.0, lateness  # contract: within one second of remind_at
    assert sum(1 for runtime in schedulers if runtime.due_index and runtime.due_index.loop.fired) == 1
    samples = [
        runtime.metrics.registry.get_sample_value(
            "activities_scheduler_firings_total", {"kind": "reminder", "outcome": "ok"}
        )
        for runtime in schedulers
    ]
    assert sum(sample or 0 for sample in samples) >= len(created)  # on /metrics of the active one


async def test_a_reminder_due_while_no_scheduler_ran_fires_late_once(
    service: Runtime, client: AsyncClient, schedulers: list[Runtime]
) -> None:
    activities = client.customer.activities
    activity = await activities.create(account_id="acc_1", remind_at=soon(0.3))
    await asyncio.sleep(1.0)
    assert (await activities.get(activity.id)).version == 1  # nothing fires without a scheduler
    await add_scheduler(service, schedulers)
    await eventually(lambda: _reminder_sent(client, activity.id), what="the late reminder")
    await add_scheduler(service, schedulers)  # a restart of sorts: a second instance, the index is kept
    await asyncio.sleep(1.5)
    fired = of_type(await history(client)(activity.id), "ActivityReminderDue")
    assert len(fired) == 1 and activity.remind_at is not None and fired[0].occurred_at > activity.remind_at


async def _reminder_sent(client: AsyncClient, activity_id: str) -> bool:
    return bool((await client.customer.activities.get(activity_id)).reminder_sent)


async def test_a_patch_of_remind_at_rearms_and_a_stopped_scheduler_resumes_from_its_index(
    service: Runtime, client: AsyncClient, schedulers: list[Runtime]
) -> None:
    activities = client.customer.activities
    first = await add_scheduler(service, schedulers)
    activity = await activities.create(account_id="acc_1", remind_at=soon(0.5))
    await eventually(lambda: _reminder_sent(client, activity.id), what="the first reminder")
    rearmed = await activities.patch(activity.id, {"remind_at": soon(1.0)})
    assert rearmed.reminder_sent is False
    await first.stop()  # a restart: the next instance resumes from the index's recorded position
    schedulers.remove(first)
    await add_scheduler(service, schedulers)
    await eventually(lambda: _reminder_sent(client, activity.id), what="the re-armed reminder")
    suppressed = await activities.patch(activity.id, {"remind_at": soon(0.3), "reminder_sent": True})
    assert suppressed.reminder_sent is True
    await asyncio.sleep(1.5)
    events = await history(client)(activity.id)
    assert [e.event_type for e in events] == [
        "ActivityLogged",
        "ActivityReminderDue",
        "ActivityPatched",
        "ActivityReminderDue",
        "ActivityPatched",
    ]
    assert events[2].changes["reminder_sent"] is False  # the re-arming, as applied


async def test_never_for_completed_deleted_or_suppressed_activities(
    service: Runtime, client: AsyncClient, schedulers: list[Runtime]
) -> None:
    activities = client.customer.activities
    await add_scheduler(service, schedulers)
    completed = await activities.create(account_id="acc_1", remind_at=soon(0.8), due_date=soon(0.8))
    done = await activities.patch(completed.id, {"status": "done"})
    assert done.completed_at is not None
    deleted = await activities.create(account_id="acc_1", remind_at=soon(0.8), due_date=soon(0.8))
    await activities.delete(deleted.id)
    suppressed = await activities.create(account_id="acc_1", remind_at=soon(0.8), reminder_sent=True)
    control = await activities.create(account_id="acc_1", remind_at=soon(0.8), due_date=soon(0.8))
    events_of = history(client)
    await eventually(lambda: _reminder_sent(client, control.id), what="the control reminder")
    await asyncio.sleep(1.0)
    assert [e.event_type for e in await events_of(control.id)][1:] in (
        ["ActivityReminderDue", "ActivityBecameOverdue"],
        ["ActivityBecameOverdue", "ActivityReminderDue"],
    )
    for activity in (completed, deleted, suppressed):
        kinds = {e.event_type for e in await events_of(activity.id)}
        assert not kinds & {"ActivityReminderDue", "ActivityBecameOverdue"}, kinds


async def test_patches_racing_firings_end_with_consistent_documents(
    service: Runtime, client: AsyncClient, schedulers: list[Runtime]
) -> None:
    activities = client.customer.activities
    await add_scheduler(service, schedulers)
    await add_scheduler(service, schedulers)
    count = 30
    created = [await activities.create(account_id="acc_1", remind_at=soon(1.0)) for _ in range(count)]
    await asyncio.sleep(0.95)
    # at the due time: half get an unrelated patch, half are moved into the future, all racing the firing
    patches = [
        activities.patch(a.id, {"subject": f"raced {i}"} if i % 2 else {"remind_at": soon(3600)})
        for i, a in enumerate(created)
    ]
    await asyncio.gather(*patches)
    await asyncio.sleep(2.0)
    events_of = history(client)
    for i, activity in enumerate(created):
        events = await events_of(activity.id)
        document = await activities.get(activity.id)
        types = [e.event_type for e in events]
        assert document.version == len(events) and events[-1].activity == document  # the document is its history
        assert types.count("ActivityReminderDue") <= 1 and types.count("ActivityPatched") == 1
        if i % 2:  # an unrelated patch never stops the reminder: it fired once, before or after the patch
            assert types.count("ActivityReminderDue") == 1 and document.reminder_sent
            assert document.subject == f"raced {i}"
        elif types[-1] == "ActivityPatched":  # moved away: fired before the patch and re-armed, or never fired
            assert document.reminder_sent is False
        else:  # impossible: a firing after the move would not be due
            raise AssertionError(types)


async def test_overdue_once_per_due_date_value(
    service: Runtime, client: AsyncClient, schedulers: list[Runtime], nc: Any
) -> None:
    activities = client.customer.activities
    await add_scheduler(service, schedulers)
    activity = await activities.create(account_id="acc_1", due_date=soon(0.5), subject="Send the quote")
    events_of = history(client)

    async def overdue_count(n: int) -> bool:
        return len(of_type(await events_of(activity.id), "ActivityBecameOverdue")) >= n

    await eventually(lambda: overdue_count(1), what="overdue")
    await activities.patch(activity.id, {"subject": "Send the quote today"})
    await asyncio.sleep(1.0)
    events = await events_of(activity.id)
    overdue = of_type(events, "ActivityBecameOverdue")
    assert len(overdue) == 1 and overdue[0].actor == "system" and overdue[0].kind == "overdue"
    before, after = events[0].activity.model_dump(), overdue[0].activity.model_dump()
    assert {name for name in after if after[name] != before[name]} == {"version", "updated_at", "updated_by"}
    # published as `overdue` on JetStream (the relay follows EVENT_TYPES)
    settings = service.settings
    subject = f"{settings.subject_prefix}.events.{activity.tenant_id}.overdue"
    deadline = time.monotonic() + 10
    while True:
        try:
            published = await nc.jetstream().get_last_msg(settings.stream_name, subject)
            break
        except nats.js.errors.NotFoundError:
            assert time.monotonic() < deadline, "the overdue event was not published"
            await asyncio.sleep(0.1)
    assert orjson.loads(published.data or b"{}")["event_type"] == "ActivityBecameOverdue"
    await activities.patch(activity.id, {"due_date": soon(0.8)})  # to the future, and it passes again
    await eventually(lambda: overdue_count(2), what="overdue again")
    await asyncio.sleep(1.0)
    assert len(of_type(await events_of(activity.id), "ActivityBecameOverdue")) == 2


async def test_the_due_index_is_kept_from_the_log(
    service: Runtime, client: AsyncClient, schedulers: list[Runtime]
) -> None:
    activities = client.customer.activities
    scheduler = await add_scheduler(service, schedulers)
    later = await activities.create(account_id="acc_1", remind_at=soon(3600), due_date=soon(7200))
    assert service.servers is not None and scheduler.due_index is not None
    due_index = scheduler.due_index

    async def indexed() -> bool:
        return due_index.position >= (await activities.get(later.id)).version and bool(rows(service, later.id))

    await eventually(indexed, what="the index")
    kinds = {row[0]: row for row in rows(service, later.id)}
    assert set(kinds) == {"reminder", "overdue"} and not kinds["overdue"][2]
    assert kinds["reminder"][1] == later.remind_at
    await activities.patch(later.id, {"status": "done"})
    await eventually(lambda: _empty(service, later.id), what="the rows of a completed activity to go")


async def _empty(service: Runtime, activity_id: str) -> bool:
    return rows(service, activity_id) == []


def rows(service: Runtime, activity_id: str) -> list[tuple[Any, ...]]:
    assert service.servers is not None
    with psycopg.connect(service.servers.database_url) as conn:
        return conn.execute(
            f"SELECT kind, due_at, fired FROM {DUE_TABLE} WHERE activity_id = %s ORDER BY kind",
            (activity_uuid(activity_id),),
        ).fetchall()


# --- the list filters --------------------------------------------------------------------------


async def test_due_date_overdue_and_completed_filters(
    service: Runtime, client: AsyncClient, request_command: Any
) -> None:
    activities = client.customer.activities
    tag = "filters"
    past_open = await activities.create(account_id="acc_1", tags=[tag], due_date="2026-01-10T09:00:00Z")
    past_done = await activities.create(account_id="acc_1", tags=[tag], due_date="2026-01-11T09:00:00Z", status="done")
    future = await activities.create(account_id="acc_1", tags=[tag], due_date="2099-01-01T09:00:00Z")
    undated = await activities.create(account_id="acc_1", tags=[tag])
    reopened = await activities.create(account_id="acc_1", tags=[tag], due_date="2026-01-12T09:00:00Z", status="done")
    await activities.patch(reopened.id, {"completed_at": None})
    assert past_done.completed_at is not None

    async def ids(**params: Any) -> set[str]:
        return {a.id async for a in activities.iterate(tag=[tag], **params)}

    assert await ids(overdue=True) == {past_open.id, reopened.id}
    assert await ids(overdue=True, limit=1) == {past_open.id, reopened.id}  # cursors bound to a boolean filter
    assert await ids(overdue=False) == {past_done.id, future.id, undated.id}
    assert await ids(completed=True) == {past_done.id}
    assert await ids(completed=False) == {past_open.id, future.id, undated.id, reopened.id}
    assert await ids(due_date_from="2026-01-11T09:00:00Z", due_date_to="2026-01-12T09:00:00Z") == {
        past_done.id,
        reopened.id,
    }
    assert await ids(due_date_from="2030-01-01T00:00:00Z", completed=False) == {future.id}
    counts = await activities.stats("status", tag=[tag], overdue=True)
    assert sum(count.count for count in counts) == 2
    # over NATS with JSON booleans, and bad values refused with the field named
    reply = await request_command("list", {"tag": [tag], "overdue": True}, kind="query")
    assert {a["id"] for a in reply["data"]} == {past_open.id, reopened.id}
    reply = await request_command("list", {"tag": [tag], "overdue": "maybe"}, kind="query")
    assert reply["error"]["code"] == "validation_error"
    with pytest.raises(ValidationError) as caught:
        await activities.list(completed="maybe")
    assert [detail["field"] for detail in caught.value.details] == ["completed"]
    with pytest.raises(ValidationError):
        await activities.list(due_date_from="yesterday")


@pytest.fixture
def request_command(service: Runtime, nc: Any, token: Callable[..., str]) -> Callable[..., Awaitable[Any]]:
    """A NATS request to this test's service (conftest's `request_command` is bound to `runtime`)."""

    async def send(name: str, body: Any, *, kind: str = "cmd") -> Any:
        subject = f"{service.settings.subject_prefix}.{kind}.{name}"
        message = await nc.request(
            subject, orjson.dumps(body), headers={"Authorization": f"Bearer {token()}"}, timeout=10
        )
        return orjson.loads(message.data)

    return send


# --- data written by release 1.0 ---------------------------------------------------------------


async def test_the_due_index_builds_from_release_1_0_events_and_fires_their_overdue_once(
    make_settings: Callable[..., Settings], make_database: Callable[[], str], servers: Any
) -> None:
    """Release 1.0 stored schema 1 events (no remind_at) with due dates now in the past: the new
    scheduler reads them from the start of the log, indexes their due dates, and appends
    `ActivityBecameOverdue` once to each open one (none to completed or deleted ones)."""
    settings = make_settings(database_url=load_database(servers.admin_database_url, make_database), jwt_secret=SECRET)
    runtime = await start(settings, ("commands", "projector", "http", "scheduler"), "upgraded")
    try:
        assert runtime.app is not None and runtime.due_index is not None
        app, due_index = runtime.app, runtime.due_index
        head = MANIFEST["events_in_store"]
        now = datetime.now(UTC)

        def old_documents() -> dict[str, dict[str, Any]]:
            """Each old activity as release 1.0 left it, read back from its stored events."""
            documents = {}
            for activity_id, expected in MANIFEST["activities"].items():
                old = app.load_version(activity_uuid(activity_id), expected["version"])
                assert old is not None and old.document["schema_version"] == 2  # upcast when read
                documents[activity_id] = old.document
            return documents

        documents = await asyncio.to_thread(old_documents)
        expected_overdue = {
            activity_id
            for activity_id, document in documents.items()
            if document["due_date"] is not None
            and not document["is_deleted"]
            and document["completed_at"] is None
            and datetime.fromisoformat(document["due_date"].replace("Z", "+00:00")) <= now
        }
        assert expected_overdue, "the fixture has open activities past their due date"

        async def all_fired() -> bool:
            return due_index.position >= head + len(expected_overdue)

        await eventually(all_fired, timeout=30, what="the index to build and the overdue to fire")
        await asyncio.sleep(1.0)  # time for a second firing, if there were one

        def appended() -> dict[str, list[str]]:
            found = {}
            for activity_id, expected in MANIFEST["activities"].items():
                events = list(app.events.get(activity_uuid(activity_id), gt=expected["version"]))
                found[activity_id] = [type(event).__name__ for event in events]
            return found

        after = await asyncio.to_thread(appended)
        assert {i for i, names in after.items() if names} == expected_overdue
        assert all(after[i] == ["ActivityBecameOverdue"] for i in expected_overdue)
        with psycopg.connect(settings.database_url or "") as conn:
            fired = conn.execute(f"SELECT count(*) FROM {DUE_TABLE} WHERE kind = 'overdue' AND fired").fetchone()
            reminders = conn.execute(f"SELECT count(*) FROM {DUE_TABLE} WHERE kind = 'reminder'").fetchone()
        assert fired == (len(expected_overdue),) and reminders == (0,)  # 1.0 had no remind_at
    finally:
        await runtime.stop()


async def test_a_dropped_due_index_is_rebuilt_from_the_log_and_fires_nothing_twice(
    service: Runtime, client: AsyncClient, schedulers: list[Runtime]
) -> None:
    activities = client.customer.activities
    first = await add_scheduler(service, schedulers)
    fired = await activities.create(account_id="acc_1", remind_at=soon(0.3), due_date=soon(0.3))
    pending = await activities.create(account_id="acc_1", remind_at=soon(3.0))
    events_of = history(client)

    async def fired_both() -> bool:
        return len(await events_of(fired.id)) == 3

    await eventually(fired_both, what="the reminder and the overdue")
    await first.stop()
    schedulers.remove(first)
    assert service.servers is not None
    with psycopg.connect(service.servers.database_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {DUE_TABLE}, {DUE_TABLE}_tracking")
    await add_scheduler(service, schedulers)  # reads the whole log again
    await eventually(lambda: _reminder_sent(client, pending.id), what="the pending reminder")
    await asyncio.sleep(1.0)
    assert [e.event_type for e in await events_of(fired.id)][1:] in (
        ["ActivityReminderDue", "ActivityBecameOverdue"],
        ["ActivityBecameOverdue", "ActivityReminderDue"],
    )
    assert [e.event_type for e in await events_of(pending.id)] == ["ActivityLogged", "ActivityReminderDue"]
