"""The relay against real PostgreSQL and NATS: every stored event on JetStream, once, in order."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from activities_client.document import CLIENT_FIELDS
from events.commands import DeleteActivity, PatchActivity, RestoreActivity, parse_create
from projections.consumer import TrackedConsumer
from projections.relay import RELAY_SETTINGS, Relay, RelayOptions, RelayStats, relay_stats
from services.application import CommandRequest, CommandResult
from services.auth import mint_token
from services.bootstrap import Runtime, stream_spec
from tests.conftest import JWT_SECRET
from services.config import Settings
from services.domain import Caller
from services.embedded import EmbeddedNats, EmbeddedPostgres
from tests.conftest import JWT_SECRET

CALLER = Caller(tenant_id="acme", sub="usr-1")
FAST = RelayOptions(ack_timeout_s=2.0, nats_reconnect_wait_s=0.2)
FAST_CONSUMER = dataclasses.replace(RELAY_SETTINGS, poll_interval_s=0.2, max_backoff_s=0.5)


class RelayUnderTest:
    """A relay as the service runs it (a handler of a tracked consumer), with the handles tests use."""

    def __init__(self, consumer: TrackedConsumer[Relay]) -> None:
        self.consumer = consumer

    @property
    def store(self) -> Any:
        return self.consumer.handler.store

    @property
    def stats(self) -> RelayStats:
        return relay_stats(self.consumer)

    async def start(self) -> None:
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()


def new_relay(
    runtime: Runtime, nats_url: str | None = None, options: RelayOptions = FAST, **settings: Any
) -> RelayUnderTest:
    assert runtime.app is not None and runtime.servers is not None
    handler = Relay(
        runtime.app, stream_spec(runtime.settings), nats_url or runtime.servers.nats_url, runtime.executor, options
    )
    consumer_settings = dataclasses.replace(FAST_CONSUMER, **settings)
    return RelayUnderTest(
        TrackedConsumer(runtime.app, runtime.servers.database_url, handler, consumer_settings, runtime.executor)
    )


async def published_unrecorded(runtime: Runtime, count: int) -> None:
    """A relay that publishes the log and is gone before it records a position (its records fail):
    what a crash right after a publish leaves."""

    def refuse(position: int) -> None:
        raise ConnectionError("the relay died before recording")

    relay = new_relay(runtime)
    relay.consumer.handler.store.save_position = refuse  # type: ignore[method-assign]
    await relay.start()
    try:
        deadline = time.monotonic() + 10
        while relay.consumer.handler.published < count:
            assert time.monotonic() < deadline, "the relay did not publish"
            await asyncio.sleep(0.02)
    finally:
        await relay.stop()


@dataclass(frozen=True)
class StreamMessage:
    seq: int
    subject: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def ref(self) -> tuple[str, int]:
        return (self.body["activity_id"], self.body["version"])


async def stream_messages(js: JetStreamContext, stream: str) -> list[StreamMessage]:
    """Every message the stream holds, by sequence."""
    info = await js.stream_info(stream)
    messages = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        with contextlib.suppress(NotFoundError):
            raw = await js.get_msg(stream, seq)
            assert raw.data is not None and raw.subject is not None
            messages.append(StreamMessage(seq, raw.subject, dict(raw.headers or {}), orjson.loads(raw.data)))
    return messages


async def wait_for_messages(js: JetStreamContext, stream: str, count: int, timeout_s: float = 30) -> None:
    """Until the stream holds `count` messages; then a moment more, so that extra ones would show."""
    deadline = time.monotonic() + timeout_s
    held = -1
    while time.monotonic() < deadline:
        with contextlib.suppress(NotFoundError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
            held = (await js.stream_info(stream)).state.messages
            if held >= count:
                await asyncio.sleep(0.5)
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"stream {stream} holds {held} messages, expected {count}")


async def logged_refs(runtime: Runtime) -> list[tuple[str, int, int]]:
    """(activity id, version, position) of every stored event, in log order."""
    assert runtime.app is not None
    app = runtime.app

    def read() -> list[tuple[str, int, int]]:
        refs = []
        for notification in app.recorder.select_notifications(1, 100_000):
            event: Any = app.mapper.to_domain_event(notification)
            refs.append((event.document["id"], event.originator_version, notification.id))
        return refs

    return await asyncio.get_running_loop().run_in_executor(None, read)


async def execute(runtime: Runtime, command: Any) -> CommandResult:
    """Append through the group-commit batcher, as the NATS and HTTP adapters do (no NATS involved)."""
    assert runtime.batcher is not None
    outcome = await runtime.batcher.submit(CommandRequest(command, CALLER))
    assert isinstance(outcome, CommandResult), outcome
    return outcome


async def lifecycle(runtime: Runtime, n: int) -> str:
    """Create, patch, delete and restore one activity: versions 1-4."""
    created = await execute(runtime, parse_create({"account_id": f"acc_{n}", "type": "call"}))
    activity_id = created.document["id"]
    await execute(runtime, PatchActivity(activity_id, {"status": f"s{n}"}))
    await execute(runtime, DeleteActivity(activity_id))
    await execute(runtime, RestoreActivity(activity_id))
    return activity_id


def assert_once_in_log_order(messages: list[StreamMessage], log: list[tuple[str, int, int]]) -> None:
    refs = [m.ref for m in messages]
    assert len(refs) == len(set(refs)), "an event is on the stream twice"
    assert refs == [(a, v) for a, v, _ in log], "the stream differs from the log"
    versions: dict[str, list[int]] = defaultdict(list)
    for activity_id, version in refs:
        versions[activity_id].append(version)
    for activity_id, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), f"{activity_id} out of order: {seen}"
    for message in messages:
        assert message.headers["Nats-Msg-Id"] == f"{message.ref[0]}:{message.ref[1]}"


def runtime_relay(runtime: Runtime) -> RelayUnderTest:
    """The relay of a runtime (a tracked consumer running the relay handler)."""
    consumer = next(c for c in runtime.components if isinstance(c, TrackedConsumer) and c.name == RELAY_SETTINGS.name)
    return RelayUnderTest(consumer)


@pytest_asyncio.fixture
async def js(nc: NatsClient) -> JetStreamContext:
    return nc.jetstream()


# ---------------------------------------------------------------------------------------------


async def test_lifecycle_is_published_in_order_with_documents_and_changes(
    request_command: Any, runtime: Runtime, js: JetStreamContext
) -> None:
    created = await request_command("create", {"account_id": "acc_1", "type": "call", "subject": "Intro"})
    activity_id = created["data"]["id"]
    patched = await request_command("patch", {"id": activity_id, "changes": {"status": "done", "tags": ["a"]}})
    deleted = await request_command("delete", {"id": activity_id})
    restored = await request_command("restore", {"id": activity_id})
    replies = [created, patched, deleted, restored]

    stream = runtime.settings.stream_name
    await wait_for_messages(js, stream, 4)
    messages = await stream_messages(js, stream)

    prefix = runtime.settings.subject_prefix
    kinds = ["logged", "patched", "deleted", "restored"]
    types = ["ActivityLogged", "ActivityPatched", "ActivityDeleted", "ActivityRestored"]
    assert [m.subject for m in messages] == [f"{prefix}.events.acme.{kind}" for kind in kinds]
    for version, (message, reply, event_type) in enumerate(zip(messages, replies, types, strict=True), start=1):
        assert message.headers["Nats-Msg-Id"] == f"{activity_id}:{version}"
        assert message.headers["Activity-Id"] == activity_id
        assert message.headers["Activity-Version"] == str(version)
        assert message.headers["Event-Type"] == event_type
        body = message.body
        assert body["event_type"] == event_type and body["schema_version"] == 2
        assert (body["activity_id"], body["tenant_id"], body["app_id"]) == (activity_id, "acme", None)
        assert body["version"] == version and body["activity"]["version"] == version
        assert body["activity"] == reply["data"]  # the whole document after the event
        assert body["position"] == reply["meta"]["position"]
        assert body["actor"] == "usr-1" and body["occurred_at"].endswith("Z")
    logged, patch, delete, restore = (m.body for m in messages)
    assert set(logged["changes"]) == set(CLIENT_FIELDS)
    assert logged["changes"]["account_id"] == "acc_1" and logged["changes"]["subject"] == "Intro"
    assert patch["changes"] == {"status": "done", "tags": ["a"], "completed_at": patch["occurred_at"]}  # section 9
    assert delete["changes"] == {} and delete["activity"]["is_deleted"] is True
    assert restore["changes"] == {} and restore["activity"]["is_deleted"] is False


async def test_stream_has_the_contract_configuration(
    runtime: Runtime, request_command: Any, js: JetStreamContext
) -> None:
    await request_command("create", {"account_id": "acc_1"})
    await wait_for_messages(js, runtime.settings.stream_name, 1)
    config = (await js.stream_info(runtime.settings.stream_name)).config
    assert config.subjects == [f"{runtime.settings.subject_prefix}.events.>"]
    assert config.storage == "file"
    assert config.duplicate_window >= 120
    assert config.retention == runtime.settings.stream_retention


# ---------------------------------------------------------------------------------------------


async def test_nats_outage_loses_repeats_and_reorders_nothing(
    own_nats: EmbeddedNats, make_settings: Callable[..., Settings]
) -> None:
    assert own_nats.url is not None
    url = own_nats.url
    runtime = Runtime(make_settings(nats_url=url))
    await runtime.start()
    relay = runtime_relay(runtime)
    relay.consumer.handler.options = FAST
    relay.consumer.settings = FAST_CONSUMER
    client = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = client.jetstream()
    stream = runtime.settings.stream_name
    appending = True
    appended: list[str] = []

    async def append_continuously() -> None:
        n = 0
        while appending:  # commands keep working whatever NATS does
            appended.append(await lifecycle(runtime, n))
            n += 1

    try:
        await lifecycle(runtime, -1)
        await wait_for_messages(js, stream, 4)
        appender = asyncio.create_task(append_continuously())
        await asyncio.sleep(0.3)
        await asyncio.to_thread(own_nats.stop)  # mid-stream: pages in flight lose their acks
        during = len(appended)
        await asyncio.sleep(2.5)
        assert len(appended) > during + 2, "commands stalled while NATS was down"
        assert relay.stats.failures > 0
        await asyncio.to_thread(own_nats.start)
        assert own_nats.url == url
        await asyncio.sleep(1.0)
        # the service's NATS subscribers came back with the server: a command over NATS is answered
        bearer = {"Authorization": f"Bearer {mint_token(JWT_SECRET, 'acme', 'usr-1')}"}
        reply = await client.request(
            f"{runtime.settings.subject_prefix}.cmd.create", b'{"account_id": "after-outage"}', headers=bearer, timeout=10
        )
        assert orjson.loads(reply.data)["data"]["account_id"] == "after-outage"
        appending = False
        await appender
        log = await logged_refs(runtime)
        await wait_for_messages(js, stream, len(log))
        messages = await stream_messages(js, stream)
        assert_once_in_log_order(messages, log)
        assert len(log) == 4 * (len(appended) + 1) + 1
    finally:
        appending = False
        await client.close()
        await runtime.stop()


async def test_nats_killed_mid_page_keeps_the_stream_a_gapless_copy_of_the_log(
    own_nats: EmbeddedNats, make_settings: Callable[..., Settings]
) -> None:
    """Acks lost in the middle of a page: only the acknowledged prefix counts, nothing is reordered."""
    assert own_nats.url is not None and own_nats.pid is not None
    runtime = Runtime(make_settings(nats_url=own_nats.url), roles=("commands",))
    await runtime.start()
    assert runtime.servers is not None and runtime.app is not None
    client = await nats.connect(own_nats.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = client.jetstream()
    options = RelayOptions(ack_timeout_s=2.0)
    relay = new_relay(runtime, own_nats.url, options, page_size=5000)
    try:
        created = await asyncio.gather(
            *(execute(runtime, parse_create({"account_id": f"acc_{n}", "custom_fields": {"pad": "x" * 2000}}))
              for n in range(1500))
        )  # fmt: skip
        await asyncio.gather(*(execute(runtime, PatchActivity(c.document["id"], {"status": "done"})) for c in created))
        log = await logged_refs(runtime)
        await relay.start()
        stream = runtime.settings.stream_name
        held = 0
        while held < 100:
            with contextlib.suppress(NotFoundError, nats.errors.TimeoutError):
                held = (await js.stream_info(stream)).state.messages
            await asyncio.sleep(0.005)
        os.kill(own_nats.pid, signal.SIGKILL)  # while most of the page is still in flight
        await asyncio.to_thread(own_nats.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(own_nats.start)
        await wait_for_messages(js, stream, len(log), timeout_s=60)
        messages = await stream_messages(js, stream)
        assert_once_in_log_order(messages, log)
        assert relay.stats.failures > 0 and held < len(log)
    finally:
        await relay.stop()
        await client.close()
        await runtime.stop()


async def test_relay_killed_before_recording_resumes_after_the_streams_last_message(
    make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    runtime = Runtime(make_settings(), roles=("commands",))  # no relay of its own: the test runs them
    await runtime.start()
    assert runtime.servers is not None and runtime.app is not None
    first: RelayUnderTest | None = None
    second: RelayUnderTest | None = None
    try:
        for n in range(5):
            await lifecycle(runtime, n)
        first = new_relay(runtime)
        await published_unrecorded(runtime, 20)  # published and acknowledged, then gone before recording
        assert await asyncio.to_thread(first.store.load_position) == 0

        await lifecycle(runtime, 5)
        second = new_relay(runtime)
        await second.start()
        log = await logged_refs(runtime)
        await wait_for_messages(js, runtime.settings.stream_name, len(log))
        deadline = time.monotonic() + 10
        while second.stats.position < log[-1][2] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

        assert second.stats.position == log[-1][2]
        assert second.stats.duplicates == 0  # nothing republished: no reliance on the dedup window
        assert second.stats.published == 4
        messages = await stream_messages(js, runtime.settings.stream_name)
        assert_once_in_log_order(messages, log)
        await second.stop()
        assert await asyncio.to_thread(second.store.load_position) == log[-1][2]  # graceful stop kept it
    finally:
        for relay in (first, second):
            if relay is not None:
                await relay.stop()
        await runtime.stop()


async def test_a_foreign_last_message_on_the_stream_leaves_the_relay_on_its_own_record(
    make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    """The stream's last message says how far the relay got only if the relay wrote it."""
    runtime = Runtime(make_settings(), roles=("commands",))
    await runtime.start()
    assert runtime.servers is not None and runtime.app is not None
    relay: RelayUnderTest | None = None
    try:
        await lifecycle(runtime, 0)
        relay = new_relay(runtime)
        await published_unrecorded(runtime, 4)  # creates the stream and fills it
        stream = runtime.settings.stream_name
        await js.publish(f"{runtime.settings.subject_prefix}.events.acme.logged", b"not an event", stream=stream)
        await relay.start()  # recorded nothing yet: everything again, the repeats dropped by their ids
        log = await logged_refs(runtime)
        deadline = time.monotonic() + 10
        while relay.stats.position < log[-1][2] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert relay.stats.position == log[-1][2]
        assert relay.stats.duplicates == relay.stats.published == len(log)  # every ack a repeat
    finally:
        if relay is not None:
            await relay.stop()
        await runtime.stop()


