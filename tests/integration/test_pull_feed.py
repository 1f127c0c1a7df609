"""PullFeed, the inbox's reader of its pull consumer, over real NATS with JetStream: messages come
to the callback in stream order as they are published, a request is over when it has them all or
when it expires, and a consumer deleted under an open request ends it with NotFoundError."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from nats.js.errors import NotFoundError

from services.inbox import PullFeed, stream_sequence

CONSUMER = "feed"


@pytest.fixture
async def stream(nc: Any) -> AsyncIterator[str]:
    js = nc.jetstream()
    name = f"FEED{uuid.uuid4().hex[:8].upper()}"
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"]))
    await js.add_consumer(name, ConsumerConfig(durable_name=CONSUMER, ack_policy=AckPolicy.EXPLICIT))
    try:
        yield name
    finally:
        await js.delete_stream(name)


async def test_a_request_is_over_once_its_batch_came_in_stream_order(nc: Any, stream: str) -> None:
    js = nc.jetstream()
    for i in range(30):
        await js.publish(f"{stream}.c", f"m{i}".encode())
    taken: list[Msg] = []
    feed = await PullFeed(nc, stream, CONSUMER, taken.append).start()
    try:
        started = time.monotonic()
        await feed.pull(20, expires_s=5.0)
        assert time.monotonic() - started < 2.0  # filled: not left open until it expires
        assert [m.data for m in taken] == [f"m{i}".encode() for i in range(20)]
        await feed.pull(20, expires_s=0.5)  # ten are left: over when it expires
        assert [m.data for m in taken] == [f"m{i}".encode() for i in range(30)]
        assert [stream_sequence(m) for m in taken] == list(range(1, 31))
    finally:
        await feed.stop()


async def test_an_open_request_hands_over_a_message_as_soon_as_it_is_published(nc: Any, stream: str) -> None:
    js = nc.jetstream()
    arrived: asyncio.Queue[tuple[float, Msg]] = asyncio.Queue()
    feed = await PullFeed(nc, stream, CONSUMER, lambda m: arrived.put_nowait((time.monotonic(), m))).start()
    try:
        pulling = asyncio.create_task(feed.pull(10, expires_s=3.0))
        await asyncio.sleep(0.3)
        assert arrived.empty()
        published = time.monotonic()
        await js.publish(f"{stream}.c", b"late")
        at, message = await asyncio.wait_for(arrived.get(), 1.0)
        assert message.data == b"late" and at - published < 0.5
        assert not pulling.done()  # still open for the nine others
        await message.ack()
        await asyncio.wait_for(pulling, 5.0)  # then over at its expiry
    finally:
        await feed.stop()


async def test_a_consumer_deleted_under_an_open_request_raises_not_found(nc: Any, stream: str) -> None:
    js = nc.jetstream()
    feed = await PullFeed(nc, stream, CONSUMER, lambda m: None).start()
    try:
        pulling = asyncio.create_task(feed.pull(10, expires_s=5.0))
        await asyncio.sleep(0.2)
        await js.delete_consumer(stream, CONSUMER)
        with pytest.raises(NotFoundError):
            await asyncio.wait_for(pulling, 3.0)
    finally:
        await feed.stop()
