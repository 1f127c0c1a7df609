"""The one entry for commands, shared by the NATS subscribers and the HTTP write routes.

It turns raw input (body, Authorization, Idempotency-Key) into a `CommandRequest`, submits it
to the group-commit batcher and returns the reply envelope. Every failure becomes an envelope:
exactly one reply per request, whatever was sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from activities_client.document import is_key_text
from activities_client.errors import ActivitiesError, Unavailable, field_error
from events.activity import valid_traceparent
from events.caller import Caller
from events.commands import (
    COMMANDS,
    BatchCommands,
    Command,
    EraseActivity,
    EraseByContact,
    command_fingerprint,
    parse_json_object,
)
from services.application import CommandBatcher, CommandRequest, CommandResult, Outcome, internal_error
from services.auth import TokenVerifier
from services.erasure import ContactEraser, erased_reply
from services.metrics import Metrics
from services.tracing import command_span

log = logging.getLogger("activities.gateway")


def check_idempotency_key(key: str | None) -> str | None:
    """1-200 printable ASCII characters, or absent."""
    if key is None or key == "":
        return None
    if not is_key_text(key):
        raise field_error("Idempotency-Key", "must be 1-200 printable ASCII characters")
    return key


class CommandGateway:
    """Authenticates, parses and submits commands; maps every outcome to the reply envelope."""

    def __init__(
        self,
        verifier: TokenVerifier,
        batcher: CommandBatcher,
        metrics: Metrics | None = None,
        contact_eraser: ContactEraser | None = None,
    ) -> None:
        self._verifier = verifier
        self._batcher = batcher
        self._metrics = metrics or Metrics()
        self._contact_eraser = contact_eraser

    async def handle(
        self,
        name: str,
        body: bytes | str | dict[str, Any],
        authorization: str | None,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """(HTTP-style status, envelope) of one command (`name` is a key of the registry's COMMANDS)."""
        spec = COMMANDS[name]
        started = time.perf_counter()
        received = asyncio.get_running_loop().time()  # the command's deadline counts from here
        outcome: Outcome
        with command_span(name, valid_traceparent(traceparent)) as trace_context:
            try:
                caller = self._verifier.verify(authorization)
                key = check_idempotency_key(idempotency_key)
                data = parse_json_object(body, spec.max_body_bytes)
                command: Command | BatchCommands = spec.parse(data)
                if isinstance(command, BatchCommands):
                    outcomes = await self._batch(command, caller, key, trace_context, received)
                    unavailable = [o for o in outcomes if isinstance(o, Unavailable)]
                    if len(unavailable) == len(outcomes):
                        raise unavailable[0]  # at capacity, or the store is down: the whole batch is retried
                    self._metrics.command_done(name, "ok", started)
                    return spec.http.status, batch_envelope(outcomes)
                fingerprint = command_fingerprint(name, data) if key else ""
                if isinstance(command, EraseByContact):  # many activities: not one command of the batcher
                    if self._contact_eraser is None:
                        raise Unavailable("erasure by contact is not served by this process")
                    outcome = await self._contact_eraser.erase(command, caller, trace_context)
                else:
                    request = CommandRequest(command, caller, key, fingerprint, trace_context)
                    outcome = await self._batcher.submit(request, received)
                    if isinstance(command, EraseActivity):
                        outcome = erased_reply(outcome)
            except ActivitiesError as error:
                outcome = error
            except Exception:
                outcome = internal_error(f"command {name} failed")
        if isinstance(outcome, CommandResult):
            self._metrics.command_done(name, "ok", started)
            status = spec.http.created_status if outcome.created and spec.http.created_status else spec.http.status
            return status, outcome.envelope()
        self._metrics.command_done(name, outcome.code, started)
        return outcome.http_status, outcome.to_envelope()

    async def _batch(
        self, batch: BatchCommands, caller: Caller, key: str | None, traceparent: str | None, received: float
    ) -> list[Outcome]:
        """The items' outcomes in order: those that parsed are submitted together (one group of
        the batcher, so their creates are saved in one transaction). An item without a key of its
        own takes `<Idempotency-Key of the batch>#<index>`, so a retried batch replays each item."""
        outcomes: list[Outcome | None] = [item.error for item in batch.items]
        requests: list[CommandRequest] = []
        indexes: list[int] = []
        for i, item in enumerate(batch.items):
            if item.command is None:
                continue
            item_key, fingerprint = item.idempotency_key, item.fingerprint
            if item_key is None and key is not None:
                item_key = f"{key}#{i}"
                fingerprint = command_fingerprint(item.op, item.body)
            requests.append(CommandRequest(item.command, caller, item_key, fingerprint, traceparent))
            indexes.append(i)
        for i, outcome in zip(indexes, await self._batcher.submit_group(requests, received), strict=True):
            outcomes[i] = outcome
        return [o if o is not None else internal_error("batch item without outcome") for o in outcomes]

    async def handle_message(self, name: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """The NATS entry: the token and the key come from message headers."""
        return await self.handle(
            name,
            body,
            header(headers, "Authorization"),
            header(headers, "Idempotency-Key"),
            header(headers, "traceparent"),
        )


def batch_envelope(outcomes: list[Outcome]) -> dict[str, Any]:
    """A batch's reply: each item's envelope, and the highest position of its successes."""
    position = max((o.position for o in outcomes if isinstance(o, CommandResult)), default=0)
    return {
        "data": [o.envelope() if isinstance(o, CommandResult) else o.to_envelope() for o in outcomes],
        "meta": {"position": position},
    }


def header(headers: dict[str, str], name: str) -> str | None:
    """A header by name, ignoring case (NATS headers are case-sensitive, HTTP's are not)."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lowered:
            return candidate
    return None
