"""The durable asynchronous inbox (docs/contract.md section 10): the `inbox` role.

Publishers JetStream-publish commands to `<prefix>.inbox.<op>` (stream `<stream>_COMMANDS`,
work-queue retention). The active inbox takes them, carries each out through the same command
gateway as the NATS request/reply subjects (so every op of the `COMMANDS` registry works, and an op
not in it is an error result), publishes its reply envelope to `<prefix>.results.<tenant_id>`
(stream `<stream>_RESULTS`, 7 days) and only then acks it.

Exactly once. The gateway's Idempotency-Key table (written in the same transaction as the events)
makes a second run of a command replay its first reply and append nothing; a result is published
with `Nats-Msg-Id: result:<inbox stream sequence>`, so the result of a redelivered command is
dropped by the results stream's duplicate window. A command without a usable key (the key is the
exactly-once guarantee) or without a valid token (no tenant to answer) goes to the DLQ at once.

Order. One inbox instance is active at a time: it holds a PostgreSQL session advisory lock, the
others wait for it (as the log consumers in projections/consumer.py). Each term starts by creating
the durable pull consumer afresh, so the new leader receives every unacknowledged command in
stream order (a durable consumer kept across terms would redeliver the dead leader's unacked
commands only after their ack wait, behind newer ones). Inside the active instance commands are
taken in stream order and run concurrently, except that a command waits for every earlier command
in hand that names the same activity (`Sequencer`): the `id` of patch, delete, restore and erase,
the `external_key` of an upsert (upserts and id commands wait for each other, since an upsert's
activity is known only by its key), and a batch, an erase by contact, or an op the inbox does not
know waits for everything before it and everything after waits for it.

Retries. `unavailable` and `internal` are tried again in place with a doubling back-off, the
command kept in hand (and its successors on the same activity waiting behind it), because a NAK'd
command would come back after later commands of its activity. While a command waits after
`unavailable` the inbox asks for no new commands (a backing service is down: taking more would only
spend their tries). After `max_deliver` tries the command goes to the DLQ with its last error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import orjson
import psycopg
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from activities_client.document import is_activity_id
from activities_client.errors import ActivitiesError, ValidationError, field_error
from activities_client.subjects import Subjects
from events.activity import activity_uuid_hex
from events.commands import COMMANDS
from projections.consumer import Backoff, lock_key
from projections.database import conninfo
from projections.erasure import remember_published_params, remember_published_sql
from projections.errors import describe
from projections.relay import MIN_DUPLICATE_WINDOW_S
from projections.streams import ensure_stream
from services.auth import TokenVerifier
from services.deadlines import Deadlines
from services.gateway import check_idempotency_key, header

log = logging.getLogger("activities.inbox")

INBOX_CONSUMER: Final = "activities-inbox"
LEADER_LOCK: Final = "activities:inbox"
RESULTS_MAX_AGE_S: Final = 7 * 24 * 3600.0
RETRYABLE: Final = frozenset({"unavailable", "internal"})

IDEMPOTENCY_KEY: Final = "Idempotency-Key"
OP: Final = "Op"
MSG_ID: Final = "Nats-Msg-Id"
DLQ_ERROR: Final = "Activities-Error"
DLQ_TRIES: Final = "Activities-Tries"
DLQ_INBOX_SEQ: Final = "Activities-Inbox-Seq"
DLQ_ENQUEUED_AT: Final = "Activities-Enqueued-At"
DLQ_HEADERS: Final = (DLQ_ERROR, DLQ_TRIES, DLQ_INBOX_SEQ, DLQ_ENQUEUED_AT)


# ---------------------------------------------------------------------------------------------
# The three streams
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InboxStreams:
    """The inbox's streams as configured (the composition root fills it from Settings)."""

    inbox: str
    results: str
    dlq: str
    subject_prefix: str
    replicas: int = 1
    duplicate_window_s: float = MIN_DUPLICATE_WINDOW_S

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.subject_prefix)

    def configs(self) -> list[StreamConfig]:
        """The inbox (work queue), the results (7 days) and the DLQ (kept until managed), all on file."""
        subjects = self.subjects
        return [
            self._config(self.inbox, subjects.all_inbox, RetentionPolicy.WORK_QUEUE,
                         "Durable asynchronous commands (docs/contract.md section 10)"),
            self._config(self.results, subjects.all_results, RetentionPolicy.LIMITS,
                         "Reply envelopes of the inbox's commands, per tenant (docs/contract.md section 10)",
                         max_age=RESULTS_MAX_AGE_S),
            self._config(self.dlq, subjects.all_dlq, RetentionPolicy.LIMITS,
                         "Inbox commands that could not be carried out (activities inbox dlq ...)"),
        ]

    def _config(self, name: str, subject: str, retention: RetentionPolicy, description: str,
                max_age: float | None = None) -> StreamConfig:
        return StreamConfig(
            name=name,
            subjects=[subject],
            retention=retention,
            storage=StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=max(self.duplicate_window_s, MIN_DUPLICATE_WINDOW_S),
            max_age=max_age,
            description=description,
        )


