"""Encryption at rest of event payloads (eventsourcing's AES-GCM cipher) as a setting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from eventsourcing.cryptography import AESCipher

from services.bootstrap import Runtime
from services.config import Settings
from tests.conftest import Requester


def stored_states(database_url: str) -> list[bytes]:
    with psycopg.connect(database_url) as conn:
        return [bytes(row[0]) for row in conn.execute("SELECT state FROM activities_events ORDER BY notification_id")]


async def test_payloads_are_encrypted_at_rest_and_readable_with_the_key(
    make_settings: Callable[..., Settings], nc: Any, token: Callable[..., str]
) -> None:
    import orjson

    settings = make_settings(cipher_key=AESCipher.create_key(32))
    runtime = Runtime(settings)
    await runtime.start()
    try:
        headers = {"Authorization": f"Bearer {token()}"}
        subject = f"{settings.subject_prefix}.cmd"
        body = {"account_id": "acc_secret", "subject": "Quarterly pricing talk"}
        created = orjson.loads((await nc.request(f"{subject}.create", orjson.dumps(body), headers=headers, timeout=10)).data)
        patch = {"id": created["data"]["id"], "changes": {"notes": "confidential"}}
        patched = orjson.loads((await nc.request(f"{subject}.patch", orjson.dumps(patch), headers=headers, timeout=10)).data)
        assert patched["data"]["subject"] == "Quarterly pricing talk" and patched["data"]["version"] == 2
        states = stored_states(settings.database_url or "")
        assert len(states) == 2
        for state in states:
            assert b"acc_secret" not in state and b"Quarterly" not in state and b"confidential" not in state
    finally:
        await runtime.stop()


async def test_without_a_key_payloads_are_plain_json(request_command: Requester, runtime: Runtime) -> None:
    await request_command("create", {"account_id": "acc_plain"})
    assert runtime.settings.database_url is not None
    assert b"acc_plain" in stored_states(runtime.settings.database_url)[0]


async def test_an_encrypted_log_rebuilds_through_the_decoding_path(
    make_settings: Callable[..., Settings], nc: Any, token: Callable[..., str]
) -> None:
    """With a cipher the log cannot be projected in SQL: the rebuild decodes it, row for row the same."""
    import asyncio

    import orjson

    from projections.read_model import read_model_datastore, rebuild

    settings = make_settings(cipher_key=AESCipher.create_key(16))
    runtime = Runtime(settings)
    await runtime.start()
    try:
        headers = {"Authorization": f"Bearer {token()}"}
        subject = f"{settings.subject_prefix}.cmd"
        last: dict[str, Any] = {}
        for i in range(5):
            created = orjson.loads((await nc.request(f"{subject}.create", orjson.dumps({"account_id": f"a{i}"}),
                                                     headers=headers, timeout=10)).data)
            patch = {"id": created["data"]["id"], "changes": {"subject": f"s{i}"}}
            last = orjson.loads((await nc.request(f"{subject}.patch", orjson.dumps(patch), headers=headers,
                                                  timeout=10)).data)
        database_url = settings.database_url or ""

        def read_model() -> list[tuple[Any, ...]]:
            with psycopg.connect(database_url) as conn:
                return list(conn.execute("SELECT id, version, position, document FROM activities ORDER BY id"))

        for _ in range(100):
            if len(read_model()) == 5 and max(row[2] for row in read_model()) >= last["meta"]["position"]:
                break
            await asyncio.sleep(0.05)
        live = read_model()
        assert runtime.app is not None and runtime.app.mapper.cipher is not None
        datastore = read_model_datastore(database_url)
        try:
            await asyncio.get_running_loop().run_in_executor(None, rebuild, runtime.app, datastore)
        finally:
            datastore.close()
        assert read_model() == live and len(live) == 5
    finally:
        await runtime.stop()
