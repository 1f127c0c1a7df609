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

from activities_client.document import DATETIME_FIELDS, SCHEMA_VERSION, client_fields, format_datetime, parse_datetime
from activities_client.errors import Gone, NotFound, VersionConflict
from events.activity import ActivityDeleted, ActivityLogged, ActivityPatched, ActivityRestored
from events.caller import Caller as Caller  # re-exported: `services.domain.Caller` keeps working
from events.commands import (
    Command,
    CreateActivity,
    DeleteActivity,
    PatchActivity,
    RestoreActivity,
    validate_fields,
)

RECURRENCE_INPUTS: Final = frozenset({"recurrence", "activity_date"})
"""A patch touching these checks the recurrence (events/recurrence.py); others keep a stored one as it is."""


@dataclass(frozen=True)
class Decision:
    """An event to append: its class and its attributes."""

    event_class: type[ActivityLogged | ActivityPatched | ActivityDeleted | ActivityRestored]
    document: dict[str, Any]
    changes: dict[str, Any]
    actor: str


class Activity(Aggregate):
    """The event-sourced Activity; its state is the document after its latest event."""

    document: dict[str, Any]

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    @classmethod
    def log(cls, originator_id: UUID, decision: Decision, now: datetime, traceparent: str | None = None) -> Activity:
        return cls._create(
            ActivityLogged,
            id=originator_id,
            timestamp=now,
            document=decision.document,
            actor=decision.actor,
            schema_version=SCHEMA_VERSION,
            traceparent=traceparent,
        )

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
) -> Decision | None:
    """The event a command produces on the current document, None for a no-op, or an error."""
    match command:
        case CreateActivity(fields=fields):
            assert new_id is not None, "a create needs the new activity id"
            return Decision(ActivityLogged, new_document(new_id, fields, caller, now), fields, caller.sub)
        case PatchActivity() | DeleteActivity() | RestoreActivity():
            if document is None or not is_visible(document, caller):
                raise NotFound(f"activity {command.activity_id} not found")
            _check_version(document, command.expected_version)
            return _decide_change(document, command, caller, now)
        case _:
            assert_never(command)


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
            if patched == client_fields(document):
                return None
            return Decision(
                ActivityPatched, _stamped(document, caller, now, **patched), _normalise_changes(changes), caller.sub
            )
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
