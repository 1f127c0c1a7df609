"""Rolling upgrade from release 1.0 (commit 2d715ff) to this release, with both serving at once.

Release 1.0's code comes from git history and runs as real `activities serve` processes (the same
venv's interpreter, PYTHONPATH on the extracted tree) beside this release's processes, on one
PostgreSQL database, one NATS server, one subject prefix and one stream:

a. 1.0 alone (every role) takes creates and patches;
b. the new release starts beside it (every role, same queue group): its start migrates the read
   model while 1.0 serves; a second 1.0 process (commands only, its own prefix) lets the test
   reach old code deterministically;
c. mixed commands and reads go to whichever process NATS picks, and all succeed, except that a
   command carrying `remind_at` (schema 2) is refused by 1.0 as an unknown field when 1.0 gets it
   (`validation_error`; sent again until the new release takes it). Half way, 1.0 restarts: the
   new projector and relay take over from it, and its start re-runs 1.0's schema statements on
   the migrated read model. An activity the new release wrote with `remind_at` is patched,
   deleted and restored by 1.0, which keeps the field;
d. the 1.0 processes stop; the new projector and relay are active (from the restart on, or from
   now: the two releases use the same advisory lock names) and carry the commands that follow;
e. the read model holds every activity at the store's latest version, every document served is
   schema 2, the filter columns of the migrations are right on rows 1.0's projector wrote, and the
   stream holds every stored event exactly once, in version order per activity.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import orjson
import psycopg
import pytest
from nats.aio.client import Client as NatsClient

from activities_client.document import SCHEMA_2_DEFAULTS, SCHEMA_VERSION
from projections.migrations import MIGRATIONS
from services.auth import mint_token

pytestmark = pytest.mark.slow

OLD_RELEASE = "2d715ff"
"""Release 1.0 (the release before schema 2)."""
REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
ACTIVITIES = str(Path(sys.executable).parent / "activities")
SECRET = "rolling-upgrade-secret-of-32-bytes-or-more"
START_TIMEOUT_S = 60.0
ERROR_LINE = re.compile(r'"level":\s*"(error|critical)"')
REQUEST_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------------------------
# Release 1.0's code, and processes of either release
# ---------------------------------------------------------------------------------------------


def extract_old_release(dest: Path) -> Path:
    """`git archive <1.0> services events projections` unpacked into `dest` (its code only)."""
    try:
        found = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", "--quiet", f"{OLD_RELEASE}^{{commit}}"],
            capture_output=True, text=True, timeout=30,
        )
    except FileNotFoundError:
        pytest.fail("the rolling-upgrade test needs git (it takes release 1.0's code from the history)")
    if found.returncode != 0:
        pytest.fail(
            f"commit {OLD_RELEASE} (release 1.0) is not in {REPO_ROOT}'s history: the rolling-upgrade test "
            "needs a clone with full history (git fetch --unshallow)"
        )
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", OLD_RELEASE, "services", "events", "projections"],
        capture_output=True, timeout=60,
    )
    assert archive.returncode == 0, f"git archive {OLD_RELEASE} failed: {archive.stderr.decode()}"
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def base_env(database_url: str, nats_url: str, prefix: str, stream: str, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTIVITIES_") and k != "PYTHONPATH"}
    env.update({
        "ACTIVITIES_DATABASE_URL": database_url,
        "ACTIVITIES_NATS_URL": nats_url,
        "ACTIVITIES_JWT_SECRET": SECRET,
        "ACTIVITIES_SUBJECT_PREFIX": prefix,
        "ACTIVITIES_STREAM_NAME": stream,
        "ACTIVITIES_HTTP_PORT": "0",
        "ACTIVITIES_DATA_DIR": str(data_dir),
        "ACTIVITIES_DB_POOL_SIZE": "4",
        "ACTIVITIES_CONSISTENCY_WAIT_MS": "8000",  # min_position reads on a loaded machine
        "ACTIVITIES_LOG_LEVEL": "WARNING",
    })
    return env


class Serve:
    """One `activities serve` process of release 1.0 (`old_tree`) or of this release (None)."""

    def __init__(self, name: str, env: dict[str, str], roles: str, root: Path, old_tree: Path | None = None) -> None:
        self.name = name
        self.data_dir = Path(env["ACTIVITIES_DATA_DIR"])
        self.env = dict(env)
        self.roles = roles
        self.log_path = root / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        if old_tree is not None:
            # the old tree first on the path, and run from it: nothing of this release's tree is importable
            # before it (the venv's editable install comes after PYTHONPATH)
            self.env["PYTHONPATH"] = str(old_tree)
            self.argv = [PYTHON, "-c", "import sys; from services.cli import main; sys.exit(main())", "serve"]
            self.cwd = old_tree
        else:
            self.argv = [ACTIVITIES, "serve"]
            self.cwd = root

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "endpoints.json").unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.argv, "--role", self.roles], env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until it writes endpoints.json (once every role of it serves)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while not (self.data_dir / "endpoints.json").exists():
            assert self.process.poll() is None, f"{self.name} exited with {self.process.returncode}"
            assert time.monotonic() < deadline, f"{self.name} did not write endpoints.json in {timeout_s:g} s"
            time.sleep(0.05)

    def terminate(self, timeout_s: float = 30) -> int:
        """SIGTERM and wait: its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            text = []
        return f"----- {self.name} ({' '.join(self.argv[:1])} ... --role {self.roles}): last lines -----\n" + "\n".join(
            text[-lines:]
        )


