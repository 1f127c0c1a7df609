"""A part of the service that is slow to stop says which part it is and where every task waits."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services import bootstrap


async def _waits_on_a_lock(lock: asyncio.Lock) -> None:
    async with lock:
        pass


def test_a_slow_stop_logs_the_part_and_where_each_task_waits(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(bootstrap, "SLOW_STOP_S", 0.05)

    async def scenario() -> None:
        lock = asyncio.Lock()
        await lock.acquire()
        asyncio.get_running_loop().call_later(0.2, lock.release)
        await bootstrap.stop_watched("Inbox", _waits_on_a_lock(lock))

    with caplog.at_level(logging.WARNING, logger="activities.bootstrap"):
        asyncio.run(scenario())
    (record,) = [r for r in caplog.records if r.getMessage() == "a part is slow to stop"]
    assert record.part == "Inbox"  # type: ignore[attr-defined]
    assert any("_waits_on_a_lock" in task and "acquire" in task for task in record.tasks)  # type: ignore[attr-defined]


def test_a_prompt_stop_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    async def prompt() -> None:
        await asyncio.sleep(0)

    with caplog.at_level(logging.WARNING, logger="activities.bootstrap"):
        asyncio.run(bootstrap.stop_watched("Relay", prompt()))
    assert not [r for r in caplog.records if r.getMessage() == "a part is slow to stop"]
