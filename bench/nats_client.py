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
        self._pending: dict[bytes, asyncio.Future[Reply]] = {}
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

    async def _read_forever(self) -> None:
        reader = self._reader
        while line := await reader.readline():
            if line.startswith(b"HMSG ") or line.startswith(b"MSG "):
                fields = line.split()
                size = int(fields[-1])
                body = (await reader.readexactly(size + 2))[:size]
                header_size = int(fields[-2]) if fields[0] == b"HMSG" else 0
                future = self._pending.get(fields[1].rsplit(b".", 1)[-1])
                if future is None or future.done():
                    continue
                if header_size and body[:header_size].startswith(b"NATS/1.0 503"):
                    future.set_exception(NoResponders(fields[1].decode()))
                else:
                    future.set_result(Reply(body[header_size:]))
            elif line.startswith(b"PING"):
                self._writer.write(b"PONG\r\n")

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
        self._writer.close()
