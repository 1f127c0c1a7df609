"""Overload over real NATS and PostgreSQL: what the service does with more commands than it can
carry out in time. Excess is refused at once, a command past its deadline is never carried out,
and nothing waits unseen in a buffer (issue "Hardening", finding 1).

The store is stalled by holding the lock every append takes, so that commands pile up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from services.bootstrap import Runtime
from services.config import Settings
from tests.integration.test_commands import LINK, error_code, holding_the_append_lock, stored_events


COMMANDS_ONLY = ("commands",)  # the write path alone: what these tests stall and overload


class Sender:
    """Creates over NATS with the test's token, optionally under an Idempotency-Key."""

    def __init__(self, runtime: Runtime, nc: Any, bearer: str) -> None:
        self.subject = f"{runtime.settings.subject_prefix}.cmd.create"
        self.nc = nc
        self.bearer = bearer

    async def create(self, key: str | None = None, subject: str = "s") -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.bearer}"}
        if key is not None:
            headers["Idempotency-Key"] = key
        message = await self.nc.request(self.subject, orjson.dumps({**LINK, "subject": subject}), headers=headers,
                                        timeout=15)
        reply: dict[str, Any] = orjson.loads(message.data)
        return reply

    def start(self, key: str | None = None, subject: str = "s") -> asyncio.Task[dict[str, Any]]:
        return asyncio.create_task(self.create(key, subject))


async def timed(reply: asyncio.Task[dict[str, Any]] | Any) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    result = await reply
    return result, time.monotonic() - started


async def test_commands_beyond_the_queue_bound_are_refused_at_once(
    make_settings: Callable[..., Settings], nc: Any, token: Callable[..., str]
) -> None:
    runtime = Runtime(make_settings(command_queue_max=3, request_timeout_s=10.0), COMMANDS_ONLY)
    await runtime.start()
    send = Sender(runtime, nc, token())
    try:
        with holding_the_append_lock(runtime):
            first = send.start("k0")
            await asyncio.sleep(0.3)  # its batch has begun and waits for the lock
            queued = [send.start(f"k{i}") for i in (1, 2, 3)]
            await asyncio.sleep(0.3)
            refused = await asyncio.gather(*(timed(send.create(f"k{i}")) for i in (4, 5)))
            for reply, seconds in refused:
                assert error_code(reply) == "unavailable", reply
                assert "Idempotency-Key" in reply["error"]["message"]
                assert seconds < 1.0, "refused at once, not after the request timeout"
            assert not first.done() and not any(task.done() for task in queued)
        replies = [await first, *[await task for task in queued]]
        assert all("data" in reply for reply in replies), replies
        retried = await send.create("k4")  # a refused command's retry with its key goes through
        assert retried["data"]["version"] == 1
        assert stored_events(runtime) == 5
        assert runtime.batcher is not None and runtime.batcher.refused + runtime_refused(runtime) == 2
        refused = runtime.metrics.commands.labels("create", "refused")._value.get()
        unavailable = runtime.metrics.commands.labels("create", "unavailable")._value.get()
        assert refused + unavailable == 2  # operators see the refusals
    finally:
        await runtime.stop()


def runtime_refused(runtime: Runtime) -> int:
    """Requests the NATS adapter refused before they reached the batcher."""
    from services.bootstrap import CommandsRole

    return sum(c._server.refused for c in runtime.components if isinstance(c, CommandsRole))


async def test_a_command_past_its_deadline_before_its_batch_began_is_never_carried_out(
    make_settings: Callable[..., Settings], nc: Any, token: Callable[..., str]
) -> None:
    runtime = Runtime(make_settings(request_timeout_s=1.0), COMMANDS_ONLY)
    await runtime.start()
    send = Sender(runtime, nc, token())
    try:
        with holding_the_append_lock(runtime):
            in_batch = send.start("began")  # its batch begins before its deadline
            await asyncio.sleep(0.3)
            late = await asyncio.gather(*(send.create(f"late-{i}") for i in range(3)))  # queued behind it
            assert [error_code(reply) for reply in late] == ["unavailable"] * 3
            await asyncio.sleep(0.2)
        assert error_code(await in_batch) == "unavailable"  # answered at its deadline...
        after = await send.create("after")  # ...and the queue behind it has been worked off
        assert after["data"]["version"] == 1
        assert stored_events(runtime) == 2, "only the command whose batch had begun, and the later one"
        assert runtime.batcher is not None and runtime.batcher.expired == 3
        again = await send.create("late-0", subject="s")  # its retry is carried out, once
        assert again["data"]["version"] == 1 and stored_events(runtime) == 3
    finally:
        await runtime.stop()


async def test_requests_beyond_the_concurrency_are_refused_at_once_not_buffered(
    make_settings: Callable[..., Settings], nc: Any, token: Callable[..., str]
) -> None:
    """Requests past the handler concurrency used to wait in nats-py's buffer (no deadline, no
    bound) and were carried out after their callers had given up."""
    runtime = Runtime(make_settings(command_concurrency=2, request_timeout_s=10.0), COMMANDS_ONLY)
    await runtime.start()
    send = Sender(runtime, nc, token())
    try:
        with holding_the_append_lock(runtime):
            in_hand = [send.start("c1"), send.start("c2")]
            await asyncio.sleep(0.3)
            reply, seconds = await timed(send.create("c3"))
            assert error_code(reply) == "unavailable" and seconds < 1.0, (reply, seconds)
            assert "Idempotency-Key" in reply["error"]["message"]
            await asyncio.sleep(0.5)
        replies = await asyncio.gather(*in_hand)
        assert all("data" in reply for reply in replies), replies
        await send.create("c4")
        assert stored_events(runtime) == 3, "the refused request was never carried out"
    finally:
        await runtime.stop()
