"""A batch that loses a race with another command process, on real PostgreSQL: only the commands
that touched what the other process wrote run again alone; the rest commit together in the first
retry (issue "Hardening", finding 2).

Two `CommandService`s on one database stand for two command processes. The other process's write
is made from inside the first one's append, just before it, so the race is lost every time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent

from events.activity import activity_uuid
from events.commands import parse_create, parse_patch
from services.application import (
    CommandRequest,
    CommandResult,
    CommandService,
    conflicting_commands,
)
from services.domain import Caller

CALLER = Caller("acme", "usr-1")




def create(subject: str, key: str | None = None) -> CommandRequest:
    return CommandRequest(parse_create({"account_id": "acc_1", "subject": subject}), CALLER, key, "fp" if key else "")


def patch(activity_id: str, subject: str) -> CommandRequest:
    return CommandRequest(parse_patch({"id": activity_id, "changes": {"subject": subject}}), CALLER)


def results(outcomes: Sequence[Any]) -> list[CommandResult]:
    assert all(isinstance(outcome, CommandResult) for outcome in outcomes), outcomes
    return list(outcomes)


class RacedStore:
    """Counts the events of each append of a service, and lets another process write first."""

    def __init__(self, service: CommandService, before: Callable[[Sequence[StoredEvent]], Any]) -> None:
        self.appends: list[int] = []
        self._append = service.store.append
        self._before = before
        service.store.append = self.append  # type: ignore[method-assign]

    async def append(self, stored: Sequence[StoredEvent], keys: Any) -> list[int]:
        if stored:
            self.appends.append(len(stored))
            await self._before(stored)
        return await self._append(stored, keys)


def test_only_the_command_on_a_hot_activity_runs_alone(make_service: Callable[[], CommandService]) -> None:
    """Another process writes activity X just before each of this batch's first three appends that
    hold X (a hot activity). Before: the batch of seven failed three times, then all seven ran
    alone (ten transactions). Now: X's patch runs alone; the other six commit in the first retry,
    whatever happens to X."""

    async def scenario() -> None:
        ours, theirs = make_service(), make_service()
        try:
            ids = [r.document["id"] for r in results(await ours.execute([create(f"s{i}") for i in range(5)]))]
            hot = activity_uuid(ids[0])
            their_writes = 0

            async def other_process_writes_hot(stored: Sequence[StoredEvent]) -> None:
                nonlocal their_writes
                if their_writes < 3 and any(event.originator_id == hot for event in stored):
                    their_writes += 1
                    results(await theirs.execute([patch(ids[0], f"theirs {their_writes}")]))

            store = RacedStore(ours, other_process_writes_hot)
            batch = [patch(activity_id, "ours") for activity_id in ids] + [create("new 1"), create("new 2")]
            outcomes = results(await ours.execute(batch))

            # the batch lost; the other six at once; X alone, losing twice more, then saved
            assert store.appends == [7, 6, 1, 1, 1]
            assert outcomes[0].document["version"] == 5  # created, three writes of theirs, ours
            assert outcomes[0].document["subject"] == "ours"
            assert [o.document["version"] for o in outcomes[1:5]] == [2, 2, 2, 2]
            rest = sorted(o.position for o in outcomes[1:])
            assert rest == list(range(rest[0], rest[0] + 6)), "the other six commit in one transaction"
        finally:
            await ours.close()
            await theirs.close()

    asyncio.run(scenario())


def test_a_key_taken_by_another_process_replays_only_that_command(
    make_service: Callable[[], CommandService],
) -> None:
    """The same command with the same Idempotency-Key reached another process too, which committed
    first: that command replies with what the other stored; the batch's others commit at once."""

    async def scenario() -> None:
        ours, theirs = make_service(), make_service()
        try:
            theirs_reply: list[CommandResult] = []

            async def other_process_takes_the_key(stored: Sequence[StoredEvent]) -> None:
                if not theirs_reply:
                    theirs_reply.extend(results(await theirs.execute([create("keyed", key="k-1")])))

            store = RacedStore(ours, other_process_takes_the_key)
            outcomes = results(await ours.execute([create("a"), create("keyed", key="k-1"), create("b")]))
            assert store.appends == [3, 2]
            assert outcomes[1] == theirs_reply[0]
            assert [o.document["subject"] for o in outcomes] == ["a", "keyed", "b"]
        finally:
            await ours.close()
            await theirs.close()

    asyncio.run(scenario())


def test_conflicting_commands_are_those_on_moved_activities_or_taken_keys() -> None:
    x, y = activity_uuid("act_01KB0000000000000000000001"), activity_uuid("act_01KB0000000000000000000002")
    targets = {0: x, 1: y, 3: x}
    keys = {2: ("acme", "k"), 4: ("other", "k")}
    assert conflicting_commands(targets, keys, {x}, {("acme", "k")}) == {0, 2, 3}
    assert conflicting_commands(targets, keys, set(), set()) == set()
