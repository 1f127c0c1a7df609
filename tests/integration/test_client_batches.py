"""The client's `upsert`, `get_by_key` and `batch` (async and blocking, over NATS and over HTTP
reads) and the CLI's `upsert`, `get-by-key` and `batch`, against the service running in-process."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from activities_client import (
    ActivitiesError,
    Activity,
    AsyncClient,
    Client,
    Gone,
    NotFound,
    ValidationError,
    VersionConflict,
)
from services.bootstrap import Runtime
from tests.conftest import JWT_SECRET


def client_kwargs(runtime: Runtime, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "nats_url": runtime.endpoints["nats_url"],
        "subject_prefix": runtime.settings.subject_prefix,
        "stream_name": runtime.settings.stream_name,
    }
    values.update(overrides)
    return values


async def test_async_client_upsert_get_by_key_and_batch(runtime: Runtime, token: Callable[..., str]) -> None:
    for http_url in (None, runtime.endpoints["http_url"]):
        kwargs = client_kwargs(runtime, http_url=http_url)
        async with AsyncClient(token=token(tenant=f"t{bool(http_url)}"), **kwargs) as c:
            activities = c.customer.activities
            created = await activities.upsert("k-1", {"account_id": "acc_1", "subject": "a"})
            assert created.created is True and created.external_key == "k-1" and created.version == 1
            updated = await activities.upsert("k-1", {"subject": "b"}, expected_version=1)
            assert updated.created is False and updated.version == 2 and updated.id == created.id
            with pytest.raises(VersionConflict) as conflict:
                await activities.upsert("k-1", {"subject": "c"}, expected_version=1)
            assert conflict.value.current_version == 2
            found = await activities.get_by_key("k-1")  # reads its own writes (min_position)
            assert found.id == created.id and found.subject == "b" and found.created is None
            with pytest.raises(NotFound):
                await activities.get_by_key("k-none")
            results = await activities.batch(
                [
                    {"op": "create", "account_id": "acc_1"},
                    {"op": "patch", "id": created.id, "changes": {"status": "done"}},
                    {"op": "create", "subject": "unlinked"},
                    {"op": "upsert", "external_key": "k-2", "activity": {"deal_id": "d"}},
                    {"op": "delete", "id": created.id},
                ]
            )
            assert [type(r) for r in results] == [Activity, Activity, ValidationError, Activity, Activity]
            assert isinstance(results[3], Activity) and results[3].created is True
            assert isinstance(results[2], ActivitiesError) and results[2].details[0]["field"] == "account_id"
            with pytest.raises(Gone):
                await activities.get_by_key("k-1")
            assert (await activities.get_by_key("k-1", include_deleted=True)).is_deleted
            with pytest.raises(ValidationError):
                await activities.batch([])


async def test_blocking_client(runtime: Runtime, token: Callable[..., str]) -> None:
    """The blocking client, in a thread (the service runs on this test's loop)."""
    await asyncio.to_thread(blocking_calls, runtime, token())


def blocking_calls(runtime: Runtime, bearer: str) -> None:
    with Client(token=bearer, **client_kwargs(runtime)) as client:
        activities = client.customer.activities
        first = activities.upsert("sync-1", {"account_id": "acc_1"})
        assert first.created is True
        assert activities.upsert("sync-1", {"subject": "s"}).created is False
        assert activities.get_by_key("sync-1").subject == "s"
        results = activities.batch([{"op": "upsert", "external_key": "sync-1", "activity": {"subject": "t"}}])
        assert isinstance(results[0], Activity) and results[0].created is False and results[0].version == 3


async def test_cli_upsert_get_by_key_and_batch(
    runtime: Runtime,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    from services.cli import main

    settings = runtime.settings
    for name, value in {
        "ACTIVITIES_DATA_DIR": str(settings.data_dir),
        "ACTIVITIES_SUBJECT_PREFIX": settings.subject_prefix,
        "ACTIVITIES_STREAM_NAME": settings.stream_name,
        "ACTIVITIES_JWT_SECRET": JWT_SECRET,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ACTIVITIES_TOKEN", raising=False)
    monkeypatch.delenv("ACTIVITIES_NATS_URL", raising=False)

    async def run(*argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, _ = await run("upsert", "cli-1", "--tenant", "clit", "-f", "account_id=acc_1", "-f", "subject=Hello")
    assert code == 0 and out.splitlines()[-1] == "created"
    code, out, _ = await run("upsert", "cli-1", "--tenant", "clit", "-f", "subject=Again", "--json")
    assert code == 0 and json.loads(out)["created"] is False and json.loads(out)["version"] == 2
    code, out, _ = await run("get-by-key", "cli-1", "--tenant", "clit", "--json")
    assert code == 0 and json.loads(out)["subject"] == "Again"
    code, _, err = await run("get-by-key", "cli-none", "--tenant", "clit")
    assert code == 1 and err.startswith("error: not_found")

    batch_file = tmp_path / "batch.json"
    commands = [
        {"op": "create", "account_id": "acc_2"},
        {"op": "upsert", "external_key": "cli-1", "activity": {"status": "done"}},
    ]
    batch_file.write_text(json.dumps({"commands": commands}))
    code, out, _ = await run("batch", str(batch_file), "--tenant", "clit", "--json")
    results = json.loads(out)
    assert code == 0 and results[0]["data"]["version"] == 1 and results[1]["created"] is False
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps([*commands, {"op": "create"}])))
    code, out, err = await run("batch", "-", "--tenant", "clit")
    lines = out.splitlines()
    assert code == 2 and "1 of 3 commands failed" in err
    assert lines[2].split()[1] == "created" and lines[4].split()[1:3] == ["error", "validation_error"]
    code, _, err = await run("batch", str(tmp_path / "missing.json"), "--tenant", "clit")
    assert code == 2 and "cannot read" in err
