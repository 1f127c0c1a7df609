"""Erasure by contact (docs/contract.md section 11): every activity of the caller's tenant (and app)
naming a contact, each erased by the one write path.

The activities are found in the read model (indexed by contact, contact ids and participant ids)
once it has applied the whole log as it was when the command arrived, so that no activity written
before the command is missed; each is then erased by an `EraseActivity` carried out by the
group-commit batcher, which checks again, on the activity's current state, that it still names the
contact. Each erasure is its own atomic write (services/application.py); a command interrupted half
way (unavailable) has erased some, and its retry erases the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Final

import psycopg
from psycopg.sql import SQL, Identifier

from activities_client.errors import ActivitiesError, Gone, NotFound, Unavailable
from events.caller import Caller
from events.commands import EraseActivity, EraseByContact
from projections.database import conninfo
from projections.queries import READ_MODEL_TABLE, TRACKING_TABLE, table_identifier
from services.application import CommandBatcher, CommandRequest, CommandResult

log = logging.getLogger("activities.erasure")

CHUNK: Final = 25
"""Erasures submitted to the batcher at a time. Each batch then carries at most this many erasures
(about 3 ms each on a loaded 2-core machine) beside the other commands waiting: with 200 at a time
(a whole batch), a steady client's creates fell to a tenth while a 10,000-activity erasure ran
(bench/results/2026-12-06-2109-erasure); smaller chunks trade a little of the erasure's speed for
the other commands' latency."""


class ContactEraser:
    """Carries out `EraseByContact`: finds the activities, erases each, counts them."""

    def __init__(
        self,
        batcher: CommandBatcher,
        database_url: str,
        events_table: str,
        schema: str,
        application_name: str,
        wait_s: float = 30.0,
        chunk: int = CHUNK,
    ) -> None:
        self._batcher = batcher
        self._database_url = database_url
        self._events = SQL("{}.{}").format(Identifier(schema), Identifier(events_table))
        self._application_name = application_name
        self._wait_s = wait_s
        self._chunk = chunk

    async def erase(self, command: EraseByContact, caller: Caller, traceparent: str | None = None) -> CommandResult:
        """`{"erased": n}` and the position of the last erasure (of the log's head when none)."""
        head, ids = await self._find(command.contact_id, caller)
        erased = 0
        position = head
        for start in range(0, len(ids), self._chunk):
            requests = [
                CommandRequest(EraseActivity(activity_id, command.contact_id), caller, traceparent=traceparent)
                for activity_id in ids[start : start + self._chunk]
            ]
            outcomes = await asyncio.gather(*(self._batcher.submit(request) for request in requests))
            for outcome in outcomes:
                if isinstance(outcome, CommandResult):
                    erased += outcome.wrote
                    position = max(position, outcome.position)
                elif not isinstance(outcome, NotFound | Gone):  # unavailable, internal: the caller retries
                    log.info("erasure by contact interrupted", extra={"erased": erased, "code": outcome.code})
                    raise outcome
        log.info("erasure by contact done", extra={"erased": erased, "tenant_id": caller.tenant_id})
        return CommandResult({"erased": erased}, position, wrote=erased > 0)

    async def _find(self, contact_id: str, caller: Caller) -> tuple[int, list[str]]:
        """The log's head when the command arrived, and the caller's activities naming the contact
        in the read model once it has applied that head."""
        try:
            async with await psycopg.AsyncConnection.connect(
                conninfo(self._database_url, connect_timeout=5), autocommit=True
            ) as conn:
                statement = SQL("SELECT max(notification_id) FROM {}").format(self._events)
                row = await (await conn.execute(statement)).fetchone()
                head = int(row[0]) if row and row[0] is not None else 0
                await self._wait_for(conn, head)
                return head, await self._matching(conn, contact_id, caller)
        except psycopg.OperationalError:
            raise Unavailable("the database is unavailable; retry the erasure") from None

    async def _wait_for(self, conn: psycopg.AsyncConnection[Any], head: int) -> None:
        deadline = time.monotonic() + self._wait_s
        statement = SQL("SELECT notification_id FROM {} WHERE application_name = %s").format(
            table_identifier(TRACKING_TABLE)
        )
        while True:
            row = await (await conn.execute(statement, (self._application_name,))).fetchone()
            if row is not None and int(row[0]) >= head:
                return
            if time.monotonic() > deadline:
                raise Unavailable(
                    "the read model is behind the log (is the projector running?); retry the erasure later"
                )
            await asyncio.sleep(0.05)

    async def _matching(self, conn: psycopg.AsyncConnection[Any], contact_id: str, caller: Caller) -> list[str]:
        scope: Sequence[Any] = (caller.tenant_id,)
        app = SQL("")
        if caller.app_id is not None:
            app, scope = SQL(" AND app_id = %s"), (caller.tenant_id, caller.app_id)
        statement = SQL(
            "SELECT id FROM {table} WHERE tenant_id = %s{app} AND NOT is_erased "
            "AND (contact_id = %s OR contact_ids @> ARRAY[%s]::text[] OR participant_ids @> ARRAY[%s]::text[]) "
            "ORDER BY id"
        ).format(table=table_identifier(READ_MODEL_TABLE), app=app)
        rows = await (await conn.execute(statement, (*scope, contact_id, contact_id, contact_id))).fetchall()
        return [str(row[0]) for row in rows]


def erased_reply(outcome: CommandResult | ActivitiesError) -> CommandResult | ActivitiesError:
    """An erase by id's outcome as the contract's erase reply: `{"erased": 1}` (0 for a no-op)."""
    if isinstance(outcome, CommandResult):
        return CommandResult({"erased": int(outcome.wrote)}, outcome.position, wrote=outcome.wrote)
    return outcome
