"""The wire bodies and replies of docs/contract.md as pydantic models, for the API documents.

The service does not parse requests with these: its own command parsers and query gateway do, so
that NATS and HTTP answer alike and every error has the contract's envelope. These models describe
the same bodies in the service's AsyncAPI and OpenAPI documents (its tests check both documents
against real replies), and type the bodies for clients.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from activities_client.document import ACTIVITY_ID_PATTERN, ActivityDocument, EventBody
from activities_client.errors import ERRORS_BY_CODE
from activities_client.filters import (
    DEFAULT_LIMIT,
    DEFAULT_SORT,
    LIST_FILTERS,
    MAX_LIMIT,
    OCCURRENCES_PARAMETERS,
    PAGE_PARAMETERS,
    STATS_GROUPS,
    STATS_PARAMETERS,
    ListFilter,
)

if TYPE_CHECKING:
    ErrorCode = str
else:  # the contract's error codes, from the error classes (one list: errors.ERRORS_BY_CODE)
    ErrorCode = Literal[tuple(ERRORS_BY_CODE)]


class PatchActivityBody(BaseModel):
    """`crm.activities.cmd.patch`: a JSON Merge Patch (RFC 7396) of the client-settable fields."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=ACTIVITY_ID_PATTERN)
    expected_version: int | None = Field(default=None, ge=1)
    changes: dict[str, Any] = Field(description="merge patch of ActivityFields: null clears, objects merge")


class ActivityRefBody(BaseModel):
    """`crm.activities.cmd.delete` and `.restore`: which activity, optionally at which version."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=ACTIVITY_ID_PATTERN)
    expected_version: int | None = Field(default=None, ge=1)


class EraseBody(BaseModel):
    """`crm.activities.cmd.erase`: one activity by `id`, or every activity naming `contact_id`
    (docs/contract.md section 11); exactly one of the two."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, pattern=ACTIVITY_ID_PATTERN)
    contact_id: str | None = Field(default=None, min_length=1, max_length=200)


class GetActivityBody(BaseModel):
    """`crm.activities.query.get`."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=ACTIVITY_ID_PATTERN)
    include_deleted: bool = False
    version: int | None = Field(default=None, ge=1)
    min_position: int | None = Field(default=None, ge=0)


def _list_field(spec: ListFilter) -> tuple[Any, Any]:
    """The type and default of a list filter in the NATS body."""
    if spec.repeatable:
        item: Any = Literal[spec.choices] if spec.choices else str
        return list[item] | None, Field(default=None, description=spec.description)
    if spec.kind == "boolean":
        return bool | None, Field(default=None, description=spec.description)
    return str | None, Field(default=None, description=spec.description)


_LIST_FIELDS: dict[str, Any] = {
    **{spec.name: _list_field(spec) for spec in LIST_FILTERS},
    "include_deleted": (bool, Field(default=False, description=PAGE_PARAMETERS["include_deleted"])),
    "sort": (str, Field(default=DEFAULT_SORT, description=PAGE_PARAMETERS["sort"])),
    "limit": (int, Field(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description=PAGE_PARAMETERS["limit"])),
    "cursor": (str | None, Field(default=None, description=PAGE_PARAMETERS["cursor"])),
    "min_position": (int | None, Field(default=None, ge=0, description=PAGE_PARAMETERS["min_position"])),
}
ListActivitiesBody = create_model(
    "ListActivitiesBody",
    __config__=ConfigDict(extra="forbid"),
    __doc__="`crm.activities.query.list`: the list parameters of docs/contract.md section 5 as a JSON object.",
    **_LIST_FIELDS,
)

if TYPE_CHECKING:
    StatsGroup = str
else:  # the values of group_by, defined once (filters.STATS_GROUPS)
    StatsGroup = Literal[STATS_GROUPS]

_STATS_FIELDS: dict[str, Any] = {
    "group_by": (StatsGroup, Field(description=STATS_PARAMETERS["group_by"])),
    **{spec.name: _list_field(spec) for spec in LIST_FILTERS},
    "include_deleted": (bool, Field(default=False, description=STATS_PARAMETERS["include_deleted"])),
    "min_position": (int | None, Field(default=None, ge=0, description=STATS_PARAMETERS["min_position"])),
}
StatsBody = create_model(
    "StatsBody",
    __config__=ConfigDict(extra="forbid"),
    __doc__="`crm.activities.query.stats`: `group_by` and any list filter (docs/contract.md section 5) as JSON.",
    **_STATS_FIELDS,
)


_OCCURRENCES_FIELDS: dict[str, Any] = {
    "from_": (str, Field(alias="from", description=OCCURRENCES_PARAMETERS["from"])),
    "to": (str, Field(description=OCCURRENCES_PARAMETERS["to"])),
    **{spec.name: _list_field(spec) for spec in LIST_FILTERS},
    "include_deleted": (bool, Field(default=False, description=OCCURRENCES_PARAMETERS["include_deleted"])),
    "limit": (int, Field(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description=OCCURRENCES_PARAMETERS["limit"])),
    "cursor": (str | None, Field(default=None, description=OCCURRENCES_PARAMETERS["cursor"])),
    "min_position": (int | None, Field(default=None, ge=0, description=OCCURRENCES_PARAMETERS["min_position"])),
}
OccurrencesBody = create_model(
    "OccurrencesBody",
    __config__=ConfigDict(extra="forbid", populate_by_name=True),
    __doc__="`crm.activities.query.occurrences`: `from`, `to` and any list filter (contract section 9) as JSON.",
    **_OCCURRENCES_FIELDS,
)


class Meta(BaseModel):
    """`meta` of a reply with one activity."""

    position: int


class ListMeta(BaseModel):
    """`meta` of a list reply."""

    next_cursor: str | None
    position: int


class ActivityReply(BaseModel):
    """Success: the activity after the command (or as read)."""

    data: ActivityDocument
    meta: Meta


class Erased(BaseModel):
    """How many activities an erase erased (0: none, or already erased)."""

    erased: int


class EraseReply(BaseModel):
    """Success of an erase; `meta.position` is that of its last event (or the latest one for 0)."""

    data: Erased
    meta: Meta


class ActivityListReply(BaseModel):
    """Success of a list: one page."""

    data: list[ActivityDocument]
    meta: ListMeta


class Count(BaseModel):
    """How many matching activities have this value of `group_by` (`key` None: those without one)."""

    key: str | None
    count: int


class StatsReply(BaseModel):
    """Success of stats: the counts, largest first (ties by key, the activities without one last)."""

    data: list[Count]
    meta: Meta


class Occurrence(BaseModel):
    """One occurrence of an activity: when (UTC), its index in the series (0: `activity_date`,
    counted before `exdates` are left out) and the activity."""

    activity_id: str
    occurrence_at: datetime
    index: int
    activity: ActivityDocument


class OccurrencesReply(BaseModel):
    """Success of occurrences: one page of occurrences in time order (then activity id, index)."""

    data: list[Occurrence]
    meta: ListMeta


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    code: ErrorCode
    message: str
    details: list[ErrorDetail] = Field(default_factory=list)
    current_version: int | None = Field(default=None, description="only with version_conflict")


class ErrorReply(BaseModel):
    """Failure: one of the contract's error codes."""

    error: ErrorBody


