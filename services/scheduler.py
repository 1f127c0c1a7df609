"""The scheduler role's bridge to the write path: a due row becomes a command of the application.

The due-time index and its firing loop live with the other log consumers (projections/scheduler.py)
and never import the service; the composition root hands them `fire_through(batcher)`, so a firing
is decided and appended like any command: group commit, the store's version check, and a decision
on the activity's current state (services/domain.py, `decide_time`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from events.activity import activity_id_of
from events.caller import Caller
from events.commands import FireReminder, MarkOverdue, TimeCommand
from projections.scheduler import DueRow, Fire
from services.application import CommandBatcher, CommandRequest, CommandResult
from services.domain import SYSTEM_ACTOR
from services.metrics import Metrics

log = logging.getLogger("activities.scheduler")


def time_command(row: DueRow) -> TimeCommand:
    """The command that fires a due row (decided on the activity's current version)."""
    activity_id = activity_id_of(row.activity_id)
    match row.kind:
        case "reminder":
            return FireReminder(activity_id)
        case "overdue":
            return MarkOverdue(activity_id)


def fire_through(batcher: CommandBatcher, metrics: Metrics | None = None) -> Fire:
    """Fire rows as commands of the system caller through the command batcher, side by side."""

    async def fire(rows: Sequence[DueRow]) -> list[int | None]:
        requests = [CommandRequest(time_command(row), Caller(row.tenant_id, SYSTEM_ACTOR)) for row in rows]
        outcomes = await asyncio.gather(*(batcher.submit(request) for request in requests))
        now = datetime.now(UTC)
        positions: list[int | None] = []
        for row, outcome in zip(rows, outcomes, strict=True):
            if metrics is not None:
                code = "ok" if isinstance(outcome, CommandResult) else outcome.code
                metrics.firings.labels(row.kind, code).inc()
                metrics.firing_lateness.labels(row.kind).observe(max((now - row.due_at).total_seconds(), 0.0))
            if isinstance(outcome, CommandResult):
                positions.append(outcome.position)
            else:
                log.warning(
                    "firing failed",
                    extra={"activity_id": activity_id_of(row.activity_id), "kind": row.kind, "code": outcome.code},
                )
                positions.append(None)
        return positions

    return fire
