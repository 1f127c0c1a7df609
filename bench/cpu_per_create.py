"""CPU per create: the service process's CPU time over a fixed load of creates, per create.

The measure of "no slower" for a change of the service's code. One `activities serve --role
commands` process gets, after 2,000 unmeasured warm-up creates, two fixed loads over NATS:

- 10,000 creates one at a time (each sent when the last was answered): every batch of the group
  commit holds one create, whatever the machine does;
- 20,000 creates offered at 1,000/s (well below the maximum of about 4,000-6,000/s; with two
  sources at the same time 500/s to each), at most 64
  in flight: the shape of real use, but the busier the machine, the longer a save takes, the more
  creates wait for the next batch, and the LESS CPU per create (reported as creates per commit).

For each load the process's own CPU time (user + sys of all its threads, from /proc/<pid>/stat)
is divided by the creates. CPU time, not wall time, so that other work on a shared machine changes
the result less; it still changes it (caches, the hypervisor), so the load of the machine is
recorded with every run, and only many rounds show a small difference.

Several source trees are measured side by side in one run: every `--source DIR` is run with that
tree's own `services`, `events` and `projections` (the service process is started from DIR with
`PYTHONPATH=DIR`, which comes before the editable install of the venv; the process reports which
files it imported and the run stops if they are not under DIR). By default every round starts one
fresh process of each source (each on a fresh database of one embedded PostgreSQL with fsync on,
and on its own subject prefix of one NATS) and offers them the same loads AT THE SAME TIME, so that
whatever else the machine does, it does to all of them (the default rate, 1,000/s, is then split
among them). With `--alternate` the sources run one after the other instead (A B, B A, ...).
The first source is the baseline ("old"): the report gives each other source's median and the
ratios of its runs to the baseline's run of the same round (the measure to read: their median).

Compare two commits (OLD and NEW are commits or branches; run from a tree whose venv has the
dependencies of both, or give each tree its interpreter as DIR=PYTHON):

    git worktree add /tmp/cpu-old OLD && git worktree add /tmp/cpu-new NEW
    .venv/bin/python -m bench.cpu_per_create --source /tmp/cpu-old --source /tmp/cpu-new --repeats 6
    git worktree remove /tmp/cpu-old && git worktree remove /tmp/cpu-new

(10-15 minutes for 6 rounds of two sources on a busy machine). Results go to
bench/results/<date-time>-cpu/ (cpu_per_create.json and cpu_per_create.md). `--quick` is a smoke
run (1,000 + 2,000 creates, one round). `python -m bench.run` also measures the paced load once,
for the current tree only, as its last phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import uvloop

from bench.load import Stats, _one
from bench.nats_client import LeanNatsClient
from bench.run import RESULTS, ROOT, BenchServers, bench_servers, create_body, headers, progress, service_env

PACKAGES = ("services", "events", "projections")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The service process, started from one source tree: it says which files its packages came from
# (a line on stderr, into its log) before it runs the console script's main.
LAUNCH = """\
import json, sys, services, events, projections, services.cli
packages = [services, events, projections, *[sys.modules[n] for n in ("activities_client",) if n in sys.modules]]
print("cpu_per_create imported " + json.dumps({m.__name__: m.__file__ for m in packages}), file=sys.stderr, flush=True)
sys.argv = ["activities", "serve", "--role", "commands"]
sys.exit(services.cli.main())
"""


@dataclass(frozen=True)
class Source:
    directory: Path
    python: str
    label: str

    @classmethod
    def parse(cls, text: str, default_python: str) -> Source:
        directory, _, python = text.partition("=")
        path = Path(directory).resolve()
        if not (path / "services" / "cli.py").is_file():
            raise SystemExit(f"--source {directory}: no services/cli.py there")
        return cls(path, python or default_python, path.name)

    def describe(self) -> dict[str, Any]:
        def git(*args: str) -> str:
            done = subprocess.run(["git", "-C", str(self.directory), *args], capture_output=True, text=True)
            return done.stdout.strip() if done.returncode == 0 else "?"

        changed = git("status", "--porcelain", "--", *PACKAGES)
        return {"directory": str(self.directory), "python": self.python, "commit": git("rev-parse", "HEAD"),
                "subject": git("log", "-1", "--format=%s"),
                # git's tree ids of the packages at the commit: equal ids, equal service code
                "service_code_trees": dict(zip(PACKAGES, git("rev-parse", *(f"HEAD:{p}" for p in PACKAGES)).split(),
                                               strict=False)),
                "service_code_changed_since_commit": bool(changed) if changed != "?" else None}


# ---------------------------------------------------------------------------------------------
# What the machine and the process did
# ---------------------------------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """User + system CPU time of the process (all its threads, living and exited), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 utime, 15 stime


