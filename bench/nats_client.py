"""A minimal NATS request/reply client for the benchmark's command load.

Like bench/http_client.py, it exists so that the load generator takes little of the two cores
the service is measured on: nats-py spent about 0.5 ms of CPU per request here, as much as a
third of the service's own. This one speaks the NATS text protocol on one TCP connection:
`HPUB` with a reply subject under one wildcard inbox subscription, and replies matched to
requests by the last token of their subject.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson


@dataclass(frozen=True)
class Reply:
    data: bytes


class NoResponders(Exception):
    """No service subscribes to the subject (NATS answered 503)."""


class LeanNatsClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._inbox = f"_INBOX.{uuid.uuid4().hex}"
        self._tokens = itertools.count()
        self._inbox_bytes = self._inbox.encode()
        self._pending: dict[bytes, asyncio.Future[Reply]] = {}
        self._callbacks: dict[bytes, Callable[[Reply | None], None]] = {}
        self._subscriptions: dict[bytes, Callable[[bytes, bytes], None]] = {}  # sid -> on_message(head, body)
        self._sids = itertools.count(2)  # sid 1 is the reply inbox
        self._pongs: list[asyncio.Future[None]] = []
        self._reading: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, url: str) -> LeanNatsClient:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 4222)
        client = cls(reader, writer)
        await reader.readline()  # INFO {...}
        options = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True, "protocol": 1}
        writer.write(b"CONNECT " + orjson.dumps(options) + b"\r\n")
        writer.write(f"SUB {client._inbox}.* 1\r\nPING\r\n".encode())
        await writer.drain()
        while (line := await reader.readline()) != b"PONG\r\n":
            if not line or line.startswith(b"-ERR"):
                raise ConnectionError(f"NATS refused the connection: {line!r}")
        client._reading = asyncio.get_running_loop().create_task(client._read_forever())
        return client

    async def request(self, subject: str, payload: bytes, headers: dict[str, str], timeout: float) -> Reply:
        token = str(next(self._tokens)).encode()
        head = ("NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        self._writer.write(
            b"HPUB %s %s.%s %d %d\r\n%s%s\r\n"
            % (subject.encode(), self._inbox.encode(), token, len(head), len(head) + len(payload), head, payload)
        )
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(token, None)

    def start_request(self, subject: str, payload: bytes, head: bytes, timeout: float) -> asyncio.Future[Reply]:
        """A request whose reply (or `TimeoutError`) comes as a future: cheaper than `request` for an
        overload client, one timer handle per request instead of `asyncio.wait_for`'s task and
        waiter. `head` is the encoded header block (`encode_headers`), made once for many requests."""
        token = str(next(self._tokens)).encode()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._pending[token] = future
        timer = loop.call_later(timeout, _expire, future)

        def done(_: asyncio.Future[Reply]) -> None:
            timer.cancel()
            self._pending.pop(token, None)

        future.add_done_callback(done)
        self._writer.write(
            b"HPUB %s %s.%s %d %d\r\n%s%s\r\n"
            % (subject.encode(), self._inbox.encode(), token, len(head), len(head) + len(payload), head, payload)
        )
        return future

    async def _read_forever(self) -> None:
        """Replies parsed from whole chunks of the socket: one await per chunk, not two per message
        (under overload the reader must keep up, or the server drops the client as a slow consumer)."""
        buffer = bytearray()
        while chunk := await self._reader.read(1 << 16):
            buffer += chunk
            position = 0
            while (end := buffer.find(b"\r\n", position)) >= 0:
                line = bytes(buffer[position:end])
                if line.startswith(b"HMSG ") or line.startswith(b"MSG "):
                    fields = line.split()
                    size = int(fields[-1])
                    if len(buffer) < end + 2 + size + 2:
                        break  # the rest of the message is in the next chunk
                    body = bytes(buffer[end + 2 : end + 2 + size])
                    position = end + 2 + size + 2
                    header_size = int(fields[-2]) if fields[0] == b"HMSG" else 0
                    if (on_message := self._subscriptions.get(fields[2])) is not None:
                        on_message(body[:header_size], body[header_size:])
                    else:
                        self._deliver(fields[1], body, header_size)
                else:
                    position = end + 2
                    if line.startswith(b"PING"):
                        self._writer.write(b"PONG\r\n")
                    elif line.startswith(b"PONG") and self._pongs:
                        self._pongs.pop(0).set_result(None)
            del buffer[:position]

    def send(self, subject: bytes, payload: bytes, head: bytes, on_reply: Callable[[Reply | None], None]) -> bytes:
        """A request without a future or a timer: `on_reply` gets the reply, or None when no service
        subscribes; the caller keeps its own deadlines and calls `forget` for a request it gave up on.
        The cheapest path, for a load generator that must offer several times what the service takes."""
        token = str(next(self._tokens)).encode()
        self._callbacks[token] = on_reply
        self._writer.write(b"HPUB %s %s.%s %d %d\r\n%s%s\r\n"
                           % (subject, self._inbox_bytes, token, len(head), len(head) + len(payload), head, payload))
        return token

    async def subscribe(self, subject: str, on_message: Callable[[bytes, bytes], None]) -> None:
        """Messages of `subject` to `on_message(header block, body)`, parsed by the same reader as
        the replies (nats-py spent several times the CPU per message: a benchmark's receiver of
        thousands of messages a second would take that from the service it measures)."""
        sid = str(next(self._sids)).encode()
        self._subscriptions[sid] = on_message
        pong: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs.append(pong)
        self._writer.write(b"SUB %s %s\r\nPING\r\n" % (subject.encode(), sid))
        await asyncio.wait_for(pong, 10)  # the server has the subscription

    def forget(self, token: bytes) -> None:
        self._callbacks.pop(token, None)

    def _deliver(self, subject: bytes, body: bytes, header_size: int) -> None:
        token = subject.rsplit(b".", 1)[-1]
        if (callback := self._callbacks.pop(token, None)) is not None:
            no_responders = header_size and body[:header_size].startswith(b"NATS/1.0 503")
            callback(None if no_responders else Reply(body[header_size:]))
            return
        future = self._pending.get(token)
        if future is None or future.done():
            return
        if header_size and body[:header_size].startswith(b"NATS/1.0 503"):
            future.set_exception(NoResponders(subject.decode()))
        else:
            future.set_result(Reply(body[header_size:]))

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
        self._writer.close()


def encode_headers(headers: dict[str, str]) -> bytes:
    return ("NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()


def _expire(future: asyncio.Future[Reply]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
