"""The Activity document: its published definition and every field rule (docs/contract.md section 1).

Pure data and pure functions, no I/O. The service validates with these same models, so the
service, its API documents and this client agree on one definition of a valid document.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, TypeGuard

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    field_validator,
)

SCHEMA_VERSION: Final = 2
"""Version of the Activity document schema (the `schema_version` field). Schema 2 added
`remind_at`, `external_key` and `is_erased` (SCHEMA_2_DEFAULTS); documents of schema 1, in events
stored before, are read as schema 2 by `upcast_document`."""

SCHEMA_2_DEFAULTS: Final = {"remind_at": None, "external_key": None, "is_erased": False}
"""What a schema 1 document holds of the fields schema 2 added."""

MAX_BODY_BYTES: Final = 256 * 1024
MAX_CUSTOM_FIELDS_DEPTH: Final = 8
ID_PREFIX: Final = "act_"
ACTIVITY_ID_PATTERN: Final = r"^act_[0-7][0-9A-HJKMNP-TV-Z]{25}$"
"""`act_` + a ULID: 26 Crockford base32 characters, the first 0-7 (a ULID is 128 bits). The one
definition: `is_activity_id`, the wire models and so the OpenAPI/AsyncAPI documents use it."""
_ACTIVITY_ID = re.compile(ACTIVITY_ID_PATTERN)
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
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


@functools.lru_cache(maxsize=256)
def format_datetime(value: datetime) -> str:
    """UTC with a `Z` suffix, microseconds when present (docs/contract.md section 1). Cached: a
    batch stamps every activity it writes with the same time (1.7 us a call, 0.1 from the cache);
    equal aware date-times are the same instant, so they have the same form."""
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
        "external_key",
        "is_erased",
    }
)

DATETIME_FIELDS: Final = ("activity_date", "due_date", "completed_at", "occurred_at", "remind_at")


class ActivityFields(BaseModel):
    """The client-settable fields of an Activity, with every rule of docs/contract.md section 1.

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
    remind_at: AwareDateTime | None = Field(default=None, strict=False)

    @field_validator("contact_ids", "attachment_refs", "tags")
    @classmethod
    def _unique(cls, values: list[str]) -> list[str]:
        if len(set(values)) == len(values):  # strings are equal exactly when their reprs are: a C check first
            return values
        return _no_duplicates(values)  # names the duplicate

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
        """The fields as JSON values, date-times in UTC with `Z`: what `model_dump(mode="json")`
        gives (tests/unit/test_domain.py compares them), read from the validated values instead
        (0.5 against 2.9 us, on every create). Every other value is JSON already (the model is
        strict); lists and objects are shared with the validated model, which is not kept, and a
        document is never changed in place."""
        data = dict(self.__dict__)
        for name in DATETIME_FIELDS:
            value = data[name]
            if value is not None:
                data[name] = format_datetime(value)
        if data["participants"]:
            data["participants"] = [participant.model_dump(mode="json") for participant in data["participants"]]
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
    external_key: str | None = None
    is_erased: bool = False


SKELETON_FIELDS: Final = (
    "id",
    "tenant_id",
    "app_id",
    "created_at",
    "updated_at",
    "deleted_at",
    "is_deleted",
    "schema_version",
    "version",
    "is_erased",
)
"""What remains of an erased activity (docs/contract.md section 11): its ids, version, the server's time
stamps and flags; nothing a client wrote (`external_key` came from a client too, and goes)."""


def skeleton(document: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The skeleton of a document (SKELETON_FIELDS, `is_erased` true), with `changes` applied."""
    kept = {name: document.get(name) for name in SKELETON_FIELDS}
    flags = {"schema_version": SCHEMA_VERSION, "is_erased": True, "is_deleted": bool(kept["is_deleted"])}
    return {**kept, **flags, **changes}


def upcast_document(document: dict[str, Any]) -> dict[str, Any]:
    """A stored document in the current schema: the fields added since its schema take their
    defaults (pure; a document already current is returned as it is)."""
    if document.get("schema_version", SCHEMA_VERSION) >= SCHEMA_VERSION:
        return document
    return {**SCHEMA_2_DEFAULTS, **document, "schema_version": SCHEMA_VERSION}


# ---------------------------------------------------------------------------------------------
# Ids
# ---------------------------------------------------------------------------------------------


_PAIRS: Final = [first + second for first in _CROCKFORD for second in _CROCKFORD]  # ten bits, two characters


class _RandomBits:
    """80 random bits at a time from the operating system's generator, read 1,024 ULIDs' worth at
    once: `secrets.randbits` makes a system call per ULID (about 3% of the service's CPU per
    create, profiled). Thread-safe, and read afresh in a forked child (else parent and child
    would hand out the same bits)."""

    CHUNK: Final = 10 * 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._bytes, self._at = b"", 0

    def next80(self) -> int:
        with self._lock:
            if self._at >= len(self._bytes):
                self._bytes, self._at = os.urandom(self.CHUNK), 0
            at, chunk = self._at, self._bytes
            self._at += 10
        return int.from_bytes(chunk[at : at + 10], "big")


_random_bits = _RandomBits()


def _ulid_text(value: int) -> str:
    """A ULID's Crockford base32 (26 characters, ten bits at a time)."""
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in range(120, -1, -10)])