def machine_ticks() -> list[int]:
    """The first line of /proc/stat: user nice system idle iowait irq softirq steal ..."""
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]


def transaction_ids(admin_url: str) -> int:
    """The cluster's next transaction id: the difference over a window counts the write
    transactions (commits) made meanwhile, plus the one this asks for. The bench's PostgreSQL
    serves only the measured service while it runs."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
    assert row is not None
    return int(row[0])


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@contextmanager
def machine_meanwhile() -> Iterator[dict[str, Any]]:
    """Load average before and after, and the machine's busy and stolen shares of CPU meanwhile."""
    found: dict[str, Any] = {"loadavg_before": loadavg()}
    before = machine_ticks()
    yield found
    after = machine_ticks()
    delta = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(delta) or 1
    found["loadavg_after"] = loadavg()
    found["machine_busy_share"] = round(1 - (delta[3] + delta[4]) / total, 3)  # all cores, not idle nor iowait
    found["machine_steal_share"] = round(delta[7] / total, 4)


# ---------------------------------------------------------------------------------------------
# The load
# ---------------------------------------------------------------------------------------------


async def paced_creates(nats_url: str, subject: str, count: int, rate: float, max_in_flight: int,
                        first: int) -> dict[str, Any]:
    """`count` creates started at `rate` per second (never more than `max_in_flight` waiting)."""
    client = await LeanNatsClient.connect(nats_url)
    stats = Stats()
    slots = asyncio.Semaphore(max_in_flight)
    auth = headers()
    tasks: set[asyncio.Task[None]] = set()
    late = 0

    async def one(payload: bytes) -> None:
        try:
            await _one(client, subject, payload, auth, stats, None)
        finally:
            slots.release()

    try:
        started = time.perf_counter()
        for i in range(count):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots.locked():
                late += 1
            await slots.acquire()
            task = asyncio.create_task(one(orjson.dumps(create_body(first + i))))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        stats.elapsed_s = time.perf_counter() - started
    finally:
        await client.close()
    return {**stats.summary(), "waited_for_a_slot": late}


@dataclass(frozen=True)
class Load:
    creates: int = 20_000  # the paced load: offered at `rate` (to each service), at most `max_in_flight` waiting
    rate: float = 1_000
    max_in_flight: int = 64
    serial: int = 10_000  # the load of one create at a time (0: none)
    warmup: int = 2_000
    idle_s: float = 2.0


@dataclass
class Running:
    """One service process of a source, started for a round."""

    source: Source
    process: subprocess.Popen[bytes]
    nats_url: str
    subject: str
    data_dir: Path
    imported: dict[str, str]
    database_url: str = ""


def service_process(source: Source, database_url: str, nats_url: str, data_dir: Path,
                    prefix: str) -> subprocess.Popen[bytes]:
    data_dir.mkdir(parents=True, exist_ok=True)
    env = service_env(database_url, nats_url, data_dir, ACTIVITIES_SUBJECT_PREFIX=prefix)
    # the tree's own client package too (in client/ since the client became its own distribution)
    own = [str(source.directory), *([str(source.directory / "client")] if (source.directory / "client").is_dir() else [])]
    env["PYTHONPATH"] = os.pathsep.join([*own, *filter(None, [env.get("PYTHONPATH")])])
    env.pop("PYTHONSTARTUP", None)
    log = (data_dir / "service.log").open("ab")
    return subprocess.Popen([source.python, "-c", LAUNCH], cwd=source.directory, env=env, stdout=log, stderr=log)


