"""Shared fixtures: real PostgreSQL and real NATS with JetStream, and the service in-process.

Two targets, chosen by ACTIVITIES_TEST_SERVERS:
- `embedded` (default): the tests start their own embedded PostgreSQL and nats-server in a temp dir;
- `machine`: the machine's own servers on 127.0.0.1:5432 and 127.0.0.1:4222.
Each test module gets a fresh database; each runtime a unique subject prefix and stream name,
so tests never see each other's data, even on a shared NATS server.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import orjson
import psycopg
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from services.application import ActivitiesApplication, CommandService, application_env
from services.auth import mint_token
from services.bootstrap import ROLES, Runtime
from services.config import Settings
from services.embedded import EmbeddedNats, EmbeddedPostgres

JWT_SECRET = "test-secret-for-the-activities-suite"
WITHOUT_SCHEDULER = tuple(role for role in ROLES if role != "scheduler")
"""Every role but the scheduler: its reminders and overdue events (contract section 9) would change
documents under the tests that compare them; tests/integration/test_scheduler.py starts it."""
TARGET = os.environ.get("ACTIVITIES_TEST_SERVERS", "embedded")


@dataclass
class TestServers:
    admin_database_url: str
    nats_url: str
    nats: EmbeddedNats | None = None
    postgres: EmbeddedPostgres | None = None


@pytest.fixture(scope="session")
def test_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="activities-tests-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def servers(test_root: Path) -> Iterator[TestServers]:
    if TARGET == "machine":
        yield TestServers("postgresql://postgres@127.0.0.1:5432/postgres", "nats://127.0.0.1:4222")
        return
    postgres = EmbeddedPostgres(test_root / "pg", fsync=False)
    nats_server = EmbeddedNats(test_root / "nats", port=None)
    admin = postgres.start().replace("/activities?", "/postgres?")
    url = nats_server.start()
    yield TestServers(admin, url, nats_server, postgres)
    nats_server.stop()
    postgres.stop()


def _database_url(admin_url: str, name: str) -> str:
    parts = conninfo_to_dict(admin_url)
    parts["dbname"] = name
    return make_conninfo(**parts)


@pytest.fixture(scope="session")
def make_database(servers: TestServers) -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty databases (dropped at the end of the session)."""
    created: list[str] = []

    def make() -> str:
        name = f"activities_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(servers.admin_database_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        created.append(name)
        return _database_url(servers.admin_database_url, name)

    yield make
    if servers.postgres is not None:
        return  # an embedded server's data directory is removed whole: no need to drop each (30 s of checkpoints)
    with psycopg.connect(servers.admin_database_url, autocommit=True) as conn:
        for name in created:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def make_settings(servers: TestServers, make_database: Callable[[], str], tmp_path: Path) -> Callable[..., Settings]:
    """Settings for a service on the test servers: fresh database, unique subjects and stream."""

    def make(**overrides: Any) -> Settings:
        unique = uuid.uuid4().hex[:10]
        values: dict[str, Any] = {
            "database_url": make_database(),
            "nats_url": servers.nats_url,
            "data_dir": tmp_path / f"data-{unique}",
            "subject_prefix": f"t{unique}.activities",
            "stream_name": f"T{unique.upper()}_ACTIVITIES",
            "jwt_secret": JWT_SECRET,
            "http_port": 0,
            "db_pool_size": 4,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def make_service(make_database: Callable[[], str]) -> Iterator[Callable[[], CommandService]]:
    """Command services (the write path alone, no NATS) on one fresh database, closed at the end;
    several of them stand for several command processes."""
    database_url = make_database()
    apps: list[ActivitiesApplication] = []

    def make() -> CommandService:
        app = ActivitiesApplication(env=application_env(database_url, pool_size=2))
        apps.append(app)
        return CommandService(app)

    yield make
    for app in apps:
        app.close()


@pytest.fixture
def token() -> Callable[..., str]:
    def make(tenant: str = "acme", sub: str = "usr-1", app: str | None = None, **claims: Any) -> str:
        return mint_token(JWT_SECRET, tenant, sub, app, **claims)

    return make


@pytest_asyncio.fixture
async def runtime(make_settings: Callable[..., Settings]) -> AsyncIterator[Runtime]:
    """The whole service (every role but the scheduler) running in this process on the test servers."""
    service = Runtime(make_settings(), WITHOUT_SCHEDULER)
    await service.start()
    yield service
    await service.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest_asyncio.fixture
async def own_nats(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """A nats-server this test may stop and start again, on one fixed port, keeping its store."""
    server = EmbeddedNats(tmp_path / "own-nats", port=free_port())
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.stop)


@pytest_asyncio.fixture
async def nc(servers: TestServers) -> AsyncIterator[NatsClient]:
    client = await nats.connect(servers.nats_url)
    yield client
    await client.drain()


Requester = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture
def request_command(nc: NatsClient, runtime: Runtime, token: Callable[..., str]) -> Requester:
    """Send a command (or query) over NATS and return the decoded reply envelope."""

    async def send(
        name: str,
        body: Any,
        *,
        bearer: str | None = None,
        key: str | None = None,
        kind: str = "cmd",
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        all_headers = {"Authorization": f"Bearer {bearer or token()}"}
        if key is not None:
            all_headers["Idempotency-Key"] = key
        all_headers.update(headers or {})
        subject = f"{runtime.settings.subject_prefix}.{kind}.{name}"
        payload = raw if raw is not None else orjson.dumps(body)
        message = await nc.request(subject, payload, headers=all_headers, timeout=10)
        decoded: dict[str, Any] = orjson.loads(message.data)
        return decoded

    return send
