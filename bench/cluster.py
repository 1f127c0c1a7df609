"""The write path on one PostgreSQL primary with and without a streaming standby, and what an
asynchronous standby loses when the primary dies.

1. Creates/s through one `activities serve --role commands` process (the bench load client of
   bench/run.py, N in flight) against three servers built the same way (tests/e2e/cluster.py,
   fsync on): a primary alone (the baseline), a primary with an asynchronous standby, and one
   with a synchronous standby (`synchronous_standby_names`: every commit waits for the standby).
   The modes run one after the other in each round, in a rotated order per round, so whatever else
   the shared machine does falls on all of them; each mode's ratio to the primary alone is the
   median of its per-round ratios.
2. Failover: retrying clients (tests/e2e/cluster.py `RetryingLoad`, every command with its own
   Idempotency-Key) create and patch activities through two command processes and a
   projector/relay process on the multi-host URL; the primary is SIGKILLed, the standby promoted
   0.5 s later, the load goes on; afterwards each acknowledged command is looked up in the new
   primary's store. Several rounds with an asynchronous standby, one with a synchronous one
   (the control: none lost). `--lag S` stops the primary's WAL sender (SIGSTOP) for S seconds
   before the kill, as a slow network or a busy standby would: replication lag made on purpose.

    .venv/bin/python -m bench.cluster [--rounds 2] [--seconds 10] [--failovers 4] [--workers 32]

Results: bench/results/<date>-<HHMM>-cluster/cluster.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import uvloop

from bench.run import RESULTS, SECRET, create_body, drive, machine, progress, service
from services.auth import mint_token
from services.config import Settings
from tests.e2e.cluster import PostgresPair, RetryingLoad, missing_acknowledged, stored_events, stream_messages
from tests.e2e.processes import ServiceProcess

MODES = ("primary alone", "asynchronous standby", "synchronous standby")


def throughput_round(root: Path, nats_url: str, mode: str, seconds: float, in_flight: int) -> dict[str, Any]:
    pair = PostgresPair(root / f"pg-{uuid.uuid4().hex[:6]}", synchronous=mode == "synchronous standby", fsync=True)
    pair.start(with_standby=mode != "primary alone")
    try:
        url = pair.primary.url(PostgresPair.DATABASE)
        with service(url, nats_url, "commands", root / f"svc-{uuid.uuid4().hex[:6]}"):
            subject = "crm.activities.cmd.create"
            uvloop.run(drive(nats_url, subject, create_body, 8, 1))  # warm-up
            stats = uvloop.run(drive(nats_url, subject, create_body, in_flight, seconds))
        return stats.summary()
    finally:
        pair.stop()
        shutil.rmtree(pair.primary.directory.parent, ignore_errors=True)


async def failover_round(
    root: Path, nats_url: str, synchronous: bool, workers: int, lag_s: float = 0.0
) -> dict[str, Any]:
    directory = root / f"failover-{uuid.uuid4().hex[:6]}"
    pair = PostgresPair(directory / "pg", synchronous=synchronous)
    pair.start()
    settings = Settings(
        database_url=pair.multi_host_url,
        nats_url=nats_url,
        data_dir=directory,
        subject_prefix=f"b{uuid.uuid4().hex[:8]}.activities",
        stream_name=f"B{uuid.uuid4().hex[:8].upper()}",
        jwt_secret=SECRET,
        http_port=0,
        db_pool_size=4,
    )
    processes = [ServiceProcess(settings, "commands", f"commands-{i}") for i in range(2)]
    processes.append(ServiceProcess(settings, "projector,relay", "log-readers"))
    load = RetryingLoad([nats_url], settings.subject_prefix, mint_token(SECRET, "bench", "usr-bench"), workers)
    try:
        for process in processes:
            process.start()
        await load.start()
        started = time.monotonic()
        while time.monotonic() - started < 5:
            await asyncio.sleep(0.1)
        acked_before = load.acked_count()
        rate_before = acked_before / (time.monotonic() - started)
        acked_while_stalled = 0
        if lag_s > 0:
            # the standby falls behind: the primary's WAL sender stopped, as a slow network or a busy
            # standby would hold it (stopping the standby's receiver instead lags nothing: what was
            # sent waits in its socket's buffer and is read after the primary died)
            [(sender,)] = pair.primary.execute("SELECT pid FROM pg_stat_replication")
            os.kill(sender, signal.SIGSTOP)
            stalled_from = load.acked_count()
            await asyncio.sleep(lag_s)
            acked_while_stalled = load.acked_count() - stalled_from
        pair.primary.kill()  # SIGKILL ends the stopped sender too
        killed = time.monotonic()
        await asyncio.sleep(0.5)
        await asyncio.get_running_loop().run_in_executor(None, pair.standby.promote)
        target = load.acked_count() + 1
        while load.acked_count() < target:
            await asyncio.sleep(0.01)
        first_ack_s = time.monotonic() - killed
        await asyncio.sleep(3)
        report = await load.stop()
        events = stored_events(pair.standby.url(PostgresPair.DATABASE))
        lost = missing_acknowledged(report, events)
        stream = await settled_stream(nats_url, settings.stream_name, len(events))
        return {
            "replication": "synchronous" if synchronous else "asynchronous",
            "acknowledged": len(report.acked),
            "acknowledged_before_kill": acked_before,
            "acks_per_s_before_kill": round(rate_before, 1),
            "standby_stalled_s": lag_s,
            "acknowledged_while_stalled": acked_while_stalled,
            "lost": len(lost),
            "lost_ops": sorted(a.op for a in lost),
            "retries": report.retries,
            "rejected": report.rejected,
            "first_ack_after_kill_s": round(first_ack_s, 2),
            "stored_events": len(events),
            **stream_divergence(events, stream),
        }
    finally:
        for process in processes:
            process.stop()
        pair.stop()
        shutil.rmtree(directory, ignore_errors=True)


async def settled_stream(nats_url: str, stream: str, expected: int) -> list[tuple[int, str, dict[str, Any]]]:
    """The stream's messages once the relay has caught up (`expected` messages) or stopped adding."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream(timeout=5)
        last, still_since = -1, time.monotonic()
        while time.monotonic() - still_since < 3:
            count = (await js.stream_info(stream)).state.messages
            if count >= expected:
                break
            if count != last:
                last, still_since = count, time.monotonic()
            await asyncio.sleep(0.2)
        return await stream_messages(nc, stream)
    finally:
        await nc.close()


