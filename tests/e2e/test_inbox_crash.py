"""Crash of the inbox: `kill -9` of the service while 2,000 inbox commands are being carried out
(three quarters published before, the rest while it is killed and restarted). After the restart each command
is carried out exactly once (one stored event each) and has exactly one result message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import nats
import orjson
import psycopg
import pytest

from services.bootstrap import inbox_streams
from services.config import Settings
from tests.e2e.processes import ServiceProcess

pytestmark = pytest.mark.slow

COMMANDS = 2000


async def test_kill_9_while_the_inbox_works_carries_each_command_out_once(
    make_settings: Callable[..., Settings], token: Callable[..., str], tmp_path: Path
) -> None:
    settings = make_settings(data_dir=tmp_path / "inbox-crash")
    assert settings.database_url is not None and settings.nats_url is not None
    streams = inbox_streams(settings)
    service = ServiceProcess(settings, roles="commands,projector,relay,http,inbox")
    service.start()
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    bearer = f"Bearer {token()}"

    async def publish(i: int) -> None:
        key = f"crash-{i}"
        headers = {"Authorization": bearer, "Idempotency-Key": key, "Nats-Msg-Id": key}
        body = orjson.dumps({"account_id": f"acc_{i}", "subject": f"queued {i}"})
        await js.publish(f"{settings.subject_prefix}.inbox.create", body, headers=headers)

    async def results() -> int:
        return int((await js.stream_info(streams.results)).state.messages)

    try:
        before = 3 * COMMANDS // 4
        for i in range(before):
            await publish(i)
        while await results() < 300:
            await asyncio.sleep(0.02)
        service.kill()
        killed_at = await results()
        for i in range(before, COMMANDS):  # published while the service is down
            await publish(i)
        service.start()
        assert killed_at < before, "the kill must land while the inbox works"

        deadline = time.monotonic() + 120
        while await results() < COMMANDS and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)  # anything still to come (a duplicate) would arrive now

        # exactly one result message per command, each a success
        assert await results() == COMMANDS
        subscription = await js.subscribe(f"{settings.subject_prefix}.results.>", ordered_consumer=True)
        keys = []
        for _ in range(COMMANDS):
            message = await subscription.next_msg(timeout=10)
            assert message.headers is not None and "data" in orjson.loads(message.data)
            keys.append(message.headers["Idempotency-Key"])
        await subscription.unsubscribe()
        assert sorted(keys) == sorted(f"crash-{i}" for i in range(COMMANDS))

        # exactly one stored event per command; nothing left in the inbox or the DLQ
        with psycopg.connect(settings.database_url) as conn:
            row = conn.execute("SELECT count(*), count(DISTINCT originator_id) FROM activities_events").fetchone()
        assert row == (COMMANDS, COMMANDS)
        assert (await js.stream_info(streams.inbox)).state.messages == 0
        assert (await js.stream_info(streams.dlq)).state.messages == 0
    finally:
        service.stop()
        await nc.close()
