"""Stats (docs/contract.md section 5, `/stats` and `crm.activities.query.stats`) against the running
service: the replies over HTTP and NATS, validation errors, tenant and app scoping, min_position,
the client (async and blocking) and the CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import pytest_asyncio

from activities_client import AsyncClient, Client, Count, RetryPolicy, Unavailable, ValidationError
from services.bootstrap import Runtime
from services.cli import main as cli_main

BASE = "/api/v1/crm/activities"
STATS = BASE + "/stats"
Send = Callable[..., Any]
OWNER_1 = "usr-00000000-0000-4000-8000-000000000001"
OWNER_2 = "usr-00000000-0000-4000-8000-000000000002"


@pytest_asyncio.fixture
async def http(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=runtime.endpoints["http_url"], timeout=10) as client:
        yield client


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def seed(send: Send, bearer: str) -> int:
    """Six activities: 3 calls (2 open), 2 emails, 1 untyped; one call deleted. The last position."""
    bodies: list[dict[str, Any]] = [
        {"type": "call", "status": "open", "owner_id": OWNER_1, "priority": "high", "outcome": "won"},
        {"type": "call", "status": "open", "owner_id": OWNER_1, "priority": "high"},
        {"type": "call", "status": "done", "owner_id": OWNER_2, "priority": "low", "outcome": "lost"},
        {"type": "email", "status": "done", "owner_id": OWNER_2},
        {"type": "email", "owner_id": OWNER_2, "outcome": "won"},
        {"status": "open"},
    ]
    for body in bodies:
        reply = await send("create", {"account_id": "acc_1", **body}, bearer=bearer)
        assert "data" in reply, reply
    deleted = await send("create", {"account_id": "acc_2", "type": "call", "status": "open"}, bearer=bearer)
    reply = await send("delete", {"id": deleted["data"]["id"]}, bearer=bearer)
    return int(reply["meta"]["position"])


async def test_stats_over_http_and_nats(
    http: httpx.AsyncClient, request_command: Send, token: Callable[..., str]
) -> None:
    bearer = token(tenant="stats-http")
    position = await seed(request_command, bearer)

    response = await http.get(STATS, params={"group_by": "type", "min_position": position}, headers=auth(bearer))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["data"] == [
        {"key": "call", "count": 3},
        {"key": "email", "count": 2},
        {"key": None, "count": 1},
    ]
    assert body["meta"]["position"] >= position and set(body["meta"]) == {"position"}

    over_nats = await request_command(
        "stats", {"group_by": "type", "min_position": position}, bearer=bearer, kind="query"
    )
    assert over_nats["data"] == body["data"]

    # the deleted call counts with include_deleted; ties by key, null last
    response = await http.get(STATS, params={"group_by": "status", "include_deleted": "true"}, headers=auth(bearer))
    assert response.json()["data"] == [
        {"key": "open", "count": 4},
        {"key": "done", "count": 2},
        {"key": None, "count": 1},
    ]

    # any list filter, repeatable ones repeated
    response = await http.get(
        STATS,
        params=[("group_by", "owner_id"), ("type", "call"), ("type", "email"), ("status", "done")],
        headers=auth(bearer),
    )
    assert response.json()["data"] == [{"key": OWNER_2, "count": 2}]
    nats_reply = await request_command(
        "stats", {"group_by": "owner_id", "type": ["call", "email"], "status": "done"}, bearer=bearer, kind="query"
    )
    assert nats_reply["data"] == [{"key": OWNER_2, "count": 2}]

    # priority and outcome
    priority = await request_command("stats", {"group_by": "priority"}, bearer=bearer, kind="query")
    assert priority["data"] == [{"key": None, "count": 3}, {"key": "high", "count": 2}, {"key": "low", "count": 1}]
    outcome = await request_command("stats", {"group_by": "outcome", "type": ["call"]}, bearer=bearer, kind="query")
    assert outcome["data"] == [{"key": "lost", "count": 1}, {"key": "won", "count": 1}, {"key": None, "count": 1}]

    # nothing matches: an empty list
    empty = await http.get(STATS, params={"group_by": "type", "account_id": "nobody"}, headers=auth(bearer))
    assert empty.status_code == 200 and empty.json()["data"] == []


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "group_by"),
        ({"type": "call"}, "group_by"),
        ({"group_by": "subject"}, "group_by"),
        ({"group_by": "type", "sort": "-activity_date"}, "sort"),
        ({"group_by": "type", "limit": "10"}, "limit"),
        ({"group_by": "type", "cursor": "abc"}, "cursor"),
        ({"group_by": "type", "colour": "red"}, "colour"),
        ({"group_by": "type", "activity_date_from": "yesterday"}, "activity_date_from"),
    ],
)
async def test_stats_validation_errors(
    http: httpx.AsyncClient, request_command: Send, token: Callable[..., str], params: dict[str, str], field: str
) -> None:
    bearer = token()
    response = await http.get(STATS, params=params, headers=auth(bearer))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error" and error["details"][0]["field"] == field, error
    over_nats = await request_command("stats", params, bearer=bearer, kind="query")
    assert over_nats["error"]["code"] == "validation_error"
    assert over_nats["error"]["details"][0]["field"] == field


async def test_stats_needs_a_token(http: httpx.AsyncClient, request_command: Send) -> None:
    response = await http.get(STATS, params={"group_by": "type"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"


async def test_stats_are_scoped_to_tenant_and_app(
    http: httpx.AsyncClient, request_command: Send, token: Callable[..., str]
) -> None:
    tenant, app = "stats-scope", "crm_app"
    user, integration = token(tenant=tenant), token(tenant=tenant, app=app)
    await request_command("create", {"account_id": "acc_1", "type": "call"}, bearer=user)
    await request_command("create", {"account_id": "acc_1", "type": "call"}, bearer=integration)
    reply = await request_command("create", {"account_id": "acc_1", "type": "note"}, bearer=integration)
    other = await request_command("create", {"account_id": "acc_1", "type": "call"}, bearer=token(tenant="stats-other"))
    position = max(reply["meta"]["position"], other["meta"]["position"])

    query = {"group_by": "type", "min_position": position}
    as_user = await request_command("stats", query, bearer=user, kind="query")
    assert as_user["data"] == [{"key": "call", "count": 2}, {"key": "note", "count": 1}]
    as_app = await request_command("stats", query, bearer=integration, kind="query")
    assert as_app["data"] == [{"key": "call", "count": 1}, {"key": "note", "count": 1}]
    over_http = await http.get(STATS, params=query, headers=auth(integration))
    assert over_http.json()["data"] == as_app["data"]
    stranger = await http.get(STATS, params=query, headers=auth(token(tenant="stats-nobody")))
    assert stranger.status_code == 200 and stranger.json()["data"] == []


async def test_stats_wait_for_min_position(
    http: httpx.AsyncClient, request_command: Send, token: Callable[..., str]
) -> None:
    bearer = token(tenant="stats-wait")
    for _ in range(3):
        reply = await request_command("create", {"account_id": "acc_1", "type": "task"}, bearer=bearer)
        counted = await request_command(
            "stats", {"group_by": "type", "min_position": reply["meta"]["position"]}, bearer=bearer, kind="query"
        )
        assert counted["meta"]["position"] >= reply["meta"]["position"]
    assert counted["data"] == [{"key": "task", "count": 3}]
    beyond = await http.get(STATS, params={"group_by": "type", "min_position": 10**12}, headers=auth(bearer))
    assert beyond.status_code == 503 and beyond.json()["error"]["code"] == "unavailable"


async def test_openapi_documents_stats(http: httpx.AsyncClient) -> None:
    spec = (await http.get("/openapi.json")).json()
    operation = spec["paths"][STATS]["get"]
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert parameters["group_by"]["required"] is True
    assert parameters["group_by"]["schema"]["enum"] == ["type", "status", "owner_id", "priority", "outcome"]
    assert {"type", "tag", "account_id", "include_deleted", "min_position"} <= set(parameters)
    assert not {"sort", "limit", "cursor"} & set(parameters)
    assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/StatsReply")


async def test_client_stats_reads_its_own_writes(runtime: Runtime, token: Callable[..., str]) -> None:
    kwargs = {"subject_prefix": runtime.settings.subject_prefix, "stream_name": runtime.settings.stream_name}
    bearer = token(tenant="stats-client")
    for http_url in (None, runtime.endpoints["http_url"]):
        async with AsyncClient(nats_url=runtime.endpoints["nats_url"], token=bearer, http_url=http_url, **kwargs) as c:
            activities = c.customer.activities
            await activities.create(account_id="acc_1", type="meeting", owner_id=OWNER_1)
            counts = await activities.stats("type", owner_id=OWNER_1)
            assert all(isinstance(count, Count) for count in counts)
            expected = 1 if http_url is None else 2
            assert counts == [Count(key="meeting", count=expected)]
            assert await activities.stats("owner_id", type=["call"]) == []
            with pytest.raises(ValidationError) as error:
                await activities.stats("colour")
            assert error.value.details[0]["field"] == "group_by"

    def blocking() -> list[Count]:
        with Client(nats_url=runtime.endpoints["nats_url"], token=bearer, **kwargs) as client:
            client.customer.activities.create(account_id="acc_1", type="note")
            return client.customer.activities.stats("type", include_deleted=True)

    counts = await asyncio.get_running_loop().run_in_executor(None, blocking)
    assert counts == [Count(key="meeting", count=2), Count(key="note", count=1)]


async def test_client_stats_unavailable_beyond_the_wait(runtime: Runtime, token: Callable[..., str]) -> None:
    kwargs = {"subject_prefix": runtime.settings.subject_prefix, "stream_name": runtime.settings.stream_name}
    one_try = RetryPolicy(attempts=1)  # each try waits the service's whole read wait first
    async with AsyncClient(nats_url=runtime.endpoints["nats_url"], token=token(), retry=one_try, **kwargs) as client:
        client.position = 10**12
        with pytest.raises(Unavailable):
            await client.customer.activities.stats("type")


async def test_cli_stats_prints_a_table(
    runtime: Runtime,
    request_command: Send,
    token: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bearer = token(tenant="stats-cli")
    position = await seed(request_command, bearer)
    await request_command("stats", {"group_by": "type", "min_position": position}, bearer=bearer, kind="query")
    monkeypatch.setenv("ACTIVITIES_SUBJECT_PREFIX", runtime.settings.subject_prefix)
    monkeypatch.setenv("ACTIVITIES_STREAM_NAME", runtime.settings.stream_name)
    connection = ["--nats-url", runtime.endpoints["nats_url"], "--token", bearer]
    loop = asyncio.get_running_loop()

    code = await loop.run_in_executor(
        None, cli_main, ["stats", "--group-by", "owner_id", "--type", "call", *connection]
    )
    out = capsys.readouterr().out.splitlines()
    assert code == 0, out
    assert out[0].split() == ["OWNER_ID", "COUNT"]
    assert out[2].split() == [OWNER_1, "2"] and out[3].split() == [OWNER_2, "1"]
    assert out[-1] == "3 activities"

    argv = ["stats", "--group-by", "outcome", "--priority", "high", "--type", "call", "--type", "note", *connection]
    code = await loop.run_in_executor(None, cli_main, argv)
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and [line.split() for line in out[2:4]] == [["won", "1"], ["-", "1"]], out

    code = await loop.run_in_executor(None, cli_main, ["stats", "--group-by", "type", "--json", *connection])
    printed = capsys.readouterr().out
    assert code == 0
    assert json.loads(printed) == [
        {"key": "call", "count": 3},
        {"key": "email", "count": 2},
        {"key": None, "count": 1},
    ]

    code = await loop.run_in_executor(
        None, cli_main, ["stats", "--group-by", "type", "--from", "not a date", *connection]
    )
    captured = capsys.readouterr()
    assert code == 1 and "validation_error" in captured.err and "activity_date_from" in captured.err