def stream_divergence(
    events: dict[tuple[str, int], bytes], stream: list[tuple[int, str, dict[str, Any]]]
) -> dict[str, int]:
    """How the stream and the store disagree: messages of events the store does not hold (or holds
    another event under that id and version), and stored events never published."""
    published = {(body["activity_id"], int(body["version"])): body for _, _, body in stream}
    not_in_store = sum(
        1 for key, body in published.items()
        if str(body["activity"].get("subject")).encode() not in events.get(key, b"")
    )
    return {
        "stream_messages": len(stream),
        "stream_events_not_in_store": not_in_store,
        "stored_events_not_on_stream": sum(1 for key in events if key not in published),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--render", type=Path, help="only write the report of a results dir's cluster.json again")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--in-flight", type=int, default=256)
    parser.add_argument("--failovers", type=int, default=4)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument(
        "--lag", type=float, default=0.0,
        help="stop the standby's WAL receiver for this many seconds before the kill (replication lag)",
    )
    args = parser.parse_args(argv)
    if args.render:
        (args.render / "cluster.md").write_text(report(json.loads((args.render / "cluster.json").read_text())))
        return 0
    from services.embedded import EmbeddedNats

    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    root.chmod(0o755)
    nats_server = EmbeddedNats(root / "nats", port=None)
    nats_url = nats_server.start()
    load_before = os.getloadavg()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "settings": vars(args),
        "throughput": {mode: [] for mode in MODES},
        "failovers": [],
    }
    try:
        for round_number in range(args.rounds):
            order = MODES[round_number % 3 :] + MODES[: round_number % 3]
            for mode in order:
                progress(f"round {round_number + 1}: creates, {mode}")
                results["throughput"][mode].append(
                    throughput_round(root, nats_url, mode, args.seconds, args.in_flight)
                )
        for number in range(args.failovers + 1):
            synchronous = number == args.failovers
            progress(f"failover {number + 1}: {'synchronous' if synchronous else 'asynchronous'} standby")
            results["failovers"].append(uvloop.run(failover_round(root, nats_url, synchronous, args.workers, args.lag)))
    finally:
        nats_server.stop()
        shutil.rmtree(root, ignore_errors=True)
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    directory = RESULTS / f"{stamp}-cluster"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cluster.json").write_text(json.dumps(results, indent=2))
    (directory / "cluster.md").write_text(report(results))
    print(report(results))
    return 0


def lost_by_op(ops: list[str]) -> str:
    """` (creates 3, patches 5)`, or nothing when none was lost."""
    counts = Counter(ops)
    plural = {"create": "creates", "patch": "patches"}
    return f" ({', '.join(f'{plural.get(op, op)} {n}' for op, n in sorted(counts.items()))})" if counts else ""


def report(results: dict[str, Any]) -> str:
    base = [run["rate_per_s"] for run in results["throughput"]["primary alone"]]
    lines = [
        f"Cluster benchmark {results['date']} on {results['machine']}; load average before "
        f"{results['load_average_before']}, after {results['load_average_after']} (a shared machine: "
        "other benchmarks and test suites ran beside it)",
    ]
    if any(results["throughput"].values()):
        lines += [
            "",
            f"Creates through one command process, {results['settings']['in_flight']} in flight, "
            f"{results['settings']['seconds']} s per run, PostgreSQL with fsync on, all on one 2-core machine:",
            "",
            "| server | creates/s per round | median ratio to the primary alone |",
            "|---|---|---|",
        ]
    for mode, runs in results["throughput"].items():
        if not runs:
            continue
        rates = [run["rate_per_s"] for run in runs]
        ratios = [rate / b for rate, b in zip(rates, base, strict=True) if b]
        lines.append(
            f"| {mode} | {', '.join(f'{r:.0f}' for r in rates)} | "
            f"{statistics.median(ratios):.2f}x |"
        )
    lines += [
        "",
        f"Failover (SIGKILL of the primary, promotion of the standby 0.5 s later, load going on from "
        f"{results['settings']['workers']} retrying clients, each creating an activity and patching it five times):",
        "",
        "| replication | standby stalled before the kill | acknowledged | before the kill (acks/s) "
        "| acknowledged while stalled | lost | retries | first ack after the kill "
        "| stream: events not in the store / stored events not on it |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["failovers"]:
        lines.append(
            f"| {run['replication']} | {run.get('standby_stalled_s', 0)} s | {run['acknowledged']} "
            f"| {run['acknowledged_before_kill']} "
            f"({run['acks_per_s_before_kill']}/s) | {run.get('acknowledged_while_stalled', 0)} "
            f"| {run['lost']}{lost_by_op(run['lost_ops'])} | {run['retries']} | "
            f"{run['first_ack_after_kill_s']} s | {run.get('stream_events_not_in_store', '-')} / "
            f"{run.get('stored_events_not_on_stream', '-')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
