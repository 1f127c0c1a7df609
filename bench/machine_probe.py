"""What the machine itself did while a latency phase ran: the floor under the phase's replies.

Two things outside the service set a floor under its latency on a shared virtual machine:
- the disk: with fsync on, a command's reply waits for its batch's WAL to reach the disk, so a
  slow fsync is a slow reply whatever the service does. A probe process writes 8 KiB and
  `fdatasync`s it every 10 ms into a file on the same disk as PostgreSQL's WAL (in its own
  process, so that it takes no CPU from the load generator);
- the CPU: the share of the machine's CPU time the hypervisor gave to other guests ("steal" in
  /proc/stat). Every process of the run stalls while it is taken.

    python -m bench.machine_probe DIRECTORY   # the disk probe: runs until SIGTERM, prints JSON
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STALL_MS = 50.0  # the p99 target of the latency phase: an fsync this slow alone breaks it
BLOCK = 8192
INTERVAL_S = 0.01
PROC_STAT = Path("/proc/stat")


def summarize_fsyncs(fsyncs_ms: list[float], elapsed_s: float) -> dict[str, Any]:
    """p50/p99/max of the fsyncs, and the share of replies the disk alone held past STALL_MS.

    A command that arrives while an fsync of d ms is stalled waits at least until the stall ends,
    so of the commands arriving at a steady rate, at least (d - STALL_MS) / elapsed of them wait
    more than STALL_MS for that stall alone. Summed over the stalls, that is a lower bound (the probe
    sees a stall only from its next fsync on); at 1% or more, no design that replies after its
    commit reached the disk can hold a p99 of STALL_MS during that phase.
    """
    if not fsyncs_ms:
        return {"fsyncs": 0}
    ordered = sorted(fsyncs_ms)
    held_ms = sum(d - STALL_MS for d in ordered if d > STALL_MS)
    return {
        "fsyncs": len(ordered),
        "p50_ms": round(ordered[len(ordered) // 2], 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
        "max_ms": round(ordered[-1], 2),
        "stalls_over_50_ms": sum(1 for d in ordered if d > STALL_MS),
        "share_held_over_50_ms": round(held_ms / 1000 / elapsed_s, 4) if elapsed_s else 0.0,
    }


def probe_disk(path: Path) -> dict[str, Any]:
    """fsync a block every INTERVAL_S until SIGTERM; the summary of what the disk did."""
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    block = os.urandom(BLOCK)
    fsyncs_ms: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    started = time.perf_counter()
    try:
        while not stopping:
            os.pwrite(fd, block, (len(fsyncs_ms) % 1024) * BLOCK)
            before = time.perf_counter()
            os.fdatasync(fd)
            fsyncs_ms.append((time.perf_counter() - before) * 1000)
            time.sleep(INTERVAL_S)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return summarize_fsyncs(fsyncs_ms, time.perf_counter() - started)


def cpu_times() -> list[int] | None:
    """The machine's CPU time counters (the `cpu` line of /proc/stat), or None off Linux."""
    try:
        return [int(field) for field in PROC_STAT.read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None


def steal_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """The share of all CPU time between two readings that the hypervisor gave to other guests."""
    if before is None or after is None or len(before) < 8 or len(after) < 8:
        return None
    spent = [a - b for a, b in zip(after, before, strict=False)]
    total = sum(spent[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return round(spent[7] / total, 4) if total > 0 else None


@contextmanager
def machine_probe(directory: Path) -> Iterator[dict[str, Any]]:
    """Probe the disk under `directory` and the CPU steal while the block runs; the yielded dict is
    filled on exit with `disk_fsync` and `cpu_steal_share`."""
    process = subprocess.Popen([sys.executable, "-m", "bench.machine_probe", str(directory)],
                               cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE)
    summary: dict[str, Any] = {}
    cpu_before = cpu_times()
    try:
        yield summary
    finally:
        summary["cpu_steal_share"] = steal_share(cpu_before, cpu_times())
        process.terminate()
        out, _ = process.communicate(timeout=30)
        summary["disk_fsync"] = json.loads(out) if out.strip() else {"error": f"probe exited {process.returncode}"}


if __name__ == "__main__":
    print(json.dumps(probe_disk(Path(sys.argv[1]) / f"fsync-probe-{os.getpid()}.dat")))