async def ensure_inbox_streams(js: JetStreamContext, streams: InboxStreams) -> None:
    """Create the three streams (or bring them up to date) through the one stream function."""
    for config in streams.configs():
        await ensure_stream(js, config, streams.replicas)


# ---------------------------------------------------------------------------------------------
# Publishing results and dead letters
# ---------------------------------------------------------------------------------------------


class Publishes(Protocol):
    """What publishes a message to a stream and returns the stream's ack: a JetStreamContext, or
    a `StreamAcks` (cheaper per message)."""

    async def publish(self, subject: str, payload: bytes = b"", *, headers: dict[str, Any]) -> PubAck: ...


class StreamAcks:
    """JetStream publishes with one subscription for all their acks, each matched by the last
    token of its reply subject. `JetStreamContext.publish` is a nats-py request: a random reply
    token from the operating system and an `asyncio.wait_for` per message, 53 us of CPU against
    33 us here (measured, 20,000 publishes of a result, 512 in flight; nats-py's `publish_async`,
    its future awaited under a timeout, 54 us). The inbox publishes one result per command, so that
    difference is about a tenth of its CPU per command."""

    def __init__(self, nc: NatsClient, timeout_s: float = 5.0) -> None:
        self._nc = nc
        self._timeout_s = timeout_s
        self._prefix = nc.new_inbox()
        self._tokens = itertools.count()
        self._waiting: dict[str, asyncio.Future[PubAck]] = {}
        self._late = Deadlines(timeout_s / 4, _expire)  # one task for every ack's deadline
        self._subscription: Subscription | None = None

    async def start(self) -> StreamAcks:
        self._subscription = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_ack)
        return self

    async def stop(self) -> None:
        await self._late.stop()
        for waiting in self._waiting.values():
            waiting.cancel()
        self._waiting.clear()
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()

    async def publish(self, subject: str, payload: bytes = b"", *, headers: dict[str, Any]) -> PubAck:
        """Publish and wait for the stream's ack; the errors of `JetStreamContext.publish`."""
        token = str(next(self._tokens))
        loop = asyncio.get_running_loop()
        acked: asyncio.Future[PubAck] = loop.create_future()
        self._waiting[token] = acked
        self._late.add(loop.time() + self._timeout_s, acked)
        try:
            await self._nc.publish(subject, payload, reply=f"{self._prefix}.{token}", headers=headers)
            return await acked
        finally:
            self._waiting.pop(token, None)

    async def _on_ack(self, message: Msg) -> None:
        acked = self._waiting.get(message.subject.rsplit(".", 1)[-1])
        if acked is None or acked.done():
            return
        if message.headers and message.headers.get("Status") == "503":  # no stream takes the subject
            acked.set_exception(NoStreamResponseError())
            return
        try:
            response = orjson.loads(message.data)
            if "error" in response:
                acked.set_exception(APIError.from_error(response["error"]))
            else:  # the fields the inbox reads, without PubAck.from_response's walk of every field
                acked.set_result(PubAck(stream=response["stream"], seq=response["seq"],
                                        domain=response.get("domain"), duplicate=response.get("duplicate")))
        except Exception as exc:  # not an ack: fail this publish, not the subscription
            acked.set_exception(exc)


def _expire(acked: asyncio.Future[Any]) -> None:
    if not acked.done():
        acked.set_exception(NatsTimeoutError())


PULL_EXPIRES_S: Final = 1.0
"""How long one pull request of the inbox stays open on the server, delivering commands as they
are published (a lingering pull: a command published to an idle inbox is taken at once)."""

