"""The stored events of an activity (eventsourcing domain events) and their wire bodies.

The Activity document itself, its field rules and ids are the published language of the client
distribution (`activities_client.document`); this module adds what only the service needs: the
event classes the store holds, the mapping of `act_` ids to the store's UUIDs, and event bodies.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Final, assert_never
from uuid import UUID, SafeUUID

from eventsourcing.domain import AggregateCreated, AggregateEvent
from ulid import ULID

from activities_client.document import (
    ID_PREFIX,
    SCHEMA_VERSION,
    client_fields,
    format_datetime,
    is_activity_id,
    new_activity_id_bits,
    parse_datetime,
    skeleton,
    upcast_document,
)

_CROCKFORD = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TO_BASE_32 = bytes.maketrans(  # Crockford's digits to Python's; its four excluded letters to a non-digit
    _CROCKFORD + _CROCKFORD.lower() + b"ILOUilou", b"0123456789ABCDEFGHIJKLMNOPQRSTUV" * 2 + b"!" * 8
)


def _ulid_int(activity_id: str) -> int:
    """The 128 bits of an `act_<ULID>` id. Crockford base32 is read as Python's base 32 after
    renaming its letters (a bytes table and `int`, both in C: the ULID package's pure-Python decoder
    was an eighth of the CPU of a create in a batch, and `str.translate` a third of this function)."""
    encoded = activity_id[len(ID_PREFIX) :]
    if len(encoded) != 26 or encoded[0] not in "01234567" or not encoded.isascii():
        raise ValueError("an activity id is act_ followed by a 26-character ULID")
    translated = encoded.encode("ascii").translate(_TO_BASE_32)
    if not translated.isalnum():  # `int` would also take "_" between digits
        raise ValueError("an activity id is act_ followed by a 26-character ULID")
    return int(translated, 32)


def activity_uuid(activity_id: str) -> UUID:
    """The event store's originator id (a UUID) of an `act_<ULID>` id: the ULID's 128 bits."""
    return UUID(int=_ulid_int(activity_id))


def new_activity_ref() -> tuple[str, UUID]:
    """A fresh `act_<ULID>` id and its originator id (`activity_uuid` of it)."""
    activity_id, bits = new_activity_id_bits()
    return activity_id, uuid_of_bits(bits)


def uuid_of_bits(bits: int) -> UUID:
    """`UUID(int=bits)` for 128 bits known to be in range, at a third of its cost (every create
    makes one): the UUID's two slots set directly, as its constructor ends by doing.
    tests/unit/test_activity_ids.py compares the two."""
    value = object.__new__(UUID)
    object.__setattr__(value, "int", bits)
    object.__setattr__(value, "is_safe", SafeUUID.unknown)
    return value


def activity_uuid_hex(activity_id: str) -> str:
    """`activity_uuid(activity_id).hex` without building the UUID (PostgreSQL reads a uuid from its
    32 hex digits): for statements that take many activities as one text parameter."""
    return format(_ulid_int(activity_id), "032x")


def is_activity_event_id(value: object) -> bool:
    """Whether a value is an `act_<ULID>` id (e.g. a message's Activity-Id header)."""
    return is_activity_id(value)


def activity_id_of(originator_id: UUID) -> str:
    return ID_PREFIX + str(ULID.from_uuid(originator_id))


# ---------------------------------------------------------------------------------------------
# The stored events (eventsourcing domain events; their topics are `events.activity:<Name>`)
# ---------------------------------------------------------------------------------------------


def upcast_to_schema_2(state: dict[str, Any]) -> None:
    """An event stored with a schema 1 document, read as schema 2 (the new fields' defaults)."""
    state["document"] = upcast_document(state["document"])
    state["schema_version"] = SCHEMA_VERSION


class ActivityLogged(AggregateCreated):
    """A new activity was logged. Its `changes` (the initial client document) are not stored: they
    are the client fields of `document`, and storing them twice doubled the JSON every rebuild and
    every reader parses (class version 2; version 1 stored them, and is upcast by dropping them).
    Class version 3 carries a schema 2 document (version 2 a schema 1 one, upcast when read)."""

    class_version = 3

    document: dict[str, Any]
    actor: str
    schema_version: int
    traceparent: str | None = None

    @property
    def changes(self) -> dict[str, Any]:
        if self.document.get("is_erased"):  # rewritten to its skeleton by an erasure: no client fields
            return {}
        return client_fields(self.document)

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state.pop("changes", None)

    upcast_v2_v3 = staticmethod(upcast_to_schema_2)

    def apply(self, aggregate: Any) -> None:
        aggregate.document = self.document


class ActivityChanged(AggregateEvent):
    """What every event after the first carries (never stored itself: it has no topic of its own).
    Its fields are ActivityLogged's; each event holds the whole document after it. Class version 2
    carries a schema 2 document (version 1 a schema 1 one, upcast when read)."""

    class_version = 2
    upcast_v1_v2 = staticmethod(upcast_to_schema_2)

    document: dict[str, Any]
    changes: dict[str, Any]
    actor: str
    schema_version: int
    traceparent: str | None = None

    def apply(self, aggregate: Any) -> None:
        # the due_date value the activity was last found overdue for holds only while due_date
        # keeps that value: moving it (and back again) makes it overdue again (contract section 9)
        overdue_for = getattr(aggregate, "overdue_for", None)
        if overdue_for is not None and not same_instant(overdue_for, self.document.get("due_date")):
            aggregate.overdue_for = None
        aggregate.document = self.document


class ActivityPatched(ActivityChanged):
    """A merge patch was applied. `changes` is the merge patch as applied."""


class ActivityDeleted(ActivityChanged):
    """The activity was soft-deleted. `changes` is {}."""


class ActivityRestored(ActivityChanged):
    """A soft-deleted activity was restored. `changes` is {}."""


class ActivityErased(ActivityChanged):
    """The activity was erased (docs/contract.md section 11). `changes` is {} and `document` the
    skeleton (activities_client.document.SKELETON_FIELDS). In the same transaction every earlier
    event of the activity was rewritten to its skeleton (`erased_state`): same topic, version,
    position and time stamp, the document reduced to the skeleton at that version, `changes` {}."""


class ActivityReminderDue(ActivityChanged):
    """The activity's `remind_at` came while it was open and its reminder armed: `reminder_sent`
    became true (actor "system"). `changes` is {}. New in v1.1 (class version 2, as its base)."""


class ActivityBecameOverdue(ActivityChanged):
    """The activity's `due_date` passed while it was open; the document is unchanged but for
    `version`, `updated_at` and `updated_by` ("system"). `changes` is {}. Appended once per
    `due_date` value: the aggregate remembers the value in `overdue_for`. New in v1.1."""

    def apply(self, aggregate: Any) -> None:
        aggregate.document = self.document
        aggregate.overdue_for = self.document.get("due_date")


ActivityEvent = (
    ActivityLogged
    | ActivityPatched
    | ActivityDeleted
    | ActivityRestored
    | ActivityReminderDue
    | ActivityBecameOverdue
    | ActivityErased
)


def holds_client_content(event: ActivityEvent) -> bool:
    """Whether an event's body may hold what a client wrote (its published message must then be
    remembered for erasure, projections/erasure.py). Exhaustive: a new event type must say."""
    match event:
        case (
            ActivityLogged()
            | ActivityPatched()
            | ActivityDeleted()
            | ActivityRestored()
            | ActivityReminderDue()
            | ActivityBecameOverdue()
        ):
            return not event.document.get("is_erased")  # a skeleton left by an erasure holds none
        case ActivityErased():
            return False  # the skeleton that tells subscribers to forget: it stays on the stream
        case _:
            assert_never(event)


def erased_copy(event: ActivityEvent) -> ActivityEvent:
    """The skeleton an erasure leaves of a stored event: the same class, activity, version, time
    stamp and actor (the verified caller, a server field); the document reduced to the skeleton of
    that version; no `changes` and no trace context (both came from a client)."""
    document = skeleton(event.document)
    event_class: Any = type(event)  # the library's dataclass events: mypy does not see their fields
    if isinstance(event, ActivityLogged):
        logged: ActivityEvent = event_class(
            originator_id=event.originator_id,
            originator_version=event.originator_version,
            timestamp=event.timestamp,
            originator_topic=event.originator_topic,
            document=document,
            actor=event.actor,
            schema_version=SCHEMA_VERSION,
            traceparent=None,
        )
        return logged
    changed: ActivityEvent = event_class(
        originator_id=event.originator_id,
        originator_version=event.originator_version,
        timestamp=event.timestamp,
        document=document,
        changes={},
        actor=event.actor,
        schema_version=SCHEMA_VERSION,
        traceparent=None,
    )
    return changed


# ---------------------------------------------------------------------------------------------
# Time (contract section 9): what a document says is due, shared by the domain's decisions and
# the scheduler's due-time index so that both read the same rule
# ---------------------------------------------------------------------------------------------

COMPLETED_STATUSES: Final = frozenset({"completed", "done"})
"""A `status` that completes an activity (compared case-insensitively)."""


def _instant(value: Any) -> datetime | None:
    return None if value is None else parse_datetime(value)


def same_instant(a: Any, b: Any) -> bool:
    """Whether two stored date-times (or None) are the same instant."""
    return _instant(a) == _instant(b)


def is_open(document: dict[str, Any]) -> bool:
    """Open: live (not deleted, not erased) and not completed (`completed_at` unset)."""
    return not document.get("is_deleted") and not document.get("is_erased") and document.get("completed_at") is None


def armed_reminder(document: dict[str, Any]) -> datetime | None:
    """When the reminder fires: `remind_at` of an open activity whose `reminder_sent` is false."""
    if is_open(document) and not document.get("reminder_sent") and document.get("remind_at") is not None:
        return parse_datetime(document["remind_at"])
    return None


def pending_overdue(document: dict[str, Any], overdue_for: Any) -> datetime | None:
    """When the activity becomes overdue: `due_date` of an open activity, unless it was already
    found overdue for that `due_date` value (`overdue_for`)."""
    due = _instant(document.get("due_date"))
    if due is None or not is_open(document) or _instant(overdue_for) == due:
        return None
    return due


_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def valid_traceparent(value: str | None) -> str | None:
    """A W3C traceparent header value, or None when absent or malformed (the spec says ignore it)."""
    if value and _TRACEPARENT.match(value.strip()):
        return value.strip()
    return None


def event_type_name(event: ActivityEvent) -> str:
    return type(event).__name__


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
