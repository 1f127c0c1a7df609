"""The service's AsyncAPI 3.0 document, generated from the subjects and the pydantic models.

FastStream builds the channels, operations and payload schemas from a documentation-only
`NatsBroker` (never connected) whose subscribers and publishers mirror the real ones: one per
command and query subject (in the `activities` queue group) and one per event kind. The
runtime's own subscribers read raw bytes (so a body that is not JSON still gets a
`validation_error` reply), which is why the typed mirror exists. FastStream does not describe
request/reply, headers or channel parameters, so those are added to its output here from the
same models. `asyncapi_document()` is served at `GET /asyncapi.json` by the http role.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, Final
from urllib.parse import unquote

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from activities_client.document import EVENT_KINDS, EVENT_TYPES, EventBody
from activities_client.subjects import COMMAND_QUEUE, Subjects
from activities_client.wire import ErrorReply
from events.commands import COMMANDS, CommandSpec
from events.queries import QUERIES, QuerySpec

ASYNCAPI_PATH: Final = "/asyncapi.json"
OPERATIONS: Final[dict[str, CommandSpec | QuerySpec]] = {**COMMANDS, **QUERIES}


AUTHORIZATION: Final = {"type": "string", "pattern": "^Bearer .+", "description": "Bearer <JWT>"}
IDEMPOTENCY_KEY: Final = {"type": "string", "minLength": 1, "maxLength": 200, "description": "replay-safe key"}
REQUEST_HEADERS: Final = {
    "type": "object",
    "required": ["Authorization"],
    "properties": {"Authorization": AUTHORIZATION},
}
COMMAND_HEADERS: Final = {
    "type": "object",
    "required": ["Authorization"],
    "properties": {"Authorization": AUTHORIZATION, "Idempotency-Key": IDEMPOTENCY_KEY},
}
EVENT_HEADERS: Final = {
    "type": "object",
    "required": ["Nats-Msg-Id", "Activity-Id", "Activity-Version", "Event-Type"],
    "properties": {
        "Nats-Msg-Id": {"type": "string", "description": "<activity_id>:<version>, the dedup id"},
        "Activity-Id": {"type": "string"},
        "Activity-Version": {"type": "string", "pattern": "^[0-9]+$"},
        "Event-Type": {
            "type": "string",
            "enum": list(EVENT_KINDS),
        },
    },
}


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def _documented(model: type[BaseModel]) -> Callable[..., Coroutine[Any, Any, None]]:
    """A handler whose signature tells FastStream the payload model (it is never called)."""

    async def handler(body: Any) -> None:
        return None

    handler.__annotations__ = {"body": model, "return": None}
    return handler


def _subject(subjects: Subjects, spec: CommandSpec | QuerySpec) -> str:
    return subjects.command(spec.name) if isinstance(spec, CommandSpec) else subjects.query(spec.name)


def documentation_broker(subjects: Subjects) -> NatsBroker:
    """A never-connected broker mirroring every subject the service serves and publishes."""
    broker = NatsBroker("nats://localhost:4222")
    for spec in OPERATIONS.values():
        subject = _subject(subjects, spec)
        broker.subscriber(subject, queue=COMMAND_QUEUE, title=subject, description=spec.summary)(
            _documented(spec.body)
        )
    for event in EVENT_TYPES:
        subject = subjects.event("{tenant_id}", event.kind)
        broker.publisher(subject, title=subject, schema=EventBody, description=f"{event.name}: {event.description}")
    _document_inbox(broker, subjects)
    return broker


# ---------------------------------------------------------------------------------------------
# The durable inbox (docs/contract.md section 10): its commands, results and dead letters
# ---------------------------------------------------------------------------------------------

INBOX_HEADERS: Final = {
    "type": "object",
    "required": ["Authorization", "Idempotency-Key", "Nats-Msg-Id"],
    "properties": {
        "Authorization": AUTHORIZATION,
        "Idempotency-Key": IDEMPOTENCY_KEY,
        "Nats-Msg-Id": {"type": "string", "description": "the Idempotency-Key again (JetStream dedup)"},
    },
}
RESULT_HEADERS: Final = {
    "type": "object",
    "required": ["Idempotency-Key", "Op", "Nats-Msg-Id"],
    "properties": {
        "Idempotency-Key": IDEMPOTENCY_KEY,
        "Op": {"type": "string", "description": "the op of the command (the last token of its inbox subject)"},
        "Nats-Msg-Id": {"type": "string", "description": "result:<inbox stream sequence> (dedup of a redelivery)"},
        "Activity-Id": {"type": "string", "description": "the activity of a reply that is one"},
    },
}
DLQ_HEADERS: Final = {
    "type": "object",
    "required": ["Activities-Error", "Activities-Tries", "Activities-Inbox-Seq"],
    "properties": {
        "Authorization": AUTHORIZATION,
        "Idempotency-Key": IDEMPOTENCY_KEY,
        "Activities-Error": {"type": "string", "description": "the last error envelope, JSON"},
        "Activities-Tries": {"type": "string", "pattern": "^[0-9]+$", "description": "tries made (0: never run)"},
        "Activities-Inbox-Seq": {"type": "string", "pattern": "^[0-9]+$"},
        "Activities-Enqueued-At": {"type": "string", "description": "when JetStream took the command"},
    },
}


def _document_inbox(broker: NatsBroker, subjects: Subjects) -> None:
    """The inbox subject of each command (JetStream), the results per tenant and the DLQ."""
    for spec in COMMANDS.values():
        subject = subjects.inbox(spec.name)
        broker.subscriber(
            subject, title=subject, description=f"durable asynchronous {spec.name} (JetStream publish): {spec.summary}"
        )(_documented(spec.body))
        broker.publisher(
            subjects.dlq(spec.name),
            title=subjects.dlq(spec.name),
            schema=spec.body,
            description=f"dead-lettered {spec.name} commands, body and headers as sent, with the last error",
        )
    results = subjects.results("{tenant_id}")
    broker.publisher(
        results,
        title=results,
        schema=ErrorReply,
        description="the reply envelope of each inbox command of the tenant (stream kept 7 days)",
    )


def _add_inbox_headers(document: dict[str, Any], subjects: Subjects) -> None:
    messages = document["components"]["messages"]
    for spec in COMMANDS.values():
        for message in document["channels"][subjects.inbox(spec.name)]["messages"].values():
            messages[_ref_name(message)]["headers"] = INBOX_HEADERS
        for message in document["channels"][subjects.dlq(spec.name)]["messages"].values():
            messages[_ref_name(message)]["headers"] = DLQ_HEADERS
    channel = document["channels"][subjects.results("{tenant_id}")]
    channel["parameters"] = {"tenant_id": {"description": "tenant_id of the command's token"}}
    replies = [*sorted({spec.reply.__name__ for spec in COMMANDS.values()}), "ErrorReply"]
    for message in channel["messages"].values():
        target = messages[_ref_name(message)]
        target["headers"] = RESULT_HEADERS
        target["payload"] = {"oneOf": [{"$ref": f"#/components/schemas/{name}"} for name in replies]}
        target.pop("correlationId", None)


def _schemas(models: list[type[BaseModel]]) -> dict[str, Any]:
    """JSON schemas of models (and the models they use) keyed by name, referring to each other."""
    _, defs = models_json_schema(
        [(model, "serialization") for model in models], ref_template="#/components/schemas/{model}"
    )
    return dict(defs.get("$defs", {}))


def _ref_name(reference: dict[str, str]) -> str:
    """The component name a `$ref` points at (FastStream percent-escapes `{` and `}`)."""
    return unquote(reference["$ref"].rsplit("/", 1)[-1])


def _add_replies_and_headers(document: dict[str, Any], subjects: Subjects) -> None:
    """Describe request/reply, headers and the tenant parameter, which FastStream leaves out."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    messages = components.setdefault("messages", {})
    schemas.update(_schemas([*{spec.reply for spec in OPERATIONS.values()}, ErrorReply]))
    for spec in OPERATIONS.values():
        subject = _subject(subjects, spec)
        reply = spec.reply.__name__
        messages[f"{subject}:Reply"] = {
            "title": f"{subject}:Reply",
            "contentType": "application/json",
            "payload": {
                "oneOf": [{"$ref": f"#/components/schemas/{reply}"}, {"$ref": "#/components/schemas/ErrorReply"}]
            },
        }
        for message in document["channels"][subject]["messages"].values():
            target = messages[_ref_name(message)]
            target["headers"] = COMMAND_HEADERS if isinstance(spec, CommandSpec) else REQUEST_HEADERS
        document["operations"][subject]["reply"] = {
            "address": {"location": "$message.header#/reply_to", "description": "the requester's inbox"},
            "messages": [{"$ref": f"#/components/messages/{subject}:Reply"}],
        }
    for event in EVENT_TYPES:
        subject = subjects.event("{tenant_id}", event.kind)
        channel = document["channels"][subject]
        channel["parameters"] = {"tenant_id": {"description": "tenant_id of the activity (JWT claim)"}}
        for message in channel["messages"].values():
            target = messages[_ref_name(message)]
            target["headers"] = EVENT_HEADERS
            target.pop("correlationId", None)  # events are not replies to anything


