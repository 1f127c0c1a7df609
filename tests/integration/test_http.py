"""The HTTP API of docs/contract.md section 5 against the running service: every route's status codes,
ETag / If-Match, old versions, histories, read-your-writes, and tenant / app isolation on every read
path over HTTP and NATS."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import pytest_asyncio

from services.bootstrap import Runtime

BASE = "/api/v1/crm/activities"
Send = Callable[..., Any]


@pytest_asyncio.fixture
async def http(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=runtime.endpoints["http_url"], timeout=10) as client:
        yield client


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def create(http: httpx.AsyncClient, bearer: str, **fields: Any) -> dict[str, Any]:
    response = await http.post(BASE, json={"account_id": "acc_1", **fields}, headers=auth(bearer))
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_http_url_is_the_bound_port(runtime: Runtime) -> None:
    url = runtime.endpoints["http_url"]
    assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")


async def test_openapi_and_docs(http: httpx.AsyncClient) -> None:
    spec = (await http.get("/openapi.json")).json()
    assert {BASE, BASE + "/{id}", BASE + "/{id}/events", BASE + "/{id}/restore"} <= set(
        spec["paths"]
    )
    assert (await http.get("/docs")).status_code == 200


async def test_openapi_documents_the_contracts_replies(http: httpx.AsyncClient) -> None:
    """Every route documents its success reply and its errors in the contract's envelope; none
    keeps FastAPI's own validation-error shape, which the service never sends."""
    spec = (await http.get("/openapi.json")).json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    expected_success = {
        ("get", BASE): "ActivityListReply",
        ("get", BASE + "/{id}"): "ActivityReply",
        ("get", BASE + "/{id}/events"): "EventHistoryReply",
        ("post", BASE): "ActivityReply",
        ("patch", BASE + "/{id}"): "ActivityReply",
        ("delete", BASE + "/{id}"): "ActivityReply",
        ("post", BASE + "/{id}/restore"): "ActivityReply",
    }
    for (method, path), success in expected_success.items():
        responses = spec["paths"][path][method]["responses"]
        schemas = {status: r["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
                   for status, r in responses.items()}
        assert schemas.pop("201" if (method, path) == ("post", BASE) else "200") == success, (method, path)
        assert {"401", "422", "500", "503"} <= set(schemas), (method, path, schemas)
        assert set(schemas.values()) == {"ErrorReply"}, (method, path, schemas)
    patch_errors = set(spec["paths"][BASE + "/{id}"]["patch"]["responses"]) - {"200"}
    assert patch_errors == {"401", "404", "409", "410", "412", "422", "500", "503"}
    error = spec["components"]["schemas"]["ErrorBody"]
    assert set(error["properties"]) == {"code", "message", "details", "current_version"}


async def test_write_routes_status_codes(http: httpx.AsyncClient, token: Callable[..., str]) -> None:
    bearer = token()
    assert (await http.post(BASE, json={"account_id": "acc_1"})).status_code == 401
    bad = await http.post(BASE, json={"type": "call"}, headers=auth(bearer))
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"
    assert (await http.post(BASE, content=b"not json", headers=auth(bearer))).status_code == 422

    created = await create(http, bearer, type="call")
    activity_id = created["data"]["id"]
    url = f"{BASE}/{activity_id}"

    patched = await http.patch(url, json={"status": "done"}, headers={**auth(bearer), "If-Match": '"1"'})
    assert patched.status_code == 200 and patched.json()["data"]["version"] == 2
    assert patched.headers["ETag"] == '"2"'
    stale = await http.patch(url, json={"status": "open"}, headers={**auth(bearer), "If-Match": '"1"'})
    assert stale.status_code == 412
    assert stale.json()["error"] == {**stale.json()["error"], "code": "version_conflict", "current_version": 2}
    stale_body = await http.patch(url, json={"status": "open"}, headers=auth(bearer))
    assert stale_body.status_code == 200  # no If-Match: any version
    assert (await http.patch(url, content=b"[1]", headers=auth(bearer))).status_code == 422
    assert (
        await http.patch(url, json={"status": "x"}, headers={**auth(bearer), "If-Match": "nope"})
    ).status_code == 422

    deleted = await http.delete(url, headers=auth(bearer))
    assert deleted.status_code == 200 and deleted.json()["data"]["is_deleted"] is True
    assert (await http.patch(url, json={"status": "x"}, headers=auth(bearer))).status_code == 410
    assert (await http.delete(url, headers={**auth(bearer), "If-Match": '"1"'})).status_code == 412
    restored = await http.post(url + "/restore", headers=auth(bearer))
    assert restored.status_code == 200 and restored.json()["data"]["is_deleted"] is False

    missing = f"{BASE}/act_01ARZ3NDEKTSV4RRFFQ69G5FAV"
    assert (await http.patch(missing, json={"status": "x"}, headers=auth(bearer))).status_code == 404
    assert (await http.delete(missing, headers=auth(bearer))).status_code == 404
    assert (await http.post(missing + "/restore", headers=auth(bearer))).status_code == 404
    assert (await http.delete(missing)).status_code == 401


async def test_idempotency_key_over_http(http: httpx.AsyncClient, token: Callable[..., str]) -> None:
    headers = {**auth(token()), "Idempotency-Key": "http-key-1"}
    first = await http.post(BASE, json={"account_id": "acc_9"}, headers=headers)
    again = await http.post(BASE, json={"account_id": "acc_9"}, headers=headers)
    other = await http.post(BASE, json={"account_id": "acc_8"}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"


async def test_get_routes_status_codes(http: httpx.AsyncClient, token: Callable[..., str]) -> None:
    bearer = token()
    created = await create(http, bearer, subject="v1")
    activity_id = created["data"]["id"]
    url = f"{BASE}/{activity_id}"
    patched = (await http.patch(url, json={"subject": "v2"}, headers=auth(bearer))).json()
    position = patched["meta"]["position"]

    got = await http.get(url, params={"min_position": position}, headers=auth(bearer))
    assert got.status_code == 200 and got.headers["ETag"] == '"2"'
    assert got.json()["data"]["subject"] == "v2" and got.json()["meta"]["position"] >= position
    old = await http.get(url, params={"version": 1}, headers=auth(bearer))
    assert old.status_code == 200 and old.json()["data"]["subject"] == "v1" and old.headers["ETag"] == '"1"'
    assert (await http.get(url, params={"version": 9}, headers=auth(bearer))).status_code == 404
    assert (await http.get(url, params={"version": "x"}, headers=auth(bearer))).status_code == 422
    assert (await http.get(url, params={"bogus": "1"}, headers=auth(bearer))).status_code == 422
    assert (await http.get(url)).status_code == 401
    assert (await http.get(url, headers=auth("not-a-jwt"))).status_code == 401
    assert (await http.get(f"{BASE}/act_01ARZ3NDEKTSV4RRFFQ69G5FAV", headers=auth(bearer))).status_code == 404

    deleted = (await http.delete(url, headers=auth(bearer))).json()
    gone = await http.get(url, params={"min_position": deleted["meta"]["position"]}, headers=auth(bearer))
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "gone"
    shown = await http.get(url, params={"include_deleted": "true"}, headers=auth(bearer))
    assert shown.status_code == 200 and shown.json()["data"]["is_deleted"] is True

    events = await http.get(url + "/events", headers=auth(bearer))
    assert events.status_code == 200
    history = events.json()["data"]
    assert [e["event_type"] for e in history] == ["ActivityLogged", "ActivityPatched", "ActivityDeleted"]
    assert [e["version"] for e in history] == [1, 2, 3]
    assert history[1]["changes"] == {"subject": "v2"} and history[1]["actor"] == "usr-1"
    assert history[1]["activity"]["subject"] == "v2" and history[-1]["position"] == deleted["meta"]["position"]
    assert {"position"} <= set(events.json()["meta"])
    assert (await http.get(url + "/events", params={"x": "1"}, headers=auth(bearer))).status_code == 422
    assert (await http.get(url + "/events")).status_code == 401


async def test_list_route_status_codes(http: httpx.AsyncClient, token: Callable[..., str]) -> None:
    bearer = token(tenant="listing")
    position = 0
    for _ in range(3):
        position = (await create(http, bearer, tags=["a"]))["meta"]["position"]
    ok = await http.get(BASE, params={"limit": 2, "tag": "a", "min_position": position}, headers=auth(bearer))
    assert ok.status_code == 200 and set(ok.json()["meta"]) == {"next_cursor", "position"}
    assert len(ok.json()["data"]) == 2 and ok.json()["meta"]["next_cursor"]
    for bad in (
        {"limit": 0},
        {"limit": 201},
        {"sort": "subject"},
        {"nope": "1"},
        {"type": "fax"},
        {"activity_date_from": "2026-01-01T00:00:00"},
        {"cursor": "garbage"},
    ):
        response = await http.get(BASE, params=bad, headers=auth(bearer))
        assert response.status_code == 422, bad
        assert response.json()["error"]["code"] == "validation_error"
        assert response.json()["error"]["details"][0]["field"] == next(iter(bad))
    assert (await http.get(BASE, params=[("status", "a"), ("status", "b")], headers=auth(bearer))).status_code == 422
    assert (await http.get(BASE)).status_code == 401
    assert (await http.get("/api/v1/nothing", headers=auth(bearer))).status_code == 404


async def test_read_with_position_from_command_reply_sees_the_command(
    http: httpx.AsyncClient, request_command: Send, token: Callable[..., str]
) -> None:
    bearer = token(tenant="ryw")
    for round_ in range(5):
        created = await request_command("create", {"deal_id": f"deal_{round_}"}, bearer=bearer)
        position = created["meta"]["position"]
        listed = await http.get(
            BASE, params={"deal_id": f"deal_{round_}", "min_position": position}, headers=auth(bearer)
        )
        assert [d["id"] for d in listed.json()["data"]] == [created["data"]["id"]]
        patched = await request_command(
            "patch", {"id": created["data"]["id"], "changes": {"status": f"s{round_}"}}, bearer=bearer
        )
        got = await request_command(
            "get",
            {"id": created["data"]["id"], "min_position": patched["meta"]["position"]},
            bearer=bearer,
            kind="query",
        )
        assert got["data"]["status"] == f"s{round_}" and got["meta"]["position"] >= patched["meta"]["position"]


async def test_min_position_beyond_the_log_is_unavailable(
    runtime: Runtime, request_command: Send, http: httpx.AsyncClient, token: Callable[..., str]
) -> None:
    far = 10**12
    started = time.monotonic()
    reply = await request_command("list", {"min_position": far}, kind="query")
    assert reply["error"]["code"] == "unavailable"
    assert time.monotonic() - started >= runtime.settings.consistency_wait_ms / 1000 * 0.9
    response = await http.get(BASE, params={"min_position": far}, headers=auth(token()))
    assert response.status_code == 503


async def test_every_read_path_refuses_other_tenants_and_apps(
    http: httpx.AsyncClient, request_command: Send, token: Callable[..., str]
) -> None:
    owner_app = token(tenant="iso", app="app_a")
    created = await create(http, owner_app, contact_id="con_iso")
    activity_id, position = created["data"]["id"], created["meta"]["position"]
    url = f"{BASE}/{activity_id}"
    same_tenant_human = token(tenant="iso")
    assert (await http.get(url, params={"min_position": position}, headers=auth(same_tenant_human))).status_code == 200

    page = await http.get(BASE, params={"limit": 1, "min_position": position}, headers=auth(owner_app))
    assert page.json()["data"][0]["id"] == activity_id

    for intruder in (token(tenant="other"), token(tenant="other", app="app_a"), token(tenant="iso", app="app_b")):
        for params in ({"min_position": position}, {"version": 1}, {"include_deleted": "true"}):
            response = await http.get(url, params=params, headers=auth(intruder))
            assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
        assert (await http.get(url + "/events", headers=auth(intruder))).status_code == 404
        listed = await http.get(
            BASE, params={"contact_id": "con_iso", "include_deleted": "true"}, headers=auth(intruder)
        )
        assert listed.status_code == 200 and listed.json()["data"] == []
        nats_get = await request_command(
            "get", {"id": activity_id, "include_deleted": True}, bearer=intruder, kind="query"
        )
        assert nats_get["error"]["code"] == "not_found"
        nats_old = await request_command("get", {"id": activity_id, "version": 1}, bearer=intruder, kind="query")
        assert nats_old["error"]["code"] == "not_found"
        nats_list = await request_command("list", {"contact_id": "con_iso"}, bearer=intruder, kind="query")
        assert nats_list["data"] == []
        # writes too: not_found, never a hint
        assert (await http.patch(url, json={"status": "x"}, headers=auth(intruder))).status_code == 404
        assert (await http.delete(url, headers=auth(intruder))).status_code == 404


async def test_cursor_is_bound_to_tenant_app_filters_and_sort(
    http: httpx.AsyncClient, request_command: Send, token: Callable[..., str]
) -> None:
    bearer = token(tenant="cur")
    position = 0
    for _ in range(3):
        position = (await create(http, bearer, account_id="acc_c"))["meta"]["position"]
    first = await request_command(
        "list", {"account_id": "acc_c", "limit": 1, "min_position": position}, bearer=bearer, kind="query"
    )
    cursor = first["meta"]["next_cursor"]
    assert cursor
    follow = await request_command(
        "list", {"account_id": "acc_c", "limit": 1, "cursor": cursor}, bearer=bearer, kind="query"
    )
    assert follow["data"] and follow["data"][0]["id"] != first["data"][0]["id"]
    bigger = await request_command(
        "list", {"account_id": "acc_c", "limit": 5, "cursor": cursor}, bearer=bearer, kind="query"
    )
    assert len(bigger["data"]) == 2  # the limit may change between pages
    tampered = cursor[:-2] + ("AA" if not cursor.endswith("AA") else "BB")
    cases = [
        ({"account_id": "acc_c", "cursor": cursor}, token(tenant="other")),
        ({"account_id": "acc_c", "cursor": cursor}, token(tenant="cur", app="app_x")),
        ({"account_id": "acc_d", "cursor": cursor}, bearer),
        ({"account_id": "acc_c", "cursor": cursor, "sort": "created_at"}, bearer),
        ({"account_id": "acc_c", "cursor": cursor, "include_deleted": True}, bearer),
        ({"account_id": "acc_c", "cursor": tampered}, bearer),
    ]
    for body, who in cases:
        reply = await request_command("list", body, bearer=who, kind="query")
        assert reply["error"]["code"] == "validation_error", body
        assert reply["error"]["details"][0]["field"] == "cursor"
        response = await http.get(BASE, params=body, headers=auth(who))
        assert response.status_code == 422


async def test_nats_query_envelopes(request_command: Send) -> None:
    raw = await request_command("list", None, kind="query", raw=b"not json")
    assert raw["error"]["code"] == "validation_error"
    missing = await request_command("get", {}, kind="query")
    assert missing["error"]["details"][0]["field"] == "id"
    unauthorized = await request_command("list", {}, kind="query", bearer="garbage")
    assert unauthorized["error"]["code"] == "unauthorized"
    listed = await request_command("list", {}, kind="query")
    assert set(listed["meta"]) == {"next_cursor", "position"}


@pytest.mark.parametrize("roles", [("http",)])
async def test_http_writes_work_without_the_commands_role(
    roles: tuple[str, ...], make_settings: Callable[..., Any], token: Callable[..., str]
) -> None:
    service = Runtime(make_settings(), roles)
    await service.start()
    try:
        async with httpx.AsyncClient(base_url=service.endpoints["http_url"]) as client:
            response = await client.post(BASE, json={"account_id": "acc_1"}, headers=auth(token()))
            assert response.status_code == 201
    finally:
        await service.stop()
