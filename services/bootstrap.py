"""The composition root: builds every part of a service process from Settings, and nothing else does.

`Runtime(settings, roles)` resolves the servers (embedded ones when no URL is configured), the
token verifier, the event store, and the parts each role runs: `commands` (NATS command
subscribers with group commit), `projector` (read model), `relay` (events to JetStream),
`http` (queries and the write gateway) and `scheduler` (reminders and overdue, contract section 9,
and retention's erasures: a list of components, `Runtime.scheduler_components`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psycopg
from fastapi import FastAPI
from faststream.nats import NatsBroker
from nats.aio.client import Client as NatsClient

from activities_client.errors import Unavailable
from activities_client.subjects import Subjects
from projections.consumer import TrackedConsumer
from projections.database import conninfo, shared_secret
from projections.erasure import StreamEraser
from projections.queries import CURSOR_KEY_NAME, CursorCodec
from projections.read_model import PROJECTOR_SETTINGS, Projector, prepare_read_model
from projections.relay import RELAY_SETTINGS, Relay, StreamSpec
from projections.scheduler import SCHEDULER_SETTINGS, DueIndex
from projections.streams import nats_servers
from services.application import ActivitiesApplication, CommandBatcher, CommandService, application_env
from services.asyncapi import add_asyncapi_route
from services.auth import JwksKeys, TokenVerifier, jwks_file_loader, jwks_url_loader
from services.config import Settings, default_read_pool_size
from services.embedded import EmbeddedNats, EmbeddedPostgres
from services.erasure import ContactEraser
from services.gateway import CommandGateway
from services.http_app import HttpRole, add_operations_routes, create_http_app
from services.inbox import Inbox, InboxOptions, InboxStreams
from services.metrics import Metrics, Operations
from services.nats_app import CommandsRole, RequestServer
from services.queries import EventStoreReads, QueryGateway, ReadModel
from services.retention import RetentionSweep
from services.scheduler import fire_through

log = logging.getLogger("activities.bootstrap")

ROLES = ("commands", "projector", "relay", "http", "scheduler", "inbox")
DEV_SECRET_FILE = "dev-jwt-secret"


class Component(Protocol):
    """A long-running part of the process."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class Servers:
    """Where PostgreSQL and NATS are, and the embedded ones this process started."""

    database_url: str
    nats_url: str
    embedded: list[EmbeddedPostgres | EmbeddedNats] = field(default_factory=list)


SLOW_STOP_S = 30.0


async def stop_watched(part: str, stopping: Any) -> None:
    """Await a part's stop; when it takes longer than SLOW_STOP_S, log once which part it is and
    where every task of the loop waits (a stop that never ends is otherwise silent)."""
    task = asyncio.ensure_future(stopping)
    done, _ = await asyncio.wait({task}, timeout=SLOW_STOP_S)
    if not done:
        log.warning("a part is slow to stop", extra={"part": part, "waiting_s": SLOW_STOP_S, "tasks": task_stacks()})
    await task


def task_stacks() -> list[str]:
    """Each task of the running loop: its name and the chain of awaits it is suspended in."""
    described = []
    for task in asyncio.all_tasks():
        awaits: list[str] = []
        awaited: Any = task.get_coro()
        while awaited is not None and len(awaits) < 12:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is None:
                awaits.append(type(awaited).__name__)  # a future, or a finished coroutine
                break
            awaits.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno})")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        described.append(f"{task.get_name()}: {' -> '.join(awaits)}")
    return described


def resolve_servers(settings: Settings) -> Servers:
    """Configured URLs, or embedded servers under the data dir (started or adopted)."""
    embedded: list[EmbeddedPostgres | EmbeddedNats] = []
    database_url = settings.database_url
    if not database_url:
        postgres = EmbeddedPostgres(settings.data_dir / "postgres")
        database_url = postgres.start()
        embedded.append(postgres)
        log.info("embedded PostgreSQL ready", extra={"database_url": database_url})
    nats_url = settings.nats_url
    if not nats_url:
        nats = EmbeddedNats(settings.data_dir / "nats", port=settings.embedded_nats_port or None)
        nats_url = nats.start()
        embedded.append(nats)
        log.info("embedded NATS ready", extra={"nats_url": nats_url})
    return Servers(database_url, nats_url, embedded)


