"""The Activity document, its field rules, and the four stored events.

This module is the published language of the service: pure data and pure functions, no I/O.
Everything that decides whether a document is valid lives here, so the command handlers,
the read model and the client agree on one definition (CONTRACT.md section 1).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal
from uuid import UUID

from eventsourcing.domain import AggregateCreated, AggregateEvent
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    field_validator,
)
from ulid import ULID

SCHEMA_VERSION: Final = 1
"""Version of the Activity document schema (the `schema_version` field)."""

EVENT_SCHEMA_VERSION: Final = 1
"""Version of the event body schema (CONTRACT.md section 4)."""

MAX_BODY_BYTES: Final = 256 * 1024
MAX_CUSTOM_FIELDS_DEPTH: Final = 8
ID_PREFIX: Final = "act_"
_ACTIVITY_ID = re.compile(r"^act_[0-7][0-9A-HJKMNP-TV-Z]{25}$")  # a ULID starts with 0-7 (128 bits)
_OWNER_ID = re.compile(r"^usr-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


SourceType = Literal["frontend", "backend", "server", "system", "api"]
"""Where a write originated."""

ActivityKind = Literal["call", "email", "meeting", "note", "task"]
"""The short classification in the `type` field."""

ParticipantType = Literal["user", "contact"]


# ---------------------------------------------------------------------------------------------
# Scalar rules
# ---------------------------------------------------------------------------------------------


def parse_datetime(value: Any) -> datetime:
    """An RFC 3339 date-time with a zone, as a UTC datetime; a naive time or a number is refused."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("z", "Z"))
        except ValueError:
            raise ValueError("must be an RFC 3339 date-time, e.g. 2026-01-31T09:30:00Z") from None
    else:
        raise ValueError("must be an RFC 3339 date-time string")
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValueError("must carry a time zone (Z or +hh:mm); naive times are refused")
    return parsed.astimezone(UTC)


def format_datetime(value: datetime) -> str:
    """UTC with a `Z` suffix, microseconds when present (CONTRACT.md section 1)."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _no_duplicates(values: list[Any]) -> list[Any]:
    seen: set[str] = set()
    for item in values:
        key = repr(sorted(item.items())) if isinstance(item, dict) else repr(item)
        if key in seen:
            raise ValueError(f"holds a duplicate: {item!r}")
        seen.add(key)
    return values


AwareDateTime = Annotated[datetime, BeforeValidator(parse_datetime)]
NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]


class Participant(BaseModel):
    """Someone present: at least a type and an id; other keys are kept as given."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: ParticipantType
    id: NonEmptyStr


# ---------------------------------------------------------------------------------------------
# The client-settable fields and the document
# ---------------------------------------------------------------------------------------------

SERVER_FIELDS: Final = frozenset(
    {
        "id",
        "tenant_id",
        "app_id",
        "created_at",
        "updated_at",
        "created_by",
        "updated_by",
        "is_deleted",
        "deleted_at",
        "deleted_by",
        "schema_version",
        "version",
    }
)

DATETIME_FIELDS: Final = ("activity_date", "due_date", "completed_at", "occurred_at")


class ActivityFields(BaseModel):
    """The client-settable fields of an Activity, with every rule of CONTRACT.md section 1.

    Used for a create body and for the document that results from a patch, so create and
    patch share one definition of validity.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    source: StrictStr = "edm"
    source_type: SourceType = "api"
    account_id: NonEmptyStr | None = None
    deal_id: NonEmptyStr | None = None
    contact_id: NonEmptyStr | None = None
    contact_ids: list[NonEmptyStr] = Field(default_factory=list)
    activity_type: StrictStr | None = None
    subject: StrictStr | None = None
    description: StrictStr | None = None
    status: StrictStr | None = None
    priority: StrictStr | None = None
    direction: StrictStr | None = None
    outcome: StrictStr | None = None
    actor_type: StrictStr | None = None
    performed_by_user_id: StrictStr | None = None
    linked_trace_id: StrictStr | None = None
    notes: StrictStr | None = None
    activity_date: AwareDateTime | None = Field(default=None, strict=False)
    due_date: AwareDateTime | None = Field(default=None, strict=False)
    completed_at: AwareDateTime | None = Field(default=None, strict=False)
    occurred_at: AwareDateTime | None = Field(default=None, strict=False)
    participants: list[Participant] = Field(default_factory=list)
    attachment_refs: list[NonEmptyStr] = Field(default_factory=list)
    recurrence: dict[str, Any] | None = None
    reminder_sent: StrictBool = False
    custom_fields: dict[str, Any] = Field(default_factory=dict)
    tags: list[NonEmptyStr] = Field(default_factory=list)
    type: ActivityKind | None = None
    owner_id: StrictStr | None = None

    @field_validator("contact_ids", "attachment_refs", "tags")
    @classmethod
    def _unique(cls, values: list[str]) -> list[str]:
        return _no_duplicates(values)

    @field_validator("participants")
    @classmethod
    def _unique_participants(cls, values: list[Participant]) -> list[Participant]:
        seen: set[tuple[str, str]] = set()
        for participant in values:
            key = (str(participant.type), participant.id)
            if key in seen:
                raise ValueError(f"holds a duplicate participant: {key[0]} {key[1]}")
            seen.add(key)
        return values

    @field_validator("owner_id")
    @classmethod
    def _owner_format(cls, value: str | None) -> str | None:
        if value is not None and not _OWNER_ID.match(value):
            raise ValueError("must be usr-<uuid> with a lower-case canonical uuid")
        return value

    @field_validator("custom_fields", "recurrence")
    @classmethod
    def _nesting(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and _depth(value) > MAX_CUSTOM_FIELDS_DEPTH:
            raise ValueError(f"is nested deeper than {MAX_CUSTOM_FIELDS_DEPTH} levels")
        return value

    def is_linked(self) -> bool:
        """The rule that an activity is logged against at least one account, deal or contact."""
        return bool(self.account_id or self.deal_id or self.contact_id)

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON values, date-times in UTC with `Z`."""
        data = self.model_dump(mode="python")
        for name in DATETIME_FIELDS:
            if data[name] is not None:
                data[name] = format_datetime(data[name])
        return data


