from typing import Any


async def test_create_then_patch_over_nats(request_command: Any) -> None:
    created = await request_command("create", {"account_id": "acc_1", "type": "call"})
    activity = created["data"]
    assert activity["version"] == 1 and activity["tenant_id"] == "acme"
    patched = await request_command("patch", {"id": activity["id"], "expected_version": 1, "changes": {"status": "done"}})
    assert patched["data"]["status"] == "done"
    assert patched["data"]["version"] == 2
    assert patched["meta"]["position"] > created["meta"]["position"]
