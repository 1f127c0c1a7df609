"""FastStream NATS adapters: each subscriber reads the raw message, calls a gateway, replies.

No rules and no SQL here. Bodies are read raw (not through FastStream's decoder) so that a body
that is not JSON still gets the contract's `validation_error` reply instead of a timeout.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from faststream.nats import NatsBroker, NatsMessage, NatsResponse

from events.subjects import COMMAND_NAMES, COMMAND_QUEUE, Subjects

Handler = Callable[[str, bytes, dict[str, str]], Awaitable[tuple[int, dict[str, Any]]]]

JSON_HEADERS = {"Content-Type": "application/json"}


def reply(envelope: dict[str, Any]) -> NatsResponse:
    return NatsResponse(body=orjson.dumps(envelope), headers=JSON_HEADERS)


def _subscriber(name: str, handler: Handler) -> Callable[[NatsMessage], Awaitable[NatsResponse]]:
    async def handle(message: NatsMessage) -> NatsResponse:
        _, envelope = await handler(name, message.body, message.headers or {})
        return reply(envelope)

    handle.__name__ = f"handle_{name}"
    return handle


COMMAND_DOCS = {
    "create": "Log a new activity. Body: the client-settable fields of an Activity.",
    "patch": 'Apply a JSON Merge Patch: {"id", "expected_version"?, "changes"}.',
    "delete": 'Soft-delete an activity: {"id", "expected_version"?}.',
    "restore": 'Restore a soft-deleted activity: {"id", "expected_version"?}.',
}


def register_commands(broker: NatsBroker, subjects: Subjects, handler: Handler, concurrency: int) -> None:
    """One subscriber per command subject, in the shared queue group."""
    for name in COMMAND_NAMES:
        broker.subscriber(
            subjects.command(name),
            queue=COMMAND_QUEUE,
            max_workers=concurrency,
            title=subjects.command(name),
            description=COMMAND_DOCS[name],
        )(_subscriber(name, handler))


def register_queries(
    broker: NatsBroker, subjects: Subjects, handler: Handler, concurrency: int, names: tuple[str, ...]
) -> None:
    """One subscriber per query subject, in the shared queue group."""
    for name in names:
        broker.subscriber(
            subjects.query(name), queue=COMMAND_QUEUE, max_workers=concurrency, title=subjects.query(name)
        )(_subscriber(name, handler))
