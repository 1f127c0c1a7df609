"""The rules that keep the command path's work bounded under overload (services/application.py)."""

from __future__ import annotations

import asyncio

from events.commands import parse_create
from services.application import CommandRequest, Waiting, queue_bound, still_wanted
from services.domain import Caller


def test_the_queue_bound_is_the_setting_or_ten_batches() -> None:
    assert queue_bound(None, 200) == 2000
    assert queue_bound(0, 200) == 2000
    assert queue_bound(50, 200) == 50


def test_a_command_is_carried_out_only_while_its_caller_waits_and_before_its_deadline() -> None:
    async def check() -> None:
        loop = asyncio.get_running_loop()
        request = CommandRequest(parse_create({"account_id": "acc_1"}), Caller("acme", "usr-1"))
        waiting = Waiting(request, loop.create_future(), deadline=10.0)
        assert still_wanted(waiting, now=9.99)
        assert not still_wanted(waiting, now=10.0)  # past its deadline: answered, never carried out
        gone = Waiting(request, loop.create_future(), deadline=10.0)
        gone.future.cancel()  # its caller stopped waiting
        assert not still_wanted(gone, now=1.0)

    asyncio.run(check())