PULL_GRACE_S: Final = 1.0
"""How long past its expiry a pull request is waited for before it is taken for lost (the server
answers an expired one with a 408; a connection lost meanwhile answers nothing)."""


class PullFeed:
    """A pull consumer's messages handed to a callback as they arrive, one request open at a time.

    nats-py's `PullSubscription.fetch` waits for each message with `next_msg`: a uuid4 from the
    operating system, a task and an `asyncio.wait_for` (one more task on Python 3.11) per message.
    Here the pull request is published as `fetch` publishes it and its messages come to a plain
    subscription's callback; only the request is waited for (filled, or ended by the server's
    status: 408 expired, 409 ended; a 409 for a deleted consumer raises NotFoundError)."""

    def __init__(self, nc: NatsClient, stream: str, consumer: str, on_message: Callable[[Msg], None]) -> None:
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._deliver = nc.new_inbox()
        self._on_message = on_message
        self._subscription: Subscription | None = None
        self._open = 0  # messages the open request may still deliver
        self._over = asyncio.Event()
        self._gone: str | None = None  # why the server ended the consumer

    async def start(self) -> PullFeed:
        self._subscription = await self._nc.subscribe(self._deliver, cb=self._on_delivery)
        return self

    async def stop(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()

    async def pull(self, batch: int, expires_s: float = PULL_EXPIRES_S) -> None:
        """Ask for up to `batch` messages and return once the request is over (they all came, it
        expired, or the server ended it); every message that comes goes to the callback, also one
        of a request taken for lost."""
        self._open = batch
        self._over.clear()
        request = {"batch": batch, "expires": int(expires_s * 1_000_000_000)}
        await self._nc.publish(self._next, orjson.dumps(request), reply=self._deliver)
        try:
            await asyncio.wait_for(self._over.wait(), expires_s + PULL_GRACE_S)
        except TimeoutError:
            pass  # no answer (a connection lost meanwhile): ask again
        finally:
            self._open = 0
        if self._gone is not None:
            raise NotFoundError(description=self._gone)

    async def _on_delivery(self, message: Msg) -> None:
        if message.reply:  # a stream's message (its ack subject)
            self._open -= 1
            if self._open <= 0:
                self._over.set()
            self._on_message(message)
            return
        headers = message.headers or {}
        status = headers.get("Status")
        if status == "100":  # an idle heartbeat
            return
        description = headers.get("Description", "")
        if status == "409" and "deleted" in description.lower():
            self._gone = description
        self._over.set()


async def publish_result(
    js: Publishes,
    subjects: Subjects,
    tenant_id: str,
    idempotency_key: str,
    op: str,
    envelope: dict[str, Any],
    msg_id: str,
) -> PubAck:
    """Publish one command's reply envelope to `<prefix>.results.<tenant_id>` and wait for the
    stream's ack. The one place results are published (erasure indexes what it publishes here)."""
    headers = {
        IDEMPOTENCY_KEY: idempotency_key,
        OP: op,
        MSG_ID: msg_id,
        "Content-Type": "application/json",
    }
    data = envelope.get("data")
    if isinstance(data, dict) and isinstance(data.get("id"), str):
        headers["Activity-Id"] = data["id"]
    return await js.publish(subjects.results(tenant_id), orjson.dumps(envelope), headers=headers)


def activities_of(envelope: dict[str, Any]) -> list[str]:
    """The activities whose content a result carries (a batch's: each item's), for erasure: their
    UUIDs' hex digits, as the statement remembering them takes them."""
    data = envelope.get("data")
    items = [item.get("data") for item in data if isinstance(item, dict)] if isinstance(data, list) else [data]
    return [
        activity_uuid_hex(item["id"])
        for item in items
        if isinstance(item, dict) and isinstance(item.get("id"), str) and is_activity_id(item["id"])
    ]


def _ascii_json(value: Any) -> str:
    """JSON on one line of ASCII: safe as a NATS header value."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


def stream_sequence(message: Msg) -> int:
    """The inbox stream's sequence of a delivered command, read from its ack subject
    (`$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`).
    nats-py's `Msg.metadata` parses every token into a dataclass and a datetime: about 3% of the
    inbox's CPU per command (profiled). Other forms (with a domain) are left to it."""
    tokens = (message.reply or "").split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5])
    return int(message.metadata.sequence.stream)


