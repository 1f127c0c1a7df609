"""Deadlines (services/deadlines.py): futures past their deadline go to `on_late` once, those done
in time never, and the one watching task ends when nothing waits."""

from __future__ import annotations

import asyncio
from typing import Any

from services.deadlines import Deadlines


def test_late_futures_are_handed_over_once_and_answered_ones_never() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        late: list[asyncio.Future[Any]] = []

        def on_late(future: asyncio.Future[Any]) -> None:
            late.append(future)
            future.set_result("late")

        deadlines = Deadlines(0.01, on_late)
        slow, quick, later = (loop.create_future() for _ in range(3))
        deadlines.add(loop.time() + 0.05, slow)
        deadlines.add(loop.time() + 0.05, quick)
        deadlines.add(loop.time() + 5.0, later)
        quick.set_result("in time")
        assert await asyncio.wait_for(slow, 1.0) == "late"
        await asyncio.sleep(0.05)
        assert late == [slow] and quick.result() == "in time" and not later.done()
        await deadlines.stop()  # what still waits is left to its owner
        assert not later.done()

        again = loop.create_future()
        deadlines.add(loop.time(), again)  # a new watch starts with the next deadline
        assert await asyncio.wait_for(again, 1.0) == "late"
        await asyncio.sleep(0.05)
        assert deadlines._task is not None and deadlines._task.done()  # nothing waits: no task keeps looking

    asyncio.run(scenario())