async def test_postgres_restart_is_survived_and_the_relay_resumes(
    tmp_path: Path, make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    postgres = EmbeddedPostgres(tmp_path / "own-pg", fsync=False)
    url = await asyncio.to_thread(postgres.start)
    runtime = Runtime(make_settings(database_url=url))
    try:
        await runtime.start()
        relay = runtime_relay(runtime)
        relay.consumer.handler.options = FAST
        relay.consumer.settings = FAST_CONSUMER
        await lifecycle(runtime, 0)
        await wait_for_messages(js, runtime.settings.stream_name, 4)

        await asyncio.to_thread(postgres.stop)
        await asyncio.sleep(1.5)  # the relay's reads fail meanwhile; it backs off
        assert await asyncio.to_thread(postgres.start) == url

        deadline = time.monotonic() + 30
        while True:  # commands answer `unavailable` until the pool has reconnected
            try:
                await lifecycle(runtime, 1)
                break
            except AssertionError:
                assert time.monotonic() < deadline, "commands did not recover after PostgreSQL restarted"
                await asyncio.sleep(0.2)
        log = await logged_refs(runtime)
        await wait_for_messages(js, runtime.settings.stream_name, len(log))
        assert_once_in_log_order(await stream_messages(js, runtime.settings.stream_name), log)
    finally:
        await runtime.stop()
        await asyncio.to_thread(postgres.stop)


async def test_a_stream_ahead_of_the_store_is_reported_as_after_an_asynchronous_failover(
    make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    """The relay published events the store then lost (PostgreSQL failed over to a standby without
    the last commits): on resume it says so, once, with what to do, instead of silently skipping."""
    import psycopg

    runtime = Runtime(make_settings(), roles=("commands",))
    await runtime.start()
    assert runtime.servers is not None and runtime.app is not None
    relay: RelayUnderTest | None = None
    try:
        for n in range(2):
            await lifecycle(runtime, n)
        await published_unrecorded(runtime, 8)  # on the stream, not recorded
        log = await logged_refs(runtime)
        with psycopg.connect(runtime.servers.database_url, autocommit=True) as conn:  # the store loses the tail
            conn.execute("DELETE FROM activities_events WHERE notification_id > %s", (log[3][2],))
        relay = new_relay(runtime)
        await relay.start()
        deadline = time.monotonic() + 10
        while relay.consumer.handler.stream_ahead == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert relay.consumer.handler.stream_ahead == log[-1][2]
    finally:
        if relay is not None:
            await relay.stop()
        await runtime.stop()


async def test_a_stream_behind_or_level_with_the_store_raises_no_alarm(
    make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    runtime = Runtime(make_settings(), roles=("commands",))
    await runtime.start()
    relay: RelayUnderTest | None = None
    try:
        await lifecycle(runtime, 0)
        await published_unrecorded(runtime, 4)  # the crash the resume rule is for: ahead of the record only
        relay = new_relay(runtime)
        await relay.start()
        log = await logged_refs(runtime)
        deadline = time.monotonic() + 10
        while relay.stats.position < log[-1][2] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert relay.stats.position == log[-1][2] and relay.consumer.handler.stream_ahead == 0
    finally:
        if relay is not None:
            await relay.stop()
        await runtime.stop()
