"""The Activity aggregate: every rule of the contract as pure decisions.

`decide(document, command, caller, now)` takes the current document (or None) and a command
and returns the event to append, or None for a no-op; it never does I/O and takes the clock
and the new id as arguments, so unit tests read given / when / then.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, assert_never
from uuid import UUID

from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic

from activities_client.document import (
    DATETIME_FIELDS,
    SCHEMA_VERSION,
    client_fields,
    format_datetime,
    parse_datetime,
    skeleton,
)
from activities_client.errors import Gone, NotFound, VersionConflict
from events.activity import (
    COMPLETED_STATUSES,
    ActivityBecameOverdue,
    ActivityDeleted,
    ActivityErased,
    ActivityLogged,
    ActivityPatched,
    ActivityReminderDue,
    ActivityRestored,
    armed_reminder,
    pending_overdue,
    same_instant,
)
from events.caller import Caller as Caller  # re-exported: `services.domain.Caller` keeps working
from events.commands import (
    Command,
    CreateActivity,
    DeleteActivity,
    EraseActivity,
    EraseByContact,
    FireReminder,
    MarkOverdue,
    PatchActivity,
    RestoreActivity,
    TimeCommand,
    UpsertActivity,
    validate_fields,
)

SYSTEM_ACTOR: Final = "system"
"""The actor (and `updated_by`) of what the service appends by itself: reminders, overdue."""

EventClass = type[
    ActivityLogged
    | ActivityPatched
    | ActivityDeleted
    | ActivityRestored
    | ActivityReminderDue
    | ActivityBecameOverdue
    | ActivityErased
]

RECURRENCE_INPUTS: Final = frozenset({"recurrence", "activity_date"})
"""A patch touching these checks the recurrence (events/recurrence.py); others keep a stored one as it is."""


@dataclass  # never changed, yet not frozen: one per command, and a frozen __init__ costs 3.5x
class Decision:
    """An event to append: its class and its attributes."""

    event_class: EventClass
    document: dict[str, Any]
    changes: dict[str, Any]
    actor: str


class Activity(Aggregate):
    """The event-sourced Activity; its state is the document after its latest event."""

    document: dict[str, Any]
    overdue_for: str | None = None
    """The `due_date` value the activity was last found overdue for (ActivityBecameOverdue sets
    it; any event that moves `due_date` clears it): overdue is appended once per value."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    @classmethod
    def log(cls, originator_id: UUID, decision: Decision, now: datetime, traceparent: str | None = None) -> Activity:
        """A new activity and its ActivityLogged event, built as the library's `_create` builds them
        (tests/unit/test_domain.py compares the two) without its generic steps: resolving topics and
        matching the event's attributes to `__init__`'s parameters were two thirds of its cost, on
        every create. The event's attributes are set as its frozen dataclass's `__init__` sets them,
        one by one through `object.__setattr__` (2.7 against 0.6 us); its `__post_init__` checks only
        that the originator id is a UUID, which `originator_id` is by its type."""
        event = object.__new__(ActivityLogged)
        event.__dict__.update(
            originator_id=originator_id,
            originator_version=cls.INITIAL_VERSION,
            timestamp=now,
            originator_topic=ACTIVITY_TOPIC,
            document=decision.document,
            actor=decision.actor,
            schema_version=SCHEMA_VERSION,
            traceparent=traceparent,
        )
        activity = cls.__new__(cls)
        activity.__base_init__(originator_id, cls.INITIAL_VERSION, now)
        event.apply(activity)  # what `__init__` would set: the document
        activity._pending_events.append(event)
        return activity

    def detached_copy(self) -> Activity:
        """A copy to decide a command on, leaving this one (the cached one) as it is.

        Cheaper than `copy.deepcopy`: a document is never changed in place (every decision builds
        a new one), so the copy shares it; only the list of pending events is its own."""
        clone = copy.copy(self)
        clone._pending_events = []
        return clone

    def record(self, decision: Decision, now: datetime, traceparent: str | None = None) -> None:
        self.trigger_event(
            decision.event_class,
            timestamp=now,
            document=decision.document,
            changes=decision.changes,
            actor=decision.actor,
            schema_version=SCHEMA_VERSION,
            traceparent=traceparent,
        )


ACTIVITY_TOPIC: Final = get_topic(Activity)


# ---------------------------------------------------------------------------------------------
# Pure rules
# ---------------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON Merge Patch: objects merge key by key, `null` removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def is_visible(document: dict[str, Any], caller: Caller) -> bool:
    """A caller sees its tenant's activities, and only its app's when its token names an app."""
    if document["tenant_id"] != caller.tenant_id:
        return False
    return caller.app_id is None or document["app_id"] == caller.app_id


