"""The AsyncAPI document: served by the running service, covering every subject, true to the wire."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import unquote

import httpx
import orjson
from nats.aio.client import Client as NatsClient

from activities_client.document import ActivityDocument, ActivityFields, EventBody
from activities_client.subjects import COMMAND_NAMES, QUERY_NAMES, Subjects
from services.asyncapi import asyncapi_document
from services.bootstrap import Runtime

KINDS = ("logged", "patched", "deleted", "restored")


def resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow `$ref`s inside the document (local JSON pointers only)."""
    while "$ref" in node:
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[unquote(part).replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def payload_of(document: dict[str, Any], channel: str) -> dict[str, Any]:
    (message,) = document["channels"][channel]["messages"].values()
    return resolve(document, resolve(document, message)["payload"])


def reply_payloads(document: dict[str, Any], subject: str) -> list[dict[str, Any]]:
    (reply,) = document["operations"][subject]["reply"]["messages"]
    return [resolve(document, option) for option in resolve(document, reply)["payload"]["oneOf"]]


def test_document_covers_every_subject_with_its_schema() -> None:
    document = asyncapi_document("acme.activities")
    subjects = Subjects("acme.activities")
    assert document["asyncapi"].startswith("3.")

    for name in COMMAND_NAMES:
        subject = subjects.command(name)
        assert document["channels"][subject]["bindings"]["nats"]["queue"] == "activities"
        assert document["operations"][subject]["action"] == "receive"
        (message,) = document["channels"][subject]["messages"].values()
        assert "Idempotency-Key" in resolve(document, message)["headers"]["properties"]
        replies = reply_payloads(document, subject)
        assert {tuple(sorted(r["properties"])) for r in replies} == {("data", "meta"), ("error",)}
    assert set(payload_of(document, subjects.command("create"))["properties"]) == set(ActivityFields.model_fields)
    assert set(payload_of(document, subjects.command("patch"))["properties"]) == {"id", "expected_version", "changes"}
    for name in ("delete", "restore"):
        assert set(payload_of(document, subjects.command(name))["properties"]) == {"id", "expected_version"}

    for name in QUERY_NAMES:
        subject = subjects.query(name)
        assert document["operations"][subject]["action"] == "receive"
        assert payload_of(document, subject)["properties"]
        assert len(reply_payloads(document, subject)) == 2
    assert {"id", "include_deleted", "version", "min_position"} <= set(
        payload_of(document, subjects.query("get"))["properties"]
    )
    assert {"account_id", "type", "tag", "sort", "limit", "cursor"} <= set(
        payload_of(document, subjects.query("list"))["properties"]
    )

    for kind in KINDS:
        channel = subjects.event("{tenant_id}", kind)
        assert document["operations"][channel]["action"] == "send"
        assert document["channels"][channel]["address"] == f"acme.activities.events.{{tenant_id}}.{kind}"
        assert "tenant_id" in document["channels"][channel]["parameters"]
        (message,) = document["channels"][channel]["messages"].values()
        assert set(resolve(document, message)["headers"]["required"]) >= {"Nats-Msg-Id", "Activity-Id"}
        assert set(payload_of(document, channel)["properties"]) == set(EventBody.model_fields)
    activity = resolve(document, {"$ref": "#/components/schemas/ActivityDocument"})
    assert set(activity["properties"]) == set(ActivityDocument.model_fields)


async def test_running_service_serves_the_document_and_events_match_it(
    runtime: Runtime, request_command: Any, nc: NatsClient
) -> None:
    async with httpx.AsyncClient(base_url=runtime.endpoints["http_url"], timeout=10) as http:
        response = await http.get("/asyncapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document == orjson.loads(orjson.dumps(asyncapi_document(runtime.settings.subject_prefix)))

    created = await request_command("create", {"account_id": "acc_1", "type": "call"})
    reply_schema = reply_payloads(document, runtime.subjects.command("create"))[0]
    assert set(created) == set(reply_schema["properties"])
    assert set(created["data"]) == set(
        resolve(document, {"$ref": "#/components/schemas/ActivityDocument"})["properties"]
    )

    js = nc.jetstream()
    deadline = time.monotonic() + 10
    while (await js.stream_info(runtime.settings.stream_name)).state.messages < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    event = orjson.loads((await js.get_msg(runtime.settings.stream_name, 1)).data or b"{}")
    schema = payload_of(document, runtime.subjects.event("{tenant_id}", "logged"))
    assert set(event) == set(schema["properties"]) and set(schema["required"]) <= set(event)
