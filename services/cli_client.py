"""The people-facing subcommands of `activities`: create, get, list, stats, history, tail.

They use the Python client (services/client.py) against a running service, found through
`<data dir>/endpoints.json` (written by `activities serve`) unless `--nats-url` / `--http-url`
say otherwise. The token comes from `--token`, else `ACTIVITIES_TOKEN`, else one is minted for
`--tenant`/`--sub` when the HS256 secret is known (ACTIVITIES_JWT_SECRET or the dev secret that
`activities serve` generated into the data dir). Output is a readable table, or JSON with `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from activities_client import ActivitiesError, Activity, AsyncClient, Event, StartAt, ValidationError
from activities_client.document import format_datetime, parse_datetime
from activities_client.filters import FILTERS_BY_NAME, STATS_GROUPS
from services.auth import mint_token
from services.bootstrap import DEV_SECRET_FILE
from services.config import Settings

CLIENT_COMMANDS: Final = (
    "create", "get", "list", "stats", "history", "tail", "upsert", "get-by-key", "batch", "erase", "occurrences"
)
TOKEN_ENV: Final = "ACTIVITIES_TOKEN"
LIST_COLUMNS: Final = ("id", "type", "subject", "status", "activity_date", "linked_to", "version", "deleted")
CELL_WIDTH: Final = 40
LIST_FILTERS: Final = (*FILTERS_BY_NAME, "include_deleted")
"""The options of `list` and `stats` that select activities: every list filter (filters.LIST_FILTERS)."""
FILTER_OPTIONS: Final = {"activity_date_from": "--from", "activity_date_to": "--to"}
"""Filters whose option is not their name with dashes."""


class CliError(Exception):
    """A problem the user can fix; printed without a traceback."""


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


def _connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--token", default=None, help=f"bearer JWT (default: ${TOKEN_ENV}, or a minted dev token)")
    group.add_argument("--tenant", default="dev", help="tenant_id of a minted dev token (default: dev)")
    group.add_argument("--sub", default="usr-cli", help="sub of a minted dev token (default: usr-cli)")
    group.add_argument("--nats-url", default=None, help="NATS URL (default: from <data dir>/endpoints.json)")
    group.add_argument("--http-url", default=None, help="HTTP base URL (default: from <data dir>/endpoints.json)")
    group.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _field(value: str) -> tuple[str, Any]:
    name, sep, raw = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("fields are NAME=VALUE")
    return name.strip(), parse_value(raw)


def parse_value(raw: str) -> Any:
    """A field value: JSON for objects, arrays, quoted strings, true/false/null; anything else a string."""
    text = raw.strip()
    if text[:1] in ("{", "[", '"') or text in ("true", "false", "null"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise argparse.ArgumentTypeError(f"not valid JSON: {raw}") from None
    return raw


def _start(value: str) -> StartAt:
    if value in ("new", "all"):
        return value  # type: ignore[return-value]
    if value.isdigit():
        return int(value)
    try:
        return parse_datetime(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"'new', 'all', a stream sequence or an RFC 3339 time ({exc})") from None


def _filter_options(parser: argparse.ArgumentParser, renames: dict[str, str] | None = None) -> None:
    """Every list filter (also the stats filters) as an option, repeatable ones repeatable."""
    for spec in FILTERS_BY_NAME.values():
        option = (FILTER_OPTIONS if renames is None else renames).get(spec.name, f"--{spec.name.replace('_', '-')}")
        if spec.kind == "boolean":  # --overdue / --no-overdue
            parser.add_argument(
                option, dest=spec.name, action=argparse.BooleanOptionalAction, default=None, help=spec.description
            )
            continue
        action = "append" if spec.repeatable else "store"
        parser.add_argument(option, dest=spec.name, action=action, default=None, help=spec.description)
    parser.add_argument("--include-deleted", action="store_true", default=None)


def add_client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add create/get/list/stats/history/tail to the `activities` parser."""
    create = commands.add_parser(
        "create",
        help="log an activity",
        description="Log an activity: activities create -f account_id=acc_1 -f type=call -f subject='Intro call'",
    )
    create.add_argument(
        "-f",
        "--field",
        dest="fields",
        action="append",
        type=_field,
        default=[],
        metavar="NAME=VALUE",
        help='a field; VALUE is JSON when it starts with {, [ or " or is true/false/null (e.g. tags=\'["a"]\')',
    )
    _connection_options(create)

    get = commands.add_parser("get", help="show one activity")
    get.add_argument("id")
    get.add_argument("--include-deleted", action="store_true", help="show it even when deleted")
    get.add_argument("--version", type=int, default=None, help="as it was at this version")
    _connection_options(get)

    list_ = commands.add_parser("list", help="list activities (a table)")
    _filter_options(list_)
    for name in ("sort", "cursor"):
        list_.add_argument(f"--{name}", dest=name, default=None)
    list_.add_argument("--limit", type=int, default=None, help="page size (1-200)")
    list_.add_argument("--all", action="store_true", help="follow the cursors to the end")
    _connection_options(list_)

    stats = commands.add_parser(
        "stats",
        help="count activities by type, status, owner, priority or outcome (a table)",
        description="Count activities: activities stats --group-by owner_id --type call",
    )
    stats.add_argument("--group-by", dest="group_by", required=True, choices=STATS_GROUPS)
    _filter_options(stats)
    _connection_options(stats)

    erase = commands.add_parser(
        "erase",
        help="erase an activity for good, or every activity naming a contact",
        description="Erase for good (docs/contract.md section 11): activities erase ID | --contact-id CONTACT",
    )
    erase.add_argument("id", nargs="?", default=None, help="the activity to erase")
    erase.add_argument("--contact-id", dest="contact_id", default=None, help="erase every activity naming it")
    _connection_options(erase)
    occurrences = commands.add_parser(
        "occurrences",
        help="occurrences of activities in a window, recurring ones expanded (a table)",
        description="Occurrences in a window: activities occurrences --from 2026-03-01T00:00:00Z "
        "--to 2026-04-01T00:00:00Z --owner-id usr-... (the activity_date filters are --activity-date-from/-to)",
    )
    occurrences.add_argument("--from", dest="window_from", required=True, help="window start (RFC 3339)")
    occurrences.add_argument("--to", dest="window_to", required=True, help="window end (RFC 3339, at most 366 days on)")
    _filter_options(occurrences, renames={})
    occurrences.add_argument("--cursor", default=None)
    occurrences.add_argument("--limit", type=int, default=None, help="page size (1-200)")
    occurrences.add_argument("--all", action="store_true", help="follow the cursors to the end")
    _connection_options(occurrences)

    history = commands.add_parser("history", help="the events of one activity (needs the HTTP endpoint)")
    history.add_argument("id")
    _connection_options(history)

    tail = commands.add_parser("tail", help="follow the tenant's events as they happen")
    tail.add_argument(
        "--from", dest="start", type=_start, default="new", help="new (default), all, a sequence or a time"
    )
    tail.add_argument("--durable", default=None, help="a durable consumer name: resume where it stopped")
    tail.add_argument("--count", type=int, default=None, help="stop after this many events")
    tail.add_argument("--idle", type=float, default=None, help="stop after this many seconds without events")
    _connection_options(tail)
    _add_keyed_commands(commands)


