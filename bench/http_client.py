"""A minimal HTTP/1.1 keep-alive GET client for the benchmark's query load.

The service and its load generator share the machine's two cores, so a generator that spends
more CPU per request than the service (httpx did: about 3 ms against 2 ms here) inflates the
latency it measures. This one writes the request line and headers by hand and reads the status
line, the headers and a Content-Length body: about a tenth of httpx's CPU per request.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlencode, urlsplit


class KeepAliveClient:
    """One persistent connection; one request at a time (use one client per request in flight)."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self._fixed = "".join(f"{name}: {value}\r\n" for name, value in {"Host": parts.netloc, **headers}.items())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self, path: str, params: dict[str, object] | None = None) -> tuple[int, bytes]:
        """(status, body) of a GET; reconnects when the server closed the connection (uvicorn
        closes one idle for 5 s), and then sends the request again (a GET may be repeated)."""
        target = f"{path}?{urlencode(params)}" if params else path
        request = f"GET {target} HTTP/1.1\r\n{self._fixed}\r\n".encode()
        status_line = b""
        for _ in range(2):
            if self._writer is None or self._writer.is_closing():
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            assert self._reader is not None
            self._writer.write(request)
            try:
                status_line = await self._reader.readline()
            except ConnectionError:
                status_line = b""
            if status_line:
                break
            await self.close()  # closed by the server while idle
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        close = False
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
            elif name == b"transfer-encoding":
                raise RuntimeError("chunked responses are not expected from the service")
        body = await self._reader.readexactly(length)
        if close:
            await self.close()
        return status, body

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
