"""PostgreSQL stopped and started under the running service: prompt `unavailable`, then recovery
of commands, the projection and the relay without restarting the service."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import orjson
import psycopg
import pytest
import pytest_asyncio

from services.bootstrap import Runtime
from services.config import Settings
from services.embedded import EmbeddedPostgres

pytestmark = pytest.mark.slow


@pytest_asyncio.fixture
async def own_postgres(test_root: Path) -> AsyncIterator[EmbeddedPostgres]:
    """A PostgreSQL of this test's own, so that it can be stopped (outside pytest's 0700 tmp dirs)."""
    server = EmbeddedPostgres(test_root / f"pg-{uuid.uuid4().hex[:8]}", fsync=False)
    await asyncio.get_running_loop().run_in_executor(None, server.start)
    yield server
    server.stop()


async def command(nc: Any, settings: Settings, bearer: str, name: str, body: dict[str, Any],
                  key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {bearer}"}
    if key:
        headers["Idempotency-Key"] = key
    message = await nc.request(f"{settings.subject_prefix}.cmd.{name}", orjson.dumps(body), headers=headers, timeout=20)
    return dict(orjson.loads(message.data))


async def test_postgres_restart_under_load(
    own_postgres: EmbeddedPostgres, make_settings: Callable[..., Settings], token: Callable[..., str]
) -> None:
    database_url = own_postgres.start()
    settings = make_settings(database_url=database_url, request_timeout_s=3.0)
    runtime = Runtime(settings)
    await runtime.start()
    nc = await nats.connect(settings.nats_url or "")
    bearer = token()
    try:
        before = await command(nc, settings, bearer, "create", {"account_id": "acc_before"})
        assert "data" in before

        await asyncio.get_running_loop().run_in_executor(None, own_postgres.stop)
        started = time.monotonic()
        during = await command(nc, settings, bearer, "create", {"account_id": "acc_down"}, key="while-down")
        waited = time.monotonic() - started
        assert during["error"]["code"] == "unavailable", during
        assert waited < 8, f"unavailable took {waited:.1f}s"

        await asyncio.get_running_loop().run_in_executor(None, own_postgres.start)
        deadline = time.monotonic() + 60
        after: dict[str, Any] = {}
        while time.monotonic() < deadline:
            after = await command(nc, settings, bearer, "create", {"account_id": "acc_down"}, key="while-down")
            if "data" in after:
                break
            await asyncio.sleep(0.5)
        assert "data" in after, after
        last = await command(nc, settings, bearer, "create", {"account_id": f"acc_after_{uuid.uuid4().hex[:6]}"})
        assert "data" in last

        # the projection and the relay came back by themselves: the last write is readable and published
        position = last["meta"]["position"]
        reply = orjson.loads((await nc.request(
            f"{settings.subject_prefix}.query.get",
            orjson.dumps({"id": last["data"]["id"], "min_position": position}),
            headers={"Authorization": f"Bearer {bearer}"}, timeout=20)).data)
        deadline = time.monotonic() + 30
        while "error" in reply and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            reply = orjson.loads((await nc.request(
                f"{settings.subject_prefix}.query.get",
                orjson.dumps({"id": last["data"]["id"], "min_position": position}),
                headers={"Authorization": f"Bearer {bearer}"}, timeout=20)).data)
        assert reply["data"]["id"] == last["data"]["id"], reply

        js = nc.jetstream()
        deadline = time.monotonic() + 30
        expected = 3  # before, the retried while-down create, and last
        while time.monotonic() < deadline:
            if (await js.stream_info(settings.stream_name)).state.messages >= expected:
                break
            await asyncio.sleep(0.3)
        assert (await js.stream_info(settings.stream_name)).state.messages == expected
    finally:
        await nc.close()
        await runtime.stop()


def test_embedded_postgres_takes_the_shared_buffers_asked_for(test_root: Path) -> None:
    """A size of shared buffers (the benchmarks ask for room for their read model) is set once and
    kept: the first start restarts the server to take it, a later start finds it in place."""
    directory = test_root / f"pg-{uuid.uuid4().hex[:8]}"
    for _ in range(2):
        server = EmbeddedPostgres(directory, fsync=False, shared_buffers="160MB")
        url = server.start()
        try:
            with psycopg.connect(url) as conn:
                row = conn.execute("SELECT current_setting('shared_buffers')").fetchone()
                assert row is not None and row[0] == "160MB"
        finally:
            server.stop()