def _add_keyed_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """upsert, get-by-key and batch (docs/contract.md section 8)."""
    upsert = commands.add_parser(
        "upsert",
        help="create or update the activity keyed KEY",
        description="Create the activity keyed KEY, or merge the fields into it: "
        "activities upsert erp-42 -f account_id=acc_1 -f subject='Order 42'",
    )
    upsert.add_argument("key", help="the external key (1-200 printable characters)")
    upsert.add_argument(
        "-f", "--field", dest="fields", action="append", type=_field, default=[], metavar="NAME=VALUE",
        help="a field, as for create; null clears it on an update",
    )  # fmt: skip
    upsert.add_argument("--expected-version", type=int, default=None, help="update only at this version")
    _connection_options(upsert)

    by_key = commands.add_parser("get-by-key", help="show the activity an upsert created under KEY")
    by_key.add_argument("key")
    by_key.add_argument("--include-deleted", action="store_true", help="show it even when deleted")
    _connection_options(by_key)

    batch = commands.add_parser(
        "batch",
        help="run 1-100 commands from a JSON file (- for stdin)",
        description='Run a batch: FILE holds {"commands": [...]} or a JSON array of commands, each '
        '{"op": "create"|"patch"|"delete"|"restore"|"upsert", "idempotency_key"?: ..., ...its body}. '
        "Prints one line per command; the exit code is 2 when any of them failed.",
    )
    batch.add_argument("file", help="a JSON file, or - for standard input")
    _connection_options(batch)


