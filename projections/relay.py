"""The tracked relay: every stored event, in log order, to JetStream (docs/contract.md section 4).

The event store is the source of truth; the relay only reads it. It keeps its own position
(the last notification id it knows to be on the stream) in `activities_relay_tracking`, reads
the log after it a page at a time, publishes the page with many acks in flight, and records the
new position only once every message up to it is acknowledged. A crash between a publish and
the recording would republish; so a relay that starts, or recovers from a failure, resumes after
the later of its record and the position in the stream's last message (the stream is a prefix
of the log, see Order), and publishes nothing twice however long it was away. A publish whose
ack was lost is repeated at once, and the stream's duplicate window (`Nats-Msg-Id:
<activity_id>:<version>`) drops it: at least once on the wire, exactly once on the stream.

Order. Messages on one NATS connection reach the server in publish order, but with acks in flight
a lost message can be followed by later ones that are stored (nats-py flushes its reconnect
buffer after a drop), and republishing the lost one would then store it after them. To make
that impossible every message after the first of a publishing session carries
`Nats-Expected-Last-Msg-Id` = the id of the message before it, so the server refuses anything
that does not directly follow its predecessor: the stream is always a prefix of the log, in log
order (hence also in version order per activity). The server checks duplicates before that
expectation (checked against nats-server 2.15), so republishing a stored tail still acks as
duplicates. A session starts again, without the expectation, after any failure.

Failure. NATS down or slow: acks time out, the relay backs off (capped), reconnects and
resumes from its position; commands are untouched because they never wait for the relay.
PostgreSQL down: reads and the tracking write fail, the relay backs off and retries. Paging,
waking on the store's LISTEN/NOTIFY channel (and polling), backing off and running as the one
active instance are the tracked-consumer core's (projections/consumer.py): `Relay` is its
handler, `RELAY_SETTINGS` how the service runs it.

The relay assumes it is the only publisher to the stream and that one relay runs per stream
(the core's advisory lock; standbys take over).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Final, Literal

import nats
import orjson
from eventsourcing.application import Application
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import PubAck, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError
from psycopg.sql import SQL, Identifier

from activities_client.document import EVENT_KINDS
from activities_client.subjects import Subjects
from events.activity import (
    ActivityEvent,
    activity_uuid,
    event_body,
    event_type_name,
    holds_client_content,
    is_activity_event_id,
)
from projections.consumer import ConsumerSettings, Entry, TrackedConsumer, event_store
from projections.erasure import (
    forget_published_sql,
    remember_published_params,
    remember_published_sql,
    scanned_through_sql,
)
from projections.errors import describe
from projections.streams import ensure_stream, nats_servers

log = logging.getLogger("activities.relay")

TRACKING_TABLE: Final = "activities_relay_tracking"
RELAY_NAME: Final = "jetstream"
MIN_DUPLICATE_WINDOW_S: Final = 120.0

SCAN_CHUNK: Final = 256  # messages read at a time when remembering a stream's unscanned tail

MSG_ID: Final = "Nats-Msg-Id"
EXPECTED_LAST_MSG_ID: Final = "Nats-Expected-Last-Msg-Id"


# ---------------------------------------------------------------------------------------------
# Pure parts: the stream's configuration and each outgoing message
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamSpec:
    """The stream the relay publishes to, as configured (the composition root fills it from Settings)."""

    name: str
    subject_prefix: str
    retention: Literal["limits", "interest", "workqueue"] = "limits"
    replicas: int = 1
    duplicate_window_s: float = MIN_DUPLICATE_WINDOW_S


def stream_config(spec: StreamSpec) -> StreamConfig:
    """The stream the contract asks for: all events, file storage, a dedup window of >= 2 minutes."""
    return StreamConfig(
        name=spec.name,
        subjects=[Subjects(spec.subject_prefix).all_events],
        retention=RetentionPolicy(spec.retention),
        storage=StorageType.FILE,
        num_replicas=spec.replicas,
        duplicate_window=max(spec.duplicate_window_s, MIN_DUPLICATE_WINDOW_S),
        description="Activity events (docs/contract.md section 4), published by the activities relay",
    )


@dataclass(frozen=True)
class Outgoing:
    """One event as a JetStream message, with the log position it came from."""

    position: int
    subject: str
    msg_id: str
    headers: dict[str, str]
    payload: bytes


def outgoing(subjects: Subjects, event: ActivityEvent, position: int) -> Outgoing:
    """The contract's subject, headers and body of a stored event."""
    body = event_body(event, position)
    type_name = event_type_name(event)
    activity_id = str(body["activity_id"])
    version = int(body["version"])
    msg_id = f"{activity_id}:{version}"
    headers = {
        MSG_ID: msg_id,
        "Activity-Id": activity_id,
        "Activity-Version": str(version),
        "Event-Type": type_name,
        "Content-Type": "application/json",
    }
    if getattr(event, "traceparent", None):  # the W3C trace context of the command that caused it
        headers["traceparent"] = str(event.traceparent)
    subject = subjects.event(str(body["tenant_id"]), EVENT_KINDS[type_name])
    return Outgoing(position, subject, msg_id, headers, orjson.dumps(body))