@functools.lru_cache(maxsize=4)
def _time_text(milliseconds: int) -> str:
    """The first ten characters of a ULID: its 48 bits of milliseconds (and two zero bits above
    them). Cached: every ULID of the same millisecond starts with them."""
    return _ulid_text(milliseconds << 80)[:10]


def _new_ulid() -> tuple[str, int]:
    """A new ULID: its Crockford base32 text and its 128 bits, 48 bits of milliseconds since the
    epoch then 80 random bits. `_ulid_text` of the bits, in a third of its time (a create's id is
    on every create's path): the time's characters come from `_time_text`, the random ones from
    two halves of 40 bits (small integers, where shifting the 128-bit value made a new big one
    for each pair of characters)."""
    milliseconds = time.time_ns() // 1_000_000
    random_bits = _random_bits.next80()
    high, low = random_bits >> 40, random_bits & 0xFF_FFFF_FFFF
    text = _time_text(milliseconds) + _forty_bits_text(high) + _forty_bits_text(low)
    return text, milliseconds << 80 | random_bits


def _forty_bits_text(value: int) -> str:
    """Eight characters of Crockford base32 for 40 bits, ten bits at a time (as `_ulid_text`)."""
    return _PAIRS[value >> 30] + _PAIRS[value >> 20 & 1023] + _PAIRS[value >> 10 & 1023] + _PAIRS[value & 1023]


MAX_KEY_LENGTH: Final = 200


def is_key_text(value: Any) -> TypeGuard[str]:
    """Whether `value` is 1-MAX_KEY_LENGTH (200) printable ASCII characters: what an Idempotency-Key and an
    external key may be. (`isascii` and `isprintable` are C loops; a generator over the
    characters was 3% of an inbox command's CPU, checked twice.)"""
    return isinstance(value, str) and 1 <= len(value) <= MAX_KEY_LENGTH and value.isascii() and value.isprintable()


def new_activity_id() -> str:
    """A fresh `act_<ULID>` id."""
    return new_activity_id_bits()[0]


def new_activity_id_bits() -> tuple[str, int]:
    """A fresh `act_<ULID>` id and its ULID's 128 bits (the event store's UUID, without decoding
    the id again)."""
    text, value = _new_ulid()
    return ID_PREFIX + text, value


def is_activity_id(value: Any) -> bool:
    """Whether `value` is an `act_<ULID>` id (ACTIVITY_ID_PATTERN)."""
    return isinstance(value, str) and bool(_ACTIVITY_ID.match(value))


@dataclass(frozen=True)
class EventType:
    """A kind of stored event: its type name, the last token of its subject, what it means."""

    name: str
    kind: str
    description: str


EVENT_TYPES: Final = (
    EventType("ActivityLogged", "logged", "a new activity. `changes` is the initial client document."),
    EventType("ActivityPatched", "patched", "a merge patch was applied. `changes` is the patch as applied."),
    EventType("ActivityDeleted", "deleted", "soft-deleted. `changes` is {}."),
    EventType("ActivityRestored", "restored", "restored after a delete. `changes` is {}."),
    EventType(
        "ActivityErased",
        "erased",
        "erased (section 11): every earlier event of the activity now holds its skeleton only; forget your "
        "copies. `changes` is {}, `activity` the skeleton.",
    ),
    EventType(
        "ActivityReminderDue",
        "reminder_due",
        "`remind_at` came for an open activity: `reminder_sent` became true (actor `system`). `changes` is {}.",
    ),
    EventType(
        "ActivityBecameOverdue",
        "overdue",
        "`due_date` passed for an open activity (once per `due_date` value; actor `system`). `changes` is {}.",
    ),
)
"""Every event type (docs/contract.md section 4), defined once: the relay's subjects, the AsyncAPI
document and the client's `Event.kind` follow from it; the service's event classes match it."""

EVENT_KINDS: Final[dict[str, str]] = {event.name: event.kind for event in EVENT_TYPES}
"""The last token of an event's subject, by event type."""


class EventBody(BaseModel):
    """The body of an event on JetStream and in `/events` (docs/contract.md section 4)."""

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
