"""Graceful shutdown: SIGTERM during load answers every request the service took, and the
projection and relay positions are saved."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import nats
import orjson
import psycopg
import pytest
from nats.errors import NoRespondersError, TimeoutError as NatsTimeout
from nats.js.errors import NotFoundError

from services.config import Settings
from tests.e2e.processes import ServiceProcess

pytestmark = pytest.mark.slow


async def test_sigterm_during_load_answers_every_request_taken(
    make_settings: Callable[..., Settings], token: Callable[..., str]
) -> None:
    settings = make_settings()
    assert settings.database_url and settings.nats_url
    service = ServiceProcess(settings)
    service.start()
    nc = await nats.connect(settings.nats_url)
    headers = {"Authorization": f"Bearer {token()}"}
    outcomes: dict[str, int] = {"ok": 0, "no_responders": 0, "refused": 0, "timeout": 0, "error": 0}

    async def create(i: int) -> None:
        try:
            message = await nc.request(f"{settings.subject_prefix}.cmd.create",
                                       orjson.dumps({"account_id": f"acc_{i}"}), headers=headers, timeout=15)
        except NoRespondersError:
            outcomes["no_responders"] += 1  # sent after the service stopped listening: never taken
            return
        except NatsTimeout:
            outcomes["timeout"] += 1
            return
        reply: dict[str, Any] = orjson.loads(message.data)
        if reply.get("error", {}).get("code") == "unavailable":
            outcomes["refused"] += 1  # more than the command queue holds (a slow machine): never taken
            return
        outcomes["ok" if "data" in reply else "error"] += 1

    async def load() -> None:
        tasks = []
        for i in range(1500):
            tasks.append(asyncio.create_task(create(i)))
            if i % 50 == 0:
                await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)

    async def relay_has_published() -> bool:
        try:
            return (await nc.jetstream().stream_info(settings.stream_name)).state.messages > 0
        except NotFoundError:
            return False  # the relay has not created its stream yet

    try:
        running = asyncio.create_task(load())
        # SIGTERM once the service has answered 200 and its relay has published: both positions exist to be saved
        while outcomes["ok"] < 200 or not await relay_has_published():
            await asyncio.sleep(0.01)
        exit_code = await asyncio.get_running_loop().run_in_executor(None, service.terminate)
        await running
        assert exit_code == 0
        assert outcomes["timeout"] == 0 and outcomes["error"] == 0, outcomes
        assert outcomes["ok"] + outcomes["no_responders"] + outcomes["refused"] == 1500
        assert outcomes["ok"] >= 200
        with psycopg.connect(settings.database_url) as conn:
            stored = conn.execute("SELECT count(*), coalesce(max(notification_id), 0) FROM activities_events").fetchone()
            projected = conn.execute(
                "SELECT notification_id FROM activities_projection_tracking WHERE application_name = 'Activities'"
            ).fetchone()
            relayed = conn.execute("SELECT position FROM activities_relay_tracking").fetchone()
        assert stored is not None and projected is not None and relayed is not None
        assert stored[0] == outcomes["ok"], "a command was stored without its reply, or replied without being stored"
        # positions saved: the read model's with its rows; the relay's after the acks of what it published
        assert 0 < projected[0] <= stored[1] and 0 < relayed[0] <= stored[1], (projected, relayed, stored)
        with psycopg.connect(settings.database_url) as conn:
            rows = conn.execute("SELECT count(*) FROM activities").fetchone()
        assert rows is not None and rows[0] == projected[0]  # every event is a create: one row per position
        info = await nc.jetstream().stream_info(settings.stream_name)
        assert info.state.messages == relayed[0]
    finally:
        await nc.close()
        service.stop()
