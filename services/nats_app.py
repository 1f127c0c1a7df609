"""NATS request/reply adapter: each request is read raw, handed to a gateway, and answered.

No rules and no SQL here. Bodies are read raw (not through a decoder) so that a body that is not
JSON still gets the contract's `validation_error` reply instead of a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from activities_client.errors import ActivitiesError, InternalError, Unavailable
from activities_client.subjects import COMMAND_QUEUE, Subjects
from events.commands import COMMANDS
from projections.errors import describe
from services.application import internal_error
from services.logs import start_request

log = logging.getLogger("activities.commands")

Handler = Callable[[str, bytes, dict[str, str]], Awaitable[tuple[int, dict[str, Any]]]]

JSON_HEADERS = {"Content-Type": "application/json"}
REPLY_HEADROOM = 1024  # the reply subject and headers travel in the same message


def oversized_reply(name: str, size: int, max_payload: int) -> bytes:
    """The reply when the real one is larger than NATS carries (a batch of patches of large
    activities): still exactly one reply, saying that the command was carried out and where to read
    its results, instead of a publish that fails and a caller that times out and retries."""
    log.warning("reply larger than max_payload", extra={"command": name, "size": size, "max_payload": max_payload})
    error = InternalError(
        f"the command was carried out, but its reply ({size} bytes) is larger than this NATS server's "
        f"max_payload ({max_payload} bytes): read the results with get, send fewer commands per batch, "
        "or use the HTTP route, which has no such limit"
    )
    return orjson.dumps(error.to_envelope())


class RequestServer:
    """Request/reply subscriptions straight on nats-py, one task per request, bounded.

    Measured on this machine, FastStream's per-message pipeline (context, logging middleware,
    dependency injection) cost about 400 µs of CPU per command, three quarters of the service's
    CPU per create; the hot request subjects therefore use the broker's nats-py connection
    directly. FastStream still owns the connection (the runtime's `NatsBroker`) and documents the
    subjects (services/asyncapi.py builds the AsyncAPI document from a documentation-only broker).

    The subscription callback never waits. When `concurrency` requests are in hand, or `admit`
    says no (the command queue is full), a request is answered `busy` at once. Waiting there
    instead (as this did with a semaphore) left the excess in nats-py's subscription buffer,
    unbounded in practice and without deadlines: under three times the maximum rate, requests
    were served seconds after their callers had timed out, the callers' retries piled on top, and
    goodput fell to a third of the maximum and stayed there.
    """

    def __init__(
        self,
        handler: Handler,
        concurrency: int,
        admit: Callable[[], bool] | None = None,
        busy: ActivitiesError | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._handler = handler
        self._limit = concurrency
        self._admit = admit or (lambda: True)
        busy = busy or Unavailable("the service is at capacity; retry shortly")
        self._busy_reply = orjson.dumps(busy.to_envelope())
        self._active = 0
        self._subscriptions: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused = 0  # requests answered `busy` without being handled
        self._on_refused = on_refused or (lambda name: None)  # e.g. a metrics counter, by subject name

    async def serve(self, connection: NatsClient, subject: str, name: str, queue: str = COMMAND_QUEUE) -> None:
        async def on_message(message: Msg) -> None:
            if self._active >= self._limit or not self._admit():
                # refuse before parsing anything: the cheapest answer keeps CPU for admitted requests
                self.refused += 1
                self._on_refused(name)
                if message.reply:
                    await connection.publish(message.reply, self._busy_reply, headers=JSON_HEADERS)
                return
            self._active += 1
            task = asyncio.create_task(self._respond(connection, name, message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._subscriptions.append(await connection.subscribe(subject, queue=queue, cb=on_message))

    async def _respond(self, connection: NatsClient, name: str, message: Msg) -> None:
        try:
            headers = message.headers or {}
            start_request(headers.get("traceparent"))
            try:
                _, envelope = await self._handler(name, message.data, headers)
            except Exception:  # a bug in a gateway: still exactly one reply
                envelope = internal_error(f"request {name} failed").to_envelope()
            if message.reply:
                payload = orjson.dumps(envelope)
                if len(payload) + REPLY_HEADROOM > connection.max_payload:
                    payload = oversized_reply(name, len(payload), connection.max_payload)
                await connection.publish(message.reply, payload, headers=JSON_HEADERS)
        finally:
            self._active -= 1

    async def drain(self) -> None:
        """Stop taking requests and answer every request already taken."""
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.drain()  # type: ignore[no-untyped-call]  # delivered requests still run
        self._subscriptions.clear()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class CommandsRole:
    """The `commands` role: the command subjects (queue group `activities`) served by `server`,
    and the hourly purge of expired Idempotency-Keys (`purge`, run on `executor`)."""

    PURGE_EVERY_S = 3600.0

    def __init__(
        self,
        server: RequestServer,
        connection: Callable[[], NatsClient],
        subjects: Subjects,
        purge: Callable[[], int],
        executor: Executor,
    ) -> None:
        self._server = server
        self._connection = connection
        self._subjects = subjects
        self._purge = purge
        self._executor = executor
        self._purger: asyncio.Task[None] | None = None

    async def start(self) -> None:
        connection = self._connection()
        for name in COMMANDS:
            await self._server.serve(connection, self._subjects.command(name), name)
        await connection.flush()
        self._purger = asyncio.get_running_loop().create_task(self._purge_forever(), name="idempotency-purge")

    async def _purge_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                purged = await loop.run_in_executor(self._executor, self._purge)
                log.info("expired idempotency keys purged", extra={"purged": purged})
            except Exception as exc:  # the database is away: next time
                log.warning("idempotency purge failed", extra={"error": describe(exc)})
            await asyncio.sleep(self.PURGE_EVERY_S)

    async def stop(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
        await self._server.drain()
