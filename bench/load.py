"""Load generators over NATS request/reply: closed loop (N in flight) and open loop (fixed rate)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench.nats_client import LeanNatsClient as NatsClient


@dataclass
class Stats:
    """What one load phase measured."""

    sent: int = 0
    ok: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    error_codes: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": self.errors,
            "error_codes": self.error_codes,
            "elapsed_s": round(self.elapsed_s, 3),
            "rate_per_s": round(self.rate, 1),
            "p50_ms": round(self.percentile(50), 2),
            "p95_ms": round(self.percentile(95), 2),
            "p99_ms": round(self.percentile(99), 2),
        }


BodyMaker = Callable[[int], Any]  # a JSON body, or its bytes
ReplyCheck = Callable[[dict[str, Any]], None]
Headers = dict[str, str] | Callable[[int], dict[str, str]]  # the same for every request, or made for the i-th


def headers_for(headers: Headers, i: int) -> dict[str, str]:
    return headers(i) if callable(headers) else headers


def encoded(body: Any) -> bytes:
    """A request's payload: a body as JSON, or bytes encoded beforehand (as they are sent)."""
    return body if isinstance(body, bytes) else orjson.dumps(body)


async def _one(nc: NatsClient, subject: str, payload: bytes, headers: dict[str, str], stats: Stats,
               on_reply: ReplyCheck | None) -> None:
    started = time.perf_counter()
    stats.sent += 1
    try:
        message = await nc.request(subject, payload, headers=headers, timeout=30)
        reply = orjson.loads(message.data)
    except Exception as exc:  # a timeout or no responders counts as an error of the run
        stats.errors += 1
        stats.error_codes[type(exc).__name__] = stats.error_codes.get(type(exc).__name__, 0) + 1
        return
    stats.latencies_ms.append((time.perf_counter() - started) * 1000)
    if "error" in reply:
        stats.errors += 1
        code = reply["error"]["code"]
        stats.error_codes[code] = stats.error_codes.get(code, 0) + 1
        return
    stats.ok += 1
    if on_reply is not None:
        on_reply(reply)


async def closed_loop(
    nc: NatsClient,
    subject: str,
    make_body: BodyMaker,
    headers: Headers,
    concurrency: int,
    duration_s: float,
    on_reply: ReplyCheck | None = None,
) -> Stats:
    """`concurrency` requests always in flight for `duration_s` seconds."""
    stats = Stats()
    counter = itertools.count()
    deadline = time.perf_counter() + duration_s

    async def worker() -> None:
        while time.perf_counter() < deadline:
            i = next(counter)
            await _one(nc, subject, encoded(make_body(i)), headers_for(headers, i), stats, on_reply)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    stats.elapsed_s = time.perf_counter() - started
    return stats


async def open_loop(
    nc: NatsClient,
    subject: str,
    make_body: BodyMaker,
    headers: Headers,
    rate: float,
    duration_s: float,
    on_reply: ReplyCheck | None = None,
) -> Stats:
    """Requests started at a fixed rate regardless of replies, so latency includes queueing."""
    stats = Stats()
    tasks: set[asyncio.Task[None]] = set()
    started = time.perf_counter()
    total = int(rate * duration_s)
    for i in range(total):
        target = started + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(
            _one(nc, subject, encoded(make_body(i)), headers_for(headers, i), stats, on_reply)
        )
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    stats.elapsed_s = time.perf_counter() - started
    return stats