def op_of(subject: str) -> str:
    """The op of an inbox subject (`<prefix>.inbox.<op>`)."""
    return subject.rsplit(".", 1)[-1]


async def dead_letter(
    js: JetStreamContext, subjects: Subjects, message: Msg, error: ActivitiesError | dict[str, Any], tries: int
) -> PubAck:
    """Copy an inbox command to the DLQ (body and headers as sent) with its last error."""
    envelope = error.to_envelope() if isinstance(error, ActivitiesError) else error
    headers = {k: v for k, v in (message.headers or {}).items() if k not in DLQ_HEADERS and k != MSG_ID}
    seq = message.metadata.sequence.stream
    headers[DLQ_ERROR] = _ascii_json(envelope)
    headers[DLQ_TRIES] = str(tries)
    headers[DLQ_INBOX_SEQ] = str(seq)
    headers[DLQ_ENQUEUED_AT] = message.metadata.timestamp.astimezone(UTC).isoformat().replace("+00:00", "Z")
    headers[MSG_ID] = f"dlq:{seq}"  # a redelivered command is dead-lettered once
    return await js.publish(subjects.dlq(op_of(message.subject)), message.data, headers=headers)


# ---------------------------------------------------------------------------------------------
# Order: which earlier commands a command waits for
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ordering:
    """What a command touches: the names of its activity, and its kind for the id/key rule."""

    keys: frozenset[str] = frozenset()
    kind: str | None = None  # "id" (names its activity by id) or "key" (by external key)
    barrier: bool = False  # may touch any activity: waits for all before, all after wait for it


def ordering_of(op: str, body: bytes) -> Ordering:
    """The ordering of a command from its op and raw body (a body that does not parse touches
    nothing: it is a validation error whatever ran before it)."""
    if op == "create":
        return Ordering()
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return Ordering()
    if not isinstance(data, dict):
        return Ordering()
    if op in ("patch", "delete", "restore", "erase") and isinstance(data.get("id"), str):
        return Ordering(frozenset({f"id:{data['id']}"}), "id")
    if op == "upsert" and isinstance(data.get("external_key"), str):
        return Ordering(frozenset({f"key:{data['external_key']}"}), "key")
    if op in ("patch", "delete", "restore", "upsert"):
        return Ordering()  # no target: a validation error
    return Ordering(barrier=True)  # batch, erase by contact, an op the inbox does not know


class Sequencer:
    """Hands out, in arrival order, the completions each command must wait for.

    A command waits for the latest earlier command in hand on each of its keys, for the earlier
    commands of the other kind (id vs external key), and for the latest barrier; a barrier waits
    for everything in hand. Completions are futures that only ever get `None`.
    """

    def __init__(self) -> None:
        self._last: dict[str, asyncio.Future[None]] = {}
        self._pending: set[asyncio.Future[None]] = set()
        self._by_kind: dict[str, set[asyncio.Future[None]]] = {"id": set(), "key": set()}
        self._barrier: asyncio.Future[None] | None = None

    def admit(self, ordering: Ordering) -> tuple[list[asyncio.Future[None]], asyncio.Future[None]]:
        """(the completions to wait for, this command's completion: set it when done)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waits: list[asyncio.Future[None]]
        if ordering.barrier:
            waits = [f for f in self._pending if not f.done()]
            self._barrier = done
        else:
            waits = [self._last[k] for k in ordering.keys if k in self._last and not self._last[k].done()]
            if self._barrier is not None and not self._barrier.done():
                waits.append(self._barrier)
            if ordering.kind is not None:
                other = "key" if ordering.kind == "id" else "id"
                waits.extend(f for f in self._by_kind[other] if not f.done())
                self._by_kind[ordering.kind].add(done)
            for key in ordering.keys:
                self._last[key] = done
        self._pending.add(done)
        done.add_done_callback(lambda f: self._forget(f, ordering))
        return waits, done

    def _forget(self, done: asyncio.Future[None], ordering: Ordering) -> None:
        self._pending.discard(done)
        if ordering.kind is not None:
            self._by_kind[ordering.kind].discard(done)
        for key in ordering.keys:
            if self._last.get(key) is done:
                del self._last[key]
        if self._barrier is done:
            self._barrier = None

    @property
    def in_hand(self) -> int:
        return len(self._pending)


# ---------------------------------------------------------------------------------------------
# The role
# ---------------------------------------------------------------------------------------------


Handle = Callable[[str, bytes, str | None, str | None, str | None], Awaitable[tuple[int, dict[str, Any]]]]
"""The gateway's entry: (op, body, Authorization, Idempotency-Key, traceparent) -> (status, envelope)."""


