"""The registry of operations: one entry per command and per query.

A command is its body model and parser (events/commands.py), its rule (services/domain.py), its
event class (events/activity.py) and one entry here. Everything that is only dispatch follows
from this table: the NATS subjects the service serves, the HTTP write routes, and the AsyncAPI
and OpenAPI documents.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from pydantic import BaseModel

from activities_client.document import ActivityFields
from activities_client.wire import (
    ActivityListReply,
    ActivityRefBody,
    ActivityReply,
    GetActivityBody,
    ListActivitiesBody,
    PatchActivityBody,
)
from events.commands import Command, parse_create, parse_delete, parse_patch, parse_restore


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


@dataclass(frozen=True)
class QuerySpec:
    """A query: served on `<prefix>.query.<name>` (its HTTP routes read query strings, see http_app)."""

    name: str
    summary: str
    body: type[BaseModel]
    reply: type[BaseModel]


Spec = TypeVar("Spec", CommandSpec, QuerySpec)


def _by_name(*specs: Spec) -> Mapping[str, Spec]:
    return {spec.name: spec for spec in specs}


COMMANDS: Final = _by_name(
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
"""Every command, by name (the last part of its subject)."""

QUERIES: Final = _by_name(
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
)
"""Every query served over NATS request/reply, by name."""
