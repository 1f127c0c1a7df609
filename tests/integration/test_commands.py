"""Every command and every error code over real NATS and PostgreSQL (docs/contract.md section 3)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import psycopg
import pytest

from services.bootstrap import Runtime
from services.config import Settings
from tests.conftest import Requester

LINK = {"account_id": "acc_1"}


def stored_events(runtime: Runtime) -> int:
    assert runtime.servers is not None
    with psycopg.connect(runtime.servers.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM activities_events").fetchone()
    assert row is not None
    return int(row[0])


def error_code(reply: dict[str, Any]) -> str:
    return str(reply["error"]["code"])


@contextlib.contextmanager
def holding_the_append_lock(runtime: Runtime) -> Iterator[None]:
    """Hold the lock every append takes, as a long append would: batches wait until the block ends."""
    assert runtime.servers is not None and runtime.app is not None
    with psycopg.connect(runtime.servers.database_url, autocommit=True) as blocker, blocker.transaction():
        blocker.execute("SELECT pg_advisory_xact_lock(%s)", (runtime.app.activities_recorder.append_lock_key,))
        yield


async def test_create_patch_delete_restore(request_command: Requester, runtime: Runtime) -> None:
    created = await request_command("create", {**LINK, "type": "meeting", "subject": "Kick-off", "tags": ["q4"]})
    activity = created["data"]
    assert activity["id"].startswith("act_") and activity["version"] == 1
    assert activity["created_by"] == "usr-1" and activity["tenant_id"] == "acme" and activity["app_id"] is None

    patched = await request_command("patch", {"id": activity["id"], "changes": {"status": "held", "tags": None}})
    assert patched["data"]["status"] == "held" and patched["data"]["tags"] == [] and patched["data"]["version"] == 2

    deleted = await request_command("delete", {"id": activity["id"], "expected_version": 2})
    assert deleted["data"]["is_deleted"] is True and deleted["data"]["deleted_by"] == "usr-1"

    restored = await request_command("restore", {"id": activity["id"]})
    assert restored["data"]["is_deleted"] is False and restored["data"]["version"] == 4

    positions = [r["meta"]["position"] for r in (created, patched, deleted, restored)]
    assert positions == sorted(positions) and len(set(positions)) == 4
    assert stored_events(runtime) == 4


async def test_no_ops_append_nothing_and_reply_with_the_current_document(
    request_command: Requester, runtime: Runtime
) -> None:
    created = await request_command("create", {**LINK, "subject": "same"})
    activity_id = created["data"]["id"]
    same = await request_command("patch", {"id": activity_id, "changes": {"subject": "same"}})
    assert same["data"] == created["data"] and same["meta"]["position"] == created["meta"]["position"]
    live_restore = await request_command("restore", {"id": activity_id})
    assert live_restore["data"]["version"] == 1
    deleted = await request_command("delete", {"id": activity_id})
    again = await request_command("delete", {"id": activity_id})
    assert again["data"] == deleted["data"] and again["meta"]["position"] == deleted["meta"]["position"]
    assert stored_events(runtime) == 2


async def test_app_tokens_stamp_and_scope(request_command: Requester, token: Callable[..., str]) -> None:
    created = await request_command("create", LINK, bearer=token(app="gong", sub="svc-gong"))
    assert created["data"]["app_id"] == "gong" and created["data"]["created_by"] == "svc-gong"
    activity_id = created["data"]["id"]
    for bearer in (token(tenant="globex"), token(app="hubspot")):
        for name, body in (
            ("patch", {"id": activity_id, "changes": {"subject": "x"}}),
            ("delete", {"id": activity_id}),
            ("restore", {"id": activity_id}),
        ):
            reply = await request_command(name, body, bearer=bearer)
            assert error_code(reply) == "not_found", (name, reply)
    human = await request_command("patch", {"id": activity_id, "changes": {"subject": "seen"}}, bearer=token())
    assert human["data"]["subject"] == "seen"


@pytest.mark.parametrize(
    ("name", "raw", "field"),
    [
        ("create", b"not json", "body"),
        ("create", b"[1,2]", "body"),
        ("create", b"\xff\xfe\x00", "body"),
        ("create", b'{"subject": "no link"}', "account_id"),
        ("create", b'{"account_id": "a", "version": 3}', "version"),
        ("create", b'{"account_id": "a", "colour": "red"}', "colour"),
        ("create", b'{"account_id": "a", "activity_date": "2026-01-01T10:00:00"}', "activity_date"),
        ("create", b'{"account_id": "a", "description": "' + b"x" * (256 * 1024) + b'"}', "body"),
        ("patch", b'{"id": "act_bad", "changes": {}}', "id"),
        ("delete", b'{"id": 5}', "id"),
        ("restore", b"{}", "id"),
    ],
)
async def test_bad_input_gets_validation_error_and_changes_nothing(
    request_command: Requester, runtime: Runtime, name: str, raw: bytes, field: str
) -> None:
    reply = await request_command(name, None, raw=raw)
    assert error_code(reply) == "validation_error"
    assert field in {d["field"] for d in reply["error"]["details"]}
    assert stored_events(runtime) == 0


@pytest.mark.parametrize("bearer", ["", "garbage", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."])
async def test_bad_tokens_are_unauthorized(request_command: Requester, runtime: Runtime, bearer: str) -> None:
    reply = await request_command("create", LINK, headers={"Authorization": f"Bearer {bearer}"})
    assert error_code(reply) == "unauthorized"
    assert stored_events(runtime) == 0


async def test_missing_authorization_header_is_unauthorized(runtime: Runtime, nc: Any) -> None:
    import orjson

    message = await nc.request(f"{runtime.settings.subject_prefix}.cmd.create", orjson.dumps(LINK), timeout=5)
    assert orjson.loads(message.data)["error"]["code"] == "unauthorized"


async def test_not_found_gone_and_version_conflict(request_command: Requester) -> None:
    missing = await request_command("patch", {"id": "act_01ARZ3NDEKTSV4RRFFQ69G5FAV", "changes": {"subject": "x"}})
    assert error_code(missing) == "not_found"
    activity = (await request_command("create", LINK))["data"]
    stale = await request_command("patch", {"id": activity["id"], "expected_version": 7, "changes": {"subject": "x"}})
    assert error_code(stale) == "version_conflict" and stale["error"]["current_version"] == 1
    await request_command("delete", {"id": activity["id"]})
    gone = await request_command("patch", {"id": activity["id"], "changes": {"subject": "x"}})
    assert error_code(gone) == "gone"


async def test_idempotency_key_replays_and_conflicts(request_command: Requester, runtime: Runtime) -> None:
    first = await request_command("create", {**LINK, "subject": "once"}, key="order-42")
    again = await request_command("create", {**LINK, "subject": "once"}, key="order-42")
    assert again == first
    other_body = await request_command("create", {**LINK, "subject": "twice"}, key="order-42")
    assert error_code(other_body) == "idempotency_conflict"
    other_command = await request_command("delete", {"id": first["data"]["id"]}, key="order-42")
    assert error_code(other_command) == "idempotency_conflict"
    assert stored_events(runtime) == 1


async def test_idempotency_keys_are_per_tenant(request_command: Requester, token: Callable[..., str]) -> None:
    acme = await request_command("create", LINK, key="shared-key")
    globex = await request_command("create", LINK, key="shared-key", bearer=token(tenant="globex"))
    assert acme["data"]["id"] != globex["data"]["id"] and globex["data"]["tenant_id"] == "globex"


async def test_a_failed_command_may_be_retried_with_its_key(request_command: Requester) -> None:
    activity = (await request_command("create", LINK))["data"]
    body = {"id": activity["id"], "expected_version": 1, "changes": {"subject": "x"}}
    await request_command("patch", {"id": activity["id"], "changes": {"subject": "moved on"}})
    failed = await request_command("patch", body, key="retry-me")
    assert error_code(failed) == "version_conflict"
    body["expected_version"] = 2
    ok = await request_command("patch", body, key="retry-me")
    assert ok["data"]["version"] == 3


async def test_a_command_the_store_is_too_slow_for_is_unavailable_and_its_retry_gets_what_was_stored(
    make_settings: Callable[..., Settings], nc: Any, token: Callable[..., str]
) -> None:
    """The reply does not wait for a stuck store past `request_timeout_s`; the command may still
    commit afterwards, and its retry with the same Idempotency-Key then replies with what was stored."""
    runtime = Runtime(make_settings(request_timeout_s=1.0))
    await runtime.start()
    subject = f"{runtime.settings.subject_prefix}.cmd.create"
    headers = {"Authorization": f"Bearer {token()}", "Idempotency-Key": "slow-store"}
    body = orjson.dumps({**LINK, "subject": "late"})
    try:
        with holding_the_append_lock(runtime):
            started = time.monotonic()
            timed_out = orjson.loads((await nc.request(subject, body, headers=headers, timeout=10)).data)
            assert error_code(timed_out) == "unavailable", timed_out
            assert 1.0 <= time.monotonic() - started < 5
            assert "Idempotency-Key" in timed_out["error"]["message"]
            assert stored_events(runtime) == 0
        retried = orjson.loads((await nc.request(subject, body, headers=headers, timeout=10)).data)
        assert retried["data"]["subject"] == "late", retried
        again = orjson.loads((await nc.request(subject, body, headers=headers, timeout=10)).data)
        assert again == retried
        assert stored_events(runtime) == 1  # the first attempt committed once the lock was free
    finally:
        await runtime.stop()


async def test_stopping_waits_for_the_batch_being_saved_and_answers_it(
    make_settings: Callable[..., Settings], nc: Any, token: Callable[..., str]
) -> None:
    runtime = Runtime(make_settings())
    await runtime.start()
    subject = f"{runtime.settings.subject_prefix}.cmd.create"
    headers = {"Authorization": f"Bearer {token()}"}
    with holding_the_append_lock(runtime):
        sent = asyncio.create_task(nc.request(subject, orjson.dumps(LINK), headers=headers, timeout=10))
        await asyncio.sleep(0.5)
        stopping = asyncio.create_task(runtime.stop())
        await asyncio.sleep(0.5)
        assert not stopping.done(), "stop must wait for the batch being saved"
    reply = orjson.loads((await sent).data)
    await asyncio.wait_for(stopping, 10)
    assert reply["data"]["version"] == 1, reply
    assert stored_events(runtime) == 1


@pytest.mark.parametrize("key", ["x" * 201, "tab\tkey", "ключ"])
async def test_bad_idempotency_keys_are_refused(request_command: Requester, key: str) -> None:
    reply = await request_command("create", LINK, headers={"Idempotency-Key": key})
    assert error_code(reply) == "validation_error"


async def test_concurrent_commands_are_grouped_and_each_gets_its_reply(
    request_command: Requester, runtime: Runtime
) -> None:
    replies = await asyncio.gather(*(request_command("create", {**LINK, "subject": f"n{i}"}) for i in range(200)))
    subjects = sorted(r["data"]["subject"] for r in replies)
    assert subjects == sorted(f"n{i}" for i in range(200))
    assert len({r["meta"]["position"] for r in replies}) == 200
    assert stored_events(runtime) == 200
    assert runtime.batcher is not None and runtime.batcher.batches < runtime.batcher.commands


async def test_concurrent_patches_of_one_activity_lose_no_update(request_command: Requester) -> None:
    activity = (await request_command("create", {**LINK, "tags": []}))["data"]
    replies = await asyncio.gather(
        *(request_command("patch", {"id": activity["id"], "changes": {"subject": f"s{i}"}}) for i in range(50))
    )
    versions = sorted(r["data"]["version"] for r in replies)
    assert versions == list(range(2, 52))


async def test_store_bug_replies_internal_with_a_correlation_id(request_command: Requester, runtime: Runtime) -> None:
    assert runtime.servers is not None
    with psycopg.connect(runtime.servers.database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE activities_idempotency RENAME TO activities_idempotency_gone")
    try:
        reply = await request_command("create", LINK, key="k-internal")
        assert error_code(reply) == "internal" and "correlation id" in reply["error"]["message"]
    finally:
        with psycopg.connect(runtime.servers.database_url, autocommit=True) as conn:
            conn.execute("ALTER TABLE activities_idempotency_gone RENAME TO activities_idempotency")
    assert stored_events(runtime) == 0


async def test_idempotent_retry_after_a_service_restart(
    make_settings: Callable[..., Settings], nc: Any, token: Callable[..., str]
) -> None:
    import orjson

    settings = make_settings()
    headers = {"Authorization": f"Bearer {token()}", "Idempotency-Key": "survives-restart"}
    subject = f"{settings.subject_prefix}.cmd.create"
    first_runtime = Runtime(settings)
    await first_runtime.start()
    try:
        first = orjson.loads((await nc.request(subject, orjson.dumps(LINK), headers=headers, timeout=10)).data)
    finally:
        await first_runtime.stop()
    second_runtime = Runtime(settings)
    await second_runtime.start()
    try:
        retried = orjson.loads((await nc.request(subject, orjson.dumps(LINK), headers=headers, timeout=10)).data)
        assert retried == first
        assert stored_events(second_runtime) == 1
    finally:
        await second_runtime.stop()


async def test_large_batches_of_large_documents_commit(request_command: Requester, runtime: Runtime) -> None:
    """A batch of big documents once deadlocked psycopg's pipeline over the embedded server's unix socket."""
    description = "lorem ipsum " * 8000  # ~96 KB each
    replies = await asyncio.gather(
        *(request_command("create", {**LINK, "description": description}) for _ in range(60))
    )
    assert all(r["data"]["description"] == description for r in replies)
    assert stored_events(runtime) == 60


async def test_idempotency_keys_expire_and_are_purged(
    make_settings: Callable[..., Settings], nc: Any, token: Callable[..., str]
) -> None:
    import orjson

    settings = make_settings(idempotency_ttl_hours=0.5 / 3600)  # half a second
    runtime = Runtime(settings)
    await runtime.start()
    try:
        headers = {"Authorization": f"Bearer {token()}", "Idempotency-Key": "short-lived"}
        subject = f"{settings.subject_prefix}.cmd.create"
        first = orjson.loads((await nc.request(subject, orjson.dumps(LINK), headers=headers, timeout=10)).data)
        await asyncio.sleep(0.8)
        other = {"account_id": "acc_2"}
        second = orjson.loads((await nc.request(subject, orjson.dumps(other), headers=headers, timeout=10)).data)
        assert second["data"]["id"] != first["data"]["id"]  # the key expired: a new command, not a conflict
        await asyncio.sleep(0.8)
        assert runtime.app is not None
        assert runtime.app.activities_recorder.purge_expired_keys() == 1
    finally:
        await runtime.stop()
