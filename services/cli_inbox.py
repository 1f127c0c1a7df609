"""The durable inbox's subcommands of `activities` (docs/contract.md section 10).

- `activities enqueue OP -f NAME=VALUE ... | --body JSON [--key KEY]`: publish a command to the
  inbox (the client's `enqueue`); prints its Idempotency-Key and stream sequence.
- `activities results [--from new|all|SEQ] [--count N] [--idle S]`: follow the tenant's results.
- `activities inbox dlq list | redrive SEQ... | redrive --all | drop SEQ... | drop --all`: the
  dead-letter stream (an operator's tool: it needs NATS, not a token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import nats

from activities_client import ActivitiesError, AsyncClient, Result
from services.bootstrap import inbox_streams
from services.cli_client import (
    CliError,
    _connection_options,
    _field,
    _start,
    build_client,
    error_lines,
    table,
)
from services.config import Settings
from services.inbox import dlq_drop, dlq_list, dlq_redrive

INBOX_COMMANDS: Final = ("enqueue", "results", "inbox")


def add_inbox_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add enqueue, results and inbox dlq ... to the `activities` parser."""
    enqueue = commands.add_parser(
        "enqueue",
        help="send a durable asynchronous command to the inbox",
        description="activities enqueue create -f account_id=acc_1 -f subject=Hi; "
        "activities enqueue patch --body '{\"id\": \"act_...\", \"changes\": {\"status\": \"done\"}}'",
    )
    enqueue.add_argument("op", help="create, patch, delete, restore, upsert, batch or erase")
    enqueue.add_argument("-f", "--field", dest="fields", action="append", type=_field, default=[], metavar="NAME=VALUE")
    enqueue.add_argument("--body", default=None, help="the whole body as JSON (instead of -f)")
    enqueue.add_argument("--key", default=None, help="the Idempotency-Key (default: a fresh one)")
    _connection_options(enqueue)

    results = commands.add_parser("results", help="follow the results of the tenant's inbox commands")
    results.add_argument("--from", dest="start", type=_start, default="new", help="new (default), all, a sequence")
    results.add_argument("--durable", default=None, help="a durable consumer name: resume where it stopped")
    results.add_argument("--count", type=int, default=None, help="stop after this many results")
    results.add_argument("--idle", type=float, default=None, help="stop after this many seconds without results")
    _connection_options(results)

    inbox = commands.add_parser("inbox", help="manage the inbox's dead-letter queue")
    inbox_commands = inbox.add_subparsers(dest="inbox_command", required=True)
    dlq = inbox_commands.add_parser("dlq", help="list, redrive or drop dead-lettered commands")
    actions = dlq.add_subparsers(dest="dlq_action", required=True)
    list_ = actions.add_parser("list", help="the dead-lettered commands, oldest first")
    list_.add_argument("--json", action="store_true")
    list_.add_argument("--nats-url", default=None)
    for name, what in (("redrive", "publish them to the inbox again, then remove them"), ("drop", "delete them")):
        action = actions.add_parser(name, help=what)
        action.add_argument("seqs", nargs="*", type=int, metavar="SEQ", help="DLQ sequences (from `dlq list`)")
        action.add_argument("--all", action="store_true", help="every dead-lettered command")
        action.add_argument("--nats-url", default=None)


def _body(args: argparse.Namespace) -> Any:
    if args.body is not None and args.fields:
        raise SystemExit("error: give the body with --body or with -f, not both")
    if args.body is not None:
        try:
            return json.loads(args.body)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"error: --body is not JSON: {exc}") from None
    return dict(args.fields)


def result_line(result: Result) -> tuple[Any, ...]:
    """seq, key, op, outcome: ids and codes only."""
    if result.error is not None:
        outcome = f"{result.error.code}: {result.error.message}"
    elif result.activity is not None:
        outcome = f"ok {result.activity.id} v{result.activity.version}"
    else:
        outcome = "ok"
    return (result.stream_sequence, result.idempotency_key, result.op, outcome)


async def _client_command(args: argparse.Namespace, settings: Settings, out: Callable[[str], None]) -> None:
    client: AsyncClient = build_client(args, settings)
    async with client:
        activities = client.customer.activities
        if args.command == "enqueue":
            key, ack = await activities.enqueue(args.op, _body(args), args.key)
            if args.json:
                out(json.dumps({"idempotency_key": key, "stream": ack.stream, "seq": ack.seq}))
            else:
                out(f"enqueued {args.op}: Idempotency-Key {key} (stream {ack.stream}, seq {ack.seq})")
            return
        seen = 0
        async with activities.results(start=args.start, durable=args.durable, idle_timeout=args.idle) as results:
            async for result in results:
                if args.json:
                    out(json.dumps({"seq": result.stream_sequence, "idempotency_key": result.idempotency_key,
                                    "op": result.op, **result.envelope}))
                else:
                    out("  ".join(str(cell) for cell in result_line(result)))
                seen += 1
                if args.count is not None and seen >= args.count:
                    break


def _nats_url(args: argparse.Namespace, settings: Settings) -> str:
    if args.nats_url:
        return str(args.nats_url)
    if settings.nats_url:
        return settings.nats_url
    path = Path(settings.data_dir) / "endpoints.json"
    try:
        return str(json.loads(path.read_text())["nats_url"])
    except (OSError, ValueError, KeyError):
        hint = f"error: no NATS: give --nats-url or ACTIVITIES_NATS_URL, or start the service ({path})"
        raise SystemExit(hint) from None


async def _dlq_command(args: argparse.Namespace, settings: Settings, out: Callable[[str], None]) -> None:
    streams = inbox_streams(settings)
    nc = await nats.connect(_nats_url(args, settings), connect_timeout=2, max_reconnect_attempts=1)
    try:
        js = nc.jetstream()
        if args.dlq_action == "list":
            letters = [letter.summary() for letter in await dlq_list(js, streams)]
            if args.json:
                out(json.dumps(letters))
            else:
                columns = ("seq", "op", "idempotency_key", "code", "tries", "dead_at", "message")
                out(table([[letter[c] for c in columns] for letter in letters], columns))
                out(f"{len(letters)} dead-lettered command(s)")
            return
        if not args.seqs and not args.all:
            raise SystemExit(f"error: name the DLQ sequences to {args.dlq_action}, or give --all")
        seqs = None if args.all else args.seqs
        action = dlq_redrive if args.dlq_action == "redrive" else dlq_drop
        done = await action(js, streams, seqs)
        verb = "redriven" if args.dlq_action == "redrive" else "dropped"
        out(f"{len(done)} command(s) {verb}" + (f": {', '.join(map(str, done))}" if done else ""))
        missing = sorted(set(args.seqs) - set(done)) if seqs is not None else []
        if missing:
            out(f"not in the DLQ: {', '.join(map(str, missing))}")
    finally:
        await nc.close()


def run_inbox_command(args: argparse.Namespace, settings: Settings) -> int:
    def out(text: str) -> None:
        print(text, flush=True)

    try:
        if args.command == "inbox":
            asyncio.run(_dlq_command(args, settings, out))
        else:
            asyncio.run(_client_command(args, settings, out))
    except KeyboardInterrupt:
        return 130
    except ActivitiesError as error:
        print("\n".join(error_lines(error)), file=sys.stderr)
        return 1
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        print(f"error: NATS: {exc!r}", file=sys.stderr)
        return 1
    return 0
