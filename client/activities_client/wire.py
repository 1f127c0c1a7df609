"""The wire bodies and replies of CONTRACT.md as pydantic models, for the API documents.

The service does not parse requests with these: its own command parsers and query gateway do, so
that NATS and HTTP answer alike and every error has the contract's envelope. These models describe
the same bodies in the service's AsyncAPI and OpenAPI documents (its tests check both documents
against real replies), and type the bodies for clients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from activities_client.document import ACTIVITY_ID_PATTERN, ActivityDocument, EventBody
from activities_client.errors import ERRORS_BY_CODE

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


class GetActivityBody(BaseModel):
    """`crm.activities.query.get`."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=ACTIVITY_ID_PATTERN)
    include_deleted: bool = False
    version: int | None = Field(default=None, ge=1)
    min_position: int | None = Field(default=None, ge=0)


class ListActivitiesBody(BaseModel):
    """`crm.activities.query.list`: the list parameters of CONTRACT.md section 5 as a JSON object."""

    model_config = ConfigDict(extra="forbid")

    account_id: str | None = None
    deal_id: str | None = None
    contact_id: str | None = None
    owner_id: str | None = None
    type: list[Literal["call", "email", "meeting", "note", "task"]] | None = None
    status: str | None = None
    tag: list[str] | None = None
    activity_date_from: str | None = Field(default=None, description="RFC 3339 date-time, inclusive")
    activity_date_to: str | None = Field(default=None, description="RFC 3339 date-time, inclusive")
    updated_since: str | None = Field(default=None, description="RFC 3339 date-time, inclusive")
    include_deleted: bool = False
    sort: str = Field(default="-activity_date", description="activity_date|created_at|updated_at|due_date, - for desc")
    limit: int = Field(default=50, ge=1, le=200)
    cursor: str | None = None
    min_position: int | None = Field(default=None, ge=0)


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


class ActivityListReply(BaseModel):
    """Success of a list: one page."""

    data: list[ActivityDocument]
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
