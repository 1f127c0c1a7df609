"""The reads' connections (ACTIVITIES_READ_POOL_SIZE): reads beyond them wait their turn rather
than run side by side in PostgreSQL, and unset the pool has this machine's cores + 1."""

from __future__ import annotations

import asyncio
import itertools
import os

from services.bootstrap import Runtime
from services.config import default_read_pool_size
from services.http_app import HttpRole
from services.queries import ReadModel

SLOW_READ = "SELECT pg_backend_pid() AS pid, clock_timestamp() AS began FROM pg_sleep(0.15)"


def test_unset_the_reads_have_one_connection_more_than_the_machine_has_cores() -> None:
    assert default_read_pool_size() == (os.cpu_count() or 1) + 1


async def test_the_service_reads_through_that_many_connections(runtime: Runtime) -> None:
    read_model = next(c for c in runtime.components if isinstance(c, HttpRole)).queries.read_model
    assert read_model.pool.max_size == default_read_pool_size()


async def test_reads_beyond_the_pool_wait_their_turn_in_order(runtime: Runtime) -> None:
    assert runtime.servers is not None
    read_model = ReadModel(runtime.servers.database_url, 1, "reads-test")  # the service's read model tables
    try:
        reads = [asyncio.create_task(read_model._fetch(SLOW_READ, [])) for _ in range(3)]
        rows = [rows[0] for _, rows in await asyncio.gather(*reads)]
    finally:
        await read_model.close()
    assert len({row["pid"] for row in rows}) == 1  # one connection served all three
    began = [row["began"] for row in rows]
    assert began == sorted(began)  # first come, first served
    assert all((later - earlier).total_seconds() >= 0.14 for earlier, later in itertools.pairwise(began))
