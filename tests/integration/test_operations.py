"""Observability: /metrics after a few commands, /healthz, /readyz, and a trace id carried from a
command's NATS headers onto the published event."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import nats

from services.bootstrap import Runtime
from tests.conftest import Requester

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}\{{{re.escape(wanted)}\}} (\S+)$" if labels else rf"^{re.escape(name)} (\S+)$",
                         re.MULTILINE)
    found = pattern.search(text)
    assert found, f"{name}{{{wanted}}} not in /metrics"
    return float(found.group(1))


async def test_metrics_expose_commands_batches_positions_and_pools(request_command: Requester, runtime: Runtime) -> None:
    created = [await request_command("create", {"account_id": f"acc_{i}"}) for i in range(3)]
    await request_command("patch", {"id": created[0]["data"]["id"], "expected_version": 9, "changes": {"subject": "x"}})
    await request_command("create", {"subject": "no link"})
    head = created[-1]["meta"]["position"]
    async with httpx.AsyncClient(base_url=runtime.endpoints["http_url"]) as http:
        text = ""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = (await http.get("/metrics")).text
            if 'activities_position{reader="projector"}' in text and metric(text, "activities_position", reader="projector") >= head:
                break
            await asyncio.sleep(0.1)
    assert metric(text, "activities_commands_total", command="create", outcome="ok") == 3
    assert metric(text, "activities_commands_total", command="create", outcome="validation_error") == 1
    assert metric(text, "activities_commands_total", command="patch", outcome="version_conflict") == 1
    assert metric(text, "activities_command_seconds_count", command="create") == 4
    assert metric(text, "activities_batch_size_count") >= 4
    assert metric(text, "activities_position", reader="head") == head
    assert metric(text, "activities_lag_events", reader="projector") == 0
    assert metric(text, "activities_db_pool", pool="event_store", stat="pool_size") >= 1
    assert 'activities_db_pool{pool="read_model"' in text
    assert "activities_http_requests_total" in text


async def test_health_and_readiness(runtime: Runtime) -> None:
    async with httpx.AsyncClient(base_url=runtime.endpoints["http_url"]) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks["database"] == "ok" and checks["nats"] == "ok"


async def test_trace_id_of_a_command_is_on_the_published_event(
    request_command: Requester, runtime: Runtime, nc: Any
) -> None:
    created = await request_command("create", {"account_id": "acc_traced"}, headers={"traceparent": TRACEPARENT})
    js = nc.jetstream()
    subscription = await js.subscribe(f"{runtime.settings.subject_prefix}.events.>", ordered_consumer=True)
    message = await subscription.next_msg(timeout=10)
    assert message.headers["Activity-Id"] == created["data"]["id"]
    assert message.headers["traceparent"] == TRACEPARENT
    await subscription.unsubscribe()


async def test_logs_are_json_lines_with_the_request_correlation_id(
    request_command: Requester, runtime: Runtime, caplog: Any
) -> None:
    """An `internal` reply names a correlation id that is on the log line with the traceback."""
    import json
    import logging

    import psycopg

    from services.logs import JsonFormatter

    assert runtime.servers is not None
    with psycopg.connect(runtime.servers.database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE activities_idempotency RENAME TO activities_idempotency_away")
    try:
        with caplog.at_level(logging.ERROR):
            reply = await request_command("create", {"account_id": "a"}, key="k", headers={"traceparent": TRACEPARENT})
    finally:
        with psycopg.connect(runtime.servers.database_url, autocommit=True) as conn:
            conn.execute("ALTER TABLE activities_idempotency_away RENAME TO activities_idempotency")
    assert reply["error"]["code"] == "internal"
    correlation = reply["error"]["message"].rsplit(" ", 1)[-1]
    lines = [json.loads(JsonFormatter().format(record)) for record in caplog.records]
    matching = [line for line in lines if line.get("correlation_id") == correlation]
    assert matching and "exc" in matching[0] and matching[0]["level"] == "error"
