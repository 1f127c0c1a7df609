"""Upgrade in place, on real data of release 1.0 (tests/fixtures/release_1_0, written by that
release's own code): its events, read model, idempotency keys and stream.

The new release starts on that database and stream and, with no manual step: migrates the read
model, serves every old activity as a schema 2 document (get, list, `?version=`, history), patches
old activities, replays the old Idempotency-Keys with the original replies, and relays the events
1.0 had stored but not yet published, upcast, after the ones it had.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import psycopg
import pytest_asyncio
from nats.js.api import StreamConfig

from activities_client.document import SCHEMA_2_DEFAULTS, SCHEMA_VERSION
from projections.migrations import MIGRATIONS
from services.auth import mint_token
from services.bootstrap import Runtime
from services.config import Settings
from tests.conftest import WITHOUT_SCHEDULER

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "release_1_0"
MANIFEST: dict[str, Any] = json.loads((FIXTURE / "manifest.json").read_text())
SECRET = MANIFEST["jwt_secret"]
OLD_PREFIX = MANIFEST["subject_prefix"]
NEW_FIELDS = set(SCHEMA_2_DEFAULTS)


def token(claims_name: str) -> str:
    claims = MANIFEST["tokens_claims"][claims_name]
    return mint_token(SECRET, claims["tenant"], claims["sub"], claims["app"])


def bearer_for(tenant: str, app_id: str | None) -> str:
    return token(f"{tenant}/{app_id}" if app_id else tenant)


def without_schema_2(document: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in document.items() if name not in NEW_FIELDS | {"schema_version"}}


def load_database(admin_url: str, make_database: Callable[[], str]) -> str:
    url = make_database()
    with psycopg.connect(url, autocommit=True) as conn:  # the dump's session settings die with it
        conn.execute((FIXTURE / "database.sql").read_text())  # type: ignore[arg-type]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE activities_idempotency SET created_at = now()")  # keys within their 24 hours
    return url


@pytest_asyncio.fixture
async def upgraded(
    make_settings: Callable[..., Settings], make_database: Callable[[], str], servers: Any
) -> AsyncIterator[Runtime]:
    """Release 1.0's database and stream (its subjects under this test's prefix), then the new release."""
    settings = make_settings(database_url=load_database(servers.admin_database_url, make_database), jwt_secret=SECRET)
    nc = await nats.connect(servers.nats_url)
    js = nc.jetstream()
    prefix = settings.subject_prefix
    await js.add_stream(StreamConfig(name=settings.stream_name, subjects=[f"{prefix}.events.>"], duplicate_window=120))
    for line in (FIXTURE / "stream.jsonl").read_text().splitlines():
        message = json.loads(line)
        subject = prefix + message["subject"][len(OLD_PREFIX) :]
        ack = await js.publish(subject, message["data"].encode(), headers=message["headers"])
        assert ack.seq == message["seq"]
    service = Runtime(settings, WITHOUT_SCHEDULER)  # the scheduler on this data: tests/integration/test_scheduler.py
    await service.start()
    try:
        yield service
    finally:
        await service.stop()
        await js.delete_stream(settings.stream_name)
        await nc.drain()


async def request(nc: nats.NATS, subject: str, body: Any, bearer: str, key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {bearer}"}
    if key:
        headers["Idempotency-Key"] = key
    reply = await nc.request(subject, orjson.dumps(body), headers=headers, timeout=10)
    decoded: dict[str, Any] = orjson.loads(reply.data)
    return decoded


def assert_schema_2(document: dict[str, Any]) -> None:
    assert document["schema_version"] == SCHEMA_VERSION == 2, document
    assert {name: document[name] for name in NEW_FIELDS} == SCHEMA_2_DEFAULTS


async def test_the_new_release_serves_upgrades_and_relays_release_1_0_data(upgraded: Runtime, servers: Any) -> None:
    settings = upgraded.settings
    assert upgraded.servers is not None and upgraded.http is not None and upgraded.http.url is not None
    prefix = settings.subject_prefix
    with psycopg.connect(upgraded.servers.database_url) as conn:
        applied = conn.execute("SELECT version FROM activities_read_model_migrations ORDER BY version").fetchall()
    assert [row[0] for row in applied] == [migration.version for migration in MIGRATIONS]

    nc = await nats.connect(servers.nats_url)
    try:
        # every old activity, as its latest version, in schema 2
        for activity_id, expected in MANIFEST["activities"].items():
            bearer = bearer_for(expected["tenant_id"], expected["app_id"])
            reply = await request(nc, f"{prefix}.query.get", {"id": activity_id, "include_deleted": True}, bearer)
            document = reply["data"]
            assert (document["version"], document["is_deleted"]) == (expected["version"], expected["is_deleted"])
            assert_schema_2(document)
            first = await request(nc, f"{prefix}.query.get", {"id": activity_id, "version": 1}, bearer)
            assert first["data"]["version"] == 1
            assert_schema_2(first["data"])

        # lists of each tenant: every live activity once, all in schema 2
        for tenant in MANIFEST["tenants"]:
            live = {i for i, a in MANIFEST["activities"].items() if a["tenant_id"] == tenant and not a["is_deleted"]}
            page = await request(nc, f"{prefix}.query.list", {"limit": 200}, bearer_for(tenant, None))
            assert {document["id"] for document in page["data"]} == live
            for document in page["data"]:
                assert_schema_2(document)

        # the old Idempotency-Keys replay the original replies (as schema 2 documents) and append nothing
        for entry in MANIFEST["idempotency_keys"]:
            bearer = bearer_for(entry["tenant"], entry["app_id"])
            reply = await request(nc, f"{prefix}.cmd.{entry['command']}", entry["body"], bearer, entry["key"])
            assert without_schema_2(reply["data"]) == without_schema_2(entry["reply"]["data"])
            assert reply["meta"] == entry["reply"]["meta"]
            assert_schema_2(reply["data"])

        # an old activity patched by the new release, and its history over HTTP
        activity_id, expected = next((i, a) for i, a in MANIFEST["activities"].items() if not a["is_deleted"])
        bearer = bearer_for(expected["tenant_id"], expected["app_id"])
        patched = await request(
            nc,
            f"{prefix}.cmd.patch",
            {"id": activity_id, "expected_version": expected["version"], "changes": {"remind_at": "2030-01-01T09:00:00Z"}},
            bearer,
        )
        assert patched["data"]["version"] == expected["version"] + 1, patched
        assert patched["data"]["remind_at"] == "2030-01-01T09:00:00Z" and patched["data"]["schema_version"] == 2
        async with httpx.AsyncClient(base_url=upgraded.http.url, timeout=10) as http:
            history = (
                await http.get(
                    f"/api/v1/crm/activities/{activity_id}/events",
                    params={"min_position": patched["meta"]["position"]},
                    headers={"Authorization": f"Bearer {bearer}"},
                )
            ).json()["data"]
        assert [event["version"] for event in history] == list(range(1, expected["version"] + 2))
        for event in history:
            assert event["schema_version"] == 2 and event["activity"]["schema_version"] == 2
        # setting remind_at re-arms the reminder (contract section 9): reminder_sent back to false if it was set
        rearmed = {"reminder_sent": False} if history[-2]["activity"]["reminder_sent"] else {}
        assert history[-1]["changes"] == {"remind_at": "2030-01-01T09:00:00Z", **rearmed}

        # the relay: 1.0 had published 65 of its 70 events; the rest follow, upcast, then the patch
        js = nc.jetstream()
        total = MANIFEST["events_in_store"] + 1
        info = await js.stream_info(settings.stream_name)
        for _ in range(100):
            if info.state.last_seq >= total:
                break
            await asyncio.sleep(0.1)
            info = await js.stream_info(settings.stream_name)
        assert info.state.messages == total and info.state.last_seq == total
        seen: dict[str, list[int]] = {}
        for sequence in range(1, total + 1):
            message = await js.get_msg(settings.stream_name, sequence)
            body = orjson.loads(message.data or b"{}")
            assert body["position"] == sequence  # the stream is the log, once and in order
            seen.setdefault(body["activity_id"], []).append(body["version"])
            if sequence > MANIFEST["events_in_stream"]:  # published by the new release
                assert body["schema_version"] == 2 and body["activity"]["schema_version"] == 2
        assert all(versions == list(range(1, len(versions) + 1)) for versions in seen.values())
    finally:
        await nc.drain()
