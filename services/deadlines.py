"""Deadlines of many waiting futures, kept by one task: the command batcher's (services/application.py)
and the inbox's result publishes (services/inbox.py, StreamAcks)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from typing import Any


class Deadlines:
    """Futures each handed to `on_late` once its deadline (event-loop time) has passed and it is
    still not done, by one task that looks every `interval_s` and only while futures wait.

    A timer per future (`asyncio.timeout`, `call_later`) cost about 4% of the CPU of a create on
    the command path. Deadlines are added nearly in order (the same timeout from about now), so
    the oldest wait at the front and a look stops at the first one still in time; one added out of
    order is handed over late by at most the difference."""

    def __init__(self, interval_s: float, on_late: Callable[[asyncio.Future[Any]], None]) -> None:
        self._interval_s = interval_s
        self._on_late = on_late
        self._waiting: collections.deque[tuple[float, asyncio.Future[Any]]] = collections.deque()
        self._task: asyncio.Task[None] | None = None

    def add(self, deadline: float, future: asyncio.Future[Any]) -> None:
        self._waiting.append((deadline, future))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="deadlines")

    async def stop(self) -> None:
        """Stop looking; the futures still waiting are left to their owner."""
        self._waiting.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        waiting = self._waiting
        while waiting:
            await asyncio.sleep(self._interval_s)
            now = loop.time()
            while waiting and (waiting[0][1].done() or waiting[0][0] <= now):
                _, future = waiting.popleft()
                if not future.done():
                    self._on_late(future)
