"""Read-your-writes under a steady stream of commands: every read with the position of the reply
before it is answered with that write, none waits out the consistency timeout. (A lost wake-up
between readers that raise the known position and the waiters once made about one read in fifty
answer `unavailable` after two seconds.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import psycopg
from psycopg.conninfo import make_conninfo

from services.bootstrap import Runtime
from services.config import Settings
from tests.conftest import Requester


async def test_every_read_after_a_write_sees_it_without_timing_out(request_command: Requester) -> None:
    for i in range(80):
        created = await request_command("create", {"deal_id": f"deal_{i}"})
        got = await request_command(
            "get", {"id": created["data"]["id"], "min_position": created["meta"]["position"]}, kind="query"
        )
        assert "data" in got, (i, got)
        assert got["data"]["deal_id"] == f"deal_{i}"


async def test_get_and_list_read_from_the_read_database_and_wait_for_its_own_position(
    make_database: Callable[[], str], make_settings: Callable[..., Settings], nc: Any, token: Callable[..., str]
) -> None:
    """With ACTIVITIES_READ_DATABASE_URL set, get and list run on that server, and `min_position`
    waits for the position there (a replica lags the in-process projector). The primary stands in
    for the replica here, reached under another application_name so that its connections show."""
    database_url = make_database()
    replica_url = make_conninfo(database_url, application_name="activities-read-replica")
    runtime = Runtime(make_settings(database_url=database_url, read_database_url=replica_url))
    await runtime.start()
    prefix = runtime.settings.subject_prefix
    headers = {"Authorization": f"Bearer {token()}"}

    async def request(subject: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = await nc.request(f"{prefix}.{subject}", orjson.dumps(body), headers=headers, timeout=10)
        return dict(orjson.loads(reply.data))

    try:
        for i in range(10):
            created = await request("cmd.create", {"deal_id": f"deal_{i}"})
            got = await request("query.get", {"id": created["data"]["id"], "min_position": created["meta"]["position"]})
            assert got["data"]["deal_id"] == f"deal_{i}", got
        listed = await request("query.list", {"limit": 50})
        assert len(listed["data"]) == 10
        with psycopg.connect(database_url) as conn:
            readers = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'activities-read-replica'"
            ).fetchone()
        assert readers is not None and readers[0] >= 1
    finally:
        await runtime.stop()
