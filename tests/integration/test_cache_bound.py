"""The command path's cache of activities stays within its memory bound with large documents
(issue "Hardening", finding 3): it was bounded by count (10,000 activities, up to about 2.5 GB
with documents near the 256 KiB limit)."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Callable

from events.activity import activity_uuid
from events.commands import parse_create, parse_patch
from services.application import CommandRequest, CommandResult, CommandService
from services.bootstrap import build_application
from services.config import Settings
from services.domain import Caller

CALLER = Caller("acme", "usr-1")
DOCUMENT_BYTES = 100_000


def test_the_cache_stays_within_its_bound_with_large_documents(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(aggregate_cache_mb=1)
    assert settings.database_url is not None
    app = build_application(settings, settings.database_url)
    service = CommandService(app)

    async def scenario() -> tuple[int, str]:
        try:
            first = ""
            for batch in range(4):  # 40 documents of 100 KB: 4 MB, four times the bound
                requests = [
                    CommandRequest(
                        parse_create({"account_id": "acc_1", "description": f"{batch}-{i} " + "x" * DOCUMENT_BYTES}),
                        CALLER,
                    )
                    for i in range(10)
                ]
                outcomes = await service.execute(requests)
                assert all(isinstance(outcome, CommandResult) for outcome in outcomes)
                ids = [outcome.document["id"] for outcome in outcomes]  # type: ignore[union-attr]
                first = first or ids[0]
                # a create is not cached; a patch caches the activity it changed, whole
                patches = [CommandRequest(parse_patch({"id": i, "changes": {"notes": "seen"}}), CALLER) for i in ids]
                outcomes = await service.execute(patches)
                assert all(isinstance(outcome, CommandResult) for outcome in outcomes)
                del requests, patches, outcomes  # keep only what the service keeps
            gc.collect()
            retained = tracemalloc.get_traced_memory()[0]
            return retained, first
        finally:
            await service.close()

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        after, first = asyncio.run(scenario())
    finally:
        tracemalloc.stop()
    try:
        retained_mb = (after - before) / 1e6
        assert retained_mb < 2.0, f"{retained_mb:.1f} MB retained for a cache bounded to 1 MB"
        assert app.activity_cache.bytes <= 1024 * 1024 and len(app.activity_cache) <= 10

        async def patch_the_first() -> CommandResult:  # evicted long ago: read from the store again
            try:
                request = CommandRequest(parse_patch({"id": first, "changes": {"subject": "still there"}}), CALLER)
                (outcome,) = await service.execute([request])
                assert isinstance(outcome, CommandResult), outcome
                return outcome
            finally:
                await service.close()

        patched = asyncio.run(patch_the_first())
        assert patched.document["version"] == 3 and patched.document["description"].startswith("0-0 ")
    finally:
        app.close()


def test_a_create_is_not_cached_and_the_first_command_on_it_caches_it(make_settings: Callable[..., Settings]) -> None:
    """Most activities are never changed after their create: the cache holds those a later command
    read or changed (services/application.py, `remember`)."""
    settings = make_settings()
    assert settings.database_url is not None
    app = build_application(settings, settings.database_url)
    service = CommandService(app)

    async def scenario() -> None:
        try:
            (created,) = await service.execute([CommandRequest(parse_create({"account_id": "acc_1"}), CALLER)])
            assert isinstance(created, CommandResult)
            originator_id = activity_uuid(created.document["id"])
            assert app.activity_cache.get(originator_id) is None
            request = CommandRequest(parse_patch({"id": created.document["id"], "changes": {"notes": "n"}}), CALLER)
            (patched,) = await service.execute([request])
            assert isinstance(patched, CommandResult) and patched.document["version"] == 2
            cached = app.activity_cache.get(originator_id)
            assert cached is not None and cached.version == 2 and cached.document == patched.document
        finally:
            await service.close()

    try:
        asyncio.run(scenario())
    finally:
        app.close()
