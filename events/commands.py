"""The imperative commands other services send (docs/contract.md section 3): their typed forms, their
parsers, and the registry `COMMANDS`.

Parsing turns any wire body into a typed command or a `ValidationError` naming the field. A new
command is its body model (activities_client/wire.py), its parser and registry entry (here), its
rule (services/domain.py) and its event class (events/activity.py). Everything that is only
dispatch follows from `COMMANDS`: the NATS subjects the service serves, the HTTP write routes, and
the AsyncAPI and OpenAPI documents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
import pydantic
from pydantic import BaseModel

from activities_client.document import (
    MAX_BODY_BYTES,
    MAX_CUSTOM_FIELDS_DEPTH,
    SERVER_FIELDS,
    ActivityFields,
    is_activity_id,
)
from activities_client.errors import ValidationError, field_error
from activities_client.wire import ActivityRefBody, ActivityReply, PatchActivityBody
from events import recurrence as recurrence_rules


@dataclass(frozen=True)
class CreateActivity:
    """Log a new activity with these client fields: all of them, validated and in their JSON form
    (`parse_create` makes them, so that a create is validated once, where it is received)."""

    fields: dict[str, Any]


@dataclass(frozen=True)
class PatchActivity:
    """Apply a JSON Merge Patch of client fields."""

    activity_id: str
    changes: dict[str, Any]
    expected_version: int | None = None


@dataclass(frozen=True)
class DeleteActivity:
    activity_id: str
    expected_version: int | None = None


@dataclass(frozen=True)
class RestoreActivity:
    activity_id: str
    expected_version: int | None = None


Command = CreateActivity | PatchActivity | DeleteActivity | RestoreActivity


def details_of(error: pydantic.ValidationError) -> list[dict[str, str]]:
    """Pydantic errors as contract details: the dotted field path and a message."""
    details = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "body"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "is not a field of an Activity"
        details.append({"field": location, "message": message.removeprefix("Value error, ")})
    return details


def validation_error(error: pydantic.ValidationError) -> ValidationError:
    details = details_of(error)
    summary = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
    return ValidationError(f"invalid activity: {summary}", details)


def parse_json_object(body: bytes | str | dict[str, Any]) -> dict[str, Any]:
    """The body as a JSON object, or a validation error (not JSON, not an object, too large)."""
    if isinstance(body, dict):
        return body
    if len(body) > MAX_BODY_BYTES:
        raise field_error("body", f"is larger than {MAX_BODY_BYTES} bytes")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise field_error("body", "is not valid UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise field_error("body", "must be a JSON object")
    check_storable(data)
    return data


MAX_BODY_DEPTH = MAX_CUSTOM_FIELDS_DEPTH + 8
"""Deepest JSON a command body may be: custom_fields' limit plus the envelope (`changes`, arrays of objects)."""


def check_storable(data: dict[str, Any]) -> None:
    """Refuse what PostgreSQL cannot store or the service cannot process safely: strings (or keys) with
    NUL characters (jsonb and text refuse them) and nesting deeper than MAX_BODY_DEPTH (recursion limits).
    Iterative, not recursive, since the body may be hostile."""
    stack: list[tuple[Any, int, str]] = [(value, 1, name) for name, value in data.items()]
    for name in data:
        if "\x00" in name:
            raise field_error("body", "holds a key with a NUL character")
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise field_error(path, "holds a NUL character")
            continue
        if isinstance(item, dict):
            if any("\x00" in key for key in item):
                raise field_error(path, "holds a key with a NUL character")
            children: list[tuple[Any, str]] = [(value, f"{path}.{key}") for key, value in item.items()]
        elif isinstance(item, list):
            children = [(value, f"{path}.{i}") for i, value in enumerate(item)]
        else:
            continue
        if depth >= MAX_BODY_DEPTH:
            raise field_error(path.split(".")[0], f"is nested deeper than {MAX_BODY_DEPTH} levels")
        stack.extend((child, depth + 1, child_path) for child, child_path in children)


def reject_server_and_unknown_fields(data: dict[str, Any]) -> None:
    """A validation error naming the first field that is the server's or no field of an Activity."""
    for name in data:
        if name in SERVER_FIELDS:
            raise field_error(name, "is set by the server and cannot be sent")
        if name not in ActivityFields.model_fields:
            raise field_error(name, "is not a field of an Activity")


def validate_fields(data: dict[str, Any], check_recurrence: bool = True) -> ActivityFields:
    """Validate a complete set of client fields (a create body or a patched document). A server
    field is named as such; an unknown one is refused by the model (`extra="forbid"`).

    `check_recurrence=False` (a patch that touches neither `recurrence` nor `activity_date`) keeps
    a recurrence stored before it was checked (release 1.0 took any object) as it is."""
    if not SERVER_FIELDS.isdisjoint(data):
        reject_server_and_unknown_fields(data)
    try:
        fields = ActivityFields.model_validate(data)
    except pydantic.ValidationError as error:
        raise validation_error(error) from None
    if not fields.is_linked():
        raise field_error("account_id", "at least one of account_id, deal_id, contact_id must be set")
    if check_recurrence and fields.recurrence is not None:
        try:
            fields.recurrence = recurrence_rules.check_recurrence(fields.recurrence, fields.activity_date)
        except recurrence_rules.RecurrenceError as error:
            raise field_error(error.field, error.message) from None
    if len(orjson.dumps(data)) > MAX_BODY_BYTES:  # after a patch: an event carries the document twice
        raise field_error("body", f"the activity would be larger than {MAX_BODY_BYTES} bytes")
    return fields