def imported_from(log: Path, source: Source) -> dict[str, str]:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("cpu_per_create imported "):
            files: dict[str, str] = json.loads(line.removeprefix("cpu_per_create imported "))
            stray = {name: f for name, f in files.items() if not Path(f).resolve().is_relative_to(source.directory)}
            if stray:
                raise RuntimeError(f"the service for {source.directory} imported {stray} from elsewhere")
            return files
    raise RuntimeError(f"the service process did not say where it imported from; see {log}")


def start(source: Source, servers: BenchServers, root: Path, round_: int, index: int) -> Running:
    """A fresh service process of `source` on a fresh database, serving its own subject prefix."""
    return _launch(source, servers.fresh_database(), servers.nats_url, root, round_, index, f"cpu{index}.activities")


def start_beside(first: Running, root: Path, round_: int, index: int) -> Running:
    """One more service process of the same source, database and subject prefix as `first`: the
    two share the command subjects' queue group, as command processes scaled out do."""
    prefix = first.subject.removesuffix(".cmd.create")
    return _launch(first.source, first.database_url, first.nats_url, root, round_, index, prefix)


def _launch(source: Source, database_url: str, nats_url: str, root: Path, round_: int, index: int,
            prefix: str) -> Running:
    root.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix=f"svc-{round_}-{index}-", dir=root))  # never an earlier one's files
    process = service_process(source, database_url, nats_url, data_dir, prefix)
    endpoints_file = data_dir / "endpoints.json"
    deadline = time.monotonic() + 60
    while not endpoints_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"service did not start; see {data_dir / 'service.log'}")
        time.sleep(0.05)
    running = Running(source, process, json.loads(endpoints_file.read_text())["nats_url"], f"{prefix}.cmd.create",
                      data_dir, {}, database_url)
    try:
        running.imported = imported_from(data_dir / "service.log", source)
    except Exception:
        stop(running)
        raise
    return running


def stop(running: Running) -> None:
    running.process.send_signal(signal.SIGTERM)
    try:
        running.process.wait(30)
    except subprocess.TimeoutExpired:
        running.process.kill()


async def loads(services: list[Running], count: int, rate: float, max_in_flight: int,
                first: int) -> list[dict[str, Any]]:
    """The same load offered to every service at the same time."""
    return list(await asyncio.gather(*(paced_creates(s.nats_url, s.subject, count, rate, max_in_flight, first)
                                       for s in services)))


def measure_load(services: list[Running], admin_url: str, count: int, rate: float, max_in_flight: int,
                 first: int) -> list[dict[str, Any]]:
    """Each service process's CPU time over `count` creates (all at once), per create; what else happened."""
    xid_before = transaction_ids(admin_url)
    with machine_meanwhile() as machine:
        own_before = time.process_time()
        cpu_before = [process_cpu_s(s.process.pid) for s in services]
        stats = uvloop.run(loads(services, count, rate, max_in_flight, first))
        cpu_s = [process_cpu_s(s.process.pid) - before for s, before in zip(services, cpu_before, strict=True)]
        own_cpu_s = time.process_time() - own_before
    commits = transaction_ids(admin_url) - xid_before - 1  # of all the services measured together
    found = []
    for service_stats, service_cpu_s in zip(stats, cpu_s, strict=True):
        if service_stats["errors"]:
            raise RuntimeError(f"creates failed: {service_stats['error_codes']}")
        found.append({
            "cpu_us_per_create": round(service_cpu_s / count * 1e6, 1),
            "service_cpu_s": round(service_cpu_s, 3),
            "creates": count,
            # write transactions meanwhile (of all services measured together): group commit saves
            # every batch of creates in one
            "commits": commits,
            "creates_per_commit": round(count * len(services) / commits, 2) if commits > 0 else None,
            "load_client_cpu_s": round(own_cpu_s, 3),
            "load": service_stats,
            **machine,
        })
    return found


