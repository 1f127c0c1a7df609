"""The Python client (services/client.py) against the real service running in-process.

Every client method, async and blocking; typed errors; the retry after a timeout that must not
log a second activity; and a subscriber that sees an activity's four events in order.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import nats.js.errors
import orjson
import psycopg
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from activities_client import (
    ActivitiesError,
    Activity,
    AsyncClient,
    Client,
    Event,
    Gone,
    HistoryUnavailable,
    IdempotencyConflict,
    NotFound,
    RetryPolicy,
    Unauthorized,
    Unavailable,
    ValidationError,
    VersionConflict,
)
from activities_client.document import format_datetime
from events.activity import activity_uuid
from services.bootstrap import Runtime

EVENTS_TABLE = "activities_events"


def client_kwargs(runtime: Runtime, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "nats_url": runtime.endpoints["nats_url"],
        "subject_prefix": runtime.settings.subject_prefix,
        "stream_name": runtime.settings.stream_name,
    }
    values.update(overrides)
    return values


@pytest_asyncio.fixture
async def client(runtime: Runtime, token: Callable[..., str]) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(token=token(), **client_kwargs(runtime)) as connected:
        yield connected


def stored_events(runtime: Runtime, activity_id: str | None = None) -> list[tuple[Any, int]]:
    """(originator id, version) of the rows in the event store, of one activity or all."""
    assert runtime.servers is not None
    with psycopg.connect(runtime.servers.database_url) as conn:
        if activity_id is None:
            rows = conn.execute(f"SELECT originator_id, originator_version FROM {EVENTS_TABLE}").fetchall()
        else:
            rows = conn.execute(
                f"SELECT originator_id, originator_version FROM {EVENTS_TABLE} WHERE originator_id = %s",
                (activity_uuid(activity_id),),
            ).fetchall()
    return [(row[0], row[1]) for row in rows]


# ---------------------------------------------------------------------------------------------
# Commands and typed errors
# ---------------------------------------------------------------------------------------------


async def test_commands_return_typed_documents_and_track_position(client: AsyncClient, runtime: Runtime) -> None:
    activities = client.customer.activities
    created = await activities.create(
        account_id="acc_1", type="call", subject="Intro", activity_date=datetime(2026, 1, 5, 9, 30, tzinfo=UTC)
    )
    assert isinstance(created, Activity)
    assert created.id.startswith("act_") and created.version == 1 and created.tenant_id == "acme"
    assert created.activity_date == datetime(2026, 1, 5, 9, 30, tzinfo=UTC)
    first_position = client.position
    assert first_position > 0

    patched = await activities.patch(created.id, {"status": "done", "subject": None}, expected_version=1)
    assert (patched.version, patched.status, patched.subject) == (2, "done", None)
    assert client.position > first_position

    deleted = await activities.delete(created.id, expected_version=2)
    assert deleted.is_deleted and deleted.deleted_by == "usr-1" and deleted.version == 3

    restored = await activities.restore(created.id)
    assert not restored.is_deleted and restored.deleted_at is None and restored.version == 4
    assert len(stored_events(runtime, created.id)) == 4


async def test_errors_are_typed(client: AsyncClient, runtime: Runtime, token: Callable[..., str]) -> None:
    activities = client.customer.activities
    created = await activities.create(deal_id="deal_1", type="email")

    with pytest.raises(VersionConflict) as conflict:
        await activities.patch(created.id, {"status": "open"}, expected_version=7)
    assert conflict.value.current_version == 1

    with pytest.raises(ValidationError) as invalid:
        await activities.create(account_id="acc_1", type="fax")
    assert [detail["field"] for detail in invalid.value.details] == ["type"], invalid.value.details

    with pytest.raises(ValidationError) as forged:
        await activities.create(account_id="acc_1", id="act_forged")
    assert [detail["field"] for detail in forged.value.details] == ["id"], forged.value.details

    with pytest.raises(ValidationError) as naive:
        await activities.create(account_id="acc_1", due_date=datetime(2026, 1, 5, 9, 30))
    assert [detail["field"] for detail in naive.value.details] == ["due_date"], naive.value.details

    with pytest.raises(ValidationError) as unlinked:
        await activities.patch(created.id, {"deal_id": None})
    assert unlinked.value.details

    key = "fixed-key-for-conflict"
    await activities.create(account_id="acc_2", idempotency_key=key)
    with pytest.raises(IdempotencyConflict):
        await activities.create(account_id="acc_3", idempotency_key=key)

    await activities.delete(created.id)
    with pytest.raises(Gone):
        await activities.patch(created.id, {"status": "open"})

    async with AsyncClient(token=token(tenant="globex"), **client_kwargs(runtime)) as other:
        with pytest.raises(NotFound):
            await other.customer.activities.restore(created.id)
        with pytest.raises(NotFound):
            await other.customer.activities.patch(created.id, {"status": "x"})

    async with AsyncClient(token=token() + "x", **client_kwargs(runtime)) as forged:
        with pytest.raises(Unauthorized):
            await forged.customer.activities.create(account_id="acc_1")
    assert issubclass(VersionConflict, ActivitiesError) and issubclass(Unauthorized, ActivitiesError)


async def test_same_key_replays_the_original_reply(client: AsyncClient, runtime: Runtime) -> None:
    first = await client.customer.activities.create(account_id="acc_9", idempotency_key="replay-1")
    again = await client.customer.activities.create(account_id="acc_9", idempotency_key="replay-1")
    assert again.id == first.id
    assert len(stored_events(runtime, first.id)) == 1


async def test_no_service_listening_is_unavailable_after_bounded_attempts(
    runtime: Runtime, token: Callable[..., str]
) -> None:
    kwargs = client_kwargs(runtime, subject_prefix="nobody.listens.here")
    retry = RetryPolicy(attempts=3, backoff_s=0.05)
    async with AsyncClient(token=token(), timeout=0.5, retry=retry, **kwargs) as lonely:
        started = time.monotonic()
        with pytest.raises(Unavailable) as error:
            await lonely.customer.activities.create(account_id="acc_1")
    assert "3 attempts" in str(error.value)
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------------------------------------
# Retry after a timeout: the same Idempotency-Key, exactly one activity
# ---------------------------------------------------------------------------------------------


async def _observe(nc: NatsClient, subject: str) -> list[Msg]:
    """Every request published on `subject` (a plain subscriber sees them besides the queue group)."""
    seen: list[Msg] = []

    async def record(message: Msg) -> None:
        seen.append(message)

    await nc.subscribe(subject, cb=record)
    await nc.flush()
    return seen


async def test_retry_after_timeout_while_the_store_is_slow_logs_one_activity(
    runtime: Runtime, token: Callable[..., str], nc: NatsClient
) -> None:
    """The first attempt reaches the service but its reply comes too late; the retry must not log twice."""
    assert runtime.servers is not None
    before = len(stored_events(runtime))
    seen = await _observe(nc, f"{runtime.settings.subject_prefix}.cmd.create")
    retry = RetryPolicy(attempts=10, backoff_s=0.1, max_backoff_s=0.3)  # patient enough for a busy CI machine
    async with AsyncClient(token=token(), timeout=0.5, retry=retry, **client_kwargs(runtime)) as slow_client:
        # Hold the events table: the service's insert blocks until the lock is released.
        with psycopg.connect(runtime.servers.database_url) as conn:
            conn.execute(f"LOCK TABLE {EVENTS_TABLE} IN ACCESS EXCLUSIVE MODE")
            create = asyncio.create_task(slow_client.customer.activities.create(account_id="acc_slow", subject="once"))
            await asyncio.sleep(1.0)
            assert not create.done()
            conn.rollback()  # release the lock: the first attempt and the retries now all reach the store
        activity = await asyncio.wait_for(create, 10)

    assert len(seen) >= 2, "the client should have retried after the first timeout"
    keys = {message.headers["Idempotency-Key"] for message in seen if message.headers}
    assert len(keys) == 1 and len(seen) == len([m for m in seen if m.headers])
    assert activity.version == 1
    assert len(stored_events(runtime)) == before + 1
    assert stored_events(runtime, activity.id) == [(activity_uuid(activity.id), 1)]


async def test_retry_after_a_swallowed_request_logs_one_activity(
    runtime: Runtime, token: Callable[..., str], nc: NatsClient
) -> None:
    """A lost request (nobody replies) is sent again with the same key and logs exactly once."""
    real = runtime.settings.subject_prefix
    front = f"front{real}"
    forwarded: list[str] = []

    async def proxy(message: Msg) -> None:
        headers = dict(message.headers or {})
        forwarded.append(headers.get("Idempotency-Key", ""))
        if len(forwarded) == 1:
            # Forward the first attempt but swallow its reply: the service logs it, the client times out.
            await nc.request(message.subject.replace(front, real, 1), message.data, headers=headers, timeout=5)
            return
        reply = await nc.request(message.subject.replace(front, real, 1), message.data, headers=headers, timeout=5)
        await message.respond(reply.data)

    await nc.subscribe(f"{front}.cmd.*", cb=proxy)
    await nc.flush()
    before = len(stored_events(runtime))
    retry = RetryPolicy(attempts=4, backoff_s=0.05)
    async with AsyncClient(
        token=token(), timeout=1.5, retry=retry, **client_kwargs(runtime, subject_prefix=front)
    ) as c:
        activity = await c.customer.activities.create(contact_id="con_1", subject="exactly once")
    assert len(forwarded) >= 2 and len(set(forwarded)) == 1 and forwarded[0] != ""
    assert len(stored_events(runtime)) == before + 1
    assert stored_events(runtime, activity.id) == [(activity_uuid(activity.id), 1)]


# ---------------------------------------------------------------------------------------------
# Subscriptions (the relay publishes the stored events to JetStream)
# ---------------------------------------------------------------------------------------------


async def wait_for_stream(runtime: Runtime, nc: NatsClient) -> None:
    """The relay creates the stream shortly after the service starts."""
    js = nc.jetstream()
    for _ in range(100):
        try:
            await js.stream_info(runtime.settings.stream_name)
            return
        except nats.js.errors.NotFoundError:
            await asyncio.sleep(0.05)
    raise AssertionError("the relay did not create the stream")


async def four_events(client: AsyncClient) -> Activity:
    """Log, patch, delete and restore one activity; return it as restored."""
    activities = client.customer.activities
    created = await activities.create(account_id="acc_sub", subject="subscribed")
    await activities.patch(created.id, {"status": "done", "tags": ["a"]})
    await activities.delete(created.id)
    return await activities.restore(created.id)


async def collect(events: AsyncIterator[Event], activity_id: str, count: int) -> list[Event]:
    mine: list[Event] = []
    async for event in events:
        if event.activity_id == activity_id:
            mine.append(event)
            if len(mine) == count:
                break
    return mine


async def test_subscriber_receives_the_four_events_in_order(
    client: AsyncClient, runtime: Runtime, token: Callable[..., str], nc: NatsClient
) -> None:
    await wait_for_stream(runtime, nc)
    async with client.customer.activities.subscribe(start="new", idle_timeout=15) as events:
        async with AsyncClient(token=token(tenant="globex"), **client_kwargs(runtime)) as other:
            foreign = await other.customer.activities.create(account_id="acc_sub")
        restored = await four_events(client)
        received: list[Event] = []
        async for event in events:
            received.append(event)
            if event.activity_id == restored.id and event.version == 4:
                break

    assert foreign.id not in {event.activity_id for event in received}, "another tenant's event leaked"
    mine = [event for event in received if event.activity_id == restored.id]
    assert [event.event_type for event in mine] == [
        "ActivityLogged",
        "ActivityPatched",
        "ActivityDeleted",
        "ActivityRestored",
    ]
    assert [event.kind for event in mine] == ["logged", "patched", "deleted", "restored"]
    assert [event.version for event in mine] == [1, 2, 3, 4]
    assert all(event.tenant_id == "acme" and event.actor == "usr-1" for event in mine)
    # a completing status sets completed_at to the event's time, and the changes say so (section 9)
    assert mine[1].changes == {"status": "done", "tags": ["a"], "completed_at": format_datetime(mine[1].occurred_at)}
    assert mine[2].activity.is_deleted and not mine[3].activity.is_deleted
    assert mine[3].activity == restored
    positions = [event.position for event in mine]
    sequences = [event.stream_sequence or 0 for event in mine]
    assert positions == sorted(positions) and sequences == sorted(sequences) and sequences[0] > 0


async def test_subscribe_from_all_sequence_and_time(client: AsyncClient, runtime: Runtime, nc: NatsClient) -> None:
    await wait_for_stream(runtime, nc)
    activities = client.customer.activities
    restored = await four_events(client)

    async with activities.subscribe(start="all", idle_timeout=10) as events:
        from_start = await collect(events, restored.id, 4)
    assert [event.version for event in from_start] == [1, 2, 3, 4]

    third = from_start[2].stream_sequence
    assert third is not None
    async with activities.subscribe(start=third, idle_timeout=10) as events:
        first_seen = await anext(aiter(events))
    assert (first_seen.activity_id, first_seen.version) == (restored.id, 3)

    await asyncio.sleep(0.05)
    since = datetime.now(UTC)
    later = await activities.patch(restored.id, {"subject": "after the mark"})
    async with activities.subscribe(start=since - timedelta(milliseconds=10), idle_timeout=10) as events:
        first_after = await anext(aiter(events))
    assert (first_after.activity_id, first_after.version) == (later.id, 5)

    with pytest.raises(ValueError):
        activities.subscribe(start=datetime(2026, 1, 1))._config()
    with pytest.raises(ValueError):
        activities.subscribe(durable="has.dot")


async def test_durable_subscription_resumes_after_the_last_processed_event(
    client: AsyncClient, runtime: Runtime, nc: NatsClient
) -> None:
    await wait_for_stream(runtime, nc)
    activities = client.customer.activities
    restored = await four_events(client)

    async with activities.subscribe(start="all", durable="client-test-durable", idle_timeout=10) as events:
        first_two = await collect(events, restored.id, 2)  # the second is acked on close: it was processed
    assert [event.version for event in first_two] == [1, 2]

    async with activities.subscribe(start="all", durable="client-test-durable", idle_timeout=10) as events:
        rest = await collect(events, restored.id, 2)
    assert [event.version for event in rest] == [3, 4]

    # An event whose processing failed is not acked: it comes again.
    with pytest.raises(RuntimeError):
        async with activities.subscribe(durable="client-test-failing", start="all", idle_timeout=10) as events:
            async for event in events:
                if event.activity_id == restored.id:
                    raise RuntimeError("processing failed")
    info = await nc.jetstream().consumer_info(runtime.settings.stream_name, "client-test-failing")
    assert info.ack_floor.stream_seq == 0  # nothing acked
    async with activities.subscribe(durable="client-test-failing", idle_timeout=1) as events:
        again = await collect(events, restored.id, 4)
    assert [event.version for event in again] == [1, 2, 3, 4]


async def test_unacked_subscription_and_stream_missing(
    runtime: Runtime, token: Callable[..., str], nc: NatsClient
) -> None:
    await wait_for_stream(runtime, nc)
    async with AsyncClient(token=token(), **client_kwargs(runtime)) as c:
        restored = await four_events(c)
        async with c.customer.activities.subscribe(start="all", ack=False, idle_timeout=10) as events:
            assert [e.version for e in await collect(events, restored.id, 4)] == [1, 2, 3, 4]
    async with AsyncClient(token=token(), **client_kwargs(runtime, stream_name="NO_SUCH_STREAM")) as c:
        with pytest.raises(Unavailable):
            await c.customer.activities.subscribe().open()


async def test_idle_timeout_ends_the_iteration(client: AsyncClient, runtime: Runtime, nc: NatsClient) -> None:
    await wait_for_stream(runtime, nc)
    started = time.monotonic()
    async with client.customer.activities.subscribe(start="new", idle_timeout=0.5) as events:
        received = [event async for event in events]
    assert received == [] and 0.4 < time.monotonic() - started < 5


# ---------------------------------------------------------------------------------------------
# Reads: over NATS and over HTTP, read-your-writes, cursors, history
# ---------------------------------------------------------------------------------------------


@pytest.fixture(params=["nats", "http"])
def reads_over(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def read_kwargs(runtime: Runtime, reads_over: str) -> dict[str, Any]:
    http_url = runtime.endpoints.get("http_url") if reads_over == "http" else None
    if reads_over == "http":
        assert http_url, "the runtime serves HTTP"
    return client_kwargs(runtime, http_url=http_url)


async def test_get_reads_its_own_writes(
    runtime: Runtime, token: Callable[..., str], reads_over: str, nc: NatsClient
) -> None:
    queries = await _observe(nc, f"{runtime.settings.subject_prefix}.query.get")
    async with AsyncClient(token=token(), **read_kwargs(runtime, reads_over)) as c:
        activities = c.customer.activities
        created = await activities.create(account_id="acc_get", subject="v1")
        assert (await activities.get(created.id)) == created  # no sleep: min_position makes it wait
        if reads_over == "nats":
            await nc.flush()
            assert orjson.loads(queries[-1].data) == {
                "id": created.id,
                "include_deleted": False,
                "min_position": c.position,
            }
        patched = await activities.patch(created.id, {"subject": "v2"})
        current = await activities.get(created.id)
        assert current.subject == "v2" and current == patched
        old = await activities.get(created.id, version=1)
        assert (old.version, old.subject) == (1, "v1")

        await activities.delete(created.id)
        with pytest.raises(Gone):
            await activities.get(created.id)
        deleted = await activities.get(created.id, include_deleted=True)
        assert deleted.is_deleted and deleted.version == 3
        with pytest.raises(NotFound):
            await activities.get("act_01ARZ3NDEKTSV4RRFFQ69G5FAV")

    async with AsyncClient(token=token(tenant="globex"), **read_kwargs(runtime, reads_over)) as other:
        with pytest.raises(NotFound):
            await other.customer.activities.get(created.id, include_deleted=True)


async def test_list_filters_pages_and_iterate(runtime: Runtime, token: Callable[..., str], reads_over: str) -> None:
    tenant = f"list{reads_over}"
    async with AsyncClient(token=token(tenant=tenant), **read_kwargs(runtime, reads_over)) as c:
        activities = c.customer.activities
        created = [
            await activities.create(
                account_id="acc_list",
                type="call" if i % 2 else "email",
                tags=["x", f"n{i}"],
                activity_date=datetime(2026, 2, 1 + i, tzinfo=UTC),
            )
            for i in range(7)
        ]
        await activities.create(deal_id="deal_other", type="call")
        await activities.delete(created[0].id)

        page = await activities.list(account_id="acc_list", limit=2)
        assert [a.id for a in page.data] == [created[6].id, created[5].id]  # default sort: -activity_date
        assert page.next_cursor and page.position is not None and page.position >= c.position

        every = [a.id async for a in activities.iterate(account_id="acc_list", limit=2)]
        assert every == [a.id for a in reversed(created[1:])]  # each exactly once, the deleted one left out

        with_deleted = [a.id async for a in activities.iterate(account_id="acc_list", include_deleted=True, limit=3)]
        assert len(with_deleted) == 7 and len(set(with_deleted)) == 7

        calls = await activities.list(account_id="acc_list", type=["call"], sort="activity_date")
        assert [a.id for a in calls.data] == [created[i].id for i in (1, 3, 5)] and calls.next_cursor is None

        tagged = await activities.list(tag=["x", "n4"])
        assert [a.id for a in tagged.data] == [created[4].id]

        window = await activities.list(
            account_id="acc_list",
            activity_date_from=datetime(2026, 2, 3, tzinfo=UTC),
            activity_date_to=datetime(2026, 2, 4, tzinfo=UTC),
        )
        assert {a.id for a in window.data} == {created[2].id, created[3].id}

        with pytest.raises(ValidationError) as invalid:
            await activities.list(colour="red")
        assert invalid.value.details[0]["field"] == "colour"


async def test_history(runtime: Runtime, token: Callable[..., str]) -> None:
    http_url = runtime.endpoints.get("http_url")
    async with AsyncClient(token=token(), **client_kwargs(runtime, http_url=http_url)) as c:
        restored = await four_events(c)
        history = await c.customer.activities.history(restored.id)
        assert [event.event_type for event in history] == [
            "ActivityLogged",
            "ActivityPatched",
            "ActivityDeleted",
            "ActivityRestored",
        ]
        assert all(isinstance(event, Event) for event in history)
        assert history[-1].activity == restored and history[1].changes == {
            "status": "done",
            "tags": ["a"],
            "completed_at": format_datetime(history[1].occurred_at),
        }
        with pytest.raises(NotFound):
            await c.customer.activities.history("act_01ARZ3NDEKTSV4RRFFQ69G5FAV")

    async with AsyncClient(token=token(), **client_kwargs(runtime)) as no_http:
        with pytest.raises(HistoryUnavailable):
            await no_http.customer.activities.history(restored.id)


# ---------------------------------------------------------------------------------------------
# The blocking client (it runs the async one on a background loop; the service runs on this one)
# ---------------------------------------------------------------------------------------------


def blocking_scenario(kwargs: dict[str, Any], bearer: str, other_bearer: str) -> dict[str, Any]:
    """Every method of the blocking client, in a plain thread as a synchronous program would call it."""
    results: dict[str, Any] = {}
    with Client(token=bearer, **kwargs) as c:
        activities = c.customer.activities
        tail = activities.subscribe(start="new", idle_timeout=15)
        created = activities.create(contact_id="con_sync", type="meeting", subject="blocking")
        patched = activities.patch(created.id, {"status": "held"}, expected_version=1)
        deleted = activities.delete(created.id, expected_version=2)
        restored = activities.restore(created.id, expected_version=3)
        results["versions"] = [created.version, patched.version, deleted.version, restored.version]
        results["get"] = activities.get(created.id)
        results["get_v2"] = activities.get(created.id, version=2)
        results["page"] = activities.list(contact_id="con_sync")
        extra = [activities.create(contact_id="con_sync", subject=f"more {i}") for i in range(3)]
        results["iterated"] = [a.id for a in activities.iterate(contact_id="con_sync", limit=2)]
        results["expected_ids"] = {created.id, *(a.id for a in extra)}
        results["history"] = [e.kind for e in activities.history(created.id)]
        results["events"] = []
        for event in tail:
            if event.activity_id == created.id:
                results["events"].append((event.kind, event.version))
                if event.version == 4:
                    break
        try:
            activities.patch(created.id, {"status": "x"}, expected_version=1)
        except VersionConflict as conflict:
            results["conflict"] = conflict.current_version
        results["position"] = c.position
        results["id"] = created.id
    with Client(token=other_bearer, **kwargs) as other:
        try:
            other.customer.activities.get(results["id"])
        except NotFound:
            results["other_tenant"] = "not_found"
    return results


async def test_blocking_client_covers_every_method(runtime: Runtime, token: Callable[..., str], nc: NatsClient) -> None:
    await wait_for_stream(runtime, nc)
    kwargs = client_kwargs(runtime, http_url=runtime.endpoints.get("http_url"))
    results = await asyncio.to_thread(blocking_scenario, kwargs, token(tenant="sync"), token(tenant="other"))
    assert results["versions"] == [1, 2, 3, 4]
    assert results["get"].version == 4 and results["get"].status == "held"
    assert results["get_v2"].version == 2 and results["get_v2"].status == "held"
    assert [a.id for a in results["page"].data] == [results["id"]]
    assert len(results["iterated"]) == 4 and set(results["iterated"]) == results["expected_ids"]
    assert results["history"] == ["logged", "patched", "deleted", "restored"]
    assert results["events"] == [("logged", 1), ("patched", 2), ("deleted", 3), ("restored", 4)]
    assert results["conflict"] == 4
    assert results["position"] > 0
    assert results["other_tenant"] == "not_found"
    assert not [t for t in threading.enumerate() if t.name == "activities-client"], "background loops are stopped"


async def test_blocking_client_requires_with(runtime: Runtime, token: Callable[..., str]) -> None:
    client = Client(token=token(), **client_kwargs(runtime))
    with pytest.raises(RuntimeError):
        client.customer.activities.create(account_id="acc_1")


# ---------------------------------------------------------------------------------------------
# The command-line helpers (they find the service through <data dir>/endpoints.json)
# ---------------------------------------------------------------------------------------------


async def test_cli_create_get_list_history_tail(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], nc: NatsClient
) -> None:
    from services.cli import main
    from tests.conftest import JWT_SECRET

    await wait_for_stream(runtime, nc)
    settings = runtime.settings
    for name, value in {
        "ACTIVITIES_DATA_DIR": str(settings.data_dir),
        "ACTIVITIES_SUBJECT_PREFIX": settings.subject_prefix,
        "ACTIVITIES_STREAM_NAME": settings.stream_name,
        "ACTIVITIES_JWT_SECRET": JWT_SECRET,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ACTIVITIES_TOKEN", raising=False)
    monkeypatch.delenv("ACTIVITIES_NATS_URL", raising=False)

    async def run(*argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, _ = await run(
        "create", "--tenant", "clitenant", "-f", "account_id=acc_cli", "-f", "type=call",
        "-f", "subject=Intro call", "-f", 'tags=["vip","q1"]', "-f", "activity_date=2026-03-01T10:00:00Z",
    )  # fmt: skip
    assert code == 0, out
    rows = dict(line.split(None, 1) for line in out.splitlines()[2:])
    activity_id = rows["id"]
    assert rows["subject"].strip() == "Intro call" and rows["version"].strip() == "1"
    assert rows["tags"].strip() == '["vip", "q1"]'

    code, out, _ = await run("get", activity_id, "--tenant", "clitenant", "--json")
    assert code == 0 and json_of(out)["tags"] == ["vip", "q1"]

    code, out, _ = await run("list", "--tenant", "clitenant", "--account-id", "acc_cli")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["ID", "TYPE", "SUBJECT"]
    assert lines[2].startswith(activity_id) and "account:acc_cli" in lines[2] and lines[-1] == "1 activity"

    code, out, err = await run("create", "--tenant", "clitenant", "-f", "account_id=acc_cli", "-f", "type=fax")
    assert code == 1 and "validation_error" in err and "type:" in err
    assert len(err.strip().splitlines()) == 1, err  # the error once, its one detail not repeated

    code, out, err = await run("get", activity_id, "--tenant", "someone-else")
    assert code == 1 and "not_found" in err

    code, out, _ = await run("history", activity_id, "--tenant", "clitenant")
    assert code == 0 and "logged" in out.splitlines()[2]

    code, out, _ = await run("tail", "--tenant", "clitenant", "--from", "all", "--count", "1", "--idle", "10")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["SEQ", "OCCURRED_AT", "EVENT"]
    assert "logged" in lines[1] and activity_id in lines[1]

    def read_nothing() -> tuple[int, bytes]:  # `activities list | head -0`: the reader goes away at once
        reader = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "get", activity_id, "--tenant", "clitenant"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert reader.stdout is not None
        reader.stdout.close()
        _, err = reader.communicate(timeout=60)
        return reader.returncode, err

    code, err_bytes = await asyncio.to_thread(read_nothing)
    assert code == 141 and b"Traceback" not in err_bytes and b"BrokenPipe" not in err_bytes, err_bytes

    monkeypatch.delenv("ACTIVITIES_JWT_SECRET")
    code, out, err = await run("list", "--tenant", "clitenant")
    assert code == 2 and "no token" in err


def json_of(text: str) -> dict[str, Any]:
    loaded = orjson.loads(text)
    assert isinstance(loaded, dict)
    return loaded
