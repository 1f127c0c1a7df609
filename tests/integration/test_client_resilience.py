"""The client when the service is not there, and the hardening of its transport (docs/contract.md sections 6, 7).

With no service reachable a call fails with `Unavailable` once its attempts are spent, in bounded
time and without a traceback on stderr or in the logs; `data_dir=` finds the service through
endpoints.json, which the service removes when it stops; the embedded NATS keeps its first port;
HTTP 502/503/504 are retried; a slow subscriber does not get its fetched batch delivered again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient

from activities_client import AsyncClient, Client, RetryPolicy, Unavailable
from activities_client.document import new_activity_id
from services.bootstrap import Runtime
from services.config import Settings
from services.embedded import EmbeddedNats
from tests.conftest import JWT_SECRET

if TYPE_CHECKING:
    from tests.conftest import TestServers

FAST = RetryPolicy(attempts=4, backoff_s=0.05, max_backoff_s=0.2)
ACTIVITIES = str(Path(sys.executable).parent / "activities")


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_quiet(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """No traceback printed to the process's stderr or stdout, none logged."""
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err[-2000:]
    logged = [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert not logged, [r.getMessage() for r in logged]


# ---------------------------------------------------------------------------------------------
# No service reachable
# ---------------------------------------------------------------------------------------------


async def test_closed_port_fails_unavailable_after_its_attempts_quietly(
    token: Callable[..., str], caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"nats://127.0.0.1:{closed_port()}"
    client = AsyncClient(nats_url=url, token=token(), retry=FAST, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(Unavailable) as caught:
        await asyncio.wait_for(client.customer.activities.get(new_activity_id()), 20)
    assert time.monotonic() - started < 15
    assert f"no service at {url}" in caught.value.message and "4 attempts" in caught.value.message
    with pytest.raises(Unavailable):  # `async with` too: connect fails the same way
        async with AsyncClient(nats_url=url, token=token(), retry=FAST, timeout=1.0):
            pass
    await client.close()
    await asyncio.sleep(0.5)  # anything nats-py would print from background tasks
    assert_quiet(caplog, capfd)


async def test_nats_without_the_service_fails_unavailable(
    servers: TestServers, token: Callable[..., str], caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    async with AsyncClient(
        nats_url=servers.nats_url, token=token(), subject_prefix="nobody.listens", retry=FAST, timeout=1.0
    ) as client:
        with pytest.raises(Unavailable) as caught:
            await asyncio.wait_for(client.customer.activities.create(account_id="acc_1"), 20)
        with pytest.raises(Unavailable):
            await asyncio.wait_for(client.customer.activities.list(), 20)
    assert time.monotonic() - started < 15
    assert "no service at" in caught.value.message and "no instance is listening" in caught.value.message
    assert_quiet(caplog, capfd)


async def test_a_lost_connection_is_unavailable_then_comes_back_with_the_server(
    tmp_path: Path, token: Callable[..., str], caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    server = EmbeddedNats(tmp_path / "nats", port=None)
    url = server.start()
    try:
        async with AsyncClient(nats_url=url, token=token(), retry=FAST, timeout=1.0) as client:
            server.stop()
            started = time.monotonic()
            with pytest.raises(Unavailable) as caught:
                await asyncio.wait_for(client.customer.activities.list(), 20)
            assert time.monotonic() - started < 15
            assert f"no service at {url} (connection lost" in caught.value.message
            assert server.start() == url  # the same port again
            await asyncio.sleep(1.0)  # nats-py reconnects in the background
            with pytest.raises(Unavailable) as caught:
                await asyncio.wait_for(client.customer.activities.list(), 20)
            assert "no instance is listening" in caught.value.message, "connected again: NATS answers"
    finally:
        server.stop()
    assert_quiet(caplog, capfd)


def test_blocking_client_fails_unavailable_and_stops_its_thread(
    token: Callable[..., str], capfd: pytest.CaptureFixture[str]
) -> None:
    url = f"nats://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(Unavailable) as caught, Client(nats_url=url, token=token(), retry=FAST, timeout=1.0):
        pass
    assert time.monotonic() - started < 15 and f"no service at {url}" in caught.value.message
    assert not [t for t in threading.enumerate() if t.name == "activities-client"], "the loop thread is stopped"
    out, err = capfd.readouterr()
    assert "Traceback" not in err + out


async def test_data_dir_without_endpoints_is_unavailable(tmp_path: Path, token: Callable[..., str]) -> None:
    started = time.monotonic()
    with pytest.raises(Unavailable) as caught:
        async with AsyncClient(data_dir=tmp_path, token=token()):
            pass
    assert time.monotonic() - started < 2  # nothing to retry
    assert caught.value.message == (
        f"no service at {tmp_path} (endpoints.json missing; is `activities serve` running?)"
    )
    with pytest.raises(Unavailable), Client(data_dir=tmp_path, token=token()):
        pass


async def test_data_dir_finds_the_service_and_stop_removes_endpoints(
    make_settings: Callable[..., Settings], token: Callable[..., str]
) -> None:
    runtime = Runtime(make_settings())
    await runtime.start()
    endpoints = runtime.settings.data_dir / "endpoints.json"
    try:
        assert json.loads(endpoints.read_text())["nats_url"] == runtime.endpoints["nats_url"]
        kwargs: dict[str, Any] = {
            "subject_prefix": runtime.settings.subject_prefix,
            "stream_name": runtime.settings.stream_name,
        }
        async with AsyncClient(data_dir=runtime.settings.data_dir, token=token(), **kwargs) as client:
            created = await client.customer.activities.create(account_id="acc_dd", subject="via data_dir")
            assert client.http_url == runtime.endpoints["http_url"]  # reads go over HTTP, as endpoints.json says
            assert (await client.customer.activities.get(created.id)).subject == "via data_dir"

        def blocking() -> str | None:
            with Client(data_dir=runtime.settings.data_dir, token=token(), **kwargs) as sync_client:
                return sync_client.customer.activities.get(created.id).subject

        assert await asyncio.to_thread(blocking) == "via data_dir"
    finally:
        await runtime.stop()
    assert not endpoints.exists(), "a stopped service leaves no endpoints.json behind"


def _cli_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTIVITIES_")}
    env.update({"ACTIVITIES_DATA_DIR": str(data_dir), "ACTIVITIES_JWT_SECRET": JWT_SECRET, **extra})
    return env


def test_cli_says_no_service_in_one_line(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{closed_port()}"
    (tmp_path / "endpoints.json").write_text(json.dumps({"nats_url": url, "http_url": None}))
    started = time.monotonic()
    done = subprocess.run(
        [ACTIVITIES, "get", new_activity_id()], env=_cli_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert time.monotonic() - started < 30
    assert done.returncode != 0 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"no service at {url}" in lines[0], done.stderr

    (tmp_path / "endpoints.json").unlink()
    done = subprocess.run([ACTIVITIES, "list"], env=_cli_env(tmp_path), capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and f"no service at {tmp_path}" in lines[0], done.stderr


def test_projections_status_with_the_database_down_is_one_line(tmp_path: Path) -> None:
    env = _cli_env(tmp_path, ACTIVITIES_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed_port()}/activities")
    done = subprocess.run([ACTIVITIES, "projections", "status"], env=env, capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and "database is unreachable" in lines[0], done.stderr


# ---------------------------------------------------------------------------------------------
# The embedded NATS keeps its port
# ---------------------------------------------------------------------------------------------


def test_embedded_nats_keeps_its_first_port(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats", port=None)  # no preferred port: any free one first
    first = server.start()
    server.stop()
    try:
        assert server.start() == first, "a restart keeps the port while it is free"
    finally:
        server.stop()
    port = int(first.rpartition(":")[2])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        try:
            other = server.start()
            assert other != first, "the port is taken: another one"
        finally:
            server.stop()
    assert server.remembered_port() == port, "the first port stays the preferred one"
    try:
        assert server.start() == first, "free again: back to the first port"
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# HTTP 502/503/504 are `unavailable`, retried
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def flaky_http() -> Iterator[tuple[str, list[int]]]:
    """An HTTP server that answers 502, then 504, then the activity; yields its URL and the statuses sent."""
    sent: list[int] = []
    activity_id = new_activity_id()
    document = {
        "id": activity_id, "tenant_id": "acme", "app_id": None, "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z", "created_by": "usr-1", "updated_by": "usr-1", "is_deleted": False,
        "deleted_at": None, "deleted_by": None, "schema_version": 1, "version": 1, "account_id": "acc_1",
    }  # fmt: skip

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = (502, 504)[len(sent)] if len(sent) < 2 else 200
            sent.append(status)
            body = json.dumps({"data": document, "meta": {"position": 1}} if status == 200 else "gateway").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{activity_id}", sent
    server.shutdown()
    server.server_close()


async def test_http_502_and_504_are_retried_as_unavailable(
    servers: TestServers, token: Callable[..., str], flaky_http: tuple[str, list[int]]
) -> None:
    url, sent = flaky_http
    base, _, activity_id = url.rpartition("/")
    async with AsyncClient(nats_url=servers.nats_url, token=token(), http_url=base, retry=FAST) as client:
        activity = await client.customer.activities.get(activity_id)
    assert activity.id == activity_id and sent == [502, 504, 200]
    async with AsyncClient(
        nats_url=servers.nats_url, token=token(), http_url=base, retry=RetryPolicy(attempts=1)
    ) as client:
        sent.clear()
        with pytest.raises(Unavailable):  # one attempt: the 502 itself, as `unavailable`
            await client.customer.activities.get(activity_id)


# ---------------------------------------------------------------------------------------------
# A slow subscriber gets no redelivery
# ---------------------------------------------------------------------------------------------


async def test_slow_handler_over_a_fetched_batch_sees_no_redelivery(
    runtime: Runtime, nc: NatsClient, token: Callable[..., str]
) -> None:
    js = nc.jetstream()
    for _ in range(100):
        try:
            await js.stream_info(runtime.settings.stream_name)
            break
        except nats.js.errors.NotFoundError:
            await asyncio.sleep(0.05)
    kwargs: dict[str, Any] = {
        "nats_url": runtime.endpoints["nats_url"],
        "subject_prefix": runtime.settings.subject_prefix,
        "stream_name": runtime.settings.stream_name,
    }
    async with AsyncClient(token=token(), **kwargs) as client:
        ids = [(await client.customer.activities.create(account_id=f"acc_{n}")).id for n in range(3)]
        for _ in range(200):  # the relay publishes them shortly after
            if (await js.stream_info(runtime.settings.stream_name)).state.messages >= 3:
                break
            await asyncio.sleep(0.05)
        ack_wait = 2.0  # in-progress acks every 0.67 s: margin for a busy machine
        durable = "slow-worker"  # two workers share it: an event the slow one does not ack in time goes to the other
        slow_seen: list[str] = []
        other_seen: list[str] = []

        async def slow() -> None:
            async with client.customer.activities.subscribe(
                start="all", durable=durable, ack_wait=ack_wait, batch=3, idle_timeout=2.5 * ack_wait
            ) as events:
                async for event in events:
                    slow_seen.append(event.activity_id)
                    await asyncio.sleep(ack_wait * 1.6)  # slower than ack_wait, with the rest of the batch fetched

        async def other() -> None:
            await asyncio.sleep(0.3)  # the slow worker has fetched the batch by now
            async with client.customer.activities.subscribe(
                durable=durable, ack_wait=ack_wait, batch=3, idle_timeout=5 * ack_wait
            ) as events:
                async for event in events:
                    other_seen.append(event.activity_id)

        await asyncio.gather(slow(), other())
        assert slow_seen == ids, "the slow worker handles its whole batch, in order"
        assert other_seen == [], "nothing of the slow worker's batch is delivered again"
        await nc.jetstream().delete_consumer(runtime.settings.stream_name, durable)


# ---------------------------------------------------------------------------------------------
# A client throttles itself while the service refuses (activities_client/throttle.py)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("throttle_ratio", [1.5, None])
async def test_a_client_holds_back_what_a_refusing_service_would_refuse(
    servers: TestServers, token: Callable[..., str], throttle_ratio: float | None
) -> None:
    """A service at capacity (a responder on the command subject that answers `unavailable` to
    everything, over real NATS): the throttled client sends only a fraction of its 300 one-attempt
    creates, the unthrottled one every one; both raise `Unavailable` for each."""
    prefix = f"throttle{os.getpid()}{throttle_ratio or 0:g}".replace(".", "")
    received = 0
    nc = await nats.connect(servers.nats_url)

    async def refuse(message: Any) -> None:
        nonlocal received
        received += 1
        await message.respond(json.dumps({"error": {"code": "unavailable", "message": "at capacity",
                                                    "details": []}}).encode())

    await nc.subscribe(f"{prefix}.cmd.create", cb=refuse)
    await nc.flush()
    retry = RetryPolicy(attempts=1, throttle_ratio=throttle_ratio)
    try:
        async with AsyncClient(nats_url=servers.nats_url, token=token(), subject_prefix=prefix, retry=retry) as client:
            for n in range(300):
                with pytest.raises(Unavailable):
                    await client.customer.activities.create(account_id=f"acc_{n}")
    finally:
        await nc.close()
    if throttle_ratio is None:
        assert received == 300
    else:
        # the first 20 (min_requests) always go; then, with nothing accepted, each goes with
        # probability 1 / (requests + 1): about ln(300 / 20) = 3 more
        assert 20 <= received < 40, received
