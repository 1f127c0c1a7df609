"""`cmd.batch` and `POST /api/v1/crm/activities/batch` (docs/contract.md section 8) against the
running service on real NATS and PostgreSQL: per-item results in order, per-item idempotency,
the limits of a batch as a whole, and its creates saved in one transaction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import psycopg
import pytest_asyncio

from events.activity import activity_uuid
from services.application import CommandBatcher, CommandService
from services.auth import TokenVerifier, mint_token
from services.bootstrap import Runtime
from services.gateway import CommandGateway
from tests.conftest import JWT_SECRET, Requester

BASE = "/api/v1/crm/activities"
EVENTS = "activities_events"


@pytest_asyncio.fixture
async def http(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=runtime.endpoints["http_url"], timeout=10) as client:
        yield client


def event_count(runtime: Runtime) -> int:
    with psycopg.connect(runtime.settings.database_url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {EVENTS}").fetchone()
    assert row is not None
    return int(row[0])


def code_of(result: dict[str, Any]) -> str:
    return str(result["error"]["code"]) if "error" in result else "ok"


async def test_mixed_items_get_their_own_results_in_order(request_command: Requester, runtime: Runtime) -> None:
    existing = (await request_command("create", {"account_id": "acc_1", "subject": "before"}))["data"]
    absent = "act_01ARZ3NDEKTSV4RRFFQ69G5FAV"
    reply = await request_command(
        "batch",
        {
            "commands": [
                {"op": "create", "account_id": "acc_2", "subject": "new"},
                {"op": "create", "subject": "no link"},  # breaks a create rule
                {"op": "patch", "id": existing["id"], "changes": {"status": "done"}},
                {"op": "patch", "id": absent, "changes": {"status": "done"}},
                {"op": "patch", "id": existing["id"], "expected_version": 1, "changes": {"subject": "x"}},
                {"op": "delete", "id": existing["id"]},
                {"op": "patch", "id": existing["id"], "changes": {"subject": "y"}},
                {"op": "restore", "id": existing["id"]},
                {"op": "upsert", "external_key": "crm-1", "activity": {"deal_id": "deal_1"}},
                {"op": "upsert", "external_key": "crm-1", "activity": {"subject": "second"}},
                "not an object",
                {"op": "erase-everything", "id": existing["id"]},
                {"op": "create", "account_id": "acc_3", "id": absent},  # a server field
            ]
        },
    )
    results = reply["data"]
    assert [code_of(r) for r in results] == [
        "ok", "validation_error", "ok", "not_found", "version_conflict", "ok", "gone", "ok", "ok", "ok",
        "validation_error", "validation_error", "validation_error",
    ]  # fmt: skip
    assert results[0]["data"]["subject"] == "new" and results[0]["data"]["version"] == 1
    assert results[1]["error"]["details"][0]["field"] == "account_id"
    assert results[2]["data"]["version"] == 2 and results[2]["data"]["status"] == "done"
    assert results[4]["error"]["current_version"] == 2
    assert results[5]["data"]["is_deleted"] is True and results[7]["data"]["is_deleted"] is False
    assert results[7]["data"]["version"] == 4
    first, second = results[8], results[9]
    assert first["meta"]["created"] is True and second["meta"]["created"] is False
    assert first["data"]["id"] == second["data"]["id"] and second["data"]["subject"] == "second"
    assert second["data"]["external_key"] == "crm-1" and second["data"]["version"] == 2
    assert results[11]["error"]["details"][0]["field"] == "op"
    assert reply["meta"]["position"] == max(r["meta"]["position"] for r in results if "data" in r)
    # 1 + the batch's 6 writes: create, patch, delete, restore, upsert create, upsert update
    assert event_count(runtime) == 7


async def test_item_idempotency_keys_replay_and_conflict(request_command: Requester, runtime: Runtime) -> None:
    items = [
        {"op": "create", "idempotency_key": "k-1", "account_id": "acc_1", "subject": "one"},
        {"op": "upsert", "idempotency_key": "k-2", "external_key": "ext-1", "activity": {"account_id": "a"}},
        {"op": "create", "account_id": "acc_1", "subject": "no key"},
    ]
    first = (await request_command("batch", {"commands": items}))["data"]
    stored = event_count(runtime)
    again = (await request_command("batch", {"commands": items}))["data"]
    assert again[0] == first[0] and again[1] == first[1]  # replayed: same document, position, created
    assert again[2]["data"]["id"] != first[2]["data"]["id"]  # no key: a second activity
    assert event_count(runtime) == stored + 1
    # a key behaves like the header: the single command with the same body replays, another body conflicts
    single = await request_command("create", {"account_id": "acc_1", "subject": "one"}, key="k-1")
    assert single == first[0]
    changed = [{**items[0], "subject": "other"}, {**items[1], "activity": {"account_id": "b"}}]
    conflicts = (await request_command("batch", {"commands": changed}))["data"]
    assert [code_of(r) for r in conflicts] == ["idempotency_conflict", "idempotency_conflict"]
    assert event_count(runtime) == stored + 1


async def test_a_batch_key_makes_a_retried_batch_replay(request_command: Requester, runtime: Runtime) -> None:
    """Items without a key of their own take the batch's Idempotency-Key and their index."""
    body = {"commands": [{"op": "create", "account_id": "acc_1", "subject": f"s{i}"} for i in range(3)]}
    first = await request_command("batch", body, key="batch-1")
    stored = event_count(runtime)
    assert await request_command("batch", body, key="batch-1") == first
    assert event_count(runtime) == stored


