"""Crash: `kill -9` of the service during a load of 2,000 commands whose clients retry with their
Idempotency-Key until answered. After the restart: exactly one stored event per acknowledged
command, the read model equals a replay of the store, and the stream holds each event once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import orjson
import psycopg
import pytest
from nats.errors import NoRespondersError, TimeoutError as NatsTimeout

from services.config import Settings
from tests.e2e.processes import ServiceProcess

pytestmark = pytest.mark.slow

OPERATIONS = 1000  # each one create and one patch: 2,000 commands


async def until_answered(nc: Any, subject: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    """Retry with the same key until a definite answer (not `unavailable`, not a timeout)."""
    for _ in range(200):
        try:
            reply = orjson.loads((await nc.request(subject, orjson.dumps(body), headers=headers, timeout=2)).data)
        except (NatsTimeout, NoRespondersError):
            await asyncio.sleep(0.2)
            continue
        if "error" in reply and reply["error"]["code"] == "unavailable":
            await asyncio.sleep(0.2)
            continue
        return dict(reply)
    raise AssertionError(f"never answered: {body}")


def table_rows(database_url: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return list(conn.execute(query).fetchall())


async def test_kill_9_during_load_loses_and_duplicates_nothing(
    make_settings: Callable[..., Settings], token: Callable[..., str], tmp_path: Path
) -> None:
    settings = make_settings(data_dir=tmp_path / "crash")
    assert settings.database_url is not None and settings.nats_url is not None
    service = ServiceProcess(settings)
    service.start()
    nc = await nats.connect(settings.nats_url)
    headers = {"Authorization": f"Bearer {token()}"}
    prefix = settings.subject_prefix
    acknowledged: list[dict[str, Any]] = []
    slots = asyncio.Semaphore(64)

    async def operation(i: int) -> None:
        async with slots:
            created = await until_answered(nc, f"{prefix}.cmd.create", {"account_id": f"acc_{i}", "subject": "new"},
                                           {**headers, "Idempotency-Key": f"create-{i}"})
            acknowledged.append(created)
            body = {"id": created["data"]["id"], "changes": {"subject": f"patched {i}"}}
            acknowledged.append(await until_answered(nc, f"{prefix}.cmd.patch", body, {**headers, "Idempotency-Key": f"patch-{i}"}))

    load = asyncio.gather(*(operation(i) for i in range(OPERATIONS)))
    try:
        while len(acknowledged) < 400:
            await asyncio.sleep(0.02)
        service.kill()
        killed_after = len(acknowledged)
        await asyncio.sleep(0.5)
        service.start()
        await asyncio.wait_for(load, timeout=240)
        assert killed_after < 2 * OPERATIONS, "the kill must land during the load"

        # exactly one stored event per acknowledged command
        assert all("data" in reply for reply in acknowledged), [r for r in acknowledged if "error" in r][:3]
        events = table_rows(settings.database_url, "SELECT originator_id, originator_version, notification_id FROM activities_events")
        assert len(events) == 2 * OPERATIONS
        positions = {reply["meta"]["position"] for reply in acknowledged}
        assert positions == {row[2] for row in events}
        versions = sorted(reply["data"]["version"] for reply in acknowledged)
        assert versions == [1] * OPERATIONS + [2] * OPERATIONS

        # the read model equals a replay of the store
        head = max(positions)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            tracked = table_rows(settings.database_url, "SELECT max(notification_id) FROM activities_projection_tracking")
            if tracked and tracked[0][0] is not None and tracked[0][0] >= head:
                break
            await asyncio.sleep(0.1)
        read_model = dict(table_rows(settings.database_url, "SELECT id, document FROM activities"))
        latest = {reply["data"]["id"]: reply["data"] for reply in acknowledged if reply["data"]["version"] == 2}
        assert read_model == latest

        # the stream holds each event once
        js = nc.jetstream()
        deadline = time.monotonic() + 60
        while (await js.stream_info(settings.stream_name)).state.messages < 2 * OPERATIONS and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        info = await js.stream_info(settings.stream_name)
        assert info.state.messages == 2 * OPERATIONS
        consumer = await js.subscribe(f"{prefix}.events.>", ordered_consumer=True)
        ids = []
        for _ in range(2 * OPERATIONS):
            message = await consumer.next_msg(timeout=10)
            ids.append(message.headers["Nats-Msg-Id"])
        assert len(set(ids)) == 2 * OPERATIONS
    finally:
        service.stop()
        await nc.close()