def measure_round(sources: list[Source], servers: BenchServers, root: Path, load: Load,
                  round_: int) -> list[dict[str, Any]]:
    """Fresh service processes of `sources` (on fresh databases): warm-up, then the measured loads,
    offered to all of them at the same time."""
    services: list[Running] = []
    found = [{"round": round_, "source": source.label} for source in sources]
    try:
        for source in sources:
            services.append(start(source, servers, root, round_, len(services)))
        for service, run in zip(services, found, strict=True):
            run["imported"] = service.imported
        for warm in uvloop.run(loads(services, load.warmup, load.rate, load.max_in_flight, 0)):
            if warm["errors"]:
                raise RuntimeError(f"warm-up creates failed: {warm['error_codes']}; see {root}")
        time.sleep(0.5)  # the warm-up's last batch committed and answered
        idle_before = [process_cpu_s(s.process.pid) for s in services]
        time.sleep(load.idle_s)
        for service, run, before in zip(services, found, idle_before, strict=True):
            run["idle_cpu_us_per_s"] = round((process_cpu_s(service.process.pid) - before) / load.idle_s * 1e6, 1)
        if load.serial:
            for run, serial in zip(found, measure_load(services, servers.admin_url, load.serial, load.rate, 1,
                                                       load.warmup), strict=True):
                run["serial"] = serial
        for run, paced in zip(found, measure_load(services, servers.admin_url, load.creates, load.rate,
                                                  load.max_in_flight, load.warmup + load.serial), strict=True):
            run.update(paced)
    finally:
        for service in services:
            stop(service)
    return found


# ---------------------------------------------------------------------------------------------
# Runs and report
# ---------------------------------------------------------------------------------------------


def run(sources: list[Source], load: Load, repeats: int, servers: BenchServers, root: Path,
        together: bool) -> list[dict[str, Any]]:
    runs = []
    for round_ in range(1, repeats + 1):
        order = sources if round_ % 2 else list(reversed(sources))  # A B, B A, A B ... : no source always first
        groups = [order] if together else [[source] for source in order]
        for group in groups:
            names = " and ".join(f"{s.label} ({s.directory})" for s in group)
            progress(f"round {round_}/{repeats}: {names}{' at the same time' if len(group) > 1 else ''}; "
                     f"loadavg {loadavg()}")
            for found in measure_round(group, servers, root, load, round_):
                serial = found.get("serial")
                if serial:
                    progress(f"  {found['source']} one at a time: {serial['cpu_us_per_create']} us of service CPU "
                             f"per create ({serial['load']['rate_per_s']:.0f}/s, machine busy "
                             f"{serial['machine_busy_share']:.0%})")
                progress(f"  {found['source']} at {load.rate:.0f}/s: {found['cpu_us_per_create']} us of service CPU "
                         f"per create, {found['creates_per_commit']} creates per commit (p50 "
                         f"{found['load']['p50_ms']} ms, machine busy {found['machine_busy_share']:.0%})")
                runs.append(found)
    return runs


MEASURES = {  # name in the summary: where a run keeps it
    "one_at_a_time": lambda r: r["serial"]["cpu_us_per_create"] if "serial" in r else None,
    "paced": lambda r: r["cpu_us_per_create"],
}


