"""The tracked-consumer core: every reader of the event store's log is one of these.

A `TrackedConsumer` runs a `Handler` over the log of an eventsourcing application stored in
PostgreSQL. While it is the active instance it reads the log a page at a time after its position,
decodes the page and hands it to the handler, which applies it and records the position it
reached *together with its effect* (the read model: rows and tracking in one transaction; the
relay: the position after the acks). A consumer is its handler plus `ConsumerSettings`; the core
owns everything else:

- Position. The handler says where to resume (`Handler.resume`, from its own record, so a
  consumer that stops anywhere resumes exactly after what it recorded) and where each page
  brought it (`Handler.handle`); the core never records positions itself.
- Wake-ups. The store NOTIFYs its channel on every append; the active instance LISTENs and reads
  at once. It also polls every `poll_interval_s`, so a lost notification only adds latency.
- Failure. Any exception of a read or of the handler makes the core back off (capped,
  exponential), then `resume` again from the handler's record and carry on.
- Single active instance. The consumer holds a PostgreSQL session advisory lock named after the
  consumer (`settings.name`) on a connection of its own, which is also the LISTEN connection and
  is checked every `heartbeat_s`; standbys try the lock every `leader_retry_s` and take over when
  the holder's session ends (its process died, it stopped, or the connection dropped). When the
  connection fails the active instance stops processing (finishing the page in flight), and
  reconnects and competes for the lock again: the LISTEN connection is supervised that way.
  Correctness does not rest on the lock alone: handlers record positions that never move back
  (the read model refuses a page it has already applied; the relay's messages are deduplicated
  by their ids), so a brief overlap while a lost lock is noticed does no harm.
- Stop. `stop()` lets a page in flight finish (its effect and its position) for up to
  `stop_timeout_s`, cancels anything else (a read, a wait, a handler still connecting), closes
  the handler and only then releases the lock.

Why asyncio and not threads: the service runs on one event loop, and the relay publishes with
nats-py, which is asyncio; a consumer that is a task composes with both, can be cancelled, and
needs no thread of its own while idle (the previous projector held two threads, one parked in
LISTEN). The eventsourcing library and its recorders are synchronous, so the core reads and
decodes pages in an executor (the composition root's store pool, or asyncio's default one);
handlers do their synchronous work the same way. The LISTEN/lock connection is psycopg's
asyncio connection, on the loop.

Adding a consumer (a scheduler keeping a due-time index, an inbox): write a `Handler` that
records its position in the same transaction as its effect, choose a name, and give both to a
`TrackedConsumer` in the composition root.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import psycopg
from eventsourcing.application import Application
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from psycopg.sql import SQL, Identifier

from projections.database import conninfo
from projections.errors import describe

log = logging.getLogger("activities.consumer")


class Entry(NamedTuple):
    """One event of the log and its position (notification id): what a handler is given."""

    event: Any
    position: int


class Handler(Protocol):
    """What a consumer does with the log. Called by one `TrackedConsumer`, one call at a time."""

    async def resume(self) -> int:
        """Become ready (again) and return the position to continue after (0: the beginning).

        Called when the consumer becomes the active instance and after every failure (after the
        back-off), so it is the place to re-read the handler's record and reset session state."""
        ...

    async def handle(self, page: Sequence[Entry]) -> int:
        """Apply a page (in log order, non-empty) and record the position reached together with
        its effect; return that position (normally `page[-1].position`; another position when
        the handler finds its record elsewhere, e.g. already past the page). Raise to make the
        consumer back off and `resume`."""
        ...

    async def close(self) -> None:
        """No longer active (stopped, or lost the lock): release connections. `resume` is called
        again if the consumer becomes active again."""
        ...


@dataclass(frozen=True)
class ConsumerSettings:
    """The tuning of one consumer; `name` also names its advisory lock (one active per name)."""

    name: str
    page_size: int = 500
    poll_interval_s: float = 1.0
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    stop_timeout_s: float = 10.0
    leader_retry_s: float = 1.0
    heartbeat_s: float = 1.0


@dataclass
class Backoff:
    """Capped exponential back-off between failed attempts."""

    initial_s: float = 0.1
    max_s: float = 5.0
    current_s: float = 0.0

    def next(self) -> float:
        self.current_s = min(self.max_s, self.current_s * 2 if self.current_s else self.initial_s)
        return self.current_s

    def reset(self) -> None:
        self.current_s = 0.0


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for a name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def schema_lock(datastore: PostgresDatastore, key: int) -> Iterator[None]:
    """Hold a session advisory lock while changing a schema (processes start together)."""
    with datastore.get_connection() as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def event_store(app: Application[Any]) -> PostgresApplicationRecorder:
    """The application's recorder, which must be the PostgreSQL one (its log, datastore, channel)."""
    recorder = app.recorder
    if not isinstance(recorder, PostgresApplicationRecorder):
        raise TypeError(f"a tracked consumer needs an event store in PostgreSQL, not {type(recorder).__name__}")
    return recorder


H = TypeVar("H", bound=Handler)