def asyncapi_document(prefix: str = "crm.activities", version: str = "1") -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the service for a subject prefix, as JSON-ready data."""
    subjects = Subjects(prefix)
    broker = documentation_broker(subjects)
    specification = AsyncAPI(
        broker,
        title="activities",
        version=version,
        description=(
            "CRM activities over NATS: commands and queries (request/reply, queue group "
            f"`{COMMAND_QUEUE}`) and events on the JetStream stream over `{subjects.all_events}`. "
            "Every request carries `Authorization: Bearer <JWT>`. See docs/contract.md."
        ),
    ).to_specification()
    document: dict[str, Any] = specification.to_jsonable()
    document.pop("servers", None)  # where NATS runs is deployment, not contract
    for channel in document["channels"].values():
        channel.pop("servers", None)
    _add_replies_and_headers(document, subjects)
    _add_inbox_headers(document, subjects)
    return document


def add_asyncapi_route(app: FastAPI, prefix: str) -> None:
    """Serve the document at `GET /asyncapi.json` (open, like `/openapi.json`), built on the first
    request (a third of a second: not on every start of the service)."""
    document = functools.cache(functools.partial(asyncapi_document, prefix))

    async def asyncapi_json() -> JSONResponse:
        return JSONResponse(document())

    app.add_api_route(ASYNCAPI_PATH, asyncapi_json, methods=["GET"], include_in_schema=False)
