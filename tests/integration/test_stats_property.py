"""Property: stats equal the same count computed in Python.

For random activities (the list property test's: random links, owners, types, statuses,
priorities, outcomes, words, some deleted, some written by an integration app) in two tenants, and
random filters (every list filter, `include_deleted`), a random `group_by` and a random caller
(a user or an app of the first tenant, or a user of the second), asked over NATS or HTTP, the
reply is exactly the matching documents counted by their `group_by` value, largest count first,
ties by key with the activities without one last.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from activities_client.filters import STATS_GROUPS
from services.bootstrap import Runtime
from tests.integration.test_queries_property import (
    HYPOTHESIS,
    filters,
    matches,
    run_examples,
    specs,
    write_activities,
)

Send = Callable[..., Any]
STATS = "/api/v1/crm/activities/stats"

stats_filters = filters.map(lambda query: {name: value for name, value in query.items() if name != "sort"})


def expected_counts(docs: list[dict[str, Any]], group_by: str) -> list[dict[str, Any]]:
    """Count by the value, largest first; ties by key (code point order), no value last."""
    counts = Counter(doc[group_by] for doc in docs)
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0] is None, item[0] or ""))
    return [{"key": key, "count": count} for key, count in ordered]


def http_params(query: dict[str, Any]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for name, value in query.items():
        for item in value if isinstance(value, list) else [value]:
            pairs.append((name, ("true" if item else "false") if isinstance(item, bool) else str(item)))
    return pairs


@pytest.mark.timeout(240)
async def test_stats_equal_python_counts(runtime: Runtime, request_command: Send, token: Callable[..., str]) -> None:
    loop = asyncio.get_running_loop()
    http = httpx.AsyncClient(base_url=runtime.endpoints["http_url"], timeout=10)

    @HYPOTHESIS
    @given(
        batch=st.lists(specs, min_size=1, max_size=12),
        other_batch=st.lists(specs, max_size=4),
        query=stats_filters,
        group_by=st.sampled_from(STATS_GROUPS),
        caller=st.sampled_from(["user", "app", "other tenant"]),
        over_http=st.booleans(),
    )
    def check(
        batch: list[Any],
        other_batch: list[Any],
        query: dict[str, Any],
        group_by: str,
        caller: str,
        over_http: bool,
    ) -> None:
        tenant, other, app = f"t{uuid.uuid4().hex[:10]}", f"t{uuid.uuid4().hex[:10]}", "crm_app"
        bearer = {None: token(tenant=tenant), app: token(tenant=tenant, app=app)}
        other_bearer = {None: token(tenant=other), app: token(tenant=other, app=app)}

        async def example() -> None:
            (docs, position), (other_docs, other_position) = await asyncio.gather(
                write_activities(request_command, bearer, batch, app),
                write_activities(request_command, other_bearer, other_batch, app),
            )
            caller_tenant, caller_app, caller_token = {
                "user": (tenant, None, bearer[None]),
                "app": (tenant, app, bearer[app]),
                "other tenant": (other, None, other_bearer[None]),
            }[caller]
            everything = docs + other_docs
            expected = expected_counts(
                [d for d in everything if matches(d, query, caller_app, caller_tenant)], group_by
            )
            body = {**query, "group_by": group_by, "min_position": max(position, other_position)}
            if over_http:
                response = await http.get(
                    STATS, params=http_params(body), headers={"Authorization": f"Bearer {caller_token}"}
                )
                reply = response.json()
            else:
                reply = await request_command("stats", body, bearer=caller_token, kind="query")
            assert "data" in reply, reply
            assert reply["data"] == expected, (query, group_by, caller, over_http)
            assert reply["meta"]["position"] >= max(position, other_position)

        asyncio.run_coroutine_threadsafe(example(), loop).result(timeout=60)

    try:
        await run_examples(runtime, check)
    finally:
        await http.aclose()
