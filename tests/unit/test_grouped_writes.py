"""The inbox writes the results it must remember in groups (services/inbox.py GroupedWrites)."""

from __future__ import annotations

import asyncio
from uuid import uuid4

from services.inbox import GroupedWrites, Remembered


async def test_rows_added_while_a_write_is_in_flight_make_one_next_write() -> None:
    writes: list[list[Remembered]] = []
    release = asyncio.Event()

    async def write(rows: list[Remembered]) -> None:
        writes.append(rows)
        await release.wait()

    grouped = GroupedWrites(write)
    first = asyncio.create_task(grouped.add([(1, uuid4())]))
    await asyncio.sleep(0)  # the first write starts and waits
    rest = [asyncio.create_task(grouped.add([(seq, uuid4())])) for seq in range(2, 12)]
    await asyncio.sleep(0)
    assert not first.done() and len(writes) == 1
    release.set()
    await asyncio.gather(first, *rest)
    assert [[seq for seq, _ in rows] for rows in writes] == [[1], list(range(2, 12))]


async def test_a_failed_write_fails_every_add_of_its_group_and_the_next_group_is_written() -> None:
    calls = 0

    async def write(rows: list[Remembered]) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if calls == 1:
            raise ConnectionError("the database went away")

    grouped = GroupedWrites(write)
    adds = [asyncio.create_task(grouped.add([(seq, uuid4())])) for seq in range(3)]
    outcomes = await asyncio.gather(*adds, return_exceptions=True)
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes)
    await grouped.add([(9, uuid4())])  # a later group is written
    assert calls == 2

