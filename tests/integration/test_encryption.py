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
