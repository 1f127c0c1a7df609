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
from dataclasses import dataclass, field
from typing import Any, Final, assert_never

import orjson
import pydantic
from pydantic import BaseModel

from activities_client.document import (
    MAX_BODY_BYTES,
    MAX_CUSTOM_FIELDS_DEPTH,
    MAX_KEY_LENGTH,
    SERVER_FIELDS,
    ActivityFields,
    is_activity_id,
    is_key_text,
)
from activities_client.errors import ValidationError, field_error
from activities_client.wire import (
    ActivityRefBody,
    ActivityReply,
    BatchBody,
    BatchReply,
    EraseBody,
    EraseReply,
    PatchActivityBody,
    UpsertActivityBody,
    UpsertReply,
)
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


@dataclass(frozen=True)
class UpsertActivity:
    """Create the activity keyed `external_key` in the caller's tenant (and app) from `changes`, or
    apply `changes` to it as a JSON Merge Patch (docs/contract.md section 8)."""

    external_key: str
    changes: dict[str, Any]
    expected_version: int | None = None


@dataclass(frozen=True)
class FireReminder:
    """The scheduler's command (contract section 9): append `ActivityReminderDue` if the
    activity's reminder is due now; nothing when it no longer is. Not on the wire: the scheduler
    sends it through the same write path as every command (decided on the current version)."""

    activity_id: str
    expected_version: int | None = None


@dataclass(frozen=True)
class MarkOverdue:
    """The scheduler's command: append `ActivityBecameOverdue` if the activity's `due_date` has
    passed and it was not yet found overdue for that value; nothing otherwise. Not on the wire."""

    activity_id: str
    expected_version: int | None = None


TimeCommand = FireReminder | MarkOverdue
"""The scheduler's commands (issued by the service itself, actor "system")."""


@dataclass  # never changed, yet not frozen: one per command, and a frozen __init__ costs 3.5x
class BatchItem:
    """One item of a batch: its command and key, or the error that makes it fail alone."""

    op: str
    command: Command | None
    idempotency_key: str | None
    fingerprint: str
    error: ValidationError | None = None
    body: dict[str, Any] = field(default_factory=dict)  # the command's body (without op and key)


@dataclass(frozen=True)
class BatchCommands:
    """`cmd.batch`: independent commands, carried out in order, their creates saved together."""

    items: tuple[BatchItem, ...]


@dataclass(frozen=True)
class EraseActivity:
    """Erase one activity (docs/contract.md section 11). `if_names_contact`: only when its current
    document still names that contact (an erasure by contact, carried out activity by activity);
    `if_deleted_before`: only when it is still deleted, since before that time (retention)."""

    activity_id: str
    if_names_contact: str | None = None
    if_deleted_before: str | None = None  # retention: only if still deleted since before this RFC 3339 time


@dataclass(frozen=True)
class EraseByContact:
    """Erase every activity of the caller's tenant (and app) naming a contact; the application
    finds them and carries out one `EraseActivity` each (services/erasure.py)."""

    contact_id: str


Command = (
    CreateActivity
    | PatchActivity
    | DeleteActivity
    | RestoreActivity
    | UpsertActivity
    | EraseActivity
    | EraseByContact
    | TimeCommand
)


def target_id(command: Command) -> str | None:
    """The id of the one existing activity a command acts on (None: a create, or an erasure by contact)."""
    match command:
        case CreateActivity() | UpsertActivity() | EraseByContact():
            return None
        case PatchActivity() | DeleteActivity() | RestoreActivity() | EraseActivity() | FireReminder() | MarkOverdue():
            return command.activity_id
        case _:
            assert_never(command)


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


