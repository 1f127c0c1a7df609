"""The queries served over NATS request/reply, one entry each: their subjects and the AsyncAPI
document follow from this table (the commands' table is `events.commands.COMMANDS`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from pydantic import BaseModel

from activities_client.wire import (
    ActivityListReply,
    ActivityReply,
    GetActivityBody,
    GetByKeyBody,
    ListActivitiesBody,
    OccurrencesBody,
    OccurrencesReply,
    StatsBody,
    StatsReply,
)


@dataclass(frozen=True)
class QuerySpec:
    """A query: served on `<prefix>.query.<name>` (its HTTP routes read query strings, see http_app)."""

    name: str
    summary: str
    body: type[BaseModel]
    reply: type[BaseModel]


QUERIES: Final[Mapping[str, QuerySpec]] = {
    spec.name: spec
    for spec in (
        QuerySpec(
            "get",
            "One activity; `version` gives it as it was; `min_position` waits for the read model.",
            GetActivityBody,
            ActivityReply,
        ),
        QuerySpec(
            "list",
            "A page of activities matching the filters, from the read model; follow `next_cursor`.",
            ListActivitiesBody,
            ActivityListReply,
        ),
        QuerySpec(
            "stats",
            "Counts of the activities matching the filters by `group_by`, largest first, from the read model.",
            StatsBody,
            StatsReply,
        ),
        QuerySpec(
            "get_by_key",
            "The activity an upsert created under `external_key` in the caller's tenant (and app); "
            "`min_position` waits for the read model.",
            GetByKeyBody,
            ActivityReply,
        ),
        QuerySpec(
            "occurrences",
            "Every occurrence in a window (`from`, `to`) of the live activities matching the filters, in time "
            "order (docs/contract.md section 9); follow `next_cursor`.",
            OccurrencesBody,
            OccurrencesReply,
        ),
    )
}
"""Every query served over NATS request/reply, by name."""
