"""`cmd.upsert`, `PUT` and `GET /api/v1/crm/activities/by-key/{external_key}` (docs/contract.md
section 8) on real NATS and PostgreSQL: create, update, no-op, gone, version conflicts, the key's
scope (tenant and app), and racing upserts of a new key (one activity, the others updates), also
between two command processes where the key table's primary key decides the race."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import psycopg
import pytest_asyncio
from eventsourcing.persistence import StoredEvent

from events.activity import activity_uuid
from events.commands import parse_create, parse_upsert
from services.application import CommandBatcher, CommandRequest, CommandResult, CommandService
from services.bootstrap import Runtime
from services.domain import Caller
from tests.conftest import Requester

BASE = "/api/v1/crm/activities"
EVENTS = "activities_events"
KEYS = "activities_external_keys"


@pytest_asyncio.fixture
async def http(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=runtime.endpoints["http_url"], timeout=10) as client:
        yield client


def events_of(database_url: str, activity_id: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {EVENTS} WHERE originator_id = %s", (activity_uuid(activity_id),)
        ).fetchone()
    assert row is not None
    return int(row[0])


def all_events(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {EVENTS}").fetchone()
    assert row is not None
    return int(row[0])


async def test_create_update_noop_and_gone(request_command: Requester, runtime: Runtime) -> None:
    url = runtime.settings.database_url
    created = await request_command(
        "upsert", {"external_key": "hubspot:42", "activity": {"account_id": "acc_1", "subject": "Call", "tags": ["a"]}}
    )
    document = created["data"]
    assert created["meta"]["created"] is True
    assert document["external_key"] == "hubspot:42" and document["version"] == 1 and document["subject"] == "Call"
    updated = await request_command(
        "upsert", {"external_key": "hubspot:42", "activity": {"subject": None, "status": "done"}}
    )
    assert updated["meta"]["created"] is False
    assert updated["data"]["id"] == document["id"] and updated["data"]["version"] == 2
    assert updated["data"]["subject"] is None and updated["data"]["tags"] == ["a"]  # a merge patch
    assert updated["data"]["external_key"] == "hubspot:42"
    noop = await request_command("upsert", {"external_key": "hubspot:42", "activity": {"status": "done"}})
    assert noop["meta"] == {"position": updated["meta"]["position"], "created": False}
    assert noop["data"]["version"] == 2 and events_of(url, document["id"]) == 2
    conflict = await request_command(
        "upsert", {"external_key": "hubspot:42", "activity": {"status": "x"}, "expected_version": 1}
    )
    assert conflict["error"]["code"] == "version_conflict" and conflict["error"]["current_version"] == 2
    matched = await request_command(
        "upsert", {"external_key": "hubspot:42", "activity": {"status": "x"}, "expected_version": 2}
    )
    assert matched["data"]["version"] == 3
    await request_command("delete", {"id": document["id"]})
    gone = await request_command("upsert", {"external_key": "hubspot:42", "activity": {"status": "y"}})
    assert gone["error"]["code"] == "gone" and events_of(url, document["id"]) == 4
    await request_command("restore", {"id": document["id"]})
    back = await request_command("upsert", {"external_key": "hubspot:42", "activity": {"status": "y"}})
    assert back["meta"]["created"] is False and back["data"]["version"] == 6
    # the key was found through the event store's key table: a new key with expected_version has nothing to match
    fresh = await request_command(
        "upsert", {"external_key": "new-key", "activity": {"account_id": "a"}, "expected_version": 1}
    )
    assert fresh["error"]["code"] == "version_conflict" and fresh["error"]["current_version"] == 0


async def test_bad_upserts_change_nothing(request_command: Requester, runtime: Runtime) -> None:
    for body, field in (
        ({"external_key": "", "activity": {"account_id": "a"}}, "external_key"),
        ({"external_key": "k" * 201, "activity": {"account_id": "a"}}, "external_key"),
        ({"external_key": "tab\there", "activity": {"account_id": "a"}}, "external_key"),
        ({"external_key": 7, "activity": {"account_id": "a"}}, "external_key"),
        ({"external_key": "k", "activity": ["account_id"]}, "activity"),
        ({"external_key": "k", "activity": {"account_id": "a", "external_key": "other"}}, "external_key"),
        ({"external_key": "k", "activity": {"account_id": "a", "colour": "red"}}, "colour"),
        ({"external_key": "k", "activity": {"subject": "no link"}}, "account_id"),  # the create rules
        ({"external_key": "k", "activity": {"account_id": "a"}, "id": "x"}, "id"),
    ):
        reply = await request_command("upsert", body)
        assert reply["error"]["code"] == "validation_error", body
        assert reply["error"]["details"][0]["field"] == field, reply
    assert all_events(runtime.settings.database_url) == 0


async def test_keys_are_scoped_to_tenant_and_app(
    request_command: Requester, token: Callable[..., str], http: httpx.AsyncClient
) -> None:
    body = {"external_key": "same", "activity": {"account_id": "acc_1"}}
    replies = [
        await request_command("upsert", body, bearer=bearer)
        for bearer in (token(app="app1"), token(app="app2"), token(), token(tenant="other"), token(app="app1"))
    ]
    assert [r["meta"]["created"] for r in replies] == [True, True, True, True, False]
    ids = [r["data"]["id"] for r in replies]
    assert len(set(ids[:4])) == 4 and ids[4] == ids[0]
    assert [r["data"]["app_id"] for r in replies[:3]] == ["app1", "app2", None]
    # get-by-key finds the caller's own (NATS and HTTP)
    for bearer, expected in ((token(app="app2"), ids[1]), (token(), ids[2]), (token(tenant="other"), ids[3])):
        found = await request_command(
            "get_by_key", {"external_key": "same", "min_position": replies[3]["meta"]["position"]},
            bearer=bearer, kind="query",
        )  # fmt: skip
        assert found["data"]["id"] == expected
        response = await http.get(
            BASE + "/by-key/same", params={"min_position": replies[3]["meta"]["position"]},
            headers={"Authorization": f"Bearer {bearer}"},
        )  # fmt: skip
        assert response.status_code == 200 and response.json()["data"]["id"] == expected
        assert response.headers["etag"] == '"1"'
    missing = await request_command("get_by_key", {"external_key": "none"}, bearer=token(app="app1"), kind="query")
    assert missing["error"]["code"] == "not_found"
    response = await http.get(BASE + "/by-key/same", headers={"Authorization": f"Bearer {token(app='app3')}"})
    assert response.status_code == 404


async def test_http_upsert_and_get_by_key(http: httpx.AsyncClient, token: Callable[..., str]) -> None:
    headers = {"Authorization": f"Bearer {token()}"}
    key = "erp/orders/7 #1"  # slashes, spaces and a hash, escaped in the path
    path = BASE + "/by-key/erp%2Forders%2F7%20%231"
    created = await http.put(path, json={"account_id": "acc_1", "subject": "Order"}, headers=headers)
    assert created.status_code == 201 and created.json()["meta"]["created"] is True
    assert created.json()["data"]["external_key"] == key and created.headers["etag"] == '"1"'
    position = created.json()["meta"]["position"]
    updated = await http.put(path, json={"subject": "Order 7"}, headers=headers)
    assert updated.status_code == 200 and updated.json()["meta"]["created"] is False
    stale = await http.put(path, json={"subject": "stale"}, headers={**headers, "If-Match": '"1"'})
    assert stale.status_code == 412 and stale.json()["error"]["current_version"] == 2
    fetched = await http.get(path, params={"min_position": position + 1}, headers=headers)
    assert fetched.status_code == 200 and fetched.json()["data"]["subject"] == "Order 7"
    invalid = await http.put(path, json={"external_key": "x"}, headers=headers)
    assert invalid.status_code == 422
    activity_id = created.json()["data"]["id"]
    deleted = await http.delete(f"{BASE}/{activity_id}", headers=headers)
    assert deleted.status_code == 200
    gone = await http.put(path, json={"subject": "again"}, headers=headers)
    assert gone.status_code == 410
    read = await http.get(path, params={"min_position": deleted.json()["meta"]["position"]}, headers=headers)
    assert read.status_code == 410
    read = await http.get(path, params={"include_deleted": "true"}, headers=headers)
    assert read.status_code == 200 and read.json()["data"]["is_deleted"] is True
    assert (await http.put(path, json={"subject": "x"})).status_code == 401


async def test_racing_upserts_over_nats_make_one_activity(request_command: Requester, runtime: Runtime) -> None:
    replies = await asyncio.gather(
        *(
            request_command("upsert", {"external_key": "race", "activity": {"account_id": "acc_1", "notes": f"n{i}"}})
            for i in range(40)
        )
    )
    assert sum(r["meta"]["created"] for r in replies) == 1
    assert len({r["data"]["id"] for r in replies}) == 1
    assert events_of(runtime.settings.database_url, replies[0]["data"]["id"]) == 40


CALLER = Caller("acme", "usr-1")


def upsert(key: str, **fields: Any) -> CommandRequest:
    return CommandRequest(parse_upsert({"external_key": key, "activity": {"account_id": "acc_1", **fields}}), CALLER)


def key_rows(service: CommandService) -> list[tuple[Any, ...]]:
    datastore = service.app.activities_recorder.datastore
    with datastore.get_connection() as conn, conn.cursor() as cursor:
        cursor.execute(f"SELECT tenant_id, app_id, external_key, originator_id FROM {KEYS}")
        return [tuple(row.values()) for row in cursor.fetchall()]


def test_a_lost_race_on_a_new_key_becomes_an_update(make_service: Callable[[], CommandService]) -> None:
    """Another command process creates the key between this one's read of the key table and its
    append: the append fails on the key table's primary key, and the upsert runs again as an update
    of the other process's activity (the batch's unrelated create is saved at its first retry)."""

    async def scenario() -> None:
        ours, theirs = make_service(), make_service()
        try:
            original = ours.store.append
            theirs_first: list[CommandResult] = []

            async def append(stored: Sequence[StoredEvent], keys: Any, external_keys: Any = ()) -> list[int]:
                if external_keys and not theirs_first:
                    (outcome,) = await theirs.execute([upsert("k-race", subject="theirs")])
                    assert isinstance(outcome, CommandResult)
                    theirs_first.append(outcome)
                return await original(stored, keys, external_keys)

            ours.store.append = append  # type: ignore[method-assign]
            create = CommandRequest(parse_create({"account_id": "acc_2"}), CALLER)
            outcomes = await ours.execute([upsert("k-race", notes="ours"), create])
            mine, made = outcomes
            assert isinstance(mine, CommandResult) and isinstance(made, CommandResult), outcomes
            assert theirs_first[0].created is True
            assert mine.created is False and mine.document["id"] == theirs_first[0].document["id"]
            assert mine.document["version"] == 2 and mine.document["subject"] == "theirs"
            assert mine.document["notes"] == "ours"
            rows = key_rows(ours)
            assert len(rows) == 1 and rows[0][:3] == ("acme", "", "k-race")
        finally:
            await ours.close()
            await theirs.close()

    asyncio.run(scenario())


def test_many_racing_upserts_in_two_processes_make_one_activity(
    make_service: Callable[[], CommandService],
) -> None:
    """Two command processes (each its own batcher and connection) take 30 upserts of one new key
    each, all at once: one activity, one `created`, every other upsert an update (each changes
    `notes`, so each appends an event)."""

    async def scenario() -> None:
        services = [make_service(), make_service()]
        batchers = [CommandBatcher(service, max_size=8) for service in services]
        for batcher in batchers:
            batcher.start()
        try:
            outcomes = await asyncio.gather(
                *(batchers[i % 2].submit(upsert("hot-key", notes=f"n{i}")) for i in range(60))
            )
            assert all(isinstance(o, CommandResult) for o in outcomes), outcomes
            results = [o for o in outcomes if isinstance(o, CommandResult)]
            assert sum(bool(r.created) for r in results) == 1
            assert len({r.document["id"] for r in results}) == 1
            assert sorted(r.document["version"] for r in results) == list(range(1, 61))
            assert len(key_rows(services[0])) == 1
        finally:
            for batcher in batchers:
                await batcher.stop()
            for service in services:
                await service.close()

    asyncio.run(scenario())
