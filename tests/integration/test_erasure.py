"""Erasure (docs/contract.md section 11): after an erase, a marker written into every client field of
every version is found nowhere the service keeps data: no column of any table of the database (found
from the catalog), no message of the test's JetStream streams, no log line at DEBUG; with and without
encryption at rest, by id and by contact. What remains are skeletons and an `ActivityErased` event."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nats
import orjson
import psycopg
import pytest
import pytest_asyncio
from eventsourcing.cryptography import AESCipher
from nats.aio.client import Client as NatsClient
from nats.js.errors import NotFoundError
from psycopg import sql

from activities_client.document import SKELETON_FIELDS
from events.activity import activity_id_of, activity_uuid
from projections.erasure import StreamEraser
from projections.read_model import read_model_datastore, rebuild
from services.bootstrap import ROLES, Runtime
from tests.conftest import WITHOUT_SCHEDULER
from services.config import Settings
from services.logs import JsonFormatter
from tests.integration.test_upgrade import upgraded  # noqa: F401 - the fixture

nats_connect = nats.connect

Send = Callable[..., Any]


# ---------------------------------------------------------------------------------------------
# What a client writes: a marker in every client field
# ---------------------------------------------------------------------------------------------


def fields_with(marker: str, contact: str, n: int) -> dict[str, Any]:
    """Every client field that can hold text, holding the marker (`n` tells versions apart)."""
    return {
        "source": f"{marker}-source-{n}",
        "source_type": "api",
        "account_id": f"{marker}-account-{n}",
        "deal_id": f"{marker}-deal-{n}",
        "contact_id": contact,
        "contact_ids": [contact, f"{marker}-contact-{n}"],
        "activity_type": f"{marker}-activity-type-{n}",
        "subject": f"{marker} subject {n}",
        "description": f"**{marker}** description {n}",
        "status": f"{marker}-status-{n}",
        "priority": f"{marker}-priority-{n}",
        "direction": f"{marker}-direction-{n}",
        "outcome": f"{marker}-outcome-{n}",
        "actor_type": f"{marker}-actor-type-{n}",
        "performed_by_user_id": f"{marker}-performer-{n}",
        "linked_trace_id": f"{marker}-trace-{n}",
        "notes": f"{marker} notes {n}",
        "activity_date": f"2026-03-0{n}T10:00:00Z",
        "due_date": f"2026-04-0{n}T10:00:00Z",
        "occurred_at": f"2026-02-0{n}T10:00:00Z",
        "participants": [{"type": "contact", "id": contact, "name": f"{marker} person {n}"}],
        "attachment_refs": [f"s3://bucket/{marker}/{n}"],
        "recurrence": {"rrule": "FREQ=WEEKLY;COUNT=4"},
        "reminder_sent": False,
        "custom_fields": {f"{marker}-key-{n}": {"deep": [f"{marker}-value-{n}"]}},
        "tags": [f"{marker}-tag-{n}"],
        "type": "meeting",
        "owner_id": "usr-" + str(uuid.uuid4()),
        "remind_at": f"2026-03-0{n}T09:00:00Z",
    }


async def write_versions(send: Send, marker: str, contact: str, key_prefix: str) -> str:
    """Create (with an Idempotency-Key), patch three times (one keyed), delete and restore; the id."""
    created = await send("create", fields_with(marker, contact, 1), key=f"{key_prefix}-create")
    assert "data" in created, created
    activity_id = str(created["data"]["id"])
    for n in (2, 3):
        changes = {k: v for k, v in fields_with(marker, contact, n).items() if k not in ("owner_id",)}
        patched = await send("patch", {"id": activity_id, "changes": changes}, key=f"{key_prefix}-patch-{n}")
        assert patched["data"]["version"] == n, patched
    patched = await send("patch", {"id": activity_id, "changes": {"notes": f"{marker} last words", "tags": None}})
    assert patched["data"]["version"] == 4
    await send("delete", {"id": activity_id})
    restored = await send("restore", {"id": activity_id})
    assert restored["data"]["version"] == 6
    return activity_id


# ---------------------------------------------------------------------------------------------
# Where a marker could remain
# ---------------------------------------------------------------------------------------------


def database_hits(database_url: str, marker: str, cipher: AESCipher | None = None) -> list[str]:
    """Every table of every schema of the database (from the catalog): rows whose text form holds
    the marker, and bytea values holding it as bytes, also once decrypted with `cipher`."""
    needle = marker.encode()
    hits: list[str] = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg_toast%%' ORDER BY 1, 2"
        ).fetchall()
        assert any(name == "activities_events" for _, name in tables)
        for schema, table in tables:
            ident = sql.Identifier(schema, table)
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {} AS t WHERE t::text LIKE %s").format(ident), (f"%{marker}%",)
            ).fetchone()
            if row and row[0]:
                hits.append(f"{schema}.{table}: {row[0]} row(s) as text")
            columns = conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND atttypid = 'bytea'::regtype "
                "AND attnum > 0 AND NOT attisdropped",
                (f'"{schema}"."{table}"',),
            ).fetchall()
            for (column,) in columns:
                values = conn.execute(sql.SQL("SELECT {} FROM {}").format(sql.Identifier(column), ident)).fetchall()
                for (value,) in values:
                    if value is None:
                        continue
                    data = bytes(value)
                    if needle in data:
                        hits.append(f"{schema}.{table}.{column}: bytes")
                    if cipher is not None:
                        try:
                            plain = cipher.decrypt(data)
                        except Exception:  # not encrypted with this key
                            continue
                        if needle in plain:
                            hits.append(f"{schema}.{table}.{column}: decrypted")
    return hits


async def stream_hits(nc: NatsClient, subject_prefix: str, marker: str) -> tuple[int, list[str]]:
    """(messages read, hits) over every message of every JetStream stream whose subjects are the
    test runtime's (its prefix), headers and bodies."""
    js = nc.jetstream()
    needle = marker.encode()
    hits: list[str] = []
    read = 0
    names: list[str] = []
    while True:  # every stream over the runtime's subjects (the server pages the list)
        request = orjson.dumps({"subject": f"{subject_prefix}.>", "offset": len(names)})
        page = orjson.loads((await nc.request("$JS.API.STREAM.NAMES", request, timeout=5)).data)
        names += page.get("streams") or []
        if not page.get("streams") or len(names) >= page["total"]:
            break
    assert names, "the runtime's streams"
    for name in names:
        info = await js.stream_info(name)
        for seq in range(info.state.first_seq or 1, (info.state.last_seq or 0) + 1):
            try:
                message = await js.get_msg(name, seq=seq)
            except NotFoundError:
                continue
            read += 1
            if needle in (message.data or b"") or needle in orjson.dumps(message.headers or {}):
                hits.append(f"{name}#{seq}")
    return read, hits