# ---------------------------------------------------------------------------------------------
# Requests and checks
# ---------------------------------------------------------------------------------------------


class Api:
    """Commands and queries over NATS request/reply under one subject prefix."""

    def __init__(self, nc: NatsClient, prefix: str, bearer: str) -> None:
        self.nc = nc
        self.prefix = prefix
        self.headers = {"Authorization": f"Bearer {bearer}"}

    async def send(self, kind: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        message = await self.nc.request(
            f"{self.prefix}.{kind}.{name}", orjson.dumps(body), headers=self.headers, timeout=REQUEST_TIMEOUT_S
        )
        reply: dict[str, Any] = orjson.loads(message.data)
        return reply

    async def ok(self, kind: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = await self.send(kind, name, body)
        assert "data" in reply, f"{self.prefix}.{kind}.{name} {body} answered {reply}"
        return reply


async def until_new_release_serves(api: Api, name: str, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A command with a schema 2 field, sent until the new release serves it: 1.0 refuses the field it
    does not know (`validation_error` naming it) when NATS gives it the request. The reply, and how
    many times 1.0 refused it."""
    for refused in range(40):
        reply = await api.send("cmd", name, body)
        if "data" in reply:
            return reply, refused
        assert reply["error"]["code"] == "validation_error" and "remind_at" in orjson.dumps(reply).decode(), reply
    raise AssertionError(f"no {name} with remind_at was served by the new release in 40 tries")


async def background_traffic(api: Api, ids: list[str], stop: asyncio.Event) -> tuple[int, int, float]:
    """Gets and patches until `stop`, each of which must succeed: (reads, writes, slowest read in s)."""
    reads = writes = 0
    slowest = 0.0
    while not stop.is_set():
        target = ids[(reads + writes) % len(ids)]
        began = time.monotonic()
        got = await api.ok("query", "get", {"id": target})
        slowest = max(slowest, time.monotonic() - began)
        assert got["data"]["id"] == target
        reads += 1
        if reads % 3 == 0:
            await api.ok("cmd", "patch", {"id": target, "changes": {"description": f"during the upgrade {reads}"}})
            writes += 1
        await asyncio.sleep(0.02)
    return reads, writes, slowest


async def list_all(api: Api, filters: dict[str, Any]) -> list[dict[str, Any]]:
    """Every page of a list (deleted activities included)."""
    listed: list[dict[str, Any]] = []
    cursor = None
    while True:
        body: dict[str, Any] = {**filters, "limit": 200, "include_deleted": True}
        if cursor:
            body["cursor"] = cursor
        page = await api.ok("query", "list", body)
        listed += page["data"]
        cursor = page["meta"]["next_cursor"]
        if not cursor:
            return listed


def query(database_url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        return list(conn.execute(statement, params).fetchall())


def latest_versions(database_url: str) -> dict[str, int]:
    """The store's latest version of every activity, by `act_` id."""
    from events.activity import activity_id_of

    rows = query(
        database_url,
        "SELECT originator_id, max(originator_version) FROM activities_events GROUP BY originator_id",
    )
    return {activity_id_of(originator_id): int(version) for originator_id, version in rows}


def stored_class_version(database_url: str, activity_id: str, version: int) -> int:
    """The class version of a stored event (eventsourcing stores it in the state when above 1)."""
    from events.activity import activity_uuid

    rows = query(
        database_url,
        "SELECT coalesce((convert_from(state, 'UTF8')::jsonb->>'class_version')::int, 1) FROM activities_events "
        "WHERE originator_id = %s AND originator_version = %s",
        (activity_uuid(activity_id), version),
    )
    assert len(rows) == 1
    return int(rows[0][0])


def assert_schema_2(document: dict[str, Any]) -> None:
    assert document["schema_version"] == SCHEMA_VERSION, document
    missing = set(SCHEMA_2_DEFAULTS) - set(document)
    assert not missing, f"{document['id']} lacks the schema 2 fields {sorted(missing)}"


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s:g} s"
        await asyncio.sleep(0.1)


async def stream_messages(nc: NatsClient, stream: str) -> list[tuple[str, str]]:
    """(subject, Nats-Msg-Id) of every message of the stream, in stream order."""
    js = nc.jetstream()
    info = await js.stream_info(stream)
    messages = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        message = await js.get_msg(stream, seq)
        messages.append((message.subject, (message.headers or {}).get("Nats-Msg-Id", "")))
    return messages


# ---------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------


async def test_rolling_upgrade_from_release_1_0_with_both_releases_serving(
    servers: Any, make_database: Callable[[], str], tmp_path: Path
) -> None:
    started = time.monotonic()
    old_tree = extract_old_release(tmp_path / "release-1.0")
    database_url = make_database()
    unique = uuid.uuid4().hex[:10]
    prefix, old_only_prefix = f"t{unique}.activities", f"t{unique}.old"
    stream = f"T{unique.upper()}_ACTIVITIES"

    def env(prefix_: str, name: str) -> dict[str, str]:
        return base_env(database_url, servers.nats_url, prefix_, stream, tmp_path / f"data-{name}")

    # the old process imports release 1.0's code, not this tree's
    probe_env = {**env(prefix, "probe"), "PYTHONPATH": str(old_tree)}
    probe = subprocess.run(
        [PYTHON, "-c", "import services, events, projections; print(services.__file__, events.__file__, "
         "projections.__file__)"],
        env=probe_env, cwd=old_tree, capture_output=True, text=True, timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    for path in probe.stdout.split():
        assert Path(path).resolve().is_relative_to(old_tree.resolve()), f"the old process imports {path}"

    old = Serve("old-1.0", env(prefix, "old"), "commands,projector,relay,http", tmp_path, old_tree)
    old_q = Serve("old-1.0-commands-q", env(old_only_prefix, "old-q"), "commands", tmp_path, old_tree)
    new = Serve("new", env(prefix, "new"), "commands,projector,relay,http", tmp_path)
    processes = [old, old_q, new]
    nc = await nats.connect(servers.nats_url)
    timings: dict[str, float] = {}
    rng = random.Random(unique)
    try:
        api = Api(nc, prefix, mint_token(SECRET, "acme", "usr-1"))
        old_api = Api(nc, old_only_prefix, mint_token(SECRET, "acme", "usr-1"))

        # a. release 1.0 alone
        old.start()
        old.wait_ready()
        ids: list[str] = []
        for i in range(20):
            reply = await api.ok("cmd", "create", {
                "account_id": f"acc_{i % 4}", "type": "call", "subject": f"old {i}",
                "activity_date": f"2026-11-{i % 28 + 1:02d}T09:00:00Z",
            })
            assert reply["data"]["schema_version"] == 1, "release 1.0 writes schema 1 documents"
            ids.append(reply["data"]["id"])
        for activity_id in ids[:8]:
            await api.ok("cmd", "patch", {"id": activity_id, "changes": {"status": "done", "tags": ["1.0"]}})
        timings["a. 1.0 alone"] = time.monotonic() - started

        # b. the new release beside it: its start migrates the read model while 1.0 serves it, under
        # traffic (reads and patches that either release may serve; none may fail or stall)
        phase = time.monotonic()
        traffic = asyncio.create_task(background_traffic(api, ids[:20], stop := asyncio.Event()))
        new.start()
        old_q.start()
        await asyncio.to_thread(new.wait_ready)
        await asyncio.to_thread(old_q.wait_ready)
        await asyncio.sleep(0.5)  # some of the traffic reaches the new release too
        stop.set()
        reads, writes, slowest_read = await asyncio.wait_for(traffic, 30)
        assert reads and writes
        assert slowest_read < 5.0, f"a read took {slowest_read:.1f} s while the new release started and migrated"
        applied = query(
            database_url, "SELECT version FROM activities_read_model_migrations WHERE tbl = 'activities' ORDER BY 1"
        )
        versions = [version for (version,) in applied]
        assert versions == [m.version for m in MIGRATIONS] and versions[:3] == [1, 2, 3], versions
        assert old.process is not None and old.process.poll() is None, "release 1.0 stopped while the new one started"
        timings["b. new release started (migrated) beside 1.0"] = time.monotonic() - phase
        timings["slowest read during b"] = slowest_read

        # c. mixed commands on the shared prefix, served by either release; reads too
        phase = time.monotonic()
        served_by_old = served_by_new = refused_by_old = 0
        deleted: set[str] = set()
        positions: list[int] = []
        for n in range(60):
            if n == 30:
                # 1.0 restarted mid-rollout (a crash, a redeploy): its projector and relay hand over to the
                # new release's standbys, and its start runs 1.0's schema statements on the migrated table
                restart = time.monotonic()
                assert old.terminate() == 0, f"{old.name} did not exit cleanly"
                old.start()
                await asyncio.to_thread(old.wait_ready)
                timings["c. 1.0 restarted mid-rollout"] = time.monotonic() - restart
            action = rng.choice(["create", "patch", "patch", "remind", "delete", "restore", "get", "list"])
            if action == "create":
                reply = await api.ok("cmd", "create", {"deal_id": f"deal_{n % 3}", "type": "note", "subject": f"c{n}"})
                ids.append(reply["data"]["id"])
                if reply["data"]["schema_version"] == 1:
                    served_by_old += 1
                else:
                    assert_schema_2(reply["data"])
                    served_by_new += 1
            elif action == "patch":
                target = rng.choice([i for i in ids if i not in deleted])
                reply = await api.ok("cmd", "patch", {"id": target, "changes": {"subject": f"patched {n}"}})
            elif action == "remind":  # a schema 2 field: 1.0 refuses it (unknown field), the new release takes it
                target = rng.choice([i for i in ids if i not in deleted])
                value = f"2027-02-{n % 28 + 1:02d}T10:00:00Z"
                reply, refused = await until_new_release_serves(
                    api, "patch", {"id": target, "changes": {"remind_at": value}}
                )
                refused_by_old += refused
                assert reply["data"]["remind_at"] == value
                assert_schema_2(reply["data"])
            elif action == "delete":
                target = rng.choice([i for i in ids if i not in deleted])
                reply = await api.ok("cmd", "delete", {"id": target})
                assert reply["data"]["is_deleted"] is True
                deleted.add(target)
            elif action == "restore" and deleted:
                target = rng.choice(sorted(deleted))
                reply = await api.ok("cmd", "restore", {"id": target})
                assert reply["data"]["is_deleted"] is False
                deleted.discard(target)
            elif action == "get":
                target = rng.choice(ids)
                got = await api.ok("query", "get", {"id": target, "include_deleted": True,
                                                    "min_position": max(positions, default=0)})
                assert got["data"]["id"] == target
                continue
            else:
                page = await api.ok("query", "list", {"limit": 200, "include_deleted": True})
                assert {d["id"] for d in page["data"]} <= set(ids)
                continue
            if "meta" in reply and "position" in reply["meta"]:
                positions.append(reply["meta"]["position"])

        # an activity the new release creates with remind_at...
        remind_at = "2027-01-15T08:30:00Z"
        reply, refused = await until_new_release_serves(
            api, "create", {"account_id": "acc_r", "type": "task", "subject": "remind me", "remind_at": remind_at}
        )
        refused_by_old += refused
        reminded = reply["data"]
        assert_schema_2(reminded)
        assert reminded["remind_at"] == remind_at
        ids.append(reminded["id"])

        # release 1.0 (deterministically: its own prefix) patches it, keeping what it does not know
        patched = await old_api.ok("cmd", "patch", {"id": reminded["id"], "changes": {"subject": "patched by 1.0"}})
        assert patched["data"]["version"] == reminded["version"] + 1
        assert patched["data"]["remind_at"] == remind_at and patched["data"]["schema_version"] == SCHEMA_VERSION
        assert stored_class_version(database_url, reminded["id"], patched["data"]["version"]) == 1, (
            "the patch on the old prefix was not stored by 1.0's code (ActivityPatched at class version 1)"
        )
        deleted_by_old = await old_api.ok("cmd", "delete", {"id": reminded["id"]})
        restored_by_old = await old_api.ok("cmd", "restore", {"id": reminded["id"]})
        assert deleted_by_old["data"]["remind_at"] == restored_by_old["data"]["remind_at"] == remind_at
        # an activity 1.0 wrote in schema 1, patched by whichever release NATS picks
        written_by_old = next(i for i in ids[:20] if i not in deleted)
        await api.ok("cmd", "patch", {"id": written_by_old, "changes": {"priority": "high"}})
        timings["c. mixed traffic on both releases"] = time.monotonic() - phase

        # d. release 1.0 stops; the new projector and relay take over
        phase = time.monotonic()
        for process in (old, old_q):
            assert process.terminate() == 0, f"{process.name} did not exit cleanly"
        # only the new release serves now: schema 2 fields are taken at once, old activities patched;
        # the new projector and relay (standbys until now) must carry these too
        for i in range(3):
            reply = await api.ok("cmd", "create", {"contact_id": f"con_{i}", "type": "email", "remind_at": remind_at})
            assert reply["data"]["remind_at"] == remind_at
            assert_schema_2(reply["data"])
            ids.append(reply["data"]["id"])
        for activity_id in [i for i in ids[:20] if i not in deleted][-3:]:
            reply = await api.ok("cmd", "patch", {"id": activity_id, "changes": {"remind_at": remind_at}})
            assert_schema_2(reply["data"])
        timings["d. 1.0 stopped, new release alone"] = time.monotonic() - phase

        # e. the read model, the documents served and the stream, all complete and current
        phase = time.monotonic()
        latest = latest_versions(database_url)
        assert set(latest) == set(ids)
        head = query(database_url, "SELECT max(notification_id) FROM activities_events")[0][0]

        def projected() -> bool:
            tracked = query(database_url, "SELECT max(notification_id) FROM activities_projection_tracking")[0][0]
            return tracked is not None and tracked >= head

        await wait_until(projected, "the new projector did not bring the read model to the log's head", 30)
        # the read model at the log's head (served by the new release: 1.0 no longer answers)
        got = await api.ok("query", "get", {"id": reminded["id"], "include_deleted": True, "min_position": head})
        assert got["data"]["remind_at"] == remind_at and got["data"]["subject"] == "patched by 1.0"
        assert got["data"]["version"] == restored_by_old["data"]["version"]
        assert_schema_2(got["data"])
        rows = dict(query(database_url, "SELECT id, version FROM activities"))
        assert rows == latest, "the read model is not at the store's latest version of every activity"
        for activity_id, version in latest.items():
            document = (await api.ok("query", "get", {"id": activity_id, "include_deleted": True}))["data"]
            assert document["version"] == version
            assert_schema_2(document)
        listed = await list_all(api, {})
        assert {d["id"]: d["version"] for d in listed} == latest
        for document in listed:
            assert_schema_2(document)
        # the filter columns migrations derive from the document are right on rows 1.0's projector wrote,
        # during and after the migration (descriptions written by the traffic of b; a priority in c)
        for filters, matches in (
            ({"q": "upgrade"}, lambda d: "upgrade" in (d["description"] or "")),
            ({"priority": "high"}, lambda d: d["priority"] == "high"),
            ({"account_id": "acc_1"}, lambda d: d["account_id"] == "acc_1"),
        ):
            expected = {d["id"] for d in listed if matches(d)}
            assert expected, filters
            assert {d["id"] for d in await list_all(api, filters)} == expected, filters

        # the stream: every stored event exactly once, per activity in version order
        events = query(database_url, "SELECT count(*) FROM activities_events")[0][0]

        def relayed() -> bool:
            count = query(database_url, "SELECT max(position) FROM activities_relay_tracking")[0][0]
            return count is not None and count >= head

        await wait_until(relayed, "the new relay did not publish up to the log's head", 30)
        messages = await stream_messages(nc, stream)
        msg_ids = [msg_id for _, msg_id in messages]
        assert len(messages) == events, f"{len(messages)} messages on the stream for {events} stored events"
        assert len(set(msg_ids)) == len(msg_ids), "an event was published twice"
        seen: dict[str, list[int]] = {}
        for msg_id in msg_ids:
            activity_id, version = msg_id.rsplit(":", 1)
            seen.setdefault(activity_id, []).append(int(version))
        assert seen == {a: list(range(1, v + 1)) for a, v in latest.items()}
        timings["e. checks"] = time.monotonic() - phase
        assert new.process is not None and new.process.poll() is None
        assert new.terminate() == 0
        for process in processes:
            logged = process.log_path.read_text(errors="replace")
            assert "Traceback" not in logged and not ERROR_LINE.search(logged), process.tail()
        print(
            f"rolling upgrade: {len(latest)} activities, {events} events; 1.0 served {served_by_old} of the "
            f"mixed creates, the new release {served_by_new}; 1.0 refused {refused_by_old} remind_at command(s); "
            f"{reads} reads and {writes} patches while the new release started; "
            + ", ".join(f"{k}: {v:.1f} s" for k, v in timings.items())
            + f"; total {time.monotonic() - started:.1f} s"
        )
    except BaseException:
        for process in processes:
            print(process.tail(), file=sys.stderr)
        raise
    finally:
        await nc.close()
        for process in processes:
            try:
                if process.process is not None and process.process.poll() is None:
                    process.terminate(10)
            except subprocess.TimeoutExpired:
                pass
            finally:
                process.kill()
