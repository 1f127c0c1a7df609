"""`activities projections status|rebuild`: operate the read model from the command line.

`status` prints the read model's position, the log's position, the lag and the row count.
`rebuild` builds the read model again from the whole log into a table aside while the service
keeps serving the old one, showing a progress bar on stderr, then switches in one transaction.
Both find PostgreSQL through ACTIVITIES_DATABASE_URL, or the running service's endpoints.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

import psycopg

from projections.database import conninfo
from projections.read_model import REBUILD_WORKERS, read_model_datastore, rebuild, status
from services.config import Settings


def add_projection_commands(commands: Any) -> None:
    """Register `projections status` and `projections rebuild` on the top-level subparsers."""
    projections = commands.add_parser("projections", help="read model status and rebuild")
    actions = projections.add_subparsers(dest="projections_command", required=True)
    status_parser = actions.add_parser("status", help="position, log position, lag and rows of the read model")
    status_parser.add_argument("--json", action="store_true", help="print one JSON object")
    rebuild_parser = actions.add_parser(
        "rebuild", help="rebuild the read model from the log aside, then switch to it atomically"
    )
    rebuild_parser.add_argument("--quiet", action="store_true", help="no progress bar")
    rebuild_parser.add_argument(
        "--workers",
        type=int,
        default=REBUILD_WORKERS,
        help=f"connections loading and indexing side by side (default {REBUILD_WORKERS}, which leaves the "
        "service's reads a core; more is faster while the reads wait longer)",
    )


def database_url(settings: Settings) -> str:
    """The configured database, else the one the running service wrote into endpoints.json."""
    if settings.database_url:
        return settings.database_url
    path = settings.data_dir / "endpoints.json"
    if path.exists():
        url = json.loads(path.read_text()).get("database_url")
        if url:
            return str(url)
    raise SystemExit(
        "activities: no database; set ACTIVITIES_DATABASE_URL, or start the service (activities serve) "
        f"so that {path} names its database"
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


class ProgressBar:
    """A one-line progress bar, redrawn at most ten times a second."""

    def __init__(self, stream: TextIO | None = None, width: int = 40) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self._last = 0.0

    def __call__(self, done: int, total: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.1 and done < total:
            return
        self._last = now
        fraction = 1.0 if total <= 0 else min(done / total, 1.0)
        filled = int(fraction * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\rrebuilding read model [{bar}] {done}/{total} events {fraction:6.1%}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def run_projection_command(args: argparse.Namespace, settings: Settings) -> int:
    from services.bootstrap import build_application  # the store is built the way the service builds it

    url = database_url(settings)
    try:  # the database down or the URL wrong is one line, not a trace of the libraries' internals
        with psycopg.connect(conninfo(url, connect_timeout=5)):  # the URL's own timeout, if any, wins
            pass
    except psycopg.Error as exc:
        print(f"activities: the database is unreachable: {_one_line(exc)}", file=sys.stderr)
        return 1
    app = build_application(settings, url)
    datastore = read_model_datastore(url)
    try:
        if args.projections_command == "status":
            current = status(app, datastore)
            report = {
                "position": current.position,
                "log_position": current.log_position,
                "lag": current.lag,
                "rows": current.rows,
            }
            if args.json:
                print(json.dumps(report))
            else:
                print("\n".join(f"{name}: {value}" for name, value in report.items()))
            return 0
        bar = ProgressBar()
        progress = (lambda done, total: None) if args.quiet else bar
        final = rebuild(app, datastore, progress, workers=max(1, args.workers))
        if not args.quiet:
            bar(final, final, force=True)
            bar.close()
        print(f"read model rebuilt and switched at position {final}")
        return 0
    finally:
        datastore.close()
        app.close()
