"""Several processes sharing one store: concurrent command writers, and projector failover."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import nats
import orjson
import psycopg
import pytest

from services.config import Settings
from tests.e2e.processes import ServiceProcess

pytestmark = pytest.mark.slow


def query(database_url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return list(conn.execute(sql).fetchall())


async def wait_for_projection(database_url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        head = query(database_url, "SELECT max(notification_id) FROM activities_events")[0][0]
        try:
            tracked = query(database_url, "SELECT max(notification_id) FROM activities_projection_tracking")
        except psycopg.errors.UndefinedTable:  # the projector has not started yet
            tracked = []
        if tracked and tracked[0][0] is not None and tracked[0][0] >= head:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the projection did not catch up")


def read_model_matches_store(database_url: str) -> None:
    latest = query(
        database_url,
        "SELECT DISTINCT ON (originator_id) originator_id, originator_version FROM activities_events "
        "ORDER BY originator_id, originator_version DESC",
    )
    rows = query(database_url, "SELECT version FROM activities")
    assert len(rows) == len(latest)
    assert sorted(version for (version,) in rows) == sorted(version for _, version in latest)


async def test_three_command_processes_patching_the_same_activities_lose_no_update(
    make_settings: Callable[..., Settings], token: Callable[..., str]
) -> None:
    settings = make_settings()
    assert settings.database_url and settings.nats_url
    writers = [ServiceProcess(settings, "commands", f"writer-{i}") for i in range(3)]
    reader = ServiceProcess(settings, "projector", "projector")
    for process in [*writers, reader]:
        process.start()
    nc = await nats.connect(settings.nats_url)
    headers = {"Authorization": f"Bearer {token()}"}
    subject = f"{settings.subject_prefix}.cmd"
    try:
        ids = []
        for i in range(5):
            reply = orjson.loads((await nc.request(f"{subject}.create", orjson.dumps({"account_id": f"a{i}"}),
                                                   headers=headers, timeout=10)).data)
            ids.append(reply["data"]["id"])

        async def patch(n: int) -> dict[str, Any]:
            body = {"id": ids[n % len(ids)], "changes": {"subject": f"patch {n}"}}
            message = await nc.request(f"{subject}.patch", orjson.dumps(body), headers=headers, timeout=30)
            return dict(orjson.loads(message.data))

        replies = await asyncio.gather(*(patch(n) for n in range(600)))
        assert all("data" in reply for reply in replies), [r for r in replies if "error" in r][:3]
        per_activity: dict[str, list[int]] = {}
        for reply in replies:
            per_activity.setdefault(reply["data"]["id"], []).append(reply["data"]["version"])
        for activity_id, versions in per_activity.items():
            # every success is a distinct version: 2..121 for 120 patches of one activity
            assert sorted(versions) == list(range(2, len(versions) + 2)), activity_id
        served_by = query(settings.database_url, "SELECT count(*) FROM activities_events")[0][0]
        assert served_by == 5 + 600

        await wait_for_projection(settings.database_url)
        read_model_matches_store(settings.database_url)
    finally:
        await nc.close()
        for process in [*writers, reader]:
            process.stop()


async def test_standby_projector_takes_over_when_the_active_one_is_killed(
    make_settings: Callable[..., Settings], token: Callable[..., str]
) -> None:
    settings = make_settings()
    assert settings.database_url and settings.nats_url
    writer = ServiceProcess(settings, "commands", "writer")
    active = ServiceProcess(settings, "projector", "projector-a")
    standby = ServiceProcess(settings, "projector", "projector-b")
    writer.start()
    active.start()
    nc = await nats.connect(settings.nats_url)
    headers = {"Authorization": f"Bearer {token()}"}

    async def create_many(count: int, tag: str) -> None:
        await asyncio.gather(*(
            nc.request(f"{settings.subject_prefix}.cmd.create", orjson.dumps({"account_id": f"{tag}{i}"}),
                       headers=headers, timeout=30)
            for i in range(count)
        ))

    try:
        await create_many(300, "before")
        await wait_for_projection(settings.database_url)
        standby.start()
        await asyncio.sleep(0.5)
        active.kill()
        await create_many(300, "after")
        await wait_for_projection(settings.database_url, timeout_s=60)
        read_model_matches_store(settings.database_url)
        rows = query(settings.database_url, "SELECT count(*) FROM activities")[0][0]
        assert rows == 600
    finally:
        await nc.close()
        for process in (writer, active, standby):
            process.stop()  # harmless for the one already killed