async def test_malformed_batches_are_one_validation_error(
    request_command: Requester, runtime: Runtime, http: httpx.AsyncClient, token: Callable[..., str]
) -> None:
    one = {"op": "create", "account_id": "acc_1"}
    for body, field in (
        ({"commands": []}, "commands"),
        ({"commands": [one] * 101}, "commands"),
        ({"commands": one}, "commands"),
        ({}, "commands"),
        ({"commands": [one], "extra": 1}, "extra"),
        ([one], "body"),
    ):
        reply = await request_command("batch", body)
        assert reply["error"]["code"] == "validation_error", body
        assert reply["error"]["details"][0]["field"] == field
    reply = await request_command("batch", None, raw=b"{not json")
    assert reply["error"]["code"] == "validation_error"
    headers = {"Authorization": f"Bearer {token()}", "Content-Type": "application/json"}
    # over 1 MiB as a whole (each item alone is within the 256 KiB limit of a command)
    big = {"commands": [{**one, "description": "x" * 200_000} for _ in range(6)]}
    response = await http.post(BASE + "/batch", content=orjson.dumps(big), headers=headers)
    assert response.status_code == 422 and response.json()["error"]["details"][0]["field"] == "body"
    # just under 1 MiB is accepted (5 such items)
    under = orjson.dumps({"commands": big["commands"][:5]})
    response = await http.post(BASE + "/batch", content=under, headers=headers)
    assert response.status_code == 200 and [code_of(r) for r in response.json()["data"]] == ["ok"] * 5
    assert event_count(runtime) == 5
    response = await http.post(BASE + "/batch", json={"commands": []}, headers=headers)
    assert response.status_code == 422
    unauthorized = await http.post(BASE + "/batch", json={"commands": [one]})
    assert unauthorized.status_code == 401 and event_count(runtime) == 5


async def test_the_creates_of_a_batch_are_one_transaction(request_command: Requester, runtime: Runtime) -> None:
    """While single creates arrive at the same time, the 100 creates of a batch are written by one
    transaction (one `xmin` on their rows), at consecutive positions."""
    body = {"commands": [{"op": "create", "account_id": "acc_1", "subject": f"b{i}"} for i in range(100)]}
    singles = [request_command("create", {"account_id": "acc_2", "subject": f"s{i}"}) for i in range(30)]
    replies = await asyncio.gather(request_command("batch", body), *singles)
    results = replies[0]["data"]
    assert [code_of(r) for r in results] == ["ok"] * 100
    positions = [r["meta"]["position"] for r in results]
    assert positions == list(range(positions[0], positions[0] + 100))
    ids = [activity_uuid(r["data"]["id"]) for r in results]
    with psycopg.connect(runtime.settings.database_url) as conn:
        transactions = conn.execute(
            f"SELECT count(DISTINCT xmin::text), count(*) FROM {EVENTS} WHERE originator_id = ANY(%s)", (ids,)
        ).fetchone()
    assert transactions == (1, 100)