def parse_json_object(body: bytes | str | dict[str, Any], max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The body as a JSON object, or a validation error (not JSON, not an object, too large)."""
    if isinstance(body, dict):
        return body
    if len(body) > max_bytes:
        raise field_error("body", f"is larger than {max_bytes} bytes")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise field_error("body", "is not valid UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise field_error("body", "must be a JSON object")
    if not plainly_storable(body, data):
        check_storable(data)
    return data


def plainly_storable(body: bytes | str, data: dict[str, Any]) -> bool:
    """Whether `check_storable` would pass, cheaply: JSON can write a NUL only as the escape
    `\\u0000` (orjson refuses a raw one), so a body without that escape holds none, and then only the
    depth of its containers is walked, level by level. False means "not known": `check_storable`
    then decides and names the field (an escaped backslash before `u0000` is no NUL, say)."""
    if (b"\\u0000" in body) if isinstance(body, bytes) else ("\\u0000" in body):
        return False
    containers = (dict, list)  # `data` is orjson's: exactly these types, never subclasses
    level: list[Any] = [value for value in data.values() if type(value) in containers]
    depth = 1
    while level:
        if depth >= MAX_BODY_DEPTH:
            return False
        below: list[Any] = []
        for container in level:
            for value in container.values() if type(container) is dict else container:
                if type(value) in containers:
                    below.append(value)
        level = below
        depth += 1
    return True


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


MAX_EXTERNAL_KEY_LENGTH: Final = MAX_KEY_LENGTH


def check_external_key(value: Any, field: str = "external_key") -> str:
    """1-200 printable ASCII characters (as an Idempotency-Key)."""
    if not is_key_text(value):
        raise field_error(field, f"must be 1-{MAX_EXTERNAL_KEY_LENGTH} printable ASCII characters")
    return value


def parse_upsert(body: bytes | str | dict[str, Any]) -> UpsertActivity:
    """The key, and the activity's fields as a merge patch; whether they make a valid activity
    (create rules, or the patched document) is decided once it is known whether the key exists."""
    data = parse_json_object(body)
    _only_keys(data, {"external_key", "activity", "expected_version"})
    key = check_external_key(data.get("external_key"))
    changes = data.get("activity")
    if not isinstance(changes, dict):
        raise field_error("activity", "must be a JSON object (the activity's fields; a merge patch when it exists)")
    reject_server_and_unknown_fields(changes)
    return UpsertActivity(key, changes, _expected_version(data))


MAX_BATCH_ITEMS: Final = 100
MAX_BATCH_BYTES: Final = 1024 * 1024
BATCH_OPS: Final = ("create", "patch", "delete", "restore", "upsert")


def parse_batch(body: bytes | str | dict[str, Any]) -> BatchCommands:
    """A batch: malformed as a whole (not an object with a list of 1-100 `commands`) is one
    validation error; an item that does not parse is its own `validation_error` result."""
    data = parse_json_object(body, MAX_BATCH_BYTES)
    _only_keys(data, {"commands"})
    commands = data.get("commands")
    if not isinstance(commands, list):
        raise field_error("commands", "must be a list of 1-100 commands")
    if not 1 <= len(commands) <= MAX_BATCH_ITEMS:
        raise field_error("commands", f"must hold 1-{MAX_BATCH_ITEMS} commands, not {len(commands)}")
    return BatchCommands(tuple(_batch_item(i, item) for i, item in enumerate(commands)))


def _batch_item(index: int, item: Any) -> BatchItem:
    op = item.get("op") if isinstance(item, dict) else None
    try:
        if not isinstance(item, dict):
            raise field_error(f"commands.{index}", "must be a JSON object with an `op`")
        if op not in BATCH_OPS:
            raise field_error("op", f"must be one of {', '.join(BATCH_OPS)}")
        key = item.get("idempotency_key")
        if key is not None and not is_key_text(key):
            raise field_error("idempotency_key", "must be 1-200 printable ASCII characters")
        body = {name: value for name, value in item.items() if name not in ("op", "idempotency_key")}
        command = COMMANDS[str(op)].parse(body)
        assert not isinstance(command, BatchCommands)
        fingerprint = command_fingerprint(str(op), body) if key else ""
        return BatchItem(str(op), command, key, fingerprint, body=body)
    except ValidationError as error:
        return BatchItem(str(op), None, None, "", error)


def parse_erase(body: bytes | str | dict[str, Any]) -> EraseActivity | EraseByContact:
    """`{"id"}` erases one activity, `{"contact_id"}` every activity naming that contact."""
    data = parse_json_object(body)
    _only_keys(data, {"id", "contact_id"})
    if ("id" in data) == ("contact_id" in data):
        raise field_error("id", "give either id (one activity) or contact_id (every activity naming it)")
    if "id" in data:
        return EraseActivity(_activity_id(data))
    contact_id = data["contact_id"]
    if not isinstance(contact_id, str) or not contact_id or len(contact_id) > 200:
        raise field_error("contact_id", "must be a non-empty string of at most 200 characters")
    return EraseByContact(contact_id)


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
    created_status: int | None = None  # the status when the command created the activity (an upsert)
    slashed: tuple[str, ...] = ()  # path parameters whose value may hold `/` (routed as the path's rest)

    @property
    def path_parameters(self) -> tuple[str, ...]:
        return tuple(part[1:-1] for part in self.path.split("/") if part.startswith("{") and part.endswith("}"))

    @property
    def route_path(self) -> str:
        """The path as the web framework routes it: a `slashed` parameter takes the rest of the path."""
        path = self.path
        for name in self.slashed:
            path = path.replace("{" + name + "}", "{" + name + ":path}")
        return path


@dataclass(frozen=True)
class CommandSpec:
    """A command: served on `<prefix>.cmd.<name>` and at `http`."""

    name: str
    summary: str
    parse: Callable[[dict[str, Any]], Command | BatchCommands]
    body: type[BaseModel]
    reply: type[BaseModel]
    http: HttpRoute
    max_body_bytes: int = MAX_BODY_BYTES
    more_http: tuple[HttpRoute, ...] = ()  # further routes to the same command (erase: by id and by contact)


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
        CommandSpec(
            "upsert",
            "Create the activity keyed `external_key` in the caller's tenant (and app), or merge-patch it "
            "(`meta.created` says which); a change of nothing appends nothing.",
            parse_upsert,
            UpsertActivityBody,
            UpsertReply,
            HttpRoute(
                "PUT",
                "/by-key/{external_key}",
                body_field="activity",
                if_match=True,
                errors=(404, 409, 410, 412),  # 404: a key the path cannot carry (a line break)
                created_status=201,
                slashed=("external_key",),
            ),
        ),
        CommandSpec(
            "batch",
            "1-100 independent commands (op create, patch, delete, restore, upsert), applied in order; "
            "one result per item, each the single command's reply; the creates are saved in one transaction.",
            parse_batch,
            BatchBody,
            BatchReply,
            HttpRoute("POST", "/batch"),
            max_body_bytes=MAX_BATCH_BYTES,
        ),
        CommandSpec(
            "erase",
            "Erase an activity for good ({id}), or every activity naming a contact ({contact_id}): what clients "
            "wrote is removed everywhere; a skeleton and an ActivityErased event remain.",
            parse_erase,
            EraseBody,
            EraseReply,
            HttpRoute("POST", "/erase", errors=(404,)),
            more_http=(HttpRoute("POST", "/{id}/erase", has_body=False, errors=(404,)),),
        ),
    )
}
"""Every command, by name (the last part of its subject)."""


def command_fingerprint(name: str, body: dict[str, Any]) -> str:
    """A stable digest of a command, to tell a retry from a different command with the same key."""
    canonical = orjson.dumps([name, body], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()
