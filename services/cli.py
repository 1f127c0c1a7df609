"""The `activities` console script."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys

import uvloop

from services.auth import mint_token
from services.bootstrap import ROLES, Runtime, dev_secret
from services.cli_client import CLIENT_COMMANDS, add_client_commands, run_client_command
from services.cli_inbox import INBOX_COMMANDS, add_inbox_commands, run_inbox_command
from services.cli_projections import add_projection_commands, run_projection_command
from services.config import Settings
from services.logs import configure_logging


def _roles(value: str) -> tuple[str, ...]:
    roles = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [role for role in roles if role not in ROLES]
    if unknown or not roles:
        raise argparse.ArgumentTypeError(f"roles are a comma-separated subset of {','.join(ROLES)}")
    return roles


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="activities",
        description="The event-sourced CRM activities service. Settings come from ACTIVITIES_* variables.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service (commands, projector, relay, http)")
    serve.add_argument(
        "--role",
        type=_roles,
        default=ROLES,
        help=f"comma-separated roles to run in this process (default: all of {','.join(ROLES)})",
    )

    token = commands.add_parser("token", help="print a development JWT signed with the configured HS256 secret")
    token.add_argument("--tenant", required=True, help="tenant_id claim")
    token.add_argument("--sub", required=True, help="sub claim (the person or service)")
    token.add_argument("--app", default=None, help="app_id claim (integration API keys)")
    token.add_argument("--ttl", type=int, default=24 * 3600, help="seconds until it expires (default one day)")
    add_client_commands(commands)  # create, get, list, history, tail (services/cli_client.py)
    add_projection_commands(commands)  # projections status|rebuild (services/cli_projections.py)
    add_inbox_commands(commands)  # enqueue, results, inbox dlq list|redrive|drop (services/cli_inbox.py)
    return parser


async def _serve(settings: Settings, roles: tuple[str, ...]) -> None:
    runtime = Runtime(settings, roles)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await runtime.start()
        _tune_garbage_collector()
        _banner(settings, runtime)
        await stop.wait()
    finally:
        print("activities: shutting down", file=sys.stderr, flush=True)
        await runtime.stop()


def _tune_garbage_collector() -> None:
    """Fewer, and shorter, collector pauses: the objects made while starting (modules, pools,
    schemas) are frozen out of every later collection, and the young generation is collected
    every 50,000 allocations instead of 700 (the service allocates a lot per request and keeps
    little of it; full collections over the aggregate cache were the latency tail)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _banner(settings: Settings, runtime: Runtime) -> None:
    endpoints = runtime.endpoints
    lines = [
        f"activities: serving roles {','.join(runtime.roles)}",
        f"  NATS:       {endpoints['nats_url']}  (subjects {settings.subject_prefix}.cmd.*)",
        f"  HTTP:       {endpoints.get('http_url') or '-'}",
        f"  PostgreSQL: {endpoints['database_url']}",
        f"  endpoints:  {settings.data_dir / 'endpoints.json'}",
    ]
    if not (settings.jwt_secret or settings.jwt_public_key or settings.jwt_jwks_url or settings.jwt_jwks_file):
        lines.append("  dev mode: tokens are signed with a secret generated into the data dir; get one with")
        lines.append("            activities token --tenant acme --sub usr-1")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    if args.command == "serve":
        configure_logging(settings.log_level)
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(_serve(settings, args.role))  # libuv's loop: about half the CPU of asyncio's per message
        return 0
    if args.command == "token":
        secret = settings.jwt_secret or dev_secret(settings.data_dir)
        print(
            mint_token(secret, args.tenant, args.sub, args.app, args.ttl, settings.jwt_issuer, settings.jwt_audience)
        )
        return 0
    if args.command in CLIENT_COMMANDS:
        try:
            return run_client_command(args, settings)
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
    if args.command == "projections":
        return run_projection_command(args, settings)
    if args.command in INBOX_COMMANDS:
        return run_inbox_command(args, settings)
    return 2


if __name__ == "__main__":
    sys.exit(main())