class EventHistoryReply(BaseModel):
    """Success of `/events`: the activity's events, oldest first."""

    data: list[EventBody]
    meta: Meta


EXTERNAL_KEY_PATTERN = "^[ -~]{1,200}$"


class UpsertActivityBody(BaseModel):
    """`crm.activities.cmd.upsert`: the activity keyed `external_key` (unique in the caller's tenant,
    and app when the token has one): created from `activity` when there is none, else `activity`
    applied to it as a JSON Merge Patch."""

    model_config = ConfigDict(extra="forbid")

    external_key: str = Field(pattern=EXTERNAL_KEY_PATTERN, description="1-200 printable ASCII characters")
    activity: dict[str, Any] = Field(description="ActivityFields: a create body, or a merge patch when it exists")
    expected_version: int | None = Field(default=None, ge=1)


class UpsertMeta(BaseModel):
    """`meta` of an upsert's reply."""

    position: int
    created: bool = Field(description="true when the upsert created the activity, false when it updated it")


class UpsertReply(BaseModel):
    """Success of an upsert: the activity after it; `meta.created` says which it did."""

    data: ActivityDocument
    meta: UpsertMeta


class BatchItemBody(BaseModel):
    """One command of a batch: `op`, an optional `idempotency_key` (as the header on a single
    command), and the rest of the fields the body of that command."""

    model_config = ConfigDict(extra="allow")

    op: Literal["create", "patch", "delete", "restore", "upsert"]
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)


class BatchBody(BaseModel):
    """`crm.activities.cmd.batch`: 1-100 commands, the whole body at most 1 MiB."""

    model_config = ConfigDict(extra="forbid")

    commands: list[BatchItemBody] = Field(min_length=1, max_length=100)


class BatchReply(BaseModel):
    """Success of a batch: one result per command, in order, each the single command's reply;
    `meta.position` is the highest position any of them wrote or read (0 when none succeeded)."""

    data: list[UpsertReply | ActivityReply | ErrorReply]
    meta: Meta


class GetByKeyBody(BaseModel):
    """`crm.activities.query.get_by_key`: the activity an upsert created under this key."""

    model_config = ConfigDict(extra="forbid")

    external_key: str = Field(pattern=EXTERNAL_KEY_PATTERN)
    include_deleted: bool = False
    min_position: int | None = Field(default=None, ge=0)
