"""The composition root: builds every part of a service process from Settings, and nothing else does.

`Runtime(settings, roles)` resolves the servers (embedded ones when no URL is configured), the
token verifier, the event store, and the parts each role runs: `commands` (NATS command
subscribers with group commit), `projector` (read model), `relay` (events to JetStream) and
`http` (queries and the write gateway).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psycopg
from faststream.nats import NatsBroker
from psycopg.conninfo import conninfo_to_dict

from events.errors import Unavailable
from events.subjects import COMMAND_NAMES, Subjects
from projections.relay import Relay
from services.application import ActivitiesApplication, CommandBatcher, CommandService, application_env
from services.auth import TokenVerifier
from services.config import Settings
from services.embedded import EmbeddedNats, EmbeddedPostgres
from services.gateway import CommandGateway
from services.leadership import SingleActive
from services.metrics import Metrics, Operations
from services.nats_app import RequestServer
from services.read_side import read_side_components

log = logging.getLogger("activities.bootstrap")

ROLES = ("commands", "projector", "relay", "http")
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
    secret = settings.jwt_secret
    if not secret and not settings.jwt_public_key:
        secret = dev_secret(settings.data_dir)
    return TokenVerifier(secret, settings.jwt_public_key, settings.jwt_issuer, settings.jwt_audience)


def build_application(settings: Settings, database_url: str) -> ActivitiesApplication:
    conninfo = conninfo_to_dict(database_url)
    env = application_env(conninfo, settings.db_pool_size, settings.cipher_key)
    app = ActivitiesApplication(env=env, cache_bytes=int(settings.aggregate_cache_mb * 1024 * 1024))
    app.activities_recorder.idempotency_ttl_s = settings.idempotency_ttl_hours * 3600
    return app


def check_database(database_url: str) -> None:
    """Fail early with an actionable message when PostgreSQL cannot be reached."""
    try:
        with psycopg.connect(database_url, connect_timeout=5):
            pass
    except psycopg.OperationalError as exc:
        raise SystemExit(
            f"cannot connect to PostgreSQL at {database_url}: {exc}\n"
            "Check ACTIVITIES_DATABASE_URL, or unset it to use the embedded server."
        ) from None


class CommandsRole:
    """NATS command subscribers (queue group `activities`) in front of the group-commit batcher,
    and the hourly purge of expired Idempotency-Keys."""

    PURGE_EVERY_S = 3600.0

    def __init__(self, runtime: Runtime, gateway: CommandGateway) -> None:
        assert runtime.broker is not None and runtime.app is not None
        self._broker = runtime.broker
        self._subjects = runtime.subjects
        self._app = runtime.app
        self._executor = runtime.executor
        assert runtime.batcher is not None
        self._server = RequestServer(
            gateway.handle_message,
            runtime.settings.command_concurrency,
            admit=runtime.batcher.has_room,  # a full queue refuses before the body is parsed
            busy=Unavailable("the service is at capacity; retry shortly with the same Idempotency-Key"),
            on_refused=lambda name: runtime.metrics.commands.labels(name, "refused").inc(),
        )
        self._purger: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for name in COMMAND_NAMES:
            await self._server.serve(self._broker.connection, self._subjects.command(name), name)
        await self._broker.connection.flush()
        self._purger = asyncio.get_running_loop().create_task(self._purge_forever(), name="idempotency-purge")

    async def _purge_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                purged = await loop.run_in_executor(self._executor, self._app.activities_recorder.purge_expired_keys)
                log.info("expired idempotency keys purged", extra={"purged": purged})
            except Exception as exc:  # the database is away: next time
                log.warning("idempotency purge failed", extra={"error": str(exc)})
            await asyncio.sleep(self.PURGE_EVERY_S)

    async def stop(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
        await self._server.drain()


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

    async def start(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        self.servers = await loop.run_in_executor(None, resolve_servers, settings)
        await loop.run_in_executor(None, check_database, self.servers.database_url)
        self.app = await loop.run_in_executor(None, build_application, settings, self.servers.database_url)
        verifier = token_verifier(settings)
        self.broker = NatsBroker(
            self.servers.nats_url,
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
        gateway = CommandGateway(verifier, self.batcher, self.metrics)
        self.operations = Operations(self.metrics, self.servers.database_url, self.app.name)
        self.operations.pools["event_store"] = self.app.activities_recorder.datastore.pool
        self.operations.nats_connected = self._nats_connected
        if "commands" in self.roles:
            self.components.append(CommandsRole(self, gateway))
        if "relay" in self.roles:  # independent of NATS commands: reads the store, publishes to JetStream
            relay = Relay(self.app, settings, self.servers.nats_url, self.servers.database_url, self.executor)
            self.components.append(SingleActive(relay, self.servers.database_url, "activities:relay"))
        self.components += read_side_components(self, verifier, gateway)  # projector, http (+ NATS queries)
        self.batcher.start()
        await self.broker.start()
        await self.broker.connection.flush()  # the server knows our subscriptions before we say we serve
        for component in self.components:
            await component.start()
        self.endpoints = {
            "nats_url": self.servers.nats_url,
            "http_url": self.endpoints.get("http_url"),
            "database_url": self.servers.database_url,
        }
        self._write_endpoints()

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

    async def stop(self) -> None:
        """Graceful: stop taking requests, answer those in flight, stop the parts, then the servers."""
        for component in reversed(self.components):
            await component.stop()
        if self.batcher is not None:
            await self.batcher.stop()
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