def dev_secret(data_dir: Path) -> str:
    """The HS256 secret of dev mode, generated once into the data dir."""
    path = data_dir / DEV_SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    path.write_text(secret)
    path.chmod(0o600)
    return secret


def token_verifier(settings: Settings) -> TokenVerifier:
    jwks = None
    if settings.jwt_jwks_url and settings.jwt_jwks_file:
        raise SystemExit("set ACTIVITIES_JWT_JWKS_URL or ACTIVITIES_JWT_JWKS_FILE, not both")
    if settings.jwt_jwks_url:
        jwks = JwksKeys(jwks_url_loader(settings.jwt_jwks_url))
    elif settings.jwt_jwks_file:
        jwks = JwksKeys(jwks_file_loader(settings.jwt_jwks_file))
    secret = settings.jwt_secret
    if not secret and not settings.jwt_public_key and jwks is None:
        secret = dev_secret(settings.data_dir)
    return TokenVerifier(
        secret, settings.jwt_public_key, settings.jwt_issuer, settings.jwt_audience, settings.jwt_leeway_s, jwks
    )


def build_application(settings: Settings, database_url: str) -> ActivitiesApplication:
    env = application_env(database_url, settings.db_pool_size, settings.cipher_key)
    app = ActivitiesApplication(env=env, cache_bytes=int(settings.aggregate_cache_mb * 1024 * 1024))
    app.activities_recorder.idempotency_ttl_s = settings.idempotency_ttl_hours * 3600
    return app


def stream_spec(settings: Settings) -> StreamSpec:
    """The relay's stream, as configured."""
    return StreamSpec(
        name=settings.stream_name,
        subject_prefix=settings.subject_prefix,
        retention=settings.stream_retention,
        replicas=settings.stream_replicas,
        duplicate_window_s=settings.stream_duplicate_window_s,
    )


def inbox_streams(settings: Settings) -> InboxStreams:
    """The durable inbox's streams, as configured (names default to the events stream's + a suffix)."""
    return InboxStreams(
        inbox=settings.inbox_stream or f"{settings.stream_name}_COMMANDS",
        results=settings.results_stream or f"{settings.stream_name}_RESULTS",
        dlq=settings.dlq_stream or f"{settings.stream_name}_DLQ",
        subject_prefix=settings.subject_prefix,
        replicas=settings.stream_replicas,
        duplicate_window_s=settings.stream_duplicate_window_s,
    )


def check_database(database_url: str) -> None:
    """Fail early with an actionable message when PostgreSQL cannot be reached."""
    try:
        with psycopg.connect(conninfo(database_url, connect_timeout=5)):
            pass
    except psycopg.OperationalError as exc:
        raise SystemExit(
            f"cannot connect to PostgreSQL at {database_url}: {exc}\n"
            "Check ACTIVITIES_DATABASE_URL, or unset it to use the embedded server."
        ) from None