def nats_files_holding(directory: Any, marker: str) -> list[str]:
    """The files of an embedded nats-server's JetStream store holding the marker's bytes."""
    files = [path for path in (directory / "jetstream").rglob("*") if path.is_file()]
    assert files
    return [str(path) for path in files if marker.encode() in path.read_bytes()]


class Captured(logging.Handler):
    """Every log record of the process at DEBUG, formatted as the service formats them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        self.names.append(record.name)

    def service_lines(self) -> list[str]:
        """The lines of the service and its libraries: all but those of the test's own HTTP client
        (httpx logs each request's URL, query included, in the process that sends it)."""
        return [
            line
            for line, name in zip(self.lines, self.names, strict=True)
            if not name.startswith(("httpx", "httpcore"))
        ]


@pytest.fixture
def debug_logs() -> Iterator[Captured]:
    root = logging.getLogger()
    handler = Captured()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# ---------------------------------------------------------------------------------------------
# The service under test
# ---------------------------------------------------------------------------------------------


class Service:
    """A runtime, a NATS client sending commands and queries as one tenant, and HTTP."""

    def __init__(self, runtime: Runtime, nc: NatsClient, token: str) -> None:
        self.runtime = runtime
        self.nc = nc
        self.token = token
        self.settings = runtime.settings
        assert runtime.servers is not None
        self.database_url = runtime.servers.database_url
        self.http = httpx.AsyncClient(base_url=str(runtime.endpoints["http_url"]), timeout=10)

    async def send(
        self, name: str, body: Any, *, key: str | None = None, kind: str = "cmd", bearer: str | None = None
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {bearer or self.token}"}
        if key is not None:
            headers["Idempotency-Key"] = key
        subject = f"{self.settings.subject_prefix}.{kind}.{name}"
        message = await self.nc.request(subject, orjson.dumps(body), headers=headers, timeout=30)
        reply: dict[str, Any] = orjson.loads(message.data)
        return reply

    async def get(self, path: str, **params: Any) -> httpx.Response:
        return await self.http.get(
            "/api/v1/crm/activities" + path, params=params, headers={"Authorization": f"Bearer {self.token}"}
        )

    async def settled(self, timeout: float = 20.0) -> None:
        """The read model and the relay have the whole log, and no erasure has messages left."""
        deadline = time.monotonic() + timeout
        while True:
            with psycopg.connect(self.database_url) as conn:
                head = conn.execute("SELECT coalesce(max(notification_id), 0) FROM activities_events").fetchone()
                projected = conn.execute(
                    "SELECT coalesce(max(notification_id), 0) FROM activities_projection_tracking"
                ).fetchone()
                relayed = conn.execute("SELECT coalesce(max(position), 0) FROM activities_relay_tracking").fetchone()
                pending = conn.execute("SELECT count(*) FROM activities_erasures WHERE pending").fetchone()
            assert head and projected and relayed and pending
            if projected[0] >= head[0] and relayed[0] >= head[0] and pending[0] == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not settled: head {head} projected {projected} relayed {relayed} {pending}")
            await asyncio.sleep(0.1)


@pytest_asyncio.fixture
async def make_service(
    make_settings: Callable[..., Settings], nc: NatsClient, token: Callable[..., str]
) -> AsyncIterator[Callable[..., Any]]:
    runtimes: list[Service] = []

    async def make(**overrides: Any) -> Service:
        # the scheduler only where retention is on: the markers' remind_at and due_date are past, and
        # its firings would add versions the tests count
        roles = ROLES if overrides.get("purge_deleted_after_days") else WITHOUT_SCHEDULER
        runtime = Runtime(make_settings(**overrides), roles)
        await runtime.start()
        for component in runtime.components:  # sweep the streams at once in tests
            if isinstance(component, StreamEraser):
                component.interval_s = 0.1
        service = Service(runtime, nc, token())
        runtimes.append(service)
        return service

    yield make
    for service in runtimes:
        await service.http.aclose()
        await service.runtime.stop()


def marker() -> str:
    return "MRK" + uuid.uuid4().hex[:16].upper()


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_erase_by_id_leaves_the_marker_nowhere(
    make_service: Callable[..., Any], nc: NatsClient, debug_logs: Captured, encrypted: bool, servers: Any
) -> None:
    key = AESCipher.create_key(32) if encrypted else None
    service = await make_service(cipher_key=key)
    cipher = AESCipher(_cipher_env(key)) if key else None
    mark = marker()
    contact = f"{mark}-primary-contact"
    activity_id = await write_versions(service.send, mark, contact, f"k-{uuid.uuid4().hex}")
    kept = await write_versions(service.send, "KEEP" + mark[3:], "keep-contact", f"k-{uuid.uuid4().hex}")
    # reads and a failed command carrying the marker, so their log lines are scanned too
    assert (await service.get("", q=mark, contact_id=contact)).status_code == 200
    bad = await service.send("patch", {"id": activity_id, "changes": {"type": mark, "custom_fields": mark}})
    assert bad["error"]["code"] == "validation_error"
    await service.settled()
    assert database_hits(service.database_url, mark, cipher), "the scan finds the marker before the erasure"
    read, before = await stream_hits(nc, service.settings.subject_prefix, mark)
    assert before and read >= 12
    if servers.nats is not None:
        assert nats_files_holding(servers.nats.directory, mark), "the file scan finds the marker before"

    erased = await service.send("erase", {"id": activity_id}, key=f"erase-{uuid.uuid4().hex}")
    assert erased["data"] == {"erased": 1} and erased["meta"]["position"] > 0
    await service.settled()

    assert database_hits(service.database_url, mark, cipher) == []
    read, hits = await stream_hits(nc, service.settings.subject_prefix, mark)
    assert hits == [] and read > 0
    if servers.nats is not None:  # the embedded server's files: secure deletes overwrote the messages
        assert nats_files_holding(servers.nats.directory, mark) == []
    assert not [line for line in debug_logs.service_lines() if mark in line]
    assert any("activities." in line for line in debug_logs.lines)  # the capture did see the service's logs
    # the other activity is untouched
    assert database_hits(service.database_url, "KEEP" + mark[3:], cipher)
    other = await service.get(f"/{kept}")
    assert other.status_code == 200 and other.json()["data"]["notes"] == f"KEEP{mark[3:]} last words"


async def test_erased_activity_reads_gone_and_keeps_skeleton_events(
    make_service: Callable[..., Any], token: Callable[..., str]
) -> None:
    service = await make_service()
    mark = marker()
    activity_id = await write_versions(service.send, mark, f"{mark}-c", f"k-{uuid.uuid4().hex}")
    create_key = f"k-{uuid.uuid4().hex}"
    second = await service.send("create", {"account_id": f"{mark}-a", "subject": mark}, key=create_key)
    erase = await service.http.post(
        f"/api/v1/crm/activities/{activity_id}/erase", headers={"Authorization": f"Bearer {service.token}"}
    )
    assert erase.status_code == 200 and erase.json()["data"] == {"erased": 1}
    position = erase.json()["meta"]["position"]

    for params in ({}, {"include_deleted": "true"}, {"version": "2"}, {"version": "7"}):
        reply = await service.get(f"/{activity_id}", min_position=position, **params)
        assert reply.status_code == 410 and reply.json()["error"]["code"] == "gone", (params, reply.json())
    nats_get = await service.send("get", {"id": activity_id, "min_position": position}, kind="query")
    assert nats_get["error"]["code"] == "gone"
    listed = await service.get("", include_deleted="true", min_position=position)
    assert activity_id not in [a["id"] for a in listed.json()["data"]]
    for name, body in (
        ("patch", {"id": activity_id, "changes": {"subject": "again"}}),
        ("delete", {"id": activity_id}),
        ("restore", {"id": activity_id}),
    ):
        assert (await service.send(name, body))["error"]["code"] == "gone", name
    again = await service.send("erase", {"id": activity_id})
    assert again["data"] == {"erased": 0} and again["meta"]["position"] == position  # a no-op

    # bad input: a clear error, nothing written
    count = _events(service.database_url)
    for body in ({}, {"id": activity_id, "contact_id": "c"}, {"id": "act_nope"}, {"contact_id": ""}, {"x": 1}):
        reply = await service.send("erase", body)
        assert reply["error"]["code"] == "validation_error" and reply["error"]["details"], (body, reply)
    unknown = "act_" + "0" * 26
    assert (await service.send("erase", {"id": unknown}))["error"]["code"] == "not_found"
    stranger = await service.send("erase", {"id": second["data"]["id"]}, bearer=token(tenant="globex"))
    assert stranger["error"]["code"] == "not_found"
    assert _events(service.database_url) == count

    history = await service.get(f"/{activity_id}/events")
    events = history.json()["data"]
    assert [e["version"] for e in events] == list(range(1, 8))
    assert [e["event_type"] for e in events][-1] == "ActivityErased"
    for event in events:
        assert set(event["activity"]) == set(SKELETON_FIELDS), event
        assert event["changes"] == {} and event["activity"]["is_erased"] is True
        assert event["activity"]["version"] == event["version"] and event["activity"]["id"] == activity_id
    assert [e["position"] for e in events] == sorted(e["position"] for e in events)

    # the other activity's key still replays; a key of the erased one is `gone`, and writes nothing
    replay = await service.send("create", {"account_id": f"{mark}-a", "subject": mark}, key=create_key)
    assert replay == second
    # (write_versions keyed the create of the erased activity with its own prefix: find that key)
    with psycopg.connect(service.database_url) as conn:
        keys = conn.execute("SELECT key, fingerprint FROM activities_idempotency ORDER BY key").fetchall()
    erased_keys = [k for k, f in keys if f == "erased"]
    assert len(erased_keys) == 3
    count = _events(service.database_url)
    retried = await service.send("create", fields_with(mark, f"{mark}-c", 1), key=erased_keys[0])
    assert retried["error"]["code"] == "gone" and _events(service.database_url) == count


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_erase_by_contact_and_rebuild(
    make_service: Callable[..., Any], nc: NatsClient, token: Callable[..., str], debug_logs: Captured, encrypted: bool
) -> None:
    key = AESCipher.create_key(16) if encrypted else None
    cipher = AESCipher(_cipher_env(key)) if key else None
    service = await make_service(cipher_key=key)
    mark = marker()
    contact = f"contact-{uuid.uuid4().hex}"  # (not the marker: a kept activity names it as a user)
    ids = [await write_versions(service.send, mark, contact, f"k-{uuid.uuid4().hex}") for _ in range(2)]
    # named only as a participant; only in contact_ids; deleted; and one naming another contact
    as_participant = await service.send(
        "create", {"account_id": "a", "subject": mark, "participants": [{"type": "contact", "id": contact}]}
    )
    in_list = await service.send("create", {"deal_id": "d", "notes": mark, "contact_ids": ["x", contact]})
    deleted = await service.send("create", {"contact_id": contact, "subject": mark})
    await service.send("delete", {"id": deleted["data"]["id"]})
    user_named = await service.send(
        "create", {"account_id": "a", "subject": "kept", "participants": [{"type": "user", "id": contact}]}
    )
    other = await service.send("create", {"contact_id": "someone-else", "subject": "kept"})
    foreign_token = token(tenant="globex")
    foreign = await service.send("create", {"contact_id": contact, "subject": "kept"}, bearer=foreign_token)
    await service.settled()
    assert database_hits(service.database_url, mark, cipher), "the scan finds the marker before the erasure"

    erase = await service.http.post(
        "/api/v1/crm/activities/erase",
        json={"contact_id": contact},
        headers={"Authorization": f"Bearer {service.token}"},
    )
    assert erase.status_code == 200, erase.text
    assert erase.json()["data"] == {"erased": 5}, erase.json()
    await service.settled()
    assert database_hits(service.database_url, mark, cipher) == []
    assert (await stream_hits(nc, service.settings.subject_prefix, mark))[1] == []
    assert not [line for line in debug_logs.service_lines() if mark in line or contact in line]
    for activity_id in [*ids, as_participant["data"]["id"], in_list["data"]["id"], deleted["data"]["id"]]:
        assert (await service.get(f"/{activity_id}", include_deleted="true")).status_code == 410
    for kept in (user_named, other):
        assert (await service.get(f"/{kept['data']['id']}")).status_code == 200
    foreign_read = await service.send("get", {"id": foreign["data"]["id"]}, kind="query", bearer=foreign_token)
    assert foreign_read["data"]["contact_id"] == contact  # another tenant's: not the caller's to erase
    again = await service.send("erase", {"contact_id": contact})
    assert again["data"] == {"erased": 0}

    # a rebuild of the read model gives the same rows, skeletons included
    before = _rows(service.database_url)
    datastore = read_model_datastore(service.database_url)
    try:
        assert service.runtime.app is not None
        await asyncio.to_thread(rebuild, service.runtime.app, datastore)
    finally:
        datastore.close()
    after = _rows(service.database_url)
    assert after == before
    skeletons = [row for row in after if row[2]]
    assert len(skeletons) == 5 and all(set(row[1]) == set(SKELETON_FIELDS) for row in skeletons)


async def test_relay_and_projector_keep_running_through_erasures(
    make_service: Callable[..., Any], nc: NatsClient
) -> None:
    """Erasures between writes, an erasure of an activity the relay has not published yet, and
    writes after: the relay and the projector never fail, and the stream stays in log order."""
    service = await make_service()
    relay = next(c for c in service.runtime.components if getattr(c, "handler", None).__class__.__name__ == "Relay")
    projector = next(
        c for c in service.runtime.components if getattr(c, "handler", None).__class__.__name__ == "Projector"
    )
    mark = marker()
    ids = []
    for i in range(20):
        created = await service.send("create", {"account_id": f"{mark}-{i}", "subject": mark})
        ids.append(created["data"]["id"])
        if i % 3 == 0:
            assert (await service.send("erase", {"id": ids[i // 2]}))["data"]["erased"] in (0, 1)
    await service.settled()
    assert relay.failures == 0 and projector.failures == 0
    js = nc.jetstream()
    info = await js.stream_info(service.settings.stream_name)
    positions, kinds, bodies = [], [], []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            message = await js.get_msg(service.settings.stream_name, seq=seq)
        except NotFoundError:
            continue
        bodies.append(orjson.loads(message.data))
        positions.append(bodies[-1]["position"])
        kinds.append((message.headers or {}).get("Event-Type"))
    assert positions == sorted(positions)
    with psycopg.connect(service.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM activities_erasures").fetchone()
    assert row is not None and row[0] >= 4
    # every ActivityErased stays on the stream; the erased activities' content is gone from it (their
    # events published after the erasure, if the relay had not got to them, are skeletons and stay)
    assert kinds.count("ActivityErased") == row[0] and kinds.count("ActivityLogged") >= 20 - row[0]
    with psycopg.connect(service.database_url) as conn:
        erased = {activity_id_of(r[0]) for r in conn.execute("SELECT activity_id FROM activities_erasures")}
    assert erased and all(body["activity"]["is_erased"] for body in bodies if body["activity_id"] in erased)
    assert sum(mark in orjson.dumps(body).decode() for body in bodies) == 20 - len(erased)


def _cipher_env(key: str | None) -> Any:
    from eventsourcing.utils import Environment

    return Environment("", {"CIPHER_KEY": key or ""})


def _events(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM activities_events").fetchone()
    assert row is not None
    return int(row[0])


def _rows(database_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return list(conn.execute("SELECT id, document, is_erased, version, position FROM activities ORDER BY id"))



async def test_erasing_release_1_0_data(upgraded: Runtime, servers: Any) -> None:  # noqa: F811
    """Activities, events (class version 1), keys and stream messages written by release 1.0: erased
    by the new release, nothing but skeletons remains, and the stream keeps only ActivityErased
    (the relay remembered the messages 1.0 had published when it first started)."""
    from tests.integration.test_upgrade import MANIFEST, bearer_for, request

    assert upgraded.servers is not None
    prefix = upgraded.settings.subject_prefix
    database_url = upgraded.servers.database_url
    eraser = next(c for c in upgraded.components if isinstance(c, StreamEraser))
    eraser.interval_s = 0.1
    nc = await nats_connect(servers.nats_url)
    try:
        for activity_id, expected in MANIFEST["activities"].items():
            bearer = bearer_for(expected["tenant_id"], expected["app_id"])
            reply = await request(nc, f"{prefix}.cmd.erase", {"id": activity_id}, bearer)
            assert reply["data"] == {"erased": 1}, reply
        total = MANIFEST["events_in_store"] + len(MANIFEST["activities"])
        js = nc.jetstream()
        deadline = time.monotonic() + 20
        while True:
            with psycopg.connect(database_url) as conn:
                row = conn.execute("SELECT count(*) FROM activities_erasures WHERE pending").fetchone()
            info = await js.stream_info(upgraded.settings.stream_name)
            if row == (0,) and info.state.last_seq >= total:
                break
            assert time.monotonic() < deadline, (row, info.state)
            await asyncio.sleep(0.1)
        kinds = []
        for seq in range(1, info.state.last_seq + 1):
            with contextlib.suppress(NotFoundError):
                kinds.append((await js.get_msg(upgraded.settings.stream_name, seq=seq)).headers["Event-Type"])
        assert kinds == ["ActivityErased"] * len(MANIFEST["activities"])
    finally:
        await nc.drain()
    assert upgraded.app is not None
    with psycopg.connect(database_url) as conn:
        states = conn.execute("SELECT topic, state FROM activities_events ORDER BY notification_id").fetchall()
        fingerprints = {row[0] for row in conn.execute("SELECT fingerprint FROM activities_idempotency")}
    assert len(states) == total
    for topic, state in states:
        document = orjson.loads(bytes(state))["document"]
        assert set(document) == set(SKELETON_FIELDS) and document["is_erased"] is True, (topic, document)
    assert fingerprints == {"erased"}


async def test_retention_erases_activities_deleted_longer_ago(make_service: Callable[..., Any]) -> None:
    from services.retention import RetentionSweep

    service = await make_service(purge_deleted_after_days=1.0)
    sweep = next(c for c in service.runtime.components if isinstance(c, RetentionSweep))
    old = await service.send("create", {"account_id": "a", "subject": "old"})
    await service.send("delete", {"id": old["data"]["id"]})
    restored = await service.send("create", {"account_id": "a", "subject": "restored"})
    await service.send("delete", {"id": restored["data"]["id"]})
    recent = await service.send("create", {"account_id": "a", "subject": "recent"})
    recent_deleted = await service.send("delete", {"id": recent["data"]["id"]})
    live = await service.send("create", {"account_id": "a", "subject": "live"})
    await service.settled()
    with psycopg.connect(service.database_url) as conn:  # two deleted two days ago (as the read model says)
        conn.execute(
            "UPDATE activities SET updated_at = now() - interval '2 days' WHERE id = ANY(%s)",
            ([old["data"]["id"], restored["data"]["id"]],),
        )
    await service.send("restore", {"id": restored["data"]["id"]})  # restored since: not erased
    await service.settled()
    # the event store says when it was deleted: let the sweep's clock run two days ahead
    sweep._clock = lambda: datetime.now(UTC) + timedelta(days=2)
    with psycopg.connect(service.database_url) as conn:
        conn.execute(
            "UPDATE activities SET updated_at = now() + interval '3 days' WHERE id = %s", (recent["data"]["id"],)
        )
    assert await sweep.sweep() == 1
    await service.settled()
    assert (await service.get(f"/{old['data']['id']}", include_deleted="true")).status_code == 410
    assert (await service.get(f"/{restored['data']['id']}")).status_code == 200
    assert (await service.get(f"/{live['data']['id']}")).status_code == 200
    reply = await service.get(f"/{recent['data']['id']}", include_deleted="true")
    assert reply.status_code == 200 and reply.json()["data"]["version"] == recent_deleted["data"]["version"]
    history = (await service.get(f"/{old['data']['id']}/events")).json()["data"]
    assert history[-1]["event_type"] == "ActivityErased" and history[-1]["actor"] == "system"
    assert await sweep.sweep() == 0  # erased ones are not found again


async def test_another_command_process_never_serves_a_cached_erased_activity(
    make_settings: Callable[..., Settings], nc: NatsClient, token: Callable[..., str]
) -> None:
    """Two command processes on one store: the one that cached the activity learns of its erasure
    from the log (its cache is brought up to date on every use), so it answers `gone`."""
    settings = make_settings()
    first, second = Runtime(settings, WITHOUT_SCHEDULER), Runtime(settings, roles=("http",))
    await first.start()
    await second.start()
    try:
        one = Service(first, nc, token())
        created = await one.send("create", {"account_id": "a", "subject": "cached"})
        activity_id = created["data"]["id"]
        assert (await one.send("patch", {"id": activity_id, "changes": {"notes": "x"}}))["data"]["version"] == 2
        assert second.command_service is not None and first.command_service is not None
        assert first.command_service.app.activity_cache.get(activity_uuid(activity_id)) is not None
        headers = {"Authorization": f"Bearer {one.token}"}
        async with httpx.AsyncClient(base_url=str(second.endpoints["http_url"])) as http:
            erased = await http.post(f"/api/v1/crm/activities/{activity_id}/erase", headers=headers)
        assert erased.json()["data"] == {"erased": 1}
        reply = await one.send("patch", {"id": activity_id, "changes": {"notes": "y"}})  # served by `first`
        assert reply["error"]["code"] == "gone"
        cached = first.command_service.app.activity_cache.get(activity_uuid(activity_id))
        assert cached is not None and set(cached.document) == set(SKELETON_FIELDS)
        await one.http.aclose()
    finally:
        await second.stop()
        await first.stop()


async def test_stream_cleanup_survives_a_restart(make_service: Callable[..., Any], nc: NatsClient) -> None:
    """The erasure is recorded with the erase; its messages are deleted by whichever process runs the
    relay role next, however the process that erased went away (and the relay's memory of what it
    published survives too: forgotten rows are found again by scanning the stream's tail)."""
    service = await make_service()
    eraser = next(c for c in service.runtime.components if isinstance(c, StreamEraser))
    await eraser.stop()  # as if the process died right after the erase's reply
    mark = marker()
    activity_id = await write_versions(service.send, mark, "c-restart", f"k-{uuid.uuid4().hex}")
    head = 0
    while head < 6:  # the relay has published them
        with psycopg.connect(service.database_url) as conn:
            row = conn.execute("SELECT coalesce(max(position), 0) FROM activities_relay_tracking").fetchone()
        head = row[0] if row else 0
        await asyncio.sleep(0.05)
    assert (await service.send("erase", {"id": activity_id}))["data"] == {"erased": 1}
    await asyncio.sleep(0.5)
    assert (await stream_hits(nc, service.settings.subject_prefix, mark))[1]  # not deleted yet
    await service.runtime.stop()
    with psycopg.connect(service.database_url, autocommit=True) as conn:  # as if never recorded (a crash)
        conn.execute("DELETE FROM activities_published")
        conn.execute("DELETE FROM activities_published_scan")

    again = Runtime(service.settings, WITHOUT_SCHEDULER)
    await again.start()
    try:
        for component in again.components:
            if isinstance(component, StreamEraser):
                component.interval_s = 0.1
        restarted = Service(again, nc, service.token)
        scanned = None
        while scanned is None:  # the new relay has scanned the stream's tail it had no record of
            with psycopg.connect(service.database_url) as conn:
                scanned = conn.execute("SELECT through_seq FROM activities_published_scan").fetchone()
            await asyncio.sleep(0.05)
        await restarted.settled()
        read, hits = await stream_hits(nc, service.settings.subject_prefix, mark)
        assert hits == [] and read == 1  # only the ActivityErased message remains
        assert database_hits(service.database_url, mark) == []
        await restarted.http.aclose()
    finally:
        await again.stop()
        service.runtime = Runtime(service.settings, WITHOUT_SCHEDULER)  # the fixture's stop of a never-started runtime is harmless


async def test_client_and_cli_erase(
    runtime: Runtime, token: Callable[..., str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from activities_client import AsyncClient, Client, Gone
    from services.cli import main as cli_main

    kwargs = {
        "nats_url": runtime.endpoints["nats_url"],
        "subject_prefix": runtime.settings.subject_prefix,
        "stream_name": runtime.settings.stream_name,
    }
    bearer = token(tenant="erase-client")
    async with AsyncClient(token=bearer, **kwargs) as client:
        activities = client.customer.activities
        one = await activities.create(account_id="a", subject="one")
        assert await activities.erase(one.id) == 1
        assert await activities.erase(one.id) == 0
        with pytest.raises(Gone):
            await activities.get(one.id)
        for _ in range(3):
            await activities.create(contact_id="c-client", subject="x")
        assert await activities.erase(contact_id="c-client") == 3
        with pytest.raises(TypeError):
            await activities.erase()
        two = await activities.create(account_id="a", subject="two")
        three = await activities.create(contact_id="c-cli", subject="three")

    def blocking() -> int:
        with Client(token=bearer, **kwargs) as sync_client:
            return sync_client.customer.activities.erase(two.id)

    assert await asyncio.to_thread(blocking) == 1
    monkeypatch.setenv("ACTIVITIES_SUBJECT_PREFIX", runtime.settings.subject_prefix)
    monkeypatch.setenv("ACTIVITIES_STREAM_NAME", runtime.settings.stream_name)
    connection = ["--nats-url", runtime.endpoints["nats_url"], "--token", bearer]
    code = await asyncio.to_thread(cli_main, ["erase", "--contact-id", "c-cli", *connection])
    assert code == 0 and capsys.readouterr().out.strip() == "erased 1 activity"
    code = await asyncio.to_thread(cli_main, ["erase", three.id, "--json", *connection])
    assert code == 0 and orjson.loads(capsys.readouterr().out) == {"erased": 0}
    code = await asyncio.to_thread(cli_main, ["erase", *connection])
    assert code != 0


async def test_erasure_deletes_the_activitys_results_from_the_results_stream(
    make_service: Callable[..., Any], nc: NatsClient, token: Callable[..., str]
) -> None:
    """An inbox command's result carries the document: the results stream is cleaned with the events."""
    service = await make_service()
    mark = marker()
    js = nc.jetstream()
    key = f"inbox-{uuid.uuid4().hex}"
    headers = {"Authorization": f"Bearer {token()}", "Idempotency-Key": key, "Nats-Msg-Id": key}
    body = orjson.dumps({"account_id": f"{mark}-account", "subject": mark, "notes": f"{mark} notes"})
    await js.publish(f"{service.settings.subject_prefix}.inbox.create", body, headers=headers)
    deadline = time.monotonic() + 30
    while True:  # the inbox carries it out and publishes its result
        _, hits = await stream_hits(nc, service.settings.subject_prefix, mark)
        results = [hit for hit in hits if "_RESULTS#" in hit]
        if results or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert results, hits
    name, seq = results[0].split("#")
    result = orjson.loads((await js.get_msg(name, seq=int(seq))).data)
    activity_id = result["data"]["id"]

    erased = await service.send("erase", {"id": activity_id})
    assert erased["data"] == {"erased": 1}
    await service.settled()
    deadline = time.monotonic() + 30
    while (hits := (await stream_hits(nc, service.settings.subject_prefix, mark))[1]) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)  # the stream cleanup runs every 0.1 s in these tests
    assert hits == []
    assert database_hits(service.database_url, mark) == []


async def test_erasure_forgets_the_upsert_key(make_service: Callable[..., Any]) -> None:
    """An upsert's external key was the client's: erased with its activity (the key table too), after
    which the key names nothing and an upsert under it creates a new activity."""
    service = await make_service()
    mark = marker()
    key = f"{mark}-crm-key"
    created = await service.send("upsert", {"external_key": key, "activity": {"account_id": "acc_1", "subject": mark}})
    assert created["meta"]["created"] is True, created
    await service.settled()
    assert database_hits(service.database_url, mark)
    erased = await service.send("erase", {"id": created["data"]["id"]})
    assert erased["data"] == {"erased": 1}
    await service.settled()
    assert database_hits(service.database_url, mark) == []
    again = await service.send("upsert", {"external_key": key, "activity": {"account_id": "acc_2"}})
    assert again["meta"]["created"] is True and again["data"]["id"] != created["data"]["id"], again