def chained_headers(message: Outgoing, previous_msg_id: str | None) -> dict[str, str]:
    """The headers to send: the message's own, plus the expectation that it follows `previous_msg_id`."""
    if previous_msg_id is None:
        return dict(message.headers)
    return {**message.headers, EXPECTED_LAST_MSG_ID: previous_msg_id}


# ---------------------------------------------------------------------------------------------
# PostgreSQL: the log and the relay's position (synchronous; called through a thread pool)
# ---------------------------------------------------------------------------------------------


class RelayStore:
    """The relay's position, kept in the event store's database (its own table)."""

    def __init__(self, app: Application[Any], name: str = RELAY_NAME) -> None:
        self.name = name
        self.datastore = event_store(app).datastore
        table = SQL("{}.{}").format(Identifier(self.datastore.schema), Identifier(TRACKING_TABLE))
        self._create = SQL(
            "CREATE TABLE IF NOT EXISTS {table} (name text PRIMARY KEY, position bigint NOT NULL, "
            "updated_at timestamptz NOT NULL DEFAULT now())"
        ).format(table=table)
        self._select = SQL("SELECT position FROM {table} WHERE name = %s").format(table=table)
        # GREATEST: a position never goes back, even if an old relay saves late.
        self._upsert = SQL(
            "INSERT INTO {table} AS t (name, position) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE "
            "SET position = GREATEST(t.position, EXCLUDED.position), updated_at = now()"
        ).format(table=table)
        recorder = event_store(app)
        self._head = SQL("SELECT max(notification_id) AS head FROM {}.{}").format(
            Identifier(self.datastore.schema), Identifier(recorder.events_table_name)
        )

    def ensure_table(self) -> None:
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(self._create)

    def load_position(self) -> int:
        """The last position known to be on the stream (0: nothing yet)."""
        self.ensure_table()
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(self._select, (self.name,))
            row = curs.fetchone()
        return int(row["position"]) if row else 0

    def head(self) -> int:
        """The log's last position in the store (0: empty)."""
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(self._head)
            row = curs.fetchone()
        return int(row["head"]) if row and row["head"] is not None else 0

    def save_position(
        self, position: int, stream: str | None = None, published: Sequence[tuple[int, Any]] = (), through: int = 0
    ) -> None:
        """Record the position and, in the same transaction, remember the `published` messages
        holding activity content ((stream sequence, activity uuid); projections/erasure.py), the
        stream being scanned `through` that sequence."""
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(self._upsert, (self.name, position))
            if stream is not None and (published or through):
                params = remember_published_params(stream, published, through)
                curs.execute(remember_published_sql(self.datastore.schema), params)

    def forget_stream(self, stream: str, before_seq: int | None) -> None:
        """Forget the remembered messages of a stream below a sequence (None: all, and its scan)."""
        with self.datastore.transaction(commit=True) as curs:
            for statement in forget_published_sql(self.datastore.schema, all_of_it=before_seq is None):
                curs.execute(statement, {"stream": stream, "before": before_seq or 0})

    def scanned_through(self, stream: str) -> int:
        """The stream sequence up to which every message is remembered (0: none yet)."""
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(scanned_through_sql(self.datastore.schema), (stream,))
            row = curs.fetchone()
        return int(row["through_seq"]) if row else 0