def _activity_id(data: dict[str, Any]) -> str:
    value = data.get("id")
    if not is_activity_id(value):
        raise field_error("id", "must be an activity id: act_ followed by a 26-character ULID")
    return str(value)


def _expected_version(data: dict[str, Any]) -> int | None:
    value = data.get("expected_version")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise field_error("expected_version", "must be a positive integer")
    return value


def _only_keys(data: dict[str, Any], allowed: set[str]) -> None:
    for name in data:
        if name not in allowed:
            raise field_error(name, f"is not allowed here; expected only {sorted(allowed)}")


def parse_create(body: bytes | str | dict[str, Any]) -> CreateActivity:
    return CreateActivity(fields=validate_fields(parse_json_object(body)).to_json())


def parse_patch(body: bytes | str | dict[str, Any]) -> PatchActivity:
    data = parse_json_object(body)
    _only_keys(data, {"id", "expected_version", "changes"})
    changes = data.get("changes")
    if not isinstance(changes, dict):
        raise field_error("changes", "must be a JSON object (a merge patch of activity fields)")
    reject_server_and_unknown_fields(changes)
    return PatchActivity(_activity_id(data), changes, _expected_version(data))


def parse_delete(body: bytes | str | dict[str, Any]) -> DeleteActivity:
    data = parse_json_object(body)
    _only_keys(data, {"id", "expected_version"})
    return DeleteActivity(_activity_id(data), _expected_version(data))


def parse_restore(body: bytes | str | dict[str, Any]) -> RestoreActivity:
    data = parse_json_object(body)
    _only_keys(data, {"id", "expected_version"})
    return RestoreActivity(_activity_id(data), _expected_version(data))


# ---------------------------------------------------------------------------------------------
# The registry: one entry per command
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpRoute:
    """How a command is reached over HTTP, below `/api/v1/crm/activities`.

    The command's body is built from the request: each path parameter goes in under its own name,
    the JSON body under `body_field` (or is the whole command body when `body_field` is None),
    and `If-Match: "<version>"` becomes `expected_version` when `if_match` is set (a conflict is
    then 412 instead of 409).
    """

    method: str
    path: str
    status: int = 200
    has_body: bool = True
    body_field: str | None = None
    media_type: str = "application/json"
    if_match: bool = False
    errors: tuple[int, ...] = ()

    @property
    def path_parameters(self) -> tuple[str, ...]:
        return tuple(part[1:-1] for part in self.path.split("/") if part.startswith("{") and part.endswith("}"))


@dataclass(frozen=True)
class CommandSpec:
    """A command: served on `<prefix>.cmd.<name>` and at `http`."""

    name: str
    summary: str
    parse: Callable[[dict[str, Any]], Command]
    body: type[BaseModel]
    reply: type[BaseModel]
    http: HttpRoute


COMMANDS: Final[Mapping[str, CommandSpec]] = {
    spec.name: spec
    for spec in (
        CommandSpec(
            "create",
            "Log a new activity. Body: the client-settable fields of an Activity.",
            parse_create,
            ActivityFields,
            ActivityReply,
            HttpRoute("POST", "", status=201, errors=(409,)),
        ),
        CommandSpec(
            "patch",
            "Apply a JSON Merge Patch to an activity; a patch that changes nothing appends nothing.",
            parse_patch,
            PatchActivityBody,
            ActivityReply,
            HttpRoute(
                "PATCH",
                "/{id}",
                body_field="changes",
                media_type="application/merge-patch+json",
                if_match=True,
                errors=(404, 409, 410, 412),
            ),
        ),
        CommandSpec(
            "delete",
            "Soft-delete an activity (a no-op when already deleted).",
            parse_delete,
            ActivityRefBody,
            ActivityReply,
            HttpRoute("DELETE", "/{id}", has_body=False, if_match=True, errors=(404, 409, 412)),
        ),
        CommandSpec(
            "restore",
            "Restore a soft-deleted activity (a no-op when live).",
            parse_restore,
            ActivityRefBody,
            ActivityReply,
            HttpRoute("POST", "/{id}/restore", has_body=False, if_match=True, errors=(404, 409, 412)),
        ),
    )
}
"""Every command, by name (the last part of its subject)."""


def command_fingerprint(name: str, body: dict[str, Any]) -> str:
    """A stable digest of a command, to tell a retry from a different command with the same key."""
    canonical = orjson.dumps([name, body], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()