@dataclass
class InboxOptions:
    """Tuning of the inbox (from Settings)."""

    max_deliver: int = 10
    backoff_s: float = 1.0
    backoff_max_s: float = 120.0
    concurrency: int = 1024
    fetch_batch: int = 256
    ack_wait_s: float = 30.0
    leader_retry_s: float = 1.0
    heartbeat_s: float = 1.0
    stop_timeout_s: float = 10.0


@dataclass
class InboxStats:
    """Counters, for tests, the benchmark and the logs."""

    results: int = 0
    retries: int = 0
    dead_lettered: int = 0
    terms: int = 0
    last_error: str | None = None
    by_code: dict[str, int] = field(default_factory=dict)


class StopTerm(Exception):
    """The term ends (stop, lost lock, or a NATS failure): leave the command unacked."""


Remembered = tuple[int, str]  # a result's stream sequence and an activity it names (its UUID in hex)


class GroupedWrites:
    """Rows that concurrent tasks each need written before they go on, written together: the
    rows added while one write is in flight make the next one (one statement and one commit for
    all of them, as the command batcher does for commands). Each `add` returns once its rows are
    written, or raises what the write raised."""

    def __init__(self, write: Callable[[list[Remembered]], Awaitable[Any]]) -> None:
        self._write = write
        self._rows: list[Remembered] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._writer: asyncio.Task[None] | None = None

    async def add(self, rows: Sequence[Remembered]) -> None:
        loop = asyncio.get_running_loop()
        written: asyncio.Future[None] = loop.create_future()
        self._rows.extend(rows)
        self._waiters.append(written)
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_all())
        await written

    async def _write_all(self) -> None:
        while self._waiters:
            rows, self._rows = self._rows, []
            waiters, self._waiters = self._waiters, []
            try:
                await self._write(rows)
            except BaseException as exc:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc if isinstance(exc, Exception) else StopTerm())
                if not isinstance(exc, Exception):
                    raise
            else:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)


