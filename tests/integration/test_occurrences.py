"""Recurrence and the occurrences query (docs/contract.md section 9) against the running service: the
recurrence rules on create and patch, `/occurrences` and `crm.activities.query.occurrences` with
filters, paging, scoping, deleted activities, bad parameters, the clients and the CLI, and release
1.0 data with recurrences stored before they were checked."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nats
import psycopg
import pytest
import pytest_asyncio

from activities_client import AsyncClient, Client, OccurrencePage, ValidationError
from events.recurrence import parse_series
from services.bootstrap import Runtime
from services.cli import main as cli_main
from tests.integration.test_upgrade import bearer_for, request, upgraded  # noqa: F401

BASE = "/api/v1/crm/activities"
OCCURRENCES = BASE + "/occurrences"
Send = Callable[..., Any]
OWNER_1 = "usr-00000000-0000-4000-8000-000000000001"
OWNER_2 = "usr-00000000-0000-4000-8000-000000000002"
WINDOW = {"from": "2026-03-01T00:00:00Z", "to": "2026-04-01T00:00:00Z"}


@pytest_asyncio.fixture
async def http(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=runtime.endpoints["http_url"], timeout=10) as client:
        yield client


def client_settings(runtime: Runtime) -> dict[str, str]:
    return {"subject_prefix": runtime.settings.subject_prefix, "stream_name": runtime.settings.stream_name}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def create(send: Send, bearer: str, **fields: Any) -> dict[str, Any]:
    reply = await send("create", {"account_id": "acc_1", **fields}, bearer=bearer)
    assert "data" in reply, reply
    return reply


async def seed(send: Send, bearer: str) -> tuple[dict[str, str], int]:
    """A weekly Berlin meeting across the spring-forward switch, a daily UTC call with an exdate, one-offs
    in and out of the window, a deleted series and a series that starts after the window."""
    ids: dict[str, str] = {}
    replies = {
        "weekly": await create(
            send,
            bearer,
            type="meeting",
            owner_id=OWNER_1,
            activity_date="2026-03-02T09:00:00+01:00",
            recurrence={"rrule": "FREQ=WEEKLY;BYDAY=MO;COUNT=6", "timezone": "Europe/Berlin"},
        ),
        "daily": await create(
            send,
            bearer,
            type="call",
            owner_id=OWNER_2,
            activity_date="2026-03-30T12:00:00Z",
            recurrence={"rrule": "FREQ=DAILY", "exdates": ["2026-03-31T14:00:00+02:00"]},
        ),
        "one_off": await create(send, bearer, type="call", owner_id=OWNER_1, activity_date="2026-03-10T10:00:00Z"),
        "outside": await create(send, bearer, type="call", owner_id=OWNER_1, activity_date="2026-04-10T10:00:00Z"),
        "later": await create(
            send, bearer, type="task", activity_date="2026-05-01T10:00:00Z", recurrence={"rrule": "FREQ=DAILY"}
        ),
        "deleted": await create(
            send, bearer, type="call", activity_date="2026-03-01T10:00:00Z", recurrence={"rrule": "FREQ=DAILY"}
        ),
    }
    ids = {name: reply["data"]["id"] for name, reply in replies.items()}
    deleted = await send("delete", {"id": ids["deleted"]}, bearer=bearer)
    return ids, int(deleted["meta"]["position"])


def expected_window(ids: dict[str, str]) -> list[tuple[str, str, int]]:
    weekly = [
        ("2026-03-02T08:00:00Z", 0),
        ("2026-03-09T08:00:00Z", 1),
        ("2026-03-16T08:00:00Z", 2),
        ("2026-03-23T08:00:00Z", 3),
        ("2026-03-30T07:00:00Z", 4),  # 09:00 local, summer time from 29 March
    ]
    daily = [("2026-03-30T12:00:00Z", 0)]  # 31 March is an exdate; 1 April 12:00 is after `to`
    rows = [(at, ids["weekly"], index) for at, index in weekly]
    rows += [(at, ids["daily"], index) for at, index in daily]
    rows.append(("2026-03-10T10:00:00Z", ids["one_off"], 0))
    return sorted(rows)


def keys(data: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    return [(item["occurrence_at"], item["activity_id"], item["index"]) for item in data]


async def test_occurrences_over_http_and_nats(
    http: httpx.AsyncClient, request_command: Send, token: Callable[..., str]
) -> None:
    bearer = token(tenant="occ-http")
    ids, position = await seed(request_command, bearer)

    response = await http.get(OCCURRENCES, params={**WINDOW, "min_position": position}, headers=auth(bearer))
    assert response.status_code == 200, response.text
    body = response.json()
    assert keys(body["data"]) == expected_window(ids)
    assert body["meta"]["next_cursor"] is None and body["meta"]["position"] >= position
    for item in body["data"]:
        assert item["activity"]["id"] == item["activity_id"] and item["activity"]["schema_version"] == 2

    over_nats = await request_command("occurrences", {**WINDOW, "min_position": position}, bearer=bearer, kind="query")
    assert over_nats["data"] == body["data"]

    # the daily series over its exdate: 31 March is left out, its index counts on
    april = {"from": "2026-03-31T00:00:00Z", "to": "2026-04-02T23:00:00Z", "owner_id": OWNER_2}
    response = await http.get(OCCURRENCES, params=april, headers=auth(bearer))
    assert keys(response.json()["data"]) == [
        ("2026-04-01T12:00:00Z", ids["daily"], 2),
        ("2026-04-02T12:00:00Z", ids["daily"], 3),
    ]

    # filters of the list apply: owner, type (repeatable), activity_date bounds of the series' start
    owner = await http.get(OCCURRENCES, params={**WINDOW, "owner_id": OWNER_1}, headers=auth(bearer))
    assert {item["activity_id"] for item in owner.json()["data"]} == {ids["weekly"], ids["one_off"]}
    calls = await request_command("occurrences", {**WINDOW, "type": ["call", "task"]}, bearer=bearer, kind="query")
    assert {item["activity_id"] for item in calls["data"]} == {ids["daily"], ids["one_off"]}
    started = await http.get(
        OCCURRENCES, params={**WINDOW, "activity_date_from": "2026-03-05T00:00:00Z"}, headers=auth(bearer)
    )
    assert {item["activity_id"] for item in started.json()["data"]} == {ids["daily"], ids["one_off"]}

    # a series that starts after the window, and a deleted one, have nothing in it; a restored one has
    assert ids["later"] not in {item["activity_id"] for item in body["data"]}
    assert ids["deleted"] not in {item["activity_id"] for item in body["data"]}
    restored = await request_command("restore", {"id": ids["deleted"]}, bearer=bearer)
    again = await http.get(
        OCCURRENCES,
        params={**WINDOW, "min_position": restored["meta"]["position"], "limit": 200},
        headers=auth(bearer),
    )
    assert sum(item["activity_id"] == ids["deleted"] for item in again.json()["data"]) == 31

    # a patch moving the series moves its occurrences; clearing the recurrence leaves one
    patched = await request_command("patch", {"id": ids["weekly"], "changes": {"recurrence": None}}, bearer=bearer)
    after = await http.get(
        OCCURRENCES,
        params={**WINDOW, "owner_id": OWNER_1, "min_position": patched["meta"]["position"]},
        headers=auth(bearer),
    )
    assert keys(after.json()["data"]) == [
        ("2026-03-02T08:00:00Z", ids["weekly"], 0),
        ("2026-03-10T10:00:00Z", ids["one_off"], 0),
    ]


async def test_paging_visits_every_occurrence_once(
    runtime: Runtime, http: httpx.AsyncClient, request_command: Send, token: Callable[..., str]
) -> None:
    bearer = token(tenant="occ-pages")
    rules = ["FREQ=DAILY", "FREQ=WEEKLY;BYDAY=MO,WE,FR", "FREQ=HOURLY;INTERVAL=7", "FREQ=DAILY;BYHOUR=9,17"]
    position = 0
    for i, rule in enumerate(rules):
        reply = await create(
            request_command,
            bearer,
            type="task",
            activity_date=f"2026-02-{10 + i}T09:00:00Z",
            recurrence={"rrule": rule, "timezone": "America/New_York"},
        )
        position = reply["meta"]["position"]
    for day in range(1, 29, 3):  # one-offs at the same instants as some series' occurrences
        reply = await create(request_command, bearer, type="call", activity_date=f"2026-03-{day:02d}T14:00:00Z")
        position = reply["meta"]["position"]
    window = {"from": "2026-03-01T00:00:00Z", "to": "2026-03-20T00:00:00Z", "min_position": position}

    whole = (await http.get(OCCURRENCES, params={**window, "limit": 200}, headers=auth(bearer))).json()
    pages, cursor, seen = 0, None, []
    while True:
        params: dict[str, Any] = {**window, "limit": 7, **({"cursor": cursor} if cursor else {})}
        page = await request_command("occurrences", params, bearer=bearer, kind="query")
        assert "data" in page, page
        seen += keys(page["data"])
        pages += 1
        cursor = page["meta"]["next_cursor"]
        if cursor is None:
            break
    assert whole["meta"]["next_cursor"] is None
    expected = []
    endpoints = runtime.endpoints
    async with AsyncClient(
        nats_url=endpoints["nats_url"], token=bearer, http_url=endpoints["http_url"], **client_settings(runtime)
    ) as client:
        async for occurrence in client.customer.activities.iterate_occurrences(window["from"], window["to"], limit=200):
            expected.append(
                (occurrence.occurrence_at.strftime("%Y-%m-%dT%H:%M:%SZ"), occurrence.activity_id, occurrence.index)
            )
    assert len(seen) > 100 and seen == expected and len(seen) == len(set(seen)) and pages == -(-len(seen) // 7)
    assert seen == sorted(seen) and keys(whole["data"]) == seen

    # the cursor is bound to the window, the filters and the caller
    first = await http.get(OCCURRENCES, params={**window, "limit": 5}, headers=auth(bearer))
    cursor = first.json()["meta"]["next_cursor"]
    for params, bearer_used in [
        ({**window, "to": "2026-03-21T00:00:00Z", "cursor": cursor}, bearer),
        ({**window, "type": "task", "cursor": cursor}, bearer),
        ({**window, "cursor": cursor}, token(tenant="occ-other")),
        ({**window, "cursor": cursor[:-2] + "AA"}, bearer),
    ]:
        response = await http.get(OCCURRENCES, params=params, headers=auth(bearer_used))
        assert response.status_code == 422, response.text
        assert response.json()["error"]["details"][0]["field"] == "cursor"
    listed = (await http.get(BASE, params={"limit": 1}, headers=auth(bearer))).json()["meta"]["next_cursor"]
    response = await http.get(OCCURRENCES, params={**window, "cursor": listed}, headers=auth(bearer))
    assert response.status_code == 422  # a list's cursor is not an occurrences cursor


async def test_occurrences_are_scoped_to_tenant_and_app(
    http: httpx.AsyncClient, request_command: Send, token: Callable[..., str]
) -> None:
    tenant = "occ-scope"
    user, integration = token(tenant=tenant), token(tenant=tenant, app="crm_app")
    mine = await create(request_command, user, activity_date="2026-03-05T10:00:00Z", recurrence={"rrule": "FREQ=DAILY"})
    app = await create(
        request_command, integration, activity_date="2026-03-05T11:00:00Z", recurrence={"rrule": "FREQ=WEEKLY"}
    )
    other = await create(
        request_command,
        token(tenant="occ-else"),
        activity_date="2026-03-05T10:00:00Z",
        recurrence={"rrule": "FREQ=DAILY"},
    )
    position = max(r["meta"]["position"] for r in (mine, app, other))
    query = {**WINDOW, "limit": 200, "min_position": position}
    as_user = await request_command("occurrences", query, bearer=user, kind="query")
    assert {item["activity_id"] for item in as_user["data"]} == {mine["data"]["id"], app["data"]["id"]}
    as_app = (await http.get(OCCURRENCES, params=query, headers=auth(integration))).json()
    assert {item["activity_id"] for item in as_app["data"]} == {app["data"]["id"]}
    assert [item["index"] for item in as_app["data"]] == [0, 1, 2, 3]
    stranger = await http.get(OCCURRENCES, params=query, headers=auth(token(tenant="occ-nobody")))
    assert stranger.status_code == 200 and stranger.json()["data"] == []
    unauthorized = await http.get(OCCURRENCES, params=WINDOW)
    assert unauthorized.status_code == 401


BAD_PARAMETERS: list[tuple[dict[str, str], str]] = [
    ({"to": WINDOW["to"]}, "from"),
    ({"from": WINDOW["from"]}, "to"),
    ({"from": "2026-03-01T00:00:00", "to": WINDOW["to"]}, "from"),
    ({"from": "yesterday", "to": WINDOW["to"]}, "from"),
    ({"from": WINDOW["to"], "to": WINDOW["from"]}, "to"),
    ({"from": "2026-01-01T00:00:00Z", "to": "2027-01-02T00:00:01Z"}, "to"),
    ({**WINDOW, "sort": "activity_date"}, "sort"),
    ({**WINDOW, "include_deleted": "true"}, "include_deleted"),
    ({**WINDOW, "limit": "0"}, "limit"),
    ({**WINDOW, "limit": "201"}, "limit"),
    ({**WINDOW, "colour": "red"}, "colour"),
    ({**WINDOW, "type": "lunch"}, "type"),
    ({**WINDOW, "cursor": "abc"}, "cursor"),
]


async def test_occurrences_validation_errors(
    http: httpx.AsyncClient, request_command: Send, token: Callable[..., str]
) -> None:
    bearer = token()
    for params, field in BAD_PARAMETERS:
        response = await http.get(OCCURRENCES, params=params, headers=auth(bearer))
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "validation_error" and error["details"][0]["field"] == field, error
        over_nats = await request_command("occurrences", params, bearer=bearer, kind="query")
        assert over_nats["error"]["code"] == "validation_error"
        assert over_nats["error"]["details"][0]["field"] == field


BAD_RECURRENCES: list[tuple[dict[str, Any], str]] = [
    ({"recurrence": {"rrule": "FREQ=WEEKLY;COUNT=4"}}, "activity_date"),
    ({"activity_date": "2026-03-01T09:00:00Z", "recurrence": {"rrule": "EVERY MONDAY"}}, "recurrence.rrule"),
    ({"activity_date": "2026-03-01T09:00:00Z", "recurrence": {"rrule": "FREQ=FORTNIGHTLY"}}, "recurrence.rrule"),
    ({"activity_date": "2026-03-01T09:00:00Z", "recurrence": {"rrule": "FREQ=SECONDLY"}}, "recurrence.rrule"),
    (
        {"activity_date": "2026-03-01T09:00:00Z", "recurrence": {"rrule": "FREQ=MINUTELY;BYSECOND=0,30"}},
        "recurrence.rrule",
    ),
    (
        {
            "activity_date": "2026-03-01T09:00:00Z",
            "recurrence": {"rrule": "FREQ=DAILY", "timezone": "Mars/Olympus"},
        },
        "recurrence.timezone",
    ),
    (
        {"activity_date": "2026-03-01T09:00:00Z", "recurrence": {"rrule": "FREQ=DAILY", "colour": "red"}},
        "recurrence.colour",
    ),
    (
        {"activity_date": "2026-03-01T09:00:00Z", "recurrence": {"rrule": "FREQ=DAILY", "exdates": ["2026-03-02"]}},
        "recurrence.exdates",
    ),
    ({"activity_date": "2026-03-01T09:00:00Z", "recurrence": {"timezone": "UTC"}}, "recurrence.rrule"),
]


async def test_recurrence_rules_on_create(
    http: httpx.AsyncClient, request_command: Send, token: Callable[..., str]
) -> None:
    bearer = token(tenant="occ-rules")
    for fields, field in BAD_RECURRENCES:
        reply = await request_command("create", {"account_id": "acc_1", **fields}, bearer=bearer)
        assert reply["error"]["code"] == "validation_error", reply
        assert reply["error"]["details"][0]["field"] == field
    listed = await http.get(BASE, headers=auth(bearer))
    assert listed.json()["data"] == []  # nothing was written


async def test_recurrence_rules_on_patch_after_the_merge(
    http: httpx.AsyncClient, request_command: Send, token: Callable[..., str]
) -> None:
    bearer = token(tenant="occ-patch")
    reply = await create(
        request_command,
        bearer,
        activity_date="2026-03-02T09:00:00Z",
        recurrence={"rrule": "FREQ=WEEKLY", "timezone": "Europe/Berlin", "exdates": ["2026-03-09T10:00:00+01:00"]},
    )
    activity = reply["data"]
    assert activity["recurrence"]["exdates"] == ["2026-03-09T09:00:00Z"]  # stored in UTC
    for changes, field in [
        ({"recurrence": {"timezone": "Nowhere/Land"}}, "recurrence.timezone"),  # merged into the stored one
        ({"recurrence": {"rrule": "FREQ=MINUTELY"}}, "recurrence.rrule"),
        ({"activity_date": None}, "activity_date"),
    ]:
        refused = await request_command("patch", {"id": activity["id"], "changes": changes}, bearer=bearer)
        assert refused["error"]["details"][0]["field"] == field, refused
    unchanged = await http.get(
        f"{BASE}/{activity['id']}", params={"min_position": reply["meta"]["position"]}, headers=auth(bearer)
    )
    assert unchanged.json()["data"]["version"] == 1
    merged = await request_command(
        "patch", {"id": activity["id"], "changes": {"recurrence": {"timezone": "America/New_York"}}}, bearer=bearer
    )
    assert merged["data"]["recurrence"] == {
        "rrule": "FREQ=WEEKLY",
        "timezone": "America/New_York",
        "exdates": ["2026-03-09T09:00:00Z"],
    }


async def test_clients_and_cli(
    runtime: Runtime,
    request_command: Send,
    token: Callable[..., str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ACTIVITIES_SUBJECT_PREFIX", runtime.settings.subject_prefix)
    monkeypatch.setenv("ACTIVITIES_STREAM_NAME", runtime.settings.stream_name)
    bearer = token(tenant="occ-client")
    reply = await create(
        request_command,
        bearer,
        type="meeting",
        subject="Standup",
        activity_date="2026-03-02T09:00:00Z",
        recurrence={"rrule": "FREQ=DAILY;COUNT=3"},
    )
    http_url = runtime.endpoints["http_url"]
    caught_up = await request_command(
        "occurrences", {**WINDOW, "min_position": reply["meta"]["position"]}, bearer=bearer, kind="query"
    )
    assert len(caught_up["data"]) == 3
    for via_http in (None, http_url):
        async with AsyncClient(
            nats_url=runtime.endpoints["nats_url"], token=bearer, http_url=via_http, **client_settings(runtime)
        ) as client:
            page = await client.customer.activities.occurrences(
                datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 31, tzinfo=UTC), type="meeting", limit=2
            )
            assert isinstance(page, OccurrencePage) and [o.index for o in page.data] == [0, 1]
            assert page.data[0].activity.subject == "Standup" and page.next_cursor is not None
            rest = await client.customer.activities.occurrences(
                "2026-03-01T00:00:00Z", "2026-03-31T00:00:00Z", type="meeting", limit=2, cursor=page.next_cursor
            )
            assert [o.occurrence_at for o in rest.data] == [datetime(2026, 3, 4, 9, tzinfo=UTC)]
            with pytest.raises(ValidationError):
                await client.customer.activities.occurrences("2026-03-01T00:00:00Z", "2028-03-01T00:00:00Z")

    def blocking() -> list[int]:
        with Client(nats_url=runtime.endpoints["nats_url"], token=bearer, **client_settings(runtime)) as client:
            found = client.customer.activities.iterate_occurrences(
                "2026-03-01T00:00:00Z", "2026-03-31T00:00:00Z", limit=1
            )
            return [occurrence.index for occurrence in found]

    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, blocking) == [0, 1, 2]

    connection = ["--token", bearer, "--nats-url", runtime.endpoints["nats_url"], "--http-url", http_url]
    argv = ["occurrences", "--from", "2026-03-01T00:00:00Z", "--to", "2026-03-31T00:00:00Z", "--type", "meeting"]
    code = await loop.run_in_executor(None, cli_main, [*argv, *connection])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and out[-1] == "3 occurrences"
    assert "2026-03-03T09:00:00Z" in "\n".join(out) and "Standup" in "\n".join(out)
    code = await loop.run_in_executor(None, cli_main, [*argv, "--json", *connection])
    printed = json.loads(capsys.readouterr().out)
    assert [item["index"] for item in printed["data"]] == [0, 1, 2] and printed["next_cursor"] is None


async def test_openapi_and_asyncapi_document_occurrences(http: httpx.AsyncClient) -> None:
    spec = (await http.get("/openapi.json")).json()
    operation = spec["paths"][OCCURRENCES]["get"]
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert parameters["from"]["required"] and parameters["to"]["required"]
    assert {"owner_id", "type", "limit", "cursor"} <= set(parameters) and "sort" not in parameters
    assert "200" in operation["responses"] and "422" in operation["responses"]
    asyncapi = (await http.get("/asyncapi.json")).json()
    assert any("query.occurrences" in address for address in json.dumps(asyncapi["channels"]).split('"'))


async def test_release_1_0_recurrences_still_read(upgraded: Runtime, servers: Any) -> None:  # noqa: F811
    """Recurrences stored by release 1.0 (any object) still read; the query serves those that do not
    parse as one-offs; a patch that does not touch them keeps them; one that does must fix them."""
    assert upgraded.servers is not None
    with psycopg.connect(upgraded.servers.database_url) as conn:
        rows = conn.execute(
            "SELECT id, tenant_id, app_id, document->'recurrence', activity_date FROM activities "
            "WHERE document->'recurrence' <> 'null'::jsonb AND NOT is_deleted AND activity_date IS NOT NULL"
        ).fetchall()
    assert rows, "release 1.0's data has live activities with a recurrence"
    prefix = upgraded.settings.subject_prefix
    nc = await nats.connect(servers.nats_url)
    try:
        for activity_id, tenant, app_id, recurrence, activity_date in rows:
            bearer = bearer_for(tenant, app_id)
            with pytest.raises(ValueError):
                parse_series(recurrence, activity_date)  # 1.0 took any object: these do not parse
            window = {
                "from": (activity_date - timedelta(days=1)).isoformat(),
                "to": (activity_date + timedelta(days=30)).isoformat(),
                "limit": 200,
            }
            found = await request(nc, f"{prefix}.query.occurrences", window, bearer)
            mine = [item for item in found["data"] if item["activity_id"] == activity_id]
            assert [(item["index"], item["activity"]["recurrence"]) for item in mine] == [(0, recurrence)]
            kept = await request(nc, f"{prefix}.cmd.patch", {"id": activity_id, "changes": {"notes": "n"}}, bearer)
            assert kept["data"]["recurrence"] == recurrence, kept
            moved = await request(
                nc,
                f"{prefix}.cmd.patch",
                {"id": activity_id, "changes": {"activity_date": "2026-03-01T00:00:00Z"}},
                bearer,
            )
            assert moved["error"]["code"] == "validation_error"
            assert moved["error"]["details"][0]["field"].startswith("recurrence")
    finally:
        await nc.drain()


def test_migration_9_columns_bound_every_series(make_database: Callable[[], str]) -> None:
    """The trigger-derived columns on rows written by the projector's upsert: `is_recurring`, the
    `recurrence` itself, and `occurrences_end` never before a series' real last occurrence (it only
    chooses candidates), NULL for what it cannot bound, never an error on garbage."""
    from activities_client.document import ActivityFields
    from projections.migrations import migrate
    from projections.queries import READ_MODEL_TABLE, build_upsert_sql

    url = make_database()
    migrate(url)
    template = ActivityFields().to_json()
    start = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    cases: list[Any] = [
        None,
        {"rrule": "FREQ=DAILY;COUNT=10"},
        {"rrule": "FREQ=WEEKLY;INTERVAL=3;BYDAY=MO,FR;COUNT=7", "timezone": "America/New_York"},
        {"rrule": "FREQ=DAILY;BYHOUR=1,23;COUNT=9", "timezone": "Pacific/Kiritimati"},
        {"rrule": "FREQ=WEEKLY;UNTIL=20260401T120000Z"},
        {"rrule": "FREQ=DAILY;UNTIL=20260320", "timezone": "Pacific/Pago_Pago"},
        {"rrule": "FREQ=MONTHLY;BYMONTHDAY=31;COUNT=5"},  # months skip: no COUNT bound
        {"rrule": "FREQ=WEEKLY;BYDAY=1MO;COUNT=5"},  # an ordinal: no COUNT bound
        {"rrule": "FREQ=DAILY"},
        {"rrule": "FREQ=DAILY;UNTIL=20261340"},  # garbage stored by an old release
        {"freq": "WEEKLY", "count": 4},
    ]
    documents = [
        {
            **template,
            "account_id": "acc_1",
            "id": f"act_{i:026d}",
            "tenant_id": "t",
            "app_id": None,
            "activity_date": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "recurrence": recurrence,
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
            "created_by": "usr-1",
            "updated_by": "usr-1",
            "is_deleted": False,
            "deleted_at": None,
            "deleted_by": None,
            "schema_version": 2,
            "version": 1,
            "external_key": None,
            "is_erased": False,
        }
        for i, recurrence in enumerate(cases)
    ]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            build_upsert_sql(READ_MODEL_TABLE),
            (json.dumps(documents), json.dumps(list(range(len(documents))))),
        )
        rows = conn.execute("SELECT is_recurring, recurrence, occurrences_end FROM activities ORDER BY id").fetchall()
    assert [row[0] for row in rows] == [False] + [True] * (len(cases) - 1)
    assert [row[1] for row in rows] == cases
    assert rows[0][2] == start
    bounded = 0
    for recurrence, (_, _, end) in zip(cases[1:], rows[1:], strict=True):
        try:
            series = parse_series(recurrence, start)
        except ValueError:
            assert end is None  # garbage: no bound, served as a one-off
            continue
        if series.count is None and series.rule._until is None:
            assert end is None  # no end
            continue
        if end is None:
            continue  # no bound known: always a candidate
        last = list(series.occurrences(start, datetime(2030, 1, 1, tzinfo=UTC)))[-1][0]
        assert last <= end < last + timedelta(days=100), (recurrence, last, end)  # a bound, not far off
        bounded += 1
    assert bounded == 5
