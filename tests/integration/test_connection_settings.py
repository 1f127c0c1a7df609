"""Every PostgreSQL connection of the service honours every parameter of its URL (issue "Hardening").

An `application_name` in the URL is seen on every connection of every role, and `sslmode=require`
against the test server (which has no TLS) is refused by every kind of connection, rather than
the parameter being dropped and the connection made in the clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import socketserver
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any, cast

import psycopg
import pytest
import pytest_asyncio
from eventsourcing.persistence import OperationalError
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from projections.consumer import ConsumerSettings, TrackedConsumer
from projections.database import url_datastore
from projections.read_model import read_model_datastore
from services.application import ActivitiesRecorder, CommandStore
from services.bootstrap import Runtime, build_application, check_database
from services.config import Settings
from services.metrics import read_positions
from services.queries import ReadModel

NAME = f"activities-{uuid.uuid4().hex[:8]}"


@pytest_asyncio.fixture
async def runtime(make_settings: Callable[..., Settings]) -> AsyncIterator[Runtime]:
    """Every role, on a URL that names its connections."""
    settings = make_settings()
    named = make_conninfo(settings.database_url or "", application_name=NAME)
    service = Runtime(settings.model_copy(update={"database_url": named}))
    await service.start()
    yield service
    await service.stop()


async def test_every_connection_of_every_role_carries_the_urls_application_name(
    runtime: Runtime, request_command: Any
) -> None:
    created = await request_command("create", {"account_id": "acc_1", "type": "call"})  # command store
    listed = await request_command("list", {"min_position": created["meta"]["position"]}, kind="query")  # read pool
    assert listed["data"], listed
    leaders = [c for c in runtime.components if isinstance(c, TrackedConsumer)]
    for _ in range(100):
        if all(leader.active for leader in leaders) and runtime.inbox is not None and runtime.inbox.active:
            break
        await asyncio.sleep(0.1)
    assert {leader.name for leader in leaders if leader.active} == {
        "activities:relay",
        "activities:projector",
        "activities:scheduler",
    }
    assert runtime.inbox is not None and runtime.inbox.active
    assert runtime.servers is not None
    dbname = conninfo_to_dict(runtime.servers.database_url)["dbname"]
    with psycopg.connect(runtime.servers.database_url, application_name="the-test", autocommit=True) as conn:
        rows = conn.execute(
            "SELECT application_name, query, EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND "
            "l.locktype = 'advisory') FROM pg_stat_activity a WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        ).fetchall()
    assert {name for name, _, _ in rows} == {NAME}, rows
    queries = [query for _, query, _ in rows]
    # the sessions (lock + LISTEN) of projector, relay and scheduler, and the active inbox's
    assert sum(leads for _, _, leads in rows) == 4, rows
    assert any("_append\"(" in query for query in queries), queries  # the command store
    assert any("set_config('activities.tenant_id'" in query for query in queries), queries  # the read pool
    assert any('INSERT INTO "activities"' in q or "projection_tracking" in q for q in queries), queries  # projector
    assert len(rows) >= 8, rows  # and the event store's pool


class TcpProxy(socketserver.ThreadingTCPServer):
    """127.0.0.1:<port> in front of the test server, which may listen on a unix socket only (where
    libpq never negotiates TLS, so `sslmode` would not matter)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, url: str) -> None:
        parts = conninfo_to_dict(url)
        host, port = str(parts.get("host") or "127.0.0.1"), int(parts.get("port") or 5432)
        self.upstream: tuple[int, Any] = (
            (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}") if host.startswith("/") else (socket.AF_INET, (host, port))
        )
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, url: str, **params: str) -> str:
        return make_conninfo(url, host="127.0.0.1", port=str(self.server_address[1]), **params)


class ProxyHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        assert isinstance(self.server, TcpProxy)
        family, address = self.server.upstream
        with socket.socket(family, socket.SOCK_STREAM) as upstream:
            upstream.connect(address)
            threading.Thread(target=pipe, args=(upstream, self.request), daemon=True).start()
            pipe(self.request, upstream)


def pipe(source: socket.socket, target: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            target.sendall(data)
    with contextlib.suppress(OSError):
        target.shutdown(socket.SHUT_WR)


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


async def fails_to_lead(caplog: pytest.LogCaptureFixture, logger: str, message: str, component: Any) -> None:
    """A supervised connection loop (it retries forever): it logs the refusal and never gets in."""
    with caplog.at_level(logging.DEBUG, logger=logger):
        await component.start()
        try:
            for _ in range(50):
                if any(message in r.getMessage() and "SSL" in str(r.__dict__.get("error")) for r in caplog.records):
                    return
                await asyncio.sleep(0.1)
        finally:
            await component.stop()
    raise AssertionError(f"no refusal logged: {[r.__dict__.get('error') for r in caplog.records]}")


class Inner:
    """A consumer's handler that notes whether it was ever made active."""

    started = False

    async def resume(self) -> int:
        self.started = True
        return 0

    async def handle(self, page: Any) -> int:
        raise AssertionError("never active: no page")

    async def close(self) -> None:
        pass


async def test_sslmode_require_is_refused_by_every_kind_of_connection(
    make_settings: Callable[..., Settings], runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """The test server has no TLS: a connection that kept `sslmode=require` cannot be made."""
    settings = make_settings()
    assert settings.database_url is not None and runtime.app is not None
    proxy = TcpProxy(settings.database_url)
    with psycopg.connect(proxy.url(settings.database_url, sslmode="disable")):
        pass  # the way in works: what follows is refused for the sslmode alone
    url = proxy.url(settings.database_url, sslmode="require")

    with pytest.raises(SystemExit, match="SSL"):
        check_database(url)
    with pytest.raises(OperationalError):  # the event store's pool (the library's datastore)
        await in_thread(build_application, settings, url)
    # the command path's own connection (a recorder's constructor would already connect to the URL)
    select_after_sql = runtime.app.activities_recorder.select_after_sql
    recorder = SimpleNamespace(datastore=url_datastore(url), select_after_sql=select_after_sql)
    with pytest.raises(OperationalError, match="SSL"):
        await CommandStore(cast(ActivitiesRecorder, recorder)).select_after([(uuid.uuid4(), 0)])
    datastore = read_model_datastore(url, pool_size=1)  # the projector's and the CLI's
    try:
        with pytest.raises(OperationalError):
            await in_thread(lambda: datastore.transaction().__enter__())
    finally:
        datastore.close()
    read_model = ReadModel(url, 1, runtime.app.name)  # the read pool
    await read_model.open()
    try:
        with pytest.raises(psycopg.OperationalError):
            async with read_model.pool.connection(timeout=2):
                pass
    finally:
        await read_model.close()
    with pytest.raises(psycopg.OperationalError, match="SSL"):  # /metrics and /readyz
        await read_positions(url, runtime.app.name)

    inner = Inner()  # the projector's and the relay's lock and LISTEN session (the tracked-consumer core)
    consumer = TrackedConsumer(runtime.app, url, inner, ConsumerSettings(name="t"))
    await fails_to_lead(caplog, "activities.consumer", "consumer session failed", consumer)
    assert not inner.started
    proxy.shutdown()
    proxy.server_close()