def messages(subjects: Subjects, page: Sequence[Entry]) -> list[Outgoing]:
    """A page of the log as messages, in log order."""
    return [outgoing(subjects, entry.event, entry.position) for entry in page]


# ---------------------------------------------------------------------------------------------
# NATS: the stream and one publishing session
# ---------------------------------------------------------------------------------------------


async def last_position_on_stream(js: JetStreamContext, stream: str) -> int:
    """The log position of the stream's last message (0: empty, or not a message of ours): with
    chained publishes the stream holds the log up to it."""
    info = await js.stream_info(stream)
    if not info.state.last_seq:
        return 0
    try:
        message = await js.get_msg(stream, seq=info.state.last_seq)
        return int(orjson.loads(message.data or b"")["position"])
    except NotFoundError:  # removed meanwhile: the relay's own record decides
        return 0
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        log.warning("the stream's last message is not an activity event; resuming from the relay's record",
                    extra={"stream": stream, "seq": info.state.last_seq})
        return 0


class PublishInterrupted(Exception):
    """Only a prefix of a page was acknowledged; the rest is published again later."""

    safe_to_log = True  # counts and the NATS error: no client content


@dataclass
class RelayStats:
    """Counters, for tests, metrics and the benchmark (see `relay_stats`)."""

    position: int = 0
    published: int = 0
    duplicates: int = 0
    failures: int = 0
    last_error: str | None = None


@dataclass
class PublishOutcome:
    """How many leading messages of a page were acknowledged, and why the rest were not."""

    acked: int
    duplicates: int
    error: BaseException | None = None
    seqs: list[int] = dataclasses.field(default_factory=list)  # stream sequences of the acknowledged prefix


async def publish_in_order(
    js: JetStreamContext, messages: Sequence[Outgoing], previous_msg_id: str | None, ack_timeout_s: float
) -> PublishOutcome:
    """Publish a page with every ack in flight at once, each chained to its predecessor.

    Returns the length of the acknowledged prefix: a message counts only if every message
    before it in the page was acknowledged too.
    """
    futures: list[asyncio.Future[PubAck]] = []
    error: BaseException | None = None
    try:
        for message in messages:
            future = await js.publish_async(
                message.subject,
                message.payload,
                wait_stall=ack_timeout_s,
                headers=chained_headers(message, previous_msg_id),
            )
            futures.append(future)
            previous_msg_id = message.msg_id
    except Exception as exc:  # not connected, buffer full, stalled: what was sent may still be acked
        error = exc
    if futures:
        _, pending = await asyncio.wait(futures, timeout=ack_timeout_s)
        for future in pending:
            future.cancel()  # frees nats-py's pending slot; a late ack is ignored
    acked = duplicates = 0
    seqs: list[int] = []
    for future in futures:
        if future.cancelled():
            error = error or TimeoutError(f"no ack within {ack_timeout_s}s")
            break
        failure = future.exception()
        if failure is not None:
            error = failure
            break
        acked += 1
        duplicates += bool(future.result().duplicate)
        seqs.append(future.result().seq)  # a duplicate's ack names the original message
    return PublishOutcome(acked, duplicates, error, seqs)


# ---------------------------------------------------------------------------------------------
# The component
# ---------------------------------------------------------------------------------------------


