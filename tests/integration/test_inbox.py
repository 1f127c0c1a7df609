"""The durable asynchronous inbox (docs/contract.md section 10) over real NATS/JetStream and PostgreSQL:
results, dead letters, order with two inbox instances, commands published while the service is
down, a command that keeps failing (the event store locked) reaching the DLQ and its redrive."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import orjson
import psycopg
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import RetentionPolicy, StorageType

from activities_client import Activity, AsyncClient, Client, NotFound, ValidationError
from events.commands import COMMANDS
from services.asyncapi import _ref_name, asyncapi_document
from services.bootstrap import Runtime, inbox_streams
from services.config import Settings
from services.embedded import EmbeddedNats
from services.inbox import dlq_drop, dlq_list, dlq_redrive
from tests.e2e.processes import ACTIVITIES, settings_env


async def publish(
    nc: NatsClient,
    settings: Settings,
    op: str,
    body: Any,
    bearer: str | None,
    key: str | None,
    raw: bytes | None = None,
) -> None:
    headers: dict[str, str] = {}
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    if key is not None:
        headers["Idempotency-Key"] = key
        headers["Nats-Msg-Id"] = key
    payload = raw if raw is not None else orjson.dumps(body)
    await nc.jetstream().publish(f"{settings.subject_prefix}.inbox.{op}", payload, headers=headers)


async def collect(nc: NatsClient, subject: str, count: int, timeout: float = 20.0) -> list[Msg]:
    """The first `count` messages of a stream subject (from the start), waiting up to `timeout`."""
    subscription = await nc.jetstream().subscribe(subject, ordered_consumer=True)
    found: list[Msg] = []
    deadline = time.monotonic() + timeout
    try:
        while len(found) < count and time.monotonic() < deadline:
            try:
                found.append(await subscription.next_msg(timeout=max(0.05, deadline - time.monotonic())))
            except nats.errors.TimeoutError:
                break
    finally:
        await subscription.unsubscribe()
    return found


async def stream_messages(nc: NatsClient, stream: str) -> int:
    return int((await nc.jetstream().stream_info(stream)).state.messages)


def events_of(database_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return list(conn.execute("SELECT originator_id, originator_version FROM activities_events").fetchall())


@pytest_asyncio.fixture
async def inbox_runtime(make_settings: Callable[..., Settings]) -> AsyncIterator[Runtime]:
    runtime = Runtime(make_settings(inbox_max_deliver=3, inbox_backoff_s=0.05, request_timeout_s=1.0))
    await runtime.start()
    yield runtime
    await runtime.stop()


async def until(condition: Callable[[], Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_streams_results_and_dead_letters(
    inbox_runtime: Runtime, nc: NatsClient, token: Callable[..., str]
) -> None:
    settings = inbox_runtime.settings
    streams = inbox_streams(settings)
    js = nc.jetstream()
    inbox = await js.stream_info(streams.inbox)
    assert inbox.config.retention == RetentionPolicy.WORK_QUEUE and inbox.config.storage == StorageType.FILE
    assert inbox.config.subjects == [f"{settings.subject_prefix}.inbox.>"]
    results = await js.stream_info(streams.results)
    assert results.config.max_age == 7 * 24 * 3600 and results.config.storage == StorageType.FILE
    assert streams.inbox == f"{settings.stream_name}_COMMANDS"

    await publish(nc, settings, "create", {"account_id": "acc_1", "subject": "hi"}, token(), "k-create")
    await publish(nc, settings, "create", {"account_id": "acc_1", "nope": 1}, token(), "k-invalid")
    await publish(nc, settings, "patch", {"id": "act_01HZZZZZZZZZZZZZZZZZZZZZZZ", "changes": {}}, token(), "k-missing")
    await publish(nc, settings, "frobnicate", {}, token(), "k-unknown-op")
    await publish(nc, settings, "create", {"account_id": "acc_1"}, token(), None)  # no key: DLQ
    await publish(nc, settings, "create", {"account_id": "acc_1"}, None, "k-no-token")  # DLQ
    await publish(nc, settings, "create", {"account_id": "acc_1"}, "not-a-jwt", "k-bad-token")  # DLQ

    messages = await collect(nc, f"{settings.subject_prefix}.results.acme", 4)
    by_key = {m.headers["Idempotency-Key"]: m for m in messages if m.headers}
    assert set(by_key) == {"k-create", "k-invalid", "k-missing", "k-unknown-op"}
    created = orjson.loads(by_key["k-create"].data)
    assert by_key["k-create"].headers is not None and by_key["k-create"].headers["Op"] == "create"
    assert created["data"]["subject"] == "hi" and created["data"]["version"] == 1
    assert created["meta"]["position"] >= 1
    assert orjson.loads(by_key["k-invalid"].data)["error"]["code"] == "validation_error"
    assert orjson.loads(by_key["k-missing"].data)["error"]["code"] == "not_found"
    unknown = orjson.loads(by_key["k-unknown-op"].data)["error"]
    assert unknown["code"] == "validation_error" and "frobnicate" in unknown["message"]

    await until(lambda: stream_messages(nc, streams.dlq), timeout=10)
    await until(lambda: _equals(stream_messages(nc, streams.dlq), 3))
    letters = await dlq_list(js, streams)
    codes = {(letter.idempotency_key, letter.error["error"]["code"]) for letter in letters}
    assert codes == {(None, "validation_error"), ("k-no-token", "unauthorized"), ("k-bad-token", "unauthorized")}
    assert all(letter.op == "create" and letter.tries == 0 for letter in letters)
    # errors are results, not retries; the inbox is empty (work queue: acked commands are gone)
    assert inbox_runtime.inbox is not None and inbox_runtime.inbox.stats.retries == 0
    await until(lambda: _equals(stream_messages(nc, streams.inbox), 0))
    assert len(events_of(settings.database_url or "")) == 1
    assert await stream_messages(nc, streams.results) == 4

    assert await dlq_drop(js, streams, [letters[0].seq]) == [letters[0].seq]
    assert len(await dlq_list(js, streams)) == 2


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_client_enqueue_and_results(inbox_runtime: Runtime, token: Callable[..., str]) -> None:
    settings = inbox_runtime.settings
    assert settings.nats_url is not None
    async with AsyncClient(nats_url=settings.nats_url, token=token(), subject_prefix=settings.subject_prefix) as client:
        activities = client.customer.activities
        results = activities.results(start="all", idle_timeout=10)
        key, ack = await activities.enqueue("create", {"account_id": "acc_9", "subject": "queued"})
        assert ack.stream == f"{settings.stream_name}_COMMANDS" and ack.seq >= 1 and not ack.duplicate
        again = await activities.enqueue("create", {"account_id": "acc_9", "subject": "queued"}, key)
        assert again.ack.duplicate  # the key is the Nats-Msg-Id: stored once
        await activities.enqueue("patch", {"id": "act_01HZZZZZZZZZZZZZZZZZZZZZZZ", "changes": {}}, "p-1")
        seen = []
        async with results:
            async for result in results:
                seen.append(result)
                if len(seen) == 2:
                    break
        assert [r.idempotency_key for r in seen] == [key, "p-1"]
        assert isinstance(seen[0].activity, Activity) and seen[0].activity.subject == "queued"
        assert seen[0].op == "create" and seen[0].ok and seen[0].outcome() == seen[0].activity
        assert isinstance(seen[1].error, NotFound) and seen[1].op == "patch"
        with pytest.raises(NotFound):
            seen[1].outcome()
        with pytest.raises(ValueError):
            await activities.enqueue("a.b", {})

    def blocking() -> None:  # in a thread: the service runs on this test's event loop
        assert settings.nats_url is not None
        with Client(nats_url=settings.nats_url, token=token(), subject_prefix=settings.subject_prefix) as client:
            enqueued = client.customer.activities.enqueue("create", {"subject": "no link"})
            for result in client.customer.activities.results(start="all", idle_timeout=10):
                if result.idempotency_key == enqueued.idempotency_key:
                    assert isinstance(result.error, ValidationError)
                    return
            raise AssertionError("no result for the blocking client's command")

    await asyncio.to_thread(blocking)


async def test_commands_published_while_down_run_at_start(
    make_settings: Callable[..., Settings], nc: NatsClient, token: Callable[..., str]
) -> None:
    settings = make_settings()
    first = Runtime(settings)
    await first.start()  # creates the streams, as any earlier run of the service did
    await first.stop()
    for i in range(20):
        await publish(nc, settings, "create", {"account_id": f"acc_{i}"}, token(), f"down-{i}")
    assert await stream_messages(nc, inbox_streams(settings).inbox) == 20
    second = Runtime(settings, ("commands", "inbox"))
    await second.start()
    try:
        messages = await collect(nc, f"{settings.subject_prefix}.results.acme", 20)
        assert sorted(m.headers["Idempotency-Key"] for m in messages if m.headers) == sorted(
            f"down-{i}" for i in range(20)
        )
        assert all("data" in orjson.loads(m.data) for m in messages)
        assert len(events_of(settings.database_url or "")) == 20
    finally:
        await second.stop()


async def test_patches_keep_their_order_with_two_inbox_instances(
    make_settings: Callable[..., Settings], nc: NatsClient, token: Callable[..., str]
) -> None:
    settings = make_settings()
    one = Runtime(settings.model_copy(update={"data_dir": settings.data_dir / "one"}), ("commands", "inbox"))
    two = Runtime(settings.model_copy(update={"data_dir": settings.data_dir / "two"}), ("commands", "inbox"))
    await one.start()
    await two.start()
    running = [one, two]
    try:
        created = await _create(nc, settings, token())
        await until(lambda: _any_active(one, two))
        for n in range(20):
            body = {"id": created, "changes": {"subject": f"patch {n}", "custom_fields": {"n": n}}}
            await publish(nc, settings, "patch", body, token(), f"order-{n}")
            if n == 9:  # the active instance goes away mid-stream: the standby takes over
                active = one if one.inbox is not None and one.inbox.active else two
                running.remove(active)
                await active.stop()
        messages = await collect(nc, f"{settings.subject_prefix}.results.acme", 21, timeout=30)
        patched = [orjson.loads(m.data) for m in messages if m.headers and m.headers["Op"] == "patch"]
        assert len(patched) == 20
        by_version = {r["data"]["version"]: r["data"]["custom_fields"]["n"] for r in patched}
        assert by_version == {n + 2: n for n in range(20)}  # versions 2..21 carry patches 0..19 in order
    finally:
        for runtime in running:
            await runtime.stop()


async def test_nats_restarted_while_the_inbox_works_leaves_each_command_one_result(
    own_nats: EmbeddedNats, make_settings: Callable[..., Settings], token: Callable[..., str]
) -> None:
    """NATS stopped while the inbox carries out 600 creates, and started again: its pull request,
    result publishes and acks in flight are lost; each command is still carried out once, with one
    result (a redelivered command replays its reply under the same result id)."""
    assert own_nats.url is not None
    settings = make_settings(nats_url=own_nats.url, inbox_concurrency=16, batch_max_size=8)
    runtime = Runtime(settings, ("commands", "inbox"))
    await runtime.start()
    client = await nats.connect(own_nats.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    count = 600
    try:
        await until(lambda: _any_active(runtime))
        for start in range(0, count, 100):
            await asyncio.gather(*(
                publish(client, settings, "create", {"account_id": f"acc_{i}"}, token(), f"restart-{i}")
                for i in range(start, start + 100)
            ))
        inbox = runtime.inbox
        assert inbox is not None

        async def some_results() -> bool:
            return inbox.stats.results >= 50

        await until(some_results)
        await asyncio.to_thread(own_nats.stop)
        assert inbox.stats.results < count, "the inbox finished before NATS stopped: nothing was tested"
        await asyncio.sleep(1.5)
        await asyncio.to_thread(own_nats.start)
        messages = await collect(client, f"{settings.subject_prefix}.results.acme", count, timeout=60)
        keys = [m.headers["Idempotency-Key"] for m in messages if m.headers]
        assert sorted(keys) == sorted(f"restart-{i}" for i in range(count))  # each one result
        await asyncio.sleep(1.0)  # a command whose ack was lost comes back after its ack wait (30 s): its
        # result is then published under the same id, which the results stream drops
        assert await stream_messages(client, inbox_streams(settings).results) == count  # none twice
        assert all("data" in orjson.loads(m.data) for m in messages)
        assert len(events_of(settings.database_url or "")) == count  # each carried out once
    finally:
        await client.close()
        await runtime.stop()


async def _any_active(*runtimes: Runtime) -> bool:
    return any(r.inbox is not None and r.inbox.active for r in runtimes)


async def _create(nc: NatsClient, settings: Settings, bearer: str) -> str:
    await publish(nc, settings, "create", {"account_id": "acc_order"}, bearer, "order-create")
    [message] = await collect(nc, f"{settings.subject_prefix}.results.acme", 1)
    return str(orjson.loads(message.data)["data"]["id"])


async def test_a_command_that_keeps_failing_reaches_the_dlq_and_redrive_carries_it_out(
    inbox_runtime: Runtime, nc: NatsClient, token: Callable[..., str]
) -> None:
    """The event store locked longer than the command deadline: every try is `unavailable`; after
    max_deliver (3) tries the command is dead-lettered; once the store is free, redrive runs it."""
    settings = inbox_runtime.settings
    assert settings.database_url is not None
    streams = inbox_streams(settings)
    js = nc.jetstream()
    key = f"poison-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(settings.database_url) as blocker:
        blocker.execute("LOCK TABLE activities_events IN ACCESS EXCLUSIVE MODE")  # held until the with ends
        await publish(nc, settings, "create", {"account_id": "acc_poison"}, token(), key)
        await until(lambda: _equals(stream_messages(nc, streams.dlq), 1), timeout=30)
        blocker.rollback()
    [letter] = await dlq_list(js, streams)
    assert letter.idempotency_key == key and letter.tries == 3
    assert letter.error["error"]["code"] == "unavailable"
    assert inbox_runtime.inbox is not None and inbox_runtime.inbox.stats.retries == 2
    assert await stream_messages(nc, streams.results) == 0  # a dead letter has no result

    assert await dlq_redrive(js, streams) == [letter.seq]
    [message] = await collect(nc, f"{settings.subject_prefix}.results.acme", 1)
    assert message.headers is not None and message.headers["Idempotency-Key"] == key
    assert orjson.loads(message.data)["data"]["account_id"] == "acc_poison"
    assert await dlq_list(js, streams) == []
    assert len(events_of(settings.database_url)) == 1  # exactly once, whatever the first tries left behind


async def activities_cli(settings: Settings, *argv: str) -> tuple[int, str, str]:
    """Run the `activities` console script (a real process) against the in-process service."""
    process = await asyncio.create_subprocess_exec(
        ACTIVITIES, *argv, env=settings_env(settings), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return int(process.returncode or 0), out.decode(), err.decode()


async def test_cli_enqueue_results_and_dlq(inbox_runtime: Runtime, nc: NatsClient, token: Callable[..., str]) -> None:
    settings = inbox_runtime.settings
    code, out, err = await activities_cli(
        settings, "enqueue", "create", "-f", "account_id=acc_cli", "-f", "subject=from the cli",
        "--key", "cli-1", "--tenant", "acme", "--json",
    )
    assert code == 0, err
    assert json.loads(out)["idempotency_key"] == "cli-1"
    code, out, err = await activities_cli(
        settings, "results", "--from", "all", "--count", "1", "--idle", "20", "--tenant", "acme", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["idempotency_key"] == "cli-1" and result["op"] == "create"
    assert result["data"]["subject"] == "from the cli"

    await publish(nc, settings, "patch", {"id": "x"}, token(), None)  # no key: dead-lettered
    streams = inbox_streams(settings)
    await until(lambda: _equals(stream_messages(nc, streams.dlq), 1))
    code, out, err = await activities_cli(settings, "inbox", "dlq", "list", "--json")
    assert code == 0, err
    [letter] = json.loads(out)
    assert letter["op"] == "patch" and letter["code"] == "validation_error" and "Idempotency-Key" in letter["message"]
    code, out, err = await activities_cli(settings, "inbox", "dlq", "drop")
    assert code != 0 and "--all" in err  # nothing named: nothing dropped
    code, out, err = await activities_cli(settings, "inbox", "dlq", "drop", str(letter["seq"]))
    assert code == 0 and "1 command(s) dropped" in out, err
    assert await dlq_list(nc.jetstream(), streams) == []


def test_the_asyncapi_document_shows_the_inbox_results_and_dlq() -> None:
    document = asyncapi_document("acme.activities")
    channels = document["channels"]
    for name in COMMANDS:
        assert f"acme.activities.inbox.{name}" in channels and f"acme.activities.dlq.{name}" in channels
    results = channels["acme.activities.results.{tenant_id}"]
    assert "tenant_id" in results["parameters"]
    [message] = results["messages"].values()
    headers = document["components"]["messages"][_ref_name(message)]["headers"]
    assert set(headers["required"]) == {"Idempotency-Key", "Op", "Nats-Msg-Id"}
