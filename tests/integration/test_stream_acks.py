"""StreamAcks, the inbox's publisher of results, over real NATS with JetStream: the stream's ack
for each message as `JetStreamContext.publish` gives it, and the same errors."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import StreamConfig
from nats.js.errors import NoStreamResponseError

from services.inbox import StreamAcks


async def test_each_publish_gets_its_own_ack_and_a_repeated_msg_id_is_a_duplicate(nc: Any) -> None:
    js = nc.jetstream()
    name = f"ACKS{uuid.uuid4().hex[:8].upper()}"
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"]))
    acks = await StreamAcks(nc).start()
    try:
        results = await asyncio.gather(
            *(acks.publish(f"{name}.r", f"m{i}".encode(), headers={"Nats-Msg-Id": f"id-{i}"}) for i in range(200))
        )
        assert sorted(ack.seq for ack in results) == list(range(1, 201))
        assert {ack.stream for ack in results} == {name}
        assert not any(ack.duplicate for ack in results)
        again = await acks.publish(f"{name}.r", b"m7", headers={"Nats-Msg-Id": "id-7"})
        assert again.duplicate and again.seq == results[7].seq  # gather keeps the order of the publishes
        message = await js.get_msg(name, results[3].seq)
        assert message.data == b"m3"
    finally:
        await acks.stop()
        await js.delete_stream(name)


async def test_no_stream_on_the_subject_is_the_error_jetstream_publish_raises(nc: Any) -> None:
    acks = await StreamAcks(nc).start()
    try:
        with pytest.raises(NoStreamResponseError):
            await acks.publish(f"nostream.{uuid.uuid4().hex}", b"x", headers={})
    finally:
        await acks.stop()


async def test_an_ack_that_never_comes_times_out(nc: Any) -> None:
    subject = f"silent.{uuid.uuid4().hex}"
    async def never_acks(message: Any) -> None:
        pass

    await nc.subscribe(subject, cb=never_acks)
    await nc.flush()
    acks = await StreamAcks(nc, timeout_s=0.2).start()
    try:
        with pytest.raises(NatsTimeoutError):
            await acks.publish(subject, b"x", headers={})
    finally:
        await acks.stop()
