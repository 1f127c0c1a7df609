"""Retention (docs/contract.md section 11): activities deleted longer ago than
`ACTIVITIES_PURGE_DELETED_AFTER_DAYS` are erased, by the `scheduler` role.

`RetentionSweep` finds them in the read model (deleted, not erased, `updated_at` (= the deletion
time: a deleted activity takes no other event) before the cutoff; a partial index of migration 8
serves it) and erases each with an `EraseActivity` through the one write path, as the `system`
actor, guarded by `if_deleted_before`: an activity restored since it was found is left alone. Any
number of instances may run it: erasing an erased activity is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg
from psycopg.sql import SQL

from activities_client.document import format_datetime
from activities_client.errors import Gone, NotFound
from events.caller import Caller
from events.commands import EraseActivity
from projections.database import conninfo
from projections.queries import READ_MODEL_TABLE, table_identifier
from services.application import CommandBatcher, CommandRequest, CommandResult

log = logging.getLogger("activities.retention")

SYSTEM_ACTOR: Final = "system"
SWEEP_INTERVAL_S: Final = 60.0
BATCH: Final = 200


class RetentionSweep:
    """Erases activities deleted more than `after_days` ago, every `interval_s` (a component)."""

    def __init__(
        self,
        batcher: CommandBatcher,
        database_url: str,
        after_days: float,
        interval_s: float = SWEEP_INTERVAL_S,
        batch: int = BATCH,
        clock: Any = None,
    ) -> None:
        self._batcher = batcher
        self._database_url = database_url
        self.after = timedelta(days=after_days)
        self.interval_s = interval_s
        self.batch = batch
        self._clock = clock or (lambda: datetime.now(UTC))
        self._task: asyncio.Task[None] | None = None
        self.erased = 0  # counters for tests and metrics
        self.sweeps = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="retention-sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        """Sweep, then wait `interval_s`, forever; a failed sweep is tried again next time."""
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database away, a restart: next time
                log.warning("retention sweep failed; retrying later", extra={"error_type": type(exc).__name__})
            await asyncio.sleep(self.interval_s)

    async def sweep(self) -> int:
        """Erase every activity deleted before the cutoff; how many were erased."""
        cutoff = self._clock() - self.after
        erased = 0
        after = ""
        while True:
            rows = await self._due(cutoff, after)
            if not rows:
                break
            after = rows[-1][0]
            requests = [
                CommandRequest(
                    EraseActivity(activity_id, if_deleted_before=format_datetime(cutoff)),
                    Caller(tenant_id=tenant_id, sub=SYSTEM_ACTOR, app_id=app_id),
                )
                for activity_id, tenant_id, app_id in rows
            ]
            for outcome in await asyncio.gather(*(self._batcher.submit(request) for request in requests)):
                if isinstance(outcome, CommandResult):
                    erased += outcome.wrote
                elif not isinstance(outcome, NotFound | Gone):
                    raise outcome
        self.sweeps += 1
        self.erased += erased
        if erased:
            log.info("retention erased deleted activities", extra={"erased": erased, "cutoff": format_datetime(cutoff)})
        return erased

    async def _due(self, cutoff: datetime, after: str) -> list[tuple[str, str, str | None]]:
        statement = SQL(
            "SELECT id, tenant_id, app_id FROM {table} WHERE is_deleted AND NOT is_erased AND updated_at < %s "
            "AND id > %s ORDER BY id LIMIT %s"
        ).format(table=table_identifier(READ_MODEL_TABLE))
        async with await psycopg.AsyncConnection.connect(
            conninfo(self._database_url, connect_timeout=5), autocommit=True
        ) as conn:
            rows = await (await conn.execute(statement, (cutoff, after, self.batch))).fetchall()
        return [(str(r[0]), str(r[1]), r[2]) for r in rows]