class TrackedConsumer(Generic[H]):
    """Runs `handler` over the log of `app` as the single active instance of `settings.name`.

    A Component (`start`/`stop`). `database_url` is where the lock and LISTEN connection goes
    (the store's database); `executor` runs the store's synchronous reads (default: asyncio's).
    `position` is the last position handled by this process; listeners are called on the event
    loop each time it moves, so in-process readers waiting for a position wake at once.
    """

    def __init__(
        self,
        app: Application[Any],
        database_url: str,
        handler: H,
        settings: ConsumerSettings,
        executor: Executor | None = None,
    ) -> None:
        self.app = app
        self.recorder = event_store(app)
        self.database_url = database_url
        self.handler = handler
        self.settings = settings
        self.executor = executor
        self.position = 0
        self.active = False
        self.failures = 0
        self.last_error: str | None = None
        self._key = lock_key(settings.name)
        self._listeners: list[Callable[[int], None]] = []
        self._wake = asyncio.Event()
        self._halt = asyncio.Event()  # set: leave the processing loop (stopping, or the lock lost)
        self._stopped = asyncio.Event()  # set: stop() was called
        self._in_handle = False
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    def add_listener(self, listener: Callable[[int], None]) -> None:
        """Call `listener(position)` each time the position moves (on the event loop)."""
        self._listeners.append(listener)

    # Lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Compete for the lock and, once held, consume; returns at once (never waits for the database)."""
        self._stopped.clear()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name=f"consumer-{self.name}")

    async def stop(self) -> None:
        """Finish the page in flight (up to `stop_timeout_s`), close the handler, release the lock."""
        self._stopped.set()
        self._halt.set()
        self._wake.set()
        if self._supervisor is not None:
            self._supervisor.cancel()  # interrupts waiting for the lock or a NOTIFY; `_lead` winds down
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None

    # Leadership: the lock and LISTEN connection -----------------------------------------------

    async def _supervise(self) -> None:
        while not self._stopped.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                    conninfo(self.database_url, connect_timeout=5), autocommit=True
                ) as conn:
                    while not self._stopped.is_set():
                        row = await (await conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,))).fetchone()
                        if row and row[0]:
                            await self._lead(conn)
                            break  # a new session for the next term: this one may be broken
                        await self._pause(self.settings.leader_retry_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away, or the session dropped: try again
                log.warning("consumer session failed", extra={"consumer": self.name, "error": describe(exc)})
            await self._pause(self.settings.leader_retry_s)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    async def _lead(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Consume while the session holding the lock lives; on any end, wind down before the
        session (and so the lock) goes."""
        await conn.execute(SQL("LISTEN {}").format(Identifier(self.recorder.channel_name)))
        log.info("became the active instance", extra={"consumer": self.name})
        self._halt.clear()
        self._wake.set()  # anything written before we listened
        self.active = True
        runner = asyncio.get_running_loop().create_task(self._process(), name=f"consumer-{self.name}-run")
        try:
            while not self._stopped.is_set():
                async for _ in conn.notifies(timeout=self.settings.heartbeat_s):
                    self._wake.set()
                await conn.execute("SELECT 1")  # the session, and with it the lock, is still ours
                if runner.done():  # cannot happen (the loop catches everything): start a new term
                    raise RuntimeError("the processing loop ended on its own")
        finally:
            self.active = False
            log.info("stopping the active instance", extra={"consumer": self.name})
            await self._wind_down(runner)

    async def _wind_down(self, runner: asyncio.Task[None]) -> None:
        self._halt.set()
        self._wake.set()
        if self._in_handle:  # a page in flight: let it record its position
            try:
                await asyncio.wait_for(asyncio.shield(runner), self.settings.stop_timeout_s)
            except TimeoutError:
                log.warning("page in flight did not finish in time", extra={"consumer": self.name})
            except Exception:  # already logged by the loop
                pass
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        try:
            await self.handler.close()
        except Exception as exc:
            log.warning("consumer handler failed to close", extra={"consumer": self.name, "error": describe(exc)})

    # Processing -------------------------------------------------------------------------------

    async def _process(self) -> None:
        settings = self.settings
        backoff = Backoff(settings.initial_backoff_s, settings.max_backoff_s)
        resumed = False
        while not self._halt.is_set():
            self._wake.clear()  # before reading, so a NOTIFY during the read is not lost
            try:
                if not resumed:
                    self._advance(await self.handler.resume())
                    resumed = True
                handled = await self.step()
                backoff.reset()
            except Exception as exc:  # supervised: back off, then resume from the handler's record
                resumed = False
                self.failures += 1
                self.last_error = describe(exc)  # no message: it may quote client content
                delay = backoff.next()
                log.warning(
                    "consumer failed; resuming from its record",
                    extra={"consumer": self.name, "error": self.last_error, "retry_in_s": delay},
                )
                with contextlib.suppress(TimeoutError):  # only a stop cuts a back-off short, not NOTIFYs
                    await asyncio.wait_for(self._halt.wait(), delay)
                continue
            if handled == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval_s)

    async def step(self) -> int:
        """Read the page after `position`, hand it to the handler, move to where it got; the
        number of events handled (0: at the end of the log)."""
        page = await asyncio.get_running_loop().run_in_executor(self.executor, self._read, self.position)
        if not page:
            return 0
        self._in_handle = True
        try:
            position = await self.handler.handle(page)
        finally:
            self._in_handle = False
        self._advance(position)
        return len(page)

    def _read(self, after: int) -> list[Entry]:
        """The next page of the log, decoded (the library's own log reader caps pages at 10)."""
        notifications = self.recorder.select_notifications(after + 1, self.settings.page_size)
        mapper = self.app.mapper
        return [Entry(mapper.to_domain_event(n), n.id) for n in notifications]

    def _advance(self, position: int) -> None:
        self.position = position
        for listener in self._listeners:
            try:
                listener(position)
            except Exception:  # a listener must never stop the consumer
                log.exception("position listener failed", extra={"consumer": self.name})