def _normalise_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """The patch as applied: date-times in the canonical UTC form."""
    normalised = dict(changes)
    for name in DATETIME_FIELDS:
        if normalised.get(name) is not None:
            normalised[name] = format_datetime(parse_datetime(normalised[name]))
    return normalised


def _check_version(document: dict[str, Any], expected_version: int | None) -> None:
    if expected_version is not None and expected_version != document["version"]:
        raise VersionConflict(
            f"expected version {expected_version} but the activity is at version {document['version']}",
            current_version=document["version"],
        )


def _stamped(document: dict[str, Any], caller: Caller, now: datetime, **changes: Any) -> dict[str, Any]:
    return {
        **document,
        **changes,
        "updated_at": format_datetime(now),
        "updated_by": caller.sub,
        "version": document["version"] + 1,
    }


def new_document(activity_id: str, fields: dict[str, Any], caller: Caller, now: datetime) -> dict[str, Any]:
    stamp = format_datetime(now)
    return {
        "id": activity_id,
        "tenant_id": caller.tenant_id,
        "app_id": caller.app_id,
        "created_at": stamp,
        "updated_at": stamp,
        "created_by": caller.sub,
        "updated_by": caller.sub,
        "is_deleted": False,
        "deleted_at": None,
        "deleted_by": None,
        "schema_version": SCHEMA_VERSION,
        "version": 1,
        "external_key": None,
        "is_erased": False,
        **fields,
    }


def decide(
    document: dict[str, Any] | None,
    command: Command,
    caller: Caller,
    now: datetime,
    new_id: str | None = None,
    overdue_for: str | None = None,
) -> Decision | None:
    """The event a command produces on the current document, None for a no-op, or an error.
    `overdue_for` is the aggregate's memory of the due_date it was last found overdue for."""
    match command:
        case CreateActivity(fields=fields):
            assert new_id is not None, "a create needs the new activity id"
            completed = completion(fields, None, now)
            fields = {**fields, **completed} if completed else fields
            return Decision(ActivityLogged, new_document(new_id, fields, caller, now), fields, caller.sub)
        case PatchActivity() | DeleteActivity() | RestoreActivity():
            if document is None or not is_visible(document, caller):
                raise NotFound(f"activity {command.activity_id} not found")
            if document.get("is_erased"):
                raise Gone(f"activity {command.activity_id} was erased")
            _check_version(document, command.expected_version)
            return _decide_change(document, command, caller, now)
        case UpsertActivity():
            return _decide_upsert(document, command, caller, now, new_id)
        case EraseActivity(if_names_contact=contact, if_deleted_before=cutoff):
            if document is None or not is_visible(document, caller):
                raise NotFound(f"activity {command.activity_id} not found")
            if document.get("is_erased") or (contact is not None and not names_contact(document, contact)):
                return None  # erasing an erased activity, or one no longer naming the contact: a no-op
            if cutoff is not None and not deleted_before(document, parse_datetime(cutoff)):
                return None  # retention: restored (or deleted again) since it was found
            erased = skeleton(document, updated_at=format_datetime(now), version=document["version"] + 1)
            return Decision(ActivityErased, erased, {}, caller.sub)
        case EraseByContact():
            raise TypeError("an erasure by contact is carried out one EraseActivity at a time (services/erasure.py)")
        case FireReminder() | MarkOverdue():
            if document is None or not is_visible(document, caller):
                raise NotFound(f"activity {command.activity_id} not found")
            _check_version(document, command.expected_version)
            return decide_time(document, command, now, overdue_for)
        case _:
            assert_never(command)


# ---------------------------------------------------------------------------------------------
# Time (contract section 9)
# ---------------------------------------------------------------------------------------------


def completion(given: dict[str, Any], before: dict[str, Any] | None, now: datetime) -> dict[str, Any]:
    """What completion adds to a create or a patch: `completed_at` = the event's time when it sets
    `status` to `completed` or `done` (any case) without giving `completed_at`. `given` is the
    create's fields (`before` None) or the merge patch (`before` the document): a patch that also
    clears `completed_at` (`null`) is taken at its word, and a patch of an activity completed
    already keeps its completion time (repeating the status never moves it)."""
    status = given.get("status")
    if not isinstance(status, str) or status.casefold() not in COMPLETED_STATUSES:
        return {}
    if given.get("completed_at") is not None:
        return {}
    if before is not None and ("completed_at" in given or before.get("completed_at") is not None):
        return {}
    return {"completed_at": format_datetime(now)}


