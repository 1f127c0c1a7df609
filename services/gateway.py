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

from activities_client.errors import ActivitiesError, Unavailable, field_error
from events.activity import valid_traceparent
from events.commands import COMMANDS, Command, EraseActivity, EraseByContact, command_fingerprint, parse_json_object
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
    if len(key) > 200 or not all(" " <= ch <= "~" for ch in key):
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
                data = parse_json_object(body)
                command: Command = spec.parse(data)
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
            return spec.http.status, outcome.envelope()
        self._metrics.command_done(name, outcome.code, started)
        return outcome.http_status, outcome.to_envelope()

    async def handle_message(self, name: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """The NATS entry: the token and the key come from message headers."""
        return await self.handle(
            name,
            body,
            header(headers, "Authorization"),
            header(headers, "Idempotency-Key"),
            header(headers, "traceparent"),
        )


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