@dataclass
class RelayOptions:
    """Tuning of the relay's NATS side; the defaults suit the contract's guarantees and the benchmark."""

    ack_timeout_s: float = 5.0
    nats_reconnect_wait_s: float = 0.5


RELAY_SETTINGS: Final = ConsumerSettings(name="activities:relay", page_size=1000, poll_interval_s=1.0)
"""How the service runs the relay (one active per store, by this name)."""


class Relay:
    """Publishes the event store's log to JetStream: a `Handler` of `TrackedConsumer`.

    `resume` connects to NATS (once; nats-py reconnects by itself), makes sure of the stream and
    returns the later of the relay's record and the position in the stream's last message; each
    page is published chained and its acknowledged prefix recorded (`handle`); `close`
    disconnects. The record lives in the event store's database; its synchronous reads and
    writes run in `executor` (default: asyncio's).
    """

    def __init__(
        self,
        app: Application[Any],
        stream: StreamSpec,
        nats_url: str,
        executor: Executor | None = None,
        options: RelayOptions | None = None,
        name: str = RELAY_NAME,
    ) -> None:
        self.stream = stream
        self.subjects = Subjects(stream.subject_prefix)
        self.store = RelayStore(app, name)
        self.nats_url = nats_url
        self.executor = executor
        self.options = options or RelayOptions()
        self.position = 0
        self.published = 0
        self.duplicates = 0
        self.stream_ahead = 0  # the stream's last position when it was found ahead of the store (an alarm)
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._stream_ready = False
        self._chain_tail: str | None = None  # msg id the next publish must follow, in this session

    async def _in_thread(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    # Handler ----------------------------------------------------------------------------------

    async def resume(self) -> int:
        """Where to continue: read again from the store and the stream, as acks may have been lost."""
        self._chain_tail = None  # a new publishing session: its first message carries no expectation
        js = await self._jetstream()
        recorded = await self._in_thread(self.store.load_position)
        published = await last_position_on_stream(js, self.stream.name)
        if published > recorded and published > await self._in_thread(self.store.head):
            # The stream has events the store lacks: PostgreSQL failed over to a standby without the
            # last commits (asynchronous replication), or the stream belongs to another store. The
            # store's next events reuse those positions and versions, and would be skipped.
            log.error(
                "the events stream is ahead of the event store; events the store appends up to the "
                "stream's last position will not be published. If PostgreSQL failed over to a standby "
                "that lacked commits, stop the relays, delete the stream and the relay's row in "
                f"{TRACKING_TABLE}, and start them again: the whole log is published anew",
                extra={"stream": self.stream.name, "stream_position": published, "store_recorded": recorded},
            )
            self.stream_ahead = published
        await self.remember_unscanned(js)
        self.position = max(recorded, published)
        return self.position

    async def remember_unscanned(self, js: JetStreamContext) -> int:
        """Remember the stream's messages after the last one remembered: those acknowledged just
        before a crash (the position was not recorded), or the whole stream on the first start of
        a release with erasure. Reads each message's headers; how many messages it remembered."""
        stream = self.stream.name
        info = await js.stream_info(stream)
        through: int = await self._in_thread(self.store.scanned_through, stream)
        first_seq, last_seq = int(info.state.first_seq or 1), int(info.state.last_seq or 0)
        if last_seq < through:  # the stream was deleted and made again: its sequences are new ones
            log.warning("the stream restarted its sequences; remembering it from the start", extra={"stream": stream})
            await self._in_thread(self.store.forget_stream, stream, None)
            through = 0
        else:  # messages the stream no longer holds (its limits removed them) need no erasing
            await self._in_thread(self.store.forget_stream, stream, first_seq)
        first, last = max(through + 1, first_seq), last_seq
        found: list[tuple[int, Any]] = []
        for start in range(first, last + 1, SCAN_CHUNK):
            seqs = range(start, min(start + SCAN_CHUNK, last + 1))
            found += [m for m in await asyncio.gather(*(self._content_message(js, seq) for seq in seqs)) if m]
            upto = seqs[-1]
            await self._in_thread(self.store.save_position, 0, stream, found, upto)  # GREATEST: 0 keeps it
            if found:
                log.info("relay remembered messages of the stream", extra={"stream": stream, "through_seq": upto})
            found = []
        return max(0, last - first + 1)

    async def _content_message(self, js: JetStreamContext, seq: int) -> tuple[int, Any] | None:
        """(seq, activity uuid) of a message holding activity content; None for others and gaps."""
        try:
            message = await js.get_msg(self.stream.name, seq=seq)
        except NotFoundError:
            return None
        headers = message.headers or {}
        activity_id = headers.get("Activity-Id")
        if headers.get("Event-Type") == "ActivityErased" or not is_activity_event_id(activity_id):
            return None
        return seq, activity_uuid(str(activity_id))

    async def handle(self, page: Sequence[Entry]) -> int:
        """Publish a page and record the position of its acknowledged prefix; raises
        `PublishInterrupted` when only a prefix was acknowledged."""
        js = await self._jetstream()
        outgoing_page: list[Outgoing] = await self._in_thread(messages, self.subjects, page)
        outcome = await publish_in_order(js, outgoing_page, self._chain_tail, self.options.ack_timeout_s)
        self.published += outcome.acked
        self.duplicates += outcome.duplicates
        if outcome.acked:
            last = outgoing_page[outcome.acked - 1]
            self._chain_tail = last.msg_id
            remembered = [
                (seq, entry.event.originator_id)
                for seq, entry in zip(outcome.seqs, page, strict=False)
                if holds_client_content(entry.event)  # (an ActivityErased stays on the stream)
            ]
            await self.record(last.position, remembered, max(outcome.seqs))
        if outcome.error is not None:
            raise PublishInterrupted(f"{outcome.acked}/{len(page)} acknowledged: {outcome.error!r}")
        return self.position

    async def record(self, position: int, published: Sequence[tuple[int, Any]] = (), through: int = 0) -> None:
        """Save the position (only ever called once everything up to it is acknowledged), with the
        messages it published that hold activity content (for erasure)."""
        await self._in_thread(self.store.save_position, position, self.stream.name, published, through)
        self.position = position

    async def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        self._nc = self._js = None
        self._stream_ready = False
        self._chain_tail = None

    # NATS ---------------------------------------------------------------------------------------

    async def _jetstream(self) -> JetStreamContext:
        if self._nc is None:
            self._nc = await nats.connect(
                nats_servers(self.nats_url),  # a cluster's nodes: reconnects go to the others
                name="activities-relay",
                max_reconnect_attempts=-1,
                reconnect_time_wait=self.options.nats_reconnect_wait_s,
                connect_timeout=2,
                error_cb=self._nats_error,
                disconnected_cb=self._nats_disconnected,
                allow_reconnect=True,
            )
            self._js = self._nc.jetstream(timeout=self.options.ack_timeout_s)
        assert self._js is not None
        if not self._nc.is_connected:
            raise ConnectionError("NATS is not connected")
        if not self._stream_ready:
            await ensure_stream(self._js, stream_config(self.stream), self.stream.replicas)
            self._stream_ready = True
        return self._js

    async def _nats_error(self, error: Exception) -> None:
        log.debug("relay NATS error", extra={"error": describe(error)})

    async def _nats_disconnected(self) -> None:
        self._chain_tail = None
        log.info("relay disconnected from NATS")


def relay_stats(consumer: TrackedConsumer[Relay]) -> RelayStats:
    """The counters of a relay and the consumer running it."""
    relay = consumer.handler
    return RelayStats(
        position=consumer.position,
        published=relay.published,
        duplicates=relay.duplicates,
        failures=consumer.failures,
        last_error=consumer.last_error,
    )