CLIENT_FIELDS: Final = tuple(ActivityFields.model_fields)


def client_fields(document: dict[str, Any]) -> dict[str, Any]:
    """The client-settable fields of a document (what a create sets, what a patch may change)."""
    return {name: document[name] for name in CLIENT_FIELDS}

FIELDS_WITH_DEFAULTS: Final = frozenset(
    name
    for name, info in ActivityFields.model_fields.items()
    if not info.is_required() and info.get_default(call_default_factory=True) is not None
)


class ActivityDocument(ActivityFields):
    """The whole Activity document as stored in events and served by reads."""

    model_config = ConfigDict(extra="forbid", strict=False)

    id: str
    tenant_id: str
    app_id: str | None
    created_at: datetime
    updated_at: datetime
    created_by: str
    updated_by: str
    is_deleted: bool
    deleted_at: datetime | None
    deleted_by: str | None
    schema_version: int
    version: int


# ---------------------------------------------------------------------------------------------
# Ids
# ---------------------------------------------------------------------------------------------


def new_activity_id(ulid: ULID | None = None) -> str:
    return ID_PREFIX + str(ulid or ULID())


def is_activity_id(value: Any) -> bool:
    return isinstance(value, str) and bool(_ACTIVITY_ID.match(value))


def activity_uuid(activity_id: str) -> UUID:
    """The event store's originator id (a UUID) of an `act_<ULID>` id."""
    return ULID.from_str(activity_id[len(ID_PREFIX) :]).to_uuid()


def activity_id_of(originator_id: UUID) -> str:
    return ID_PREFIX + str(ULID.from_uuid(originator_id))


# ---------------------------------------------------------------------------------------------
# The stored events (eventsourcing domain events; their topics are `events.activity:<Name>`)
# ---------------------------------------------------------------------------------------------


class ActivityLogged(AggregateCreated):
    """A new activity was logged. Its `changes` (the initial client document) are not stored: they
    are the client fields of `document`, and storing them twice doubled the JSON every rebuild and
    every reader parses (class version 2; version 1 stored them, and is upcast by dropping them)."""

    class_version = 2

    document: dict[str, Any]
    actor: str
    schema_version: int
    traceparent: str | None = None

    @property
    def changes(self) -> dict[str, Any]:
        return client_fields(self.document)

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state.pop("changes", None)

    def apply(self, aggregate: Any) -> None:
        aggregate.document = self.document


class ActivityChanged(AggregateEvent):
    """What every event after the first carries (never stored itself: it has no topic of its own).
    Its fields are ActivityLogged's; each event holds the whole document after it."""

    document: dict[str, Any]
    changes: dict[str, Any]
    actor: str
    schema_version: int
    traceparent: str | None = None

    def apply(self, aggregate: Any) -> None:
        aggregate.document = self.document


class ActivityPatched(ActivityChanged):
    """A merge patch was applied. `changes` is the merge patch as applied."""


class ActivityDeleted(ActivityChanged):
    """The activity was soft-deleted. `changes` is {}."""


class ActivityRestored(ActivityChanged):
    """A soft-deleted activity was restored. `changes` is {}."""


ActivityEvent = ActivityLogged | ActivityPatched | ActivityDeleted | ActivityRestored

EVENT_KINDS: Final[dict[str, str]] = {
    "ActivityLogged": "logged",
    "ActivityPatched": "patched",
    "ActivityDeleted": "deleted",
    "ActivityRestored": "restored",
}


_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def valid_traceparent(value: str | None) -> str | None:
    """A W3C traceparent header value, or None when absent or malformed (the spec says ignore it)."""
    if value and _TRACEPARENT.match(value.strip()):
        return value.strip()
    return None


def event_type_name(event: ActivityEvent) -> str:
    return type(event).__name__


class EventBody(BaseModel):
    """The body of an event on JetStream and in `/events` (CONTRACT.md section 4)."""

    event_type: str
    schema_version: int
    activity_id: str
    tenant_id: str
    app_id: str | None
    version: int
    position: int
    occurred_at: str
    actor: str
    changes: dict[str, Any]
    activity: dict[str, Any]


def event_body(event: ActivityEvent, position: int) -> dict[str, Any]:
    """The wire body of a stored event at a global position."""
    document = event.document
    return {
        "event_type": event_type_name(event),
        "schema_version": event.schema_version,
        "activity_id": document["id"],
        "tenant_id": document["tenant_id"],
        "app_id": document["app_id"],
        "version": event.originator_version,
        "position": position,
        "occurred_at": format_datetime(event.timestamp),
        "actor": event.actor,
        "changes": event.changes,
        "activity": document,
    }