def summarise(sources: list[Source], runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    base = sources[0].label
    for measure, value in MEASURES.items():
        if any(value(r) is None for r in runs):
            continue
        per_source: dict[str, Any] = summary.setdefault(measure, {})
        for source in sources:
            values = [value(r) for r in runs if r["source"] == source.label]
            median = statistics.median(values)
            per_source[source.label] = {
                "runs_us": values,
                "median_us": round(median, 1),
                "min_us": min(values),
                "max_us": max(values),
                "spread": round((max(values) - min(values)) / median, 3),  # (max - min) / median
            }
        for source in sources[1:]:
            pairs = []
            for round_ in sorted({r["round"] for r in runs}):
                mine = [value(r) for r in runs if r["round"] == round_ and r["source"] == source.label]
                theirs = [value(r) for r in runs if r["round"] == round_ and r["source"] == base]
                pairs.append(round(mine[0] / theirs[0], 3))
            per_source[source.label]["ratio_of_medians"] = round(
                per_source[source.label]["median_us"] / per_source[base]["median_us"], 3)
            per_source[source.label]["ratios_per_round"] = pairs
            per_source[source.label]["median_ratio_per_round"] = round(statistics.median(pairs), 3)
    return summary


def markdown(results: dict[str, Any]) -> str:
    load = results["load"]
    base = results["sources"][0]["label"]
    serial = (f"first {load['serial']:,} creates one at a time (every batch one create, one commit), then "
              if load["serial"] else "")
    together = ("every round all sources at the same time (each its own process, database and subjects, the "
                "same load offered to each at once)." if results.get("together") else
                "sources one after the other (A B, B A, ...).")
    lines = [
        f"CPU per create, {results['date']} on {results['machine']}",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Fixed loads, to one fresh `serve --role commands` process per source and round (each on a fresh "
        f"database), after "
        f"{load['warmup']:,} unmeasured warm-up creates: {serial}{load['creates']:,} creates offered at "
        f"{load['rate']:,.0f}/s (at most {load['max_in_flight']} in flight). The measure: the process's user+sys CPU "
        f"time (/proc/<pid>/stat) over each load divided by its creates. {results['repeats']} rounds, "
        f"{together} Load average at start {results['loadavg_start']}, at end "
        f"{results['loadavg_end']}.",
        "",
        "| load | source | commit | µs CPU per create, median | min - max | spread | ratio to first (medians) "
        "| ratio per round (median; each) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"one_at_a_time": "one at a time", "paced": f"{load['rate']:,.0f}/s each"}
    for measure, per_source in results["summary"].items():
        for source in results["sources"]:
            s = per_source[source["label"]]
            trees = source.get("service_code_trees", {})
            code = " ".join(f"{name[0]}:{tree[:7]}" for name, tree in trees.items())
            dirty = " + uncommitted changes" if source.get("service_code_changed_since_commit") else ""
            ratio = f"{s['ratio_of_medians']:.3f}" if "ratio_of_medians" in s else "1 (baseline)"
            rounds = (f"{s['median_ratio_per_round']:.3f}; {', '.join(f'{r:.3f}' for r in s['ratios_per_round'])}"
                      if "ratios_per_round" in s else "-")
            lines.append(f"| {names[measure]} | {source['label']} (`{source['directory']}`) | {source['commit'][:9]} "
                         f"({code}{dirty}) | {s['median_us']} | {s['min_us']} - {s['max_us']} | {s['spread']:.1%} "
                         f"| {ratio} | {rounds} |")
    lines += ["", "Each run:", "",
              "| round | source | load | µs CPU per create | creates per commit | service CPU s | achieved rate "
              "| p50 / p99 ms | machine busy | stolen | loadavg before → after |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        for name, m in (("one at a time", r.get("serial")), (names["paced"], r)):
            if not m:
                continue
            lines.append(
                f"| {r['round']} | {r['source']} | {name} | {m['cpu_us_per_create']} | {m['creates_per_commit']} "
                f"| {m['service_cpu_s']} | {m['load']['rate_per_s']:.0f}/s | {m['load']['p50_ms']} / "
                f"{m['load']['p99_ms']} | {m['machine_busy_share']:.0%} | {m['machine_steal_share']:.1%} | "
                f"{m['loadavg_before']} → {m['loadavg_after']} |")
    lines += ["", f"The first source ({base}) is the baseline; a ratio above 1 is more CPU per create than it. "
              "The commit column gives git's tree ids of services (s), events (e) and projections (p): equal ids, "
              "equal service code. Creates per commit: the cluster's transaction ids used meanwhile (by all the "
              "services of a round together). Group commit makes the paced measure depend on the machine: the "
              "busier it is, the longer a save takes, the more "
              "creates wait for the next batch and the less CPU each create costs; one at a time, every batch is "
              "one create whatever the machine does."]
    return "\n".join(lines) + "\n"


def machine() -> str:
    return f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"


def cpu_per_create_phase(servers: BenchServers, root: Path, creates: int, rate: float) -> dict[str, Any]:
    """For bench/run.py: one measured paced load of the current tree (no load of one at a time)."""
    source = Source(ROOT, sys.executable, ROOT.name)
    load = Load(creates=creates, rate=rate, serial=0, warmup=max(200, creates // 10))
    (found,) = measure_round([source], servers, root / "cpu-per-create", load, 1)
    return {"creates": creates, "rate": rate, **{k: v for k, v in found.items() if k not in ("imported", "round")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", metavar="DIR[=PYTHON]",
                        help="a source tree to measure (repeat; the first is the baseline); default: this tree")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for the service processes (default: this one)")
    parser.add_argument("--creates", type=int, default=Load.creates, help="measured creates per run")
    parser.add_argument("--rate", type=float, default=None,
                        help="creates offered per second to each service (default 1,000 split among the services "
                             "measured at the same time)")
    parser.add_argument("--max-in-flight", type=int, default=Load.max_in_flight)
    parser.add_argument("--serial", type=int, default=Load.serial,
                        help="measured creates sent one at a time before the paced load (0: none)")
    parser.add_argument("--warmup", type=int, default=Load.warmup, help="unmeasured creates before each run")
    parser.add_argument("--repeats", type=int, default=6, help="rounds (each runs every source once)")
    parser.add_argument("--alternate", action="store_true",
                        help="run the sources one after the other (A B, B A, ...) instead of at the same time")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2,000 creates, one round")
    parser.add_argument("--admin-url", help="use this PostgreSQL (a superuser URL) instead of an embedded one "
                        "(creates per commit then count every write transaction of that cluster)")
    parser.add_argument("--nats-url", help="use this NATS (with --admin-url) instead of an embedded one")
    args = parser.parse_args(argv)
    sources = [Source.parse(s, args.python) for s in (args.source or [str(ROOT)])]
    labels = [s.label for s in sources]
    for i, source in enumerate(sources):  # unique labels: the directory's name, numbered if repeated
        if labels.count(source.label) > 1:
            sources[i] = Source(source.directory, source.python, f"{source.label}#{i + 1}")
    rate = args.rate or Load.rate / (1 if args.alternate else len(sources))
    load = Load(args.creates, rate, args.max_in_flight, args.serial, args.warmup)
    repeats = args.repeats
    if args.quick:
        load, repeats = Load(2_000, rate, args.max_in_flight, min(args.serial, 1_000), 500), 1
    started = datetime.now(UTC)
    results: dict[str, Any] = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "quick": args.quick,
        "command": " ".join(["python -m bench.cpu_per_create", *(argv if argv is not None else sys.argv[1:])]),
        "load": load.__dict__, "repeats": repeats, "together": not args.alternate, "loadavg_start": loadavg(),
        "sources": [{"label": s.label, **s.describe()} for s in sources],
    }
    root = Path(tempfile.mkdtemp(prefix="activities-cpu-"))
    try:
        if args.admin_url and args.nats_url:
            servers = BenchServers(args.admin_url, args.nats_url)
            results["runs"] = run(sources, load, repeats, servers, root, not args.alternate)
        else:
            with bench_servers(root) as servers:
                results["runs"] = run(sources, load, repeats, servers, root, not args.alternate)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["loadavg_end"] = loadavg()
    results["summary"] = summarise(sources, results["runs"])
    out = RESULTS / (started.strftime("%Y-%m-%d-%H%M") + ("-cpu-quick" if args.quick else "-cpu"))
    if out.exists():  # two runs in one minute
        out = out.with_name(started.strftime("%Y-%m-%d-%H%M%S") + ("-cpu-quick" if args.quick else "-cpu"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_per_create.json").write_text(json.dumps(results, indent=2))
    report = markdown(results)
    (out / "cpu_per_create.md").write_text(report)
    print(report)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