async def test_http_batch_route(http: httpx.AsyncClient, token: Callable[..., str]) -> None:
    headers = {"Authorization": f"Bearer {token()}"}
    body = {
        "commands": [
            {"op": "create", "account_id": "acc_1"},
            {"op": "upsert", "external_key": "h/1", "activity": {"account_id": "acc_1"}},
            {"op": "delete", "id": "act_01ARZ3NDEKTSV4RRFFQ69G5FAV"},
        ]
    }
    response = await http.post(BASE + "/batch", json=body, headers=headers)
    assert response.status_code == 200
    results = response.json()["data"]
    assert [code_of(r) for r in results] == ["ok", "ok", "not_found"]
    assert results[1]["meta"] == {"position": results[1]["meta"]["position"], "created": True}
    spec = (await http.get("/openapi.json")).json()
    assert "post" in spec["paths"][BASE + "/batch"]
    assert {"put", "get"} <= set(spec["paths"][BASE + "/by-key/{external_key}"])


def test_a_batch_nothing_could_be_done_for_is_one_unavailable(make_service: Callable[[], CommandService]) -> None:
    """When no item could even be tried (the store did not take the batch before its deadline), the
    reply is one `unavailable`, which clients retry with the same key, not 200 with a list of them."""

    async def scenario() -> None:
        service = make_service()
        batcher = CommandBatcher(service, timeout_s=0.3)  # never started: nothing is saved in time
        gateway = CommandGateway(TokenVerifier(secret=JWT_SECRET), batcher)
        body = {"commands": [{"op": "create", "account_id": "acc_1"}, {"op": "create", "account_id": "acc_2"}]}
        bearer = f"Bearer {mint_token(JWT_SECRET, 'acme', 'usr-1')}"
        status, envelope = await gateway.handle("batch", orjson.dumps(body), bearer)
        assert status == 503 and envelope["error"]["code"] == "unavailable"
        body["commands"].append({"op": "create"})  # one item fails on its own: per-item results
        status, envelope = await gateway.handle("batch", orjson.dumps(body), bearer)
        assert status == 200
        assert [code_of(r) for r in envelope["data"]] == ["unavailable", "unavailable", "validation_error"]
        await service.close()

    asyncio.run(scenario())


async def test_a_reply_larger_than_nats_carries_is_still_one_reply(
    request_command: Requester, runtime: Runtime, http: httpx.AsyncClient, token: Callable[..., str]
) -> None:
    """Patches of five activities of 240 KB each: the NATS reply would hold 1.2 MB of documents,
    more than NATS carries; the caller gets one error saying the batch was carried out (and the
    same batch over HTTP gets every document)."""
    ids = [
        (await request_command("create", {"account_id": "acc_1", "description": "x" * 240_000}))["data"]["id"]
        for _ in range(5)
    ]
    body = {"commands": [{"op": "patch", "id": activity_id, "changes": {"status": "done"}} for activity_id in ids]}
    reply = await request_command("batch", body)
    assert reply["error"]["code"] == "internal" and "carried out" in reply["error"]["message"]
    assert event_count(runtime) == 10  # the five creates and the five patches
    body = {"commands": [{"op": "patch", "id": activity_id, "changes": {"status": "closed"}} for activity_id in ids]}
    response = await http.post(BASE + "/batch", json=body, headers={"Authorization": f"Bearer {token()}"})
    assert response.status_code == 200 and [r["data"]["version"] for r in response.json()["data"]] == [3] * 5