class Runtime:
    """One service process: its servers, store, broker and the components of its roles."""

    def __init__(self, settings: Settings, roles: tuple[str, ...] = ROLES) -> None:
        unknown = set(roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown role(s) {sorted(unknown)}; choose from {list(ROLES)}")
        self.settings = settings
        self.roles = roles
        self.subjects = Subjects(settings.subject_prefix)
        self.servers: Servers | None = None
        self.app: ActivitiesApplication | None = None
        self.executor = ThreadPoolExecutor(max_workers=settings.db_pool_size, thread_name_prefix="store")
        self.broker: NatsBroker | None = None
        self.batcher: CommandBatcher | None = None
        self.command_service: CommandService | None = None
        self.components: list[Component] = []
        self.metrics = Metrics()
        self.operations: Operations | None = None
        self.endpoints: dict[str, Any] = {}
        self.http: HttpRole | None = None
        self.due_index: DueIndex | None = None
        self.inbox: Inbox | None = None

    async def start(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        self.servers = await loop.run_in_executor(None, resolve_servers, settings)
        await loop.run_in_executor(None, check_database, self.servers.database_url)
        self.app = await loop.run_in_executor(None, build_application, settings, self.servers.database_url)
        if {"projector", "http"} & set(self.roles):  # the read model in the current schema (a no-op when it is)
            await loop.run_in_executor(None, prepare_read_model, self.servers.database_url)
        verifier = token_verifier(settings)
        self.broker = NatsBroker(
            nats_servers(self.servers.nats_url),  # a cluster's nodes: reconnects go to the others
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            logger=logging.getLogger("activities.nats"),
            log_level=logging.DEBUG,  # per-message access logs only when debugging
        )
        self.command_service = CommandService(self.app)
        self.batcher = CommandBatcher(
            self.command_service,
            settings.batch_max_size,
            settings.request_timeout_s,
            self.metrics.batch_size.observe,
            settings.command_queue_max,
        )
        recorder = self.app.activities_recorder
        contact_eraser = ContactEraser(
            self.batcher,
            self.servers.database_url,
            recorder.events_table_name,
            recorder.datastore.schema,
            self.app.name,
            wait_s=max(settings.request_timeout_s, settings.consistency_wait_ms / 1000),
        )
        gateway = CommandGateway(verifier, self.batcher, self.metrics, contact_eraser)
        self.operations = Operations(self.metrics, self.servers.database_url, self.app.name)
        self.operations.pools["event_store"] = self.app.activities_recorder.datastore.pool
        self.operations.nats_connected = self._nats_connected
        self.components = self._components(verifier, gateway)
        self.batcher.start()
        await self.broker.start()
        await self.broker.connection.flush()  # the server knows our subscriptions before we say we serve
        for component in self.components:
            await component.start()
        self.endpoints = {
            "nats_url": self.servers.nats_url,
            "http_url": self.http.url if self.http is not None else None,
            "database_url": self.servers.database_url,
        }
        self._write_endpoints()

    def _components(self, verifier: TokenVerifier, commands: CommandGateway) -> list[Component]:
        """The parts of this process's roles, each given exactly what it needs, in start order."""
        assert self.app is not None and self.servers is not None and self.operations is not None
        settings, app, database_url = self.settings, self.app, self.servers.database_url
        components: list[Component] = []
        if "commands" in self.roles:
            assert self.batcher is not None
            server = RequestServer(
                commands.handle_message,
                settings.command_concurrency,
                admit=self.batcher.has_room,  # a full queue refuses before the body is parsed
                busy=Unavailable("the service is at capacity; retry shortly with the same Idempotency-Key"),
                on_refused=lambda name: self.metrics.commands.labels(name, "refused").inc(),
            )
            purge = app.activities_recorder.purge_expired_keys
            components.append(CommandsRole(server, self._connection, self.subjects, purge, self.executor))
        if "relay" in self.roles:  # independent of NATS commands: reads the store, publishes to JetStream
            relay = Relay(app, stream_spec(settings), self.servers.nats_url, self.executor)
            components.append(TrackedConsumer(app, database_url, relay, RELAY_SETTINGS, self.executor))
            # erasure: deletes erased activities' messages from the streams (projections/erasure.py)
            schema = app.activities_recorder.datastore.schema
            components.append(StreamEraser(database_url, self.servers.nats_url, schema))
        projector: TrackedConsumer[Projector] | None = None
        if "projector" in self.roles:
            projector = TrackedConsumer(app, database_url, Projector(app, database_url), PROJECTOR_SETTINGS)
            components.append(projector)
        if "inbox" in self.roles:  # durable asynchronous commands through the same gateway
            assert self.batcher is not None
            options = InboxOptions(
                max_deliver=settings.inbox_max_deliver,
                backoff_s=settings.inbox_backoff_s,
                backoff_max_s=settings.inbox_backoff_max_s,
                concurrency=settings.inbox_concurrency,
            )
            self.inbox = Inbox(
                commands.handle,
                verifier,
                self._connection,
                inbox_streams(settings),
                database_url,
                options,
                admit=self.batcher.has_room,
                schema=app.activities_recorder.datastore.schema,
            )
            components.append(self.inbox)
        if "http" in self.roles:
            queries = self._query_gateway(verifier)
            self.operations.pools["read_model"] = queries.read_model.pool
            if projector is not None and not settings.read_database_url:
                # a replica lags the projector: there, `min_position` waits poll the replica's own position
                projector.add_listener(queries.read_model.notify_position)
            self.http = HttpRole(
                self._http_app(queries, commands),
                queries,
                self._connection,
                self.subjects,
                settings.http_host,
                settings.http_port,
                settings.command_concurrency,
            )
            components.append(self.http)
        if "scheduler" in self.roles:
            components += self.scheduler_components()
        return components

    def scheduler_components(self) -> list[Component]:
        """The scheduler role's parts: the due-time index with its firing loop (reminders, overdue;
        one active instance by its advisory lock, firing through the command batcher) and, when
        ACTIVITIES_PURGE_DELETED_AFTER_DAYS is set, retention's sweep. Further time-driven parts
        are appended here."""
        assert self.app is not None and self.servers is not None and self.batcher is not None
        database_url = self.servers.database_url
        self.due_index = DueIndex(database_url, fire_through(self.batcher, self.metrics))
        components: list[Component] = [
            TrackedConsumer(self.app, database_url, self.due_index, SCHEDULER_SETTINGS, self.executor)
        ]
        if self.settings.purge_deleted_after_days:
            components.append(RetentionSweep(self.batcher, database_url, self.settings.purge_deleted_after_days))
        return components

    def _query_gateway(self, verifier: TokenVerifier) -> QueryGateway:
        """The query gateway: the read model's pool, the event store's reads, the cursor key."""
        assert self.app is not None and self.servers is not None
        settings = self.settings
        database_url = self.servers.database_url
        read_pool_size = settings.read_pool_size or default_read_pool_size()
        read_model = ReadModel(settings.read_database_url or database_url, read_pool_size, self.app.name)
        return QueryGateway(
            verifier,
            read_model,
            EventStoreReads(self.app, self.executor),
            CursorCodec(shared_secret(database_url, CURSOR_KEY_NAME)),
            settings.consistency_wait_ms,
        )

    def _http_app(self, queries: QueryGateway, commands: CommandGateway) -> FastAPI:
        assert self.operations is not None
        http_app = create_http_app(queries, commands)
        add_asyncapi_route(http_app, self.settings.subject_prefix)
        add_operations_routes(http_app, self.operations)
        return http_app

    def _connection(self) -> NatsClient:
        assert self.broker is not None
        return self.broker.connection

    def _nats_connected(self) -> bool:
        try:
            return self.broker is not None and bool(self.broker.connection.is_connected)
        except Exception:  # not connected yet
            return False

    def _write_endpoints(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.settings.data_dir / "endpoints.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.endpoints, indent=2))
        os.replace(tmp, path)

    def _remove_endpoints(self) -> None:
        """Stopped: endpoints.json no longer names a running service (unless another instance rewrote it)."""
        if not self.endpoints:
            return
        path = self.settings.data_dir / "endpoints.json"
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()) == self.endpoints:
                path.unlink()

    async def stop(self) -> None:
        """Graceful: stop taking requests, answer those in flight, stop the parts, then the servers."""
        self._remove_endpoints()  # first: no client should find a service that is going away
        for component in reversed(self.components):
            await stop_watched(type(component).__name__, component.stop())
        if self.batcher is not None:
            await stop_watched("CommandBatcher", self.batcher.stop())
        if self.command_service is not None:
            await self.command_service.close()
        if self.broker is not None:
            await self.broker.stop()
        if self.app is not None:
            self.app.close()
        self.executor.shutdown(wait=True)
        if self.servers is not None:
            for server in reversed(self.servers.embedded):
                server.stop()
