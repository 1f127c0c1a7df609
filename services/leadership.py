"""One active instance of a single-writer role (projector, relay), with standbys.

`SingleActive` starts its inner component only while this process holds a PostgreSQL session
advisory lock; standbys retry every second and take over when the holder dies (its session
ends, so PostgreSQL releases the lock). Correctness does not depend on the lock alone: the read
model's tracking refuses to move backwards and the relay's messages are deduplicated by
`Nats-Msg-Id`, so a brief overlap while a lost lock is noticed does no harm.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from typing import Any

import psycopg

from services.database import conninfo

log = logging.getLogger("activities.leadership")


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for a role name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class SingleActive:
    """Runs `inner` (a Component) only while holding the advisory lock `name`."""

    def __init__(self, inner: Any, database_url: str, name: str, retry_s: float = 1.0) -> None:
        self.inner = inner
        self.name = name
        self._database_url = database_url
        self._key = lock_key(name)
        self._retry_s = retry_s
        self._task: asyncio.Task[None] | None = None
        self.active = False

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"single-active-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    conninfo(self._database_url, connect_timeout=5), autocommit=True
                ) as conn:
                    row = await (await conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,))).fetchone()
                    if row and row[0]:
                        await self._lead(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: try again
                log.warning("leadership check failed", extra={"role": self.name, "error": str(exc)})
            await asyncio.sleep(self._retry_s)

    async def _lead(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Run the inner component until the lock's session fails or we are cancelled."""
        log.info("became the active instance", extra={"role": self.name})
        await self.inner.start()
        self.active = True
        try:
            while True:
                await asyncio.sleep(self._retry_s)
                await conn.execute("SELECT 1")
        finally:
            self.active = False
            log.info("stopping the active instance", extra={"role": self.name})
            await self.inner.stop()