class Inbox:
    """The `inbox` role: a Component (`start`/`stop`)."""

    def __init__(
        self,
        handle: Handle,
        verifier: TokenVerifier,
        connection: Callable[[], NatsClient],
        streams: InboxStreams,
        database_url: str,
        options: InboxOptions | None = None,
        admit: Callable[[], bool] | None = None,
        schema: str = "public",
    ) -> None:
        self._handle = handle
        self._verifier = verifier
        self._connection = connection
        self.streams = streams
        self.subjects = streams.subjects
        self._database_url = database_url
        self._remember_sql = remember_published_sql(schema)
        self._remembered = GroupedWrites(self._write_remembered)
        self._conn: psycopg.AsyncConnection[Any] | None = None  # the active term's session
        self.options = options or InboxOptions()
        self._admit = admit or (lambda: True)
        self.stats = InboxStats()
        self.active = False
        self._key = lock_key(LEADER_LOCK)
        self._stopped = asyncio.Event()
        self._halt = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: dict[int, Msg] = {}  # taken and not yet acked, by stream sequence
        self._waiting_unavailable = 0  # commands backing off after `unavailable`: ask for no new ones
        self._in_hand = 0  # commands taken and not finished (the term's `concurrency` bounds it)
        self._room = asyncio.Event()  # set when enough commands finished to fetch another batch
        self._results: StreamAcks | None = None  # the active term's publisher of results

    # Lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        js = self._connection().jetstream()
        with contextlib.suppress(Exception):  # NATS away: the term creates them when it can
            await ensure_inbox_streams(js, self.streams)
        self._stopped.clear()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name="inbox")

    async def stop(self) -> None:
        self._stopped.set()
        self._halt.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None

    # Leadership -------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        while not self._stopped.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                    conninfo(self._database_url, connect_timeout=5), autocommit=True
                ) as conn:
                    while not self._stopped.is_set():
                        row = await (await conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,))).fetchone()
                        if row and row[0]:
                            await self._lead(conn)
                            break
                        await self._pause(self.options.leader_retry_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("inbox session failed", extra={"error": describe(exc)})
            await self._pause(self.options.leader_retry_s)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    async def _lead(self, conn: psycopg.AsyncConnection[Any]) -> None:
        log.info("became the active inbox")
        self.stats.terms += 1
        self._halt.clear()
        self.active = True
        self._conn = conn
        runner = asyncio.get_running_loop().create_task(self._consume(), name="inbox-term")
        try:
            while not self._stopped.is_set() and not self._halt.is_set() and not runner.done():
                await asyncio.wait([runner], timeout=self.options.heartbeat_s)
                await conn.execute("SELECT 1")  # the session, and with it the lock, is still ours
        finally:
            self.active = False
            await self._wind_down(runner)
            self._conn = None

    async def _wind_down(self, runner: asyncio.Task[None]) -> None:
        """Stop taking commands, let those in hand finish (up to stop_timeout_s), cancel the rest:
        their commands stay unacked and the next term carries them out."""
        self._halt.set()
        self._room.set()
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=self.options.stop_timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        if self._results is not None:
            await self._results.stop()
            self._results = None
        with contextlib.suppress(Exception):
            error = runner.exception() if runner.done() and not runner.cancelled() else None
            if error is not None:
                log.warning("inbox term ended", extra={"error": describe(error)})
        self._held.clear()
        self._waiting_unavailable = 0
        self._in_hand = 0
        log.info("the inbox is no longer active")

    # One term ---------------------------------------------------------------------------------

    async def _consume(self) -> None:
        nc = self._connection()
        js = nc.jetstream()
        await ensure_inbox_streams(js, self.streams)
        await self._fresh_consumer(js)
        self._results = await StreamAcks(nc).start()  # stopped by _wind_down, after the commands in hand
        sequencer = Sequencer()

        def take(message: Msg) -> None:
            if not self._halt.is_set():  # the term is ending: left unacked for the next one
                self._take(js, sequencer, message)

        feed = await PullFeed(nc, self.streams.inbox, INBOX_CONSUMER, take).start()
        keepalive = asyncio.get_running_loop().create_task(self._keep_in_progress(), name="inbox-keepalive")
        backoff = Backoff(0.1, 2.0)
        try:
            while not self._halt.is_set():
                if self._waiting_unavailable:
                    await asyncio.sleep(0.05)
                    continue
                free = self.options.concurrency - self._in_hand
                if free < self._min_fetch():  # busy: wait for a batch's worth of room (not a fetch per command)
                    self._room.clear()
                    await self._room.wait()
                    continue
                try:
                    await feed.pull(min(free, self.options.fetch_batch))
                    backoff.reset()
                except NotFoundError:
                    raise  # the consumer is gone: end the term, the next one creates it afresh
                except Exception as exc:  # disconnected: nats-py reconnects; try again
                    self.stats.last_error = describe(exc)
                    await asyncio.sleep(backoff.next())
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive
            await feed.stop()  # a subscription left open holds up the connection's drain

    async def _fresh_consumer(self, js: JetStreamContext) -> None:
        """The durable pull consumer, created anew: every unacked command, in stream order."""
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(self.streams.inbox, INBOX_CONSUMER)
        config = ConsumerConfig(
            durable_name=INBOX_CONSUMER,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.options.ack_wait_s,
            max_deliver=-1,
            max_ack_pending=self.options.concurrency * 2,
            filter_subject=self.subjects.all_inbox,
        )
        await js.add_consumer(self.streams.inbox, config)

    async def _keep_in_progress(self) -> None:
        """Commands in hand (waiting for their turn or backing off) are not redelivered meanwhile."""
        while True:
            await asyncio.sleep(self.options.ack_wait_s / 3)
            for message in list(self._held.values()):
                with contextlib.suppress(Exception):
                    await message.in_progress()

    def _min_fetch(self) -> int:
        return max(1, min(self.options.fetch_batch, self.options.concurrency // 4))

    def _finished(self) -> None:
        self._in_hand -= 1
        if self.options.concurrency - self._in_hand >= self._min_fetch():
            self._room.set()

    def _take(self, js: JetStreamContext, sequencer: Sequencer, message: Msg) -> None:
        self._in_hand += 1
        seq = stream_sequence(message)
        self._held[seq] = message
        waits, done = sequencer.admit(ordering_of(op_of(message.subject), message.data))
        task = asyncio.get_running_loop().create_task(self._run(js, message, seq, waits, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self,
        js: JetStreamContext,
        message: Msg,
        seq: int,
        waits: Sequence[asyncio.Future[None]],
        done: asyncio.Future[None],
    ) -> None:
        try:
            if waits:  # `wait`, not `gather`: a cancelled waiter must not cancel its predecessors' completions
                await asyncio.wait(waits)
            await self._carry_out(js, message, seq)
            self._held.pop(seq, None)
        except (StopTerm, asyncio.CancelledError):
            pass  # unacked: the next term carries it out
        except Exception as exc:  # NATS failed while publishing the result or the dead letter
            self.stats.last_error = describe(exc)
            log.warning("inbox command left for the next term", extra={"error": describe(exc)})
            self._halt.set()  # end the term: later commands on the same activity must not overtake it
        finally:
            if not done.done():
                done.set_result(None)
            self._finished()

    async def _carry_out(self, js: JetStreamContext, message: Msg, seq: int) -> None:
        """Run one command until it has a result (published, then acked) or a dead letter."""
        op = op_of(message.subject)
        headers = message.headers or {}
        authorization = header(headers, "Authorization")
        try:
            key = check_idempotency_key(header(headers, IDEMPOTENCY_KEY))
            if key is None:
                raise field_error(IDEMPOTENCY_KEY, "is required on an inbox command (it makes it exactly once)")
            caller = self._verifier.verify(authorization)
        except ActivitiesError as error:  # no key, or no tenant to answer
            await self._dead_letter(js, message, error, 0)
            return
        tries = 0
        while True:
            tries += 1
            envelope = await self._attempt(op, message, authorization, key, headers)
            code = envelope["error"].get("code") if "error" in envelope else None
            if code not in RETRYABLE:
                break
            if tries >= self.options.max_deliver:
                await self._dead_letter(js, message, envelope, tries)
                return
            await self._back_off(tries, code == "unavailable")
        msg_id = f"result:{seq}"
        ack = await publish_result(self._results or js, self.subjects, caller.tenant_id, key, op, envelope, msg_id)
        await self._remember(ack, envelope)
        await message.ack()
        self.stats.results += 1
        self.stats.by_code[code or "ok"] = self.stats.by_code.get(code or "ok", 0) + 1

    async def _remember(self, ack: PubAck, envelope: dict[str, Any]) -> None:
        """Remember the result's message for erasure (projections/erasure.py) before the command is
        acked: an erased activity's results are deleted from the results stream with its events.
        A rerun after a crash publishes the same message (its Nats-Msg-Id) and remembers it then."""
        activities = activities_of(envelope)
        if activities:
            await self._remembered.add([(ack.seq, activity) for activity in activities])

    async def _write_remembered(self, messages: list[Remembered]) -> None:
        """The results of the commands carried out meanwhile, remembered in one statement."""
        if self._conn is None:
            raise StopTerm()
        await self._conn.execute(self._remember_sql, remember_published_params(self.streams.results, messages))

    async def _attempt(
        self, op: str, message: Msg, authorization: str | None, key: str, headers: dict[str, str]
    ) -> dict[str, Any]:
        if op not in COMMANDS:
            known = ", ".join(COMMANDS)
            return ValidationError(f"unknown op {op!r}: this service carries out {known}").to_envelope()
        while not self._admit():  # the command queue is full (request/reply load): not a failed try
            if self._halt.is_set():
                raise StopTerm()
            await asyncio.sleep(0.005)
        _, envelope = await self._handle(op, message.data, authorization, key, header(headers, "traceparent"))
        return envelope

    async def _back_off(self, tries: int, unavailable: bool) -> None:
        self.stats.retries += 1
        delay = min(self.options.backoff_max_s, self.options.backoff_s * 2 ** (tries - 1))
        if unavailable:
            self._waiting_unavailable += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._halt.wait(), delay)
        finally:
            if unavailable:
                self._waiting_unavailable -= 1
        if self._halt.is_set():
            raise StopTerm()

    async def _dead_letter(
        self, js: JetStreamContext, message: Msg, error: ActivitiesError | dict[str, Any], tries: int
    ) -> None:
        await dead_letter(js, self.subjects, message, error, tries)
        await message.ack()
        self.stats.dead_lettered += 1
        envelope = error.to_envelope() if isinstance(error, ActivitiesError) else error
        log.warning(
            "inbox command dead-lettered",
            extra={"seq": message.metadata.sequence.stream, "code": envelope["error"].get("code"), "tries": tries},
        )


# ---------------------------------------------------------------------------------------------
# Managing the DLQ (`activities inbox dlq list | redrive | drop`)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered command as the DLQ holds it."""

    seq: int
    op: str
    idempotency_key: str | None
    error: dict[str, Any]
    tries: int
    enqueued_at: str | None
    dead_at: datetime | None
    headers: dict[str, str]
    body: bytes

    def summary(self) -> dict[str, Any]:
        """What `dlq list` shows: ids and codes, never the command's content."""
        error = self.error.get("error", {}) if isinstance(self.error, dict) else {}
        return {
            "seq": self.seq,
            "op": self.op,
            "idempotency_key": self.idempotency_key,
            "code": error.get("code"),
            "message": error.get("message"),
            "tries": self.tries,
            "enqueued_at": self.enqueued_at,
            "dead_at": self.dead_at.isoformat().replace("+00:00", "Z") if self.dead_at else None,
        }


async def dlq_list(js: JetStreamContext, streams: InboxStreams, limit: int | None = None) -> list[DeadLetter]:
    """The DLQ's commands, oldest first."""
    info = await js.stream_info(streams.dlq)
    found: list[DeadLetter] = []
    seq = info.state.first_seq or 1
    last = info.state.last_seq or 0
    while seq <= last and (limit is None or len(found) < limit):
        try:
            raw = await js.get_msg(streams.dlq, seq=seq, subject=streams.subjects.all_dlq, next=True)
        except NotFoundError:
            break
        headers = dict(raw.headers or {})
        try:
            error = json.loads(headers.get(DLQ_ERROR, "{}"))
        except ValueError:
            error = {}
        assert raw.seq is not None
        found.append(
            DeadLetter(
                seq=raw.seq,
                op=op_of(raw.subject or ""),
                idempotency_key=header(headers, IDEMPOTENCY_KEY),
                error=error,
                tries=int(headers.get(DLQ_TRIES, "0") or 0),
                enqueued_at=headers.get(DLQ_ENQUEUED_AT),
                dead_at=raw.time,
                headers=headers,
                body=raw.data or b"",
            )
        )
        seq = raw.seq + 1
    return found


async def dlq_redrive(js: JetStreamContext, streams: InboxStreams, seqs: Sequence[int] | None = None) -> list[int]:
    """Publish DLQ commands (all, or those sequences) to the inbox again, then remove them from
    the DLQ; returns the sequences redriven. The redriven command keeps its Idempotency-Key (so a
    command that was carried out after all replays its reply) under a fresh message id."""
    wanted = set(seqs) if seqs is not None else None
    done: list[int] = []
    for letter in await dlq_list(js, streams):
        if wanted is not None and letter.seq not in wanted:
            continue
        headers = {k: v for k, v in letter.headers.items() if k not in DLQ_HEADERS and k != MSG_ID}
        key = letter.idempotency_key
        headers[MSG_ID] = f"{key}:redrive:{letter.seq}:{int(time.time())}" if key else f"redrive:{letter.seq}"
        await js.publish(streams.subjects.inbox(letter.op), letter.body, headers=headers)
        await js.delete_msg(streams.dlq, letter.seq)
        done.append(letter.seq)
    return done


async def dlq_drop(js: JetStreamContext, streams: InboxStreams, seqs: Sequence[int] | None = None) -> list[int]:
    """Remove DLQ commands (all, or those sequences) for good; returns the sequences dropped."""
    wanted = set(seqs) if seqs is not None else None
    done: list[int] = []
    for letter in await dlq_list(js, streams):
        if wanted is None or letter.seq in wanted:
            await js.delete_msg(streams.dlq, letter.seq)
            done.append(letter.seq)
    return done
