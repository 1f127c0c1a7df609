"""Row-level security on the read model: a second wall behind every query's tenant filter."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest

from services.bootstrap import Runtime
from services.domain import Caller
from services.http_app import HttpRole
from tests.conftest import Requester

UNFILTERED = "SELECT id, tenant_id, app_id FROM activities"  # a query that forgot its tenant filter


def read_model_of(runtime: Runtime):  # type: ignore[no-untyped-def]
    return next(c for c in runtime.components if isinstance(c, HttpRole)).queries.read_model


async def test_a_query_that_forgets_its_tenant_filter_sees_nothing_foreign(
    request_command: Requester, runtime: Runtime, token: Callable[..., str]
) -> None:
    replies = [
        await request_command("create", {"account_id": "a"}, bearer=token(tenant="acme")),
        await request_command("create", {"account_id": "a"}, bearer=token(tenant="acme", app="gong")),
        await request_command("create", {"account_id": "g"}, bearer=token(tenant="globex")),
    ]
    read_model = read_model_of(runtime)
    await read_model.wait_for(max(r["meta"]["position"] for r in replies), 10)
    ids = {r["data"]["tenant_id"] + (r["data"]["app_id"] or ""): r["data"]["id"] for r in replies}

    _, acme_rows = await read_model._fetch(UNFILTERED, [], Caller("acme", "usr-1"))
    assert {row["id"] for row in acme_rows} == {ids["acme"], ids["acmegong"]}

    _, app_rows = await read_model._fetch(UNFILTERED, [], Caller("acme", "svc", "gong"))
    assert {row["id"] for row in app_rows} == {ids["acmegong"]}

    _, globex_rows = await read_model._fetch(UNFILTERED, [], Caller("globex", "usr-2"))
    assert {row["id"] for row in globex_rows} == {ids["globex"]}

    _, unscoped_rows = await read_model._fetch(UNFILTERED, [])  # forgot to say who is asking: nothing
    assert unscoped_rows == []


async def test_a_read_that_fails_leaves_its_connection_idle_and_scoped_to_nobody(
    request_command: Requester, runtime: Runtime, token: Callable[..., str]
) -> None:
    reply = await request_command("create", {"account_id": "a"}, bearer=token(tenant="acme"))
    read_model = read_model_of(runtime)
    await read_model.wait_for(reply["meta"]["position"], 10)
    for _ in range(read_model.pool.max_size + 1):  # every pooled connection, and then some
        with pytest.raises(psycopg.errors.DivisionByZero):
            await read_model._fetch("SELECT 1 / 0", [], Caller("acme", "usr-1"))
    async with read_model.pool.connection() as conn:
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        tenant = await (await conn.execute("SELECT current_setting('activities.tenant_id', true) AS t")).fetchone()
        assert tenant is not None and tenant["t"] in ("", None)
    for _ in range(read_model.pool.max_size + 1):
        _, rows = await read_model._fetch(UNFILTERED, [])
        assert rows == []
    _, acme_rows = await read_model._fetch(UNFILTERED, [], Caller("acme", "usr-1"))
    assert [row["id"] for row in acme_rows] == [reply["data"]["id"]]


async def test_the_scoped_views_hold_only_the_callers_rows_even_for_the_tables_owner(
    request_command: Requester, runtime: Runtime, token: Callable[..., str]
) -> None:
    """Where the service's user may not switch to the reader role, it reads as the table's owner,
    whom the policy does not bind: the views every read goes through still scope it."""
    replies = [
        await request_command("create", {"account_id": "a"}, bearer=token(tenant="acme")),
        await request_command("create", {"account_id": "a"}, bearer=token(tenant="acme", app="gong")),
        await request_command("create", {"account_id": "g"}, bearer=token(tenant="globex")),
    ]
    await read_model_of(runtime).wait_for(max(r["meta"]["position"] for r in replies), 10)
    assert runtime.servers is not None
    with psycopg.connect(runtime.servers.database_url) as conn:  # the owner, no reader role, no `activities.reader`

        def visible(tenant: str | None, app: str = "") -> set[str]:
            with conn.transaction():
                if tenant is not None:
                    conn.execute(
                        "SELECT set_config('activities.tenant_id', %s, true), set_config('activities.app_id', %s, true)",
                        (tenant, app),
                    )
                view = "activities_of_app" if app else "activities_of_tenant"
                return {row[0] for row in conn.execute(f"SELECT tenant_id || coalesce(app_id, '') FROM {view}")}

        assert visible("acme") == {"acme", "acmegong"}
        assert visible("acme", "gong") == {"acmegong"}
        assert visible("globex") == {"globex"}
        assert visible(None) == set()
        assert visible("acme", "crm") == set()
        assert len(conn.execute("SELECT id FROM activities").fetchall()) == 3  # the table itself: every row