def read_batch(path: str) -> list[Any]:
    """The commands of a batch file: `{"commands": [...]}` or a bare list."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{path} is not JSON: {exc}") from None
    commands = data.get("commands") if isinstance(data, dict) else data
    if not isinstance(commands, list):
        raise CliError(f'{path} must hold a JSON list of commands, or {{"commands": [...]}}')
    return commands


# ---------------------------------------------------------------------------------------------
# Connection
# ---------------------------------------------------------------------------------------------


def resolve_token(args: argparse.Namespace, settings: Settings) -> str:
    """--token, $ACTIVITIES_TOKEN, or a dev token minted with the known HS256 secret."""
    token = args.token or os.environ.get(TOKEN_ENV)
    if token:
        return str(token)
    secret = settings.jwt_secret
    dev_path = settings.data_dir / DEV_SECRET_FILE
    if not secret and dev_path.exists():
        secret = dev_path.read_text().strip()
    if not secret:
        raise CliError(f"no token: pass --token or set {TOKEN_ENV} (no HS256 secret is known to mint a dev token)")
    return mint_token(secret, args.tenant, args.sub, None, 3600, settings.jwt_issuer, settings.jwt_audience)


def build_client(args: argparse.Namespace, settings: Settings) -> AsyncClient:
    """--nats-url, else the running service's `<data dir>/endpoints.json` (read by the client when it
    connects), else ACTIVITIES_NATS_URL; with none of them the client says that no service runs."""
    use_data_dir = not args.nats_url and ((settings.data_dir / "endpoints.json").exists() or not settings.nats_url)
    return AsyncClient(
        nats_url=None if use_data_dir else (args.nats_url or settings.nats_url),
        token=resolve_token(args, settings),
        http_url=args.http_url,
        subject_prefix=settings.subject_prefix,
        stream_name=settings.stream_name,
        data_dir=settings.data_dir if use_data_dir else None,
    )


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, datetime):
        text = value.strftime("%Y-%m-%d %H:%M")
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, list | dict):
        text = json.dumps(value, default=str) if value else "-"
    else:
        text = str(value)
    text = " ".join(text.split())
    return text if len(text) <= CELL_WIDTH else text[: CELL_WIDTH - 1] + "…"


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain text table with a header rule."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _linked_to(activity: Activity) -> str:
    for name in ("account_id", "deal_id", "contact_id"):
        value = getattr(activity, name)
        if value:
            return f"{name.removesuffix('_id')}:{value}"
    return "-"


def activity_table(activity: Activity) -> str:
    """One activity as FIELD / VALUE rows (empty fields left out)."""
    data = activity.model_dump()
    first = ("id", "version", "type", "subject", "status")
    names = [*first, *(name for name in data if name not in first)]
    rows = [(name, data[name]) for name in names if data[name] not in (None, [], {}, "")]
    return table(rows, ("field", "value"))


def activities_table(activities: Iterable[Activity]) -> str:
    rows = [
        (a.id, a.type, a.subject, a.status, a.activity_date, _linked_to(a), a.version, a.is_deleted) for a in activities
    ]
    return table(rows, LIST_COLUMNS)


EVENT_COLUMNS: Final = ("seq", "occurred_at", "event", "activity_id", "version", "actor", "changes")


def event_row(event: Event) -> tuple[Any, ...]:
    return (
        event.stream_sequence,
        event.occurred_at.strftime("%Y-%m-%d %H:%M:%S"),
        event.kind,
        event.activity_id,
        event.version,
        event.actor,
        event.changes if event.event_type == "ActivityPatched" else "",
    )


def _count(n: int) -> str:
    return f"{n} activity" if n == 1 else f"{n} activities"


def error_lines(error: ActivitiesError) -> list[str]:
    """An error as printed: its code and message, then the details the message does not already say."""
    lines = [f"error: {error.code}: {error.message}"]
    for detail in error.details:
        line = f"{detail.get('field')}: {detail.get('message')}"
        if line not in error.message:
            lines.append(f"  {line}")
    return lines


def _json(value: Any) -> str:
    return json.dumps(value, default=str, indent=2)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


async def _run(args: argparse.Namespace, settings: Settings, out: Callable[[str], None]) -> None:
    async with build_client(args, settings) as client:
        activities = client.customer.activities
        if args.command == "create":
            created = await activities.create(**dict(args.fields))
            out(_json(created.model_dump(mode="json")) if args.json else activity_table(created))
        elif args.command == "get":
            found = await activities.get(args.id, include_deleted=args.include_deleted, version=args.version)
            out(_json(found.model_dump(mode="json")) if args.json else activity_table(found))
        elif args.command == "list":
            names = [*LIST_FILTERS, "sort", "limit"]
            params = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
            if args.all:
                rows = [activity async for activity in activities.iterate(**params)]
                cursor = None
            else:
                page = await activities.list(**params, cursor=args.cursor)
                rows, cursor = page.data, page.next_cursor
            if args.json:
                out(_json({"data": [a.model_dump(mode="json") for a in rows], "next_cursor": cursor}))
            else:
                out(activities_table(rows))
                out(_count(len(rows)) + (f"; next page: --cursor {cursor}" if cursor else ""))
        elif args.command == "stats":
            params = {name: getattr(args, name) for name in LIST_FILTERS if getattr(args, name) is not None}
            counts = await activities.stats(args.group_by, **params)
            if args.json:
                out(_json([count.model_dump(mode="json") for count in counts]))
            else:
                out(table([(count.key, count.count) for count in counts], (args.group_by, "count")))
                out(_count(sum(count.count for count in counts)))
        elif args.command == "erase":
            if (args.id is None) == (args.contact_id is None):
                raise ValidationError("give an activity id or --contact-id, one of the two")
            erased = await activities.erase(args.id, contact_id=args.contact_id)
            out(_json({"erased": erased}) if args.json else f"erased {_count(erased)}")
        elif args.command == "occurrences":
            await _occurrences(args, activities, out)
        elif args.command == "history":
            events = await activities.history(args.id)
            if args.json:
                out(_json([event.model_dump(mode="json") for event in events]))
            else:
                out(table([event_row(event)[1:] for event in events], EVENT_COLUMNS[1:]))
        elif args.command == "tail":
            await _tail(args, client, out)
        elif args.command == "upsert":
            done = await activities.upsert(args.key, dict(args.fields), args.expected_version)
            if args.json:
                out(_json({**done.model_dump(mode="json"), "created": done.created}))
            else:
                out(activity_table(done))
                out("created" if done.created else "updated")
        elif args.command == "get-by-key":
            found = await activities.get_by_key(args.key, include_deleted=args.include_deleted)
            out(_json(found.model_dump(mode="json")) if args.json else activity_table(found))
        elif args.command == "batch":
            await _batch(args, activities, out)


async def _batch(args: argparse.Namespace, activities: Any, out: Callable[[str], None]) -> None:
    """Print one result per command (a JSON array with --json); CliError when any failed."""
    results = await activities.batch(read_batch(args.file))
    if args.json:
        out(_json([
            r.to_envelope() if isinstance(r, ActivitiesError)
            else {"data": r.model_dump(mode="json"), **({"created": r.created} if r.created is not None else {})}
            for r in results
        ]))  # fmt: skip
    else:
        rows = [
            (i, "error", r.code, r.message) if isinstance(r, ActivitiesError)
            else (i, "created" if r.created or (r.created is None and r.version == 1) else "ok", r.id, r.version)
            for i, r in enumerate(results)
        ]  # fmt: skip
        out(table(rows, ("item", "result", "id / code", "version / message")))
    failed = sum(isinstance(r, ActivitiesError) for r in results)
    if failed:
        raise CliError(f"{failed} of {len(results)} commands failed")


OCCURRENCE_COLUMNS: Final = ("occurrence_at", "index", "id", "type", "subject")


async def _occurrences(args: argparse.Namespace, activities: Any, out: Callable[[str], None]) -> None:
    """`activities occurrences`: one page (or every page with --all) as a table or JSON."""
    params = {name: getattr(args, name) for name in (*LIST_FILTERS, "limit") if getattr(args, name) is not None}
    params.pop("include_deleted", None)
    if args.all:
        found = [o async for o in activities.iterate_occurrences(args.window_from, args.window_to, **params)]
        cursor = None
    else:
        page = await activities.occurrences(args.window_from, args.window_to, cursor=args.cursor, **params)
        found, cursor = page.data, page.next_cursor
    if args.json:
        out(_json({"data": [o.model_dump(mode="json") for o in found], "next_cursor": cursor}))
        return
    rows = [
        (format_datetime(o.occurrence_at), o.index, o.activity_id, o.activity.type, o.activity.subject) for o in found
    ]
    out(table(rows, OCCURRENCE_COLUMNS))
    counted = f"{len(found)} occurrence" + ("" if len(found) == 1 else "s")
    out(counted + (f"; next page: --cursor {cursor}" if cursor else ""))


async def _tail(args: argparse.Namespace, client: AsyncClient, out: Callable[[str], None]) -> None:
    """Print events as they come: a header, then one aligned line per event."""
    widths = (6, 19, 8, 30, 7, 16)
    if not args.json:
        out("  ".join(h.upper().ljust(w) for h, w in zip(EVENT_COLUMNS, (*widths, 0), strict=True)).rstrip())
    seen = 0
    subscription = client.customer.activities.subscribe(start=args.start, durable=args.durable, idle_timeout=args.idle)
    async with subscription as events:
        async for event in events:
            if args.json:
                out(json.dumps({**event.model_dump(mode="json"), "stream_sequence": event.stream_sequence}))
            else:
                cells = [_cell(value) for value in event_row(event)]
                out("  ".join(c.ljust(w) for c, w in zip(cells, (*widths, 0), strict=True)).rstrip())
            seen += 1
            if args.count is not None and seen >= args.count:
                break


def run_client_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run one of CLIENT_COMMANDS; errors are printed as `error: <code>: <message>` with exit code 1."""

    def out(text: str) -> None:
        print(text, flush=True)

    try:
        asyncio.run(_run(args, settings, out))
    except KeyboardInterrupt:
        return 130
    except ActivitiesError as error:
        print("\n".join(error_lines(error)), file=sys.stderr)
        return 1
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