def rearm(changes: dict[str, Any], patched: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """A patch that changes `remind_at` re-arms the reminder: `reminder_sent` back to false, unless
    the same patch sets `reminder_sent` itself."""
    if "remind_at" not in changes or "reminder_sent" in changes:
        return {}
    if same_instant(patched.get("remind_at"), before.get("remind_at")) or not patched.get("reminder_sent"):
        return {}
    return {"reminder_sent": False}


def decide_time(
    document: dict[str, Any], command: TimeCommand, now: datetime, overdue_for: str | None
) -> Decision | None:
    """A firing of the scheduler, decided on the current document: the event when it is due at
    `now`, else None (no longer due: completed, deleted, re-armed for later, already fired...)."""
    system = Caller(document["tenant_id"], SYSTEM_ACTOR, document["app_id"])
    match command:
        case FireReminder():
            due = armed_reminder(document)
            if due is None or due > now:
                return None
            return Decision(ActivityReminderDue, _stamped(document, system, now, reminder_sent=True), {}, SYSTEM_ACTOR)
        case MarkOverdue():
            due = pending_overdue(document, overdue_for)
            if due is None or due > now:
                return None
            return Decision(ActivityBecameOverdue, _stamped(document, system, now), {}, SYSTEM_ACTOR)
        case _:
            assert_never(command)


def _decide_upsert(
    document: dict[str, Any] | None, command: UpsertActivity, caller: Caller, now: datetime, new_id: str | None
) -> Decision | None:
    """`document` is the activity keyed `command.external_key` in the caller's scope, or None: then
    the upsert creates it (create rules; `null` fields are left out, as a merge patch of nothing
    would), stamped with the key. Otherwise it is a merge patch of that activity."""
    if document is None:
        if command.expected_version is not None:
            raise VersionConflict(
                f"expected version {command.expected_version} but no activity has this external_key yet",
                current_version=0,
            )
        assert new_id is not None, "an upsert that creates needs the new activity id"
        fields = validate_fields(merge_patch({}, command.changes)).to_json()
        fields = {**fields, **completion(fields, None, now)}
        created = {**new_document(new_id, fields, caller, now), "external_key": command.external_key}
        return Decision(ActivityLogged, created, fields, caller.sub)
    if not is_visible(document, caller):
        raise NotFound("no activity has this external_key")
    if document.get("is_erased"):
        raise Gone(f"activity {document['id']} is erased")
    patch = PatchActivity(document["id"], command.changes, command.expected_version)
    _check_version(document, command.expected_version)
    return _decide_change(document, patch, caller, now)


def deleted_before(document: dict[str, Any], cutoff: datetime) -> bool:
    """Whether a document is deleted, and has been since before `cutoff`."""
    deleted_at = document.get("deleted_at")
    return bool(document.get("is_deleted")) and deleted_at is not None and parse_datetime(deleted_at) < cutoff


def names_contact(document: dict[str, Any], contact_id: str) -> bool:
    """Whether a document names a contact: in `contact_id`, `contact_ids` or as a contact participant."""
    if document.get("contact_id") == contact_id or contact_id in (document.get("contact_ids") or ()):
        return True
    return any(
        isinstance(p, dict) and p.get("type") == "contact" and p.get("id") == contact_id
        for p in document.get("participants") or ()
    )


def _decide_change(
    document: dict[str, Any],
    command: PatchActivity | DeleteActivity | RestoreActivity,
    caller: Caller,
    now: datetime,
) -> Decision | None:
    match command:
        case PatchActivity(changes=changes):
            if document["is_deleted"]:
                raise Gone(f"activity {command.activity_id} is deleted; restore it first")
            merged = merge_patch(client_fields(document), changes)
            patched = validate_fields(merged, check_recurrence=not RECURRENCE_INPUTS.isdisjoint(changes)).to_json()
            derived = {**completion(changes, document, now), **rearm(changes, patched, document)}
            patched.update(derived)
            if patched == client_fields(document):
                return None
            applied = {**_normalise_changes(changes), **derived}
            return Decision(ActivityPatched, _stamped(document, caller, now, **patched), applied, caller.sub)
        case DeleteActivity():
            if document["is_deleted"]:
                return None
            deleted = _stamped(
                document, caller, now, is_deleted=True, deleted_at=format_datetime(now), deleted_by=caller.sub
            )
            return Decision(ActivityDeleted, deleted, {}, caller.sub)
        case RestoreActivity():
            if not document["is_deleted"]:
                return None
            restored = _stamped(document, caller, now, is_deleted=False, deleted_at=None, deleted_by=None)
            return Decision(ActivityRestored, restored, {}, caller.sub)
        case _:
            assert_never(command)
