"""The Python client other services import: `client.customer.activities.*` (docs/contract.md section 7).

```
from activities_client import AsyncClient, Client

async with AsyncClient(nats_url="nats://127.0.0.1:4222", token=jwt) as client:
    activity = await client.customer.activities.create(account_id="acc_1", type="call", subject="Intro")
    activity = await client.customer.activities.patch(activity.id, {"status": "done"}, expected_version=1)

with Client(nats_url="nats://127.0.0.1:4222", token=jwt) as client:   # the same, blocking
    page = client.customer.activities.list(account_id="acc_1")
```

How it talks to the service:
- Commands (create, patch, delete, restore) are NATS requests to `<prefix>.cmd.<name>` with the
  headers `Authorization: Bearer <token>` and a fresh `Idempotency-Key` per call. A request that
  times out, finds no responder, or gets `unavailable` is sent again with the *same* key (bounded
  attempts, exponential backoff with jitter), so a retry never logs a second activity.
- The client remembers the `meta.position` of its latest command and sends it as `min_position`
  on `get`, `list` and `stats`, so it always reads its own writes.
- Reads go over HTTP (section 5) when `http_url` is given, else over NATS `<prefix>.query.get|list|stats`.
- `history` needs `http_url`: the `/events` route reads the event store itself. Deriving it from
  JetStream instead would mean scanning the tenant's whole stream (event subjects do not carry the
  activity id), and a stream with limits retention may have dropped old events, so a stream-derived
  history could be silently incomplete. Without `http_url` it raises `HistoryUnavailable`.
- `subscribe` reads the JetStream stream through a pull consumer filtered to the caller's tenant
  (`<prefix>.events.<tenant_id>.>`, the tenant taken from the token's claims without verifying it;
  the stream only carries what the service published, and the server still enforces access to
  commands and queries).

- With no service reachable a call fails with `Unavailable` once its attempts are spent: the NATS
  connection is made with a bounded connect timeout and reconnect budget, and nats-py's error and
  disconnect callbacks are replaced by quiet ones (they would otherwise log a traceback per try).
  `data_dir=` instead of URLs reads `<data_dir>/endpoints.json`, written by `activities serve`.

`Client` runs an `AsyncClient` on an event loop in a background thread: one implementation, two faces.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import contextlib
import json
import logging
import random
import threading
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, NamedTuple, TypeVar
from urllib.parse import quote

import httpx
import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api as js_api
from nats.js.client import JetStreamContext
from pydantic import BaseModel, ConfigDict, Field

from activities_client.document import EVENT_KINDS, ActivityDocument, EventBody, format_datetime
from activities_client.errors import (
    ActivitiesError,
    Gone,
    IdempotencyConflict,
    InternalError,
    NotFound,
    Unauthorized,
    Unavailable,
    ValidationError,
    VersionConflict,
    error_from_envelope,
)
from activities_client.subjects import Subjects
from activities_client.throttle import DEFAULT_RATIO, AdaptiveThrottle
from activities_client.wire import Count

ERASE_BY_CONTACT_TIMEOUT_S = 300.0
"""How long `erase(contact_id=...)` waits for its reply by default (it erases activity by activity)."""

__all__ = [
    "ActivitiesError",
    "Activity",
    "AsyncActivities",
    "AsyncClient",
    "Client",
    "Enqueued",
    "Event",
    "Gone",
    "HistoryUnavailable",
    "IdempotencyConflict",
    "InternalError",
    "NotFound",
    "Page",
    "Result",
    "ResultSubscription",
    "RetryPolicy",
    "Subscription",
    "SyncActivities",
    "Unauthorized",
    "Unavailable",
    "ValidationError",
    "VersionConflict",
]

DEFAULT_SUBJECT_PREFIX: Final = "crm.activities"
DEFAULT_STREAM_NAME: Final = "CRM_ACTIVITIES"
API_PATH: Final = "/api/v1/crm/activities"
ENDPOINTS_FILE: Final = "endpoints.json"
UNAVAILABLE_HTTP_STATUSES: Final = frozenset({502, 503, 504})
"""Statuses of a proxy or load balancer in front of a service that is down or overloaded: retried."""

log = logging.getLogger("activities_client")

T = TypeVar("T")
StartAt = Literal["new", "all"] | int | datetime
"""Where a subscription starts: only new events, the whole stream, a stream sequence, or a time."""


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class Activity(ActivityDocument):
    """An Activity document as the service returns it (docs/contract.md section 1).

    The same model and rules the service uses, except that fields a newer service version may
    add are ignored instead of refused, so an older client keeps working.
    """

    model_config = ConfigDict(extra="ignore", strict=False)

    created: bool | None = Field(
        default=None,
        exclude=True,
        description="after an upsert: true when it created the activity, false when it updated it (else None)",
    )




class Event(EventBody):
    """One stored event (docs/contract.md section 4), from `history` or a subscription: the event body,
    with its time and its activity parsed. Its `event_type` is one of document.EVENT_TYPES, or a
    newer service's, which passes through."""

    model_config = ConfigDict(extra="ignore")

    occurred_at: datetime  # type: ignore[assignment]  # the body's RFC 3339 text, parsed
    activity: Activity  # type: ignore[assignment]  # the body's document, as the client's model
    stream_sequence: int | None = Field(
        default=None,
        exclude=True,
        description="JetStream stream sequence of a subscribed event (pass it as `start` to resume after it)",
    )

    @property
    def kind(self) -> str:
        """The last subject token (`logged`, `patched`, ...; see document.EVENT_TYPES)."""
        return EVENT_KINDS.get(self.event_type, self.event_type)


class Page(BaseModel):
    """One page of a list: the activities, the cursor of the next page (None at the end)."""

    data: list[Activity]
    next_cursor: str | None = None
    position: int | None = Field(default=None, description="how far the read model had got (meta.position)")


class ActivityOccurrence(BaseModel):
    """One occurrence (docs/contract.md section 9): when (UTC), its index in the series (0 is
    `activity_date`) and the activity."""

    activity_id: str
    occurrence_at: datetime
    index: int
    activity: Activity


class OccurrencePage(BaseModel):
    """One page of occurrences in time order; `next_cursor` None at the end."""

    data: list[ActivityOccurrence]
    next_cursor: str | None = None
    position: int | None = Field(default=None, description="how far the read model had got (meta.position)")


class HistoryUnavailable(ActivitiesError):
    """`history` was called on a client without `http_url` (see the module docstring for why)."""

    code = "history_unavailable"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a request is repeated after a timeout or `unavailable`."""

    attempts: int = 4
    backoff_s: float = 0.2
    max_backoff_s: float = 3.0
    throttle_ratio: float | None = DEFAULT_RATIO
    """While the service refuses requests, send at most about this many per request it accepts
    (activities_client/throttle.py); None never throttles."""

    def delay(self, attempt: int) -> float:
        """Full-jitter exponential backoff before attempt `attempt + 1` (attempts count from 1)."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


# ---------------------------------------------------------------------------------------------
# Encoding helpers
# ---------------------------------------------------------------------------------------------


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _dumps(value: Any) -> bytes:
    """JSON bytes; aware datetimes as RFC 3339 (naive ones are sent as such, and refused by the service)."""
    return orjson.dumps(value, default=_default)


def _query_value(value: Any) -> Any:
    """A list/get parameter as JSON: datetimes in UTC with `Z`."""
    if isinstance(value, datetime):
        return format_datetime(value) if value.tzinfo is not None else value.isoformat()
    if isinstance(value, list | tuple | set | frozenset):
        return [_query_value(item) for item in value]
    return value


def _http_params(params: Mapping[str, Any]) -> list[tuple[str, str | int | float | bool | None]]:
    """Query-string pairs: repeatable parameters repeated, booleans as true/false, None left out."""
    pairs: list[tuple[str, str | int | float | bool | None]] = []
    for name, value in params.items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            if item is None:
                continue
            pairs.append((name, ("true" if item else "false") if isinstance(item, bool) else str(item)))
    return pairs


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, decoded from its base64url payload without verifying the signature
    (the service verifies; the client only needs to know its tenant)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise Unauthorized("the token is not a JWT: it does not have three dot-separated parts")
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise Unauthorized(f"the token is not a JWT: its payload is not base64url JSON ({exc})") from None
    if not isinstance(claims, dict):
        raise Unauthorized("the token is not a JWT: its payload is not a JSON object")
    return claims


def tenant_of(token: str) -> str:
    """The `tenant_id` claim of a JWT, read without verifying it (the service verifies)."""
    tenant = unverified_claims(token).get("tenant_id")
    if not isinstance(tenant, str) or not tenant:
        raise Unauthorized("the token has no tenant_id claim")
    return tenant


def _event_of(message: Msg) -> Event:
    event = Event.model_validate_json(message.data)
    with contextlib.suppress(Exception):
        event.stream_sequence = message.metadata.sequence.stream
    return event


# ---------------------------------------------------------------------------------------------
# The async client
# ---------------------------------------------------------------------------------------------


class AsyncClient:
    """Async client of the activities service; use as `async with AsyncClient(...) as client`.

    Args:
        nats_url: the NATS server the service listens on (commands, NATS queries, events); one URL
            or a comma-separated list of a cluster's nodes.
        token: the caller's JWT; sent as `Authorization: Bearer <token>`.
        http_url: the service's HTTP base URL; when given, reads and `history` use HTTP.
        subject_prefix: the service's `ACTIVITIES_SUBJECT_PREFIX`.
        stream_name: the JetStream stream of the events (`ACTIVITIES_STREAM_NAME`).
        timeout: seconds to wait for one attempt of a request.
        retry: attempts and backoff after a timeout, no responder, no connection or `unavailable`.
        data_dir: instead of `nats_url` (and `http_url`): the service's data dir, whose
            `endpoints.json` (written by `activities serve`) names them; read when connecting.
    """

    def __init__(
        self,
        nats_url: str | None = None,
        token: str | None = None,
        http_url: str | None = None,
        subject_prefix: str = DEFAULT_SUBJECT_PREFIX,
        stream_name: str = DEFAULT_STREAM_NAME,
        timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        data_dir: str | Path | None = None,
    ) -> None:
        if not token:
            raise ValueError("a token is required: the caller's JWT")
        if not nats_url and data_dir is None:
            raise ValueError("give nats_url=... (and optionally http_url=...), or data_dir=...")
        self.nats_url = nats_url
        self.token = token
        self.http_url = http_url.rstrip("/") if http_url else None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.subjects = Subjects(subject_prefix)
        self.stream_name = stream_name
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.throttle = AdaptiveThrottle(self.retry.throttle_ratio) if self.retry.throttle_ratio else None
        self.position = 0
        """The global position of this client's latest command (sent as `min_position` on reads)."""
        self._nc: NatsClient | None = None
        self._nc_url: str | None = None
        self._http: httpx.AsyncClient | None = None
        self._subscriptions: set[Subscription] = set()
        self.customer = _Customer(AsyncActivities(self))

    # Lifecycle ----------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect to NATS (and open the HTTP connection pool when `http_url` is set).

        Tried as often as `retry` says; raises `Unavailable` when no server answers.
        """
        for number in range(1, self.retry.attempts + 1):
            try:
                await self._ensure_connected()
                return
            except Unavailable:
                if number == self.retry.attempts or self._nc_url is None:
                    raise  # attempts spent, or no endpoints.json: nothing to retry
            await asyncio.sleep(self.retry.delay(number))

    def _endpoints(self) -> tuple[str, str | None]:
        """The NATS and HTTP URLs: as given, else from `<data_dir>/endpoints.json`."""
        if self.nats_url:
            return self.nats_url, self.http_url
        assert self.data_dir is not None
        path = self.data_dir / ENDPOINTS_FILE
        try:
            endpoints = json.loads(path.read_text())
        except FileNotFoundError:
            raise Unavailable(
                f"no service at {self.data_dir} ({ENDPOINTS_FILE} missing; is `activities serve` running?)"
            ) from None
        except (OSError, ValueError) as exc:
            raise Unavailable(f"no service at {self.data_dir} ({ENDPOINTS_FILE} unreadable: {exc})") from None
        nats_url = endpoints.get("nats_url") if isinstance(endpoints, dict) else None
        if not isinstance(nats_url, str) or not nats_url:
            raise Unavailable(f"no service at {self.data_dir} ({ENDPOINTS_FILE} names no nats_url)")
        http_url = endpoints.get("http_url")
        return nats_url, self.http_url or (http_url.rstrip("/") if isinstance(http_url, str) and http_url else None)

    @property
    def target(self) -> str:
        """Where this client looks for the service (for messages)."""
        return self.nats_url or self._nc_url or str(self.data_dir)

    async def _ensure_connected(self) -> NatsClient:
        """The NATS connection, made (again) when there is none or the last one was closed."""
        if self._nc is not None and not self._nc.is_closed:
            return self._nc
        nats_url, http_url = self._endpoints()
        self._nc_url = nats_url
        servers = [url.strip() for url in nats_url.split(",") if url.strip()]
        try:
            nc = await nats.connect(
                servers,
                name="activities-client",
                connect_timeout=max(0.1, min(self.timeout, 2.0)),
                # Bounded so that a first connect to nothing ends (nats-py tries each server this many
                # times more; 0 would mean forever), raised to unlimited once connected, below.
                max_reconnect_attempts=1,
                reconnect_time_wait=0.2,
                error_cb=_quiet_error,
                disconnected_cb=_quiet_event,
                reconnected_cb=_quiet_event,
                closed_cb=_quiet_event,
            )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            raise Unavailable(f"no service at {nats_url} ({_reason(exc)})") from None
        # An established connection rides out a server restart: nats-py keeps reconnecting in the
        # background while each request still ends after its timeout and retries (then Unavailable).
        nc.options["max_reconnect_attempts"] = -1
        self._nc = nc
        if http_url and self._http is None:
            self.http_url = http_url
            self._http = httpx.AsyncClient(
                base_url=http_url, headers={"Authorization": f"Bearer {self.token}"}, timeout=self.timeout
            )
        return nc

    async def close(self) -> None:
        """Close open subscriptions, then the connections."""
        for subscription in list(self._subscriptions):
            await subscription.close()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._nc is not None:
            with contextlib.suppress(Exception):
                if self._nc.is_connected:
                    await self._nc.drain()
                else:
                    await self._nc.close()
            self._nc = None

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def nc(self) -> NatsClient:
        """The NATS connection (after `connect`)."""
        if self._nc is None:
            raise RuntimeError("the client is not connected: use `async with AsyncClient(...)` or await connect()")
        return self._nc

    @property
    def tenant_id(self) -> str:
        """The tenant of the token (unverified)."""
        return tenant_of(self.token)

    # Transport ------------------------------------------------------------------------------

    async def _with_retry(self, attempt: Callable[[], Awaitable[dict[str, Any]]], what: str) -> dict[str, Any]:
        """Run `attempt` until it gives a reply, retrying timeouts and `unavailable` with backoff."""
        last: str = ""
        for number in range(1, self.retry.attempts + 1):
            if self.throttle is not None and not self.throttle.admits():
                last = "the service refused most recent requests, so this client held this one back"
                if number < self.retry.attempts:
                    await asyncio.sleep(self.retry.delay(number))
                continue
            try:
                envelope = await attempt()
            except Unavailable as unreachable:  # no connection could be made (see _ensure_connected)
                self._unanswered()
                if self._nc_url is None:
                    raise  # no endpoints.json: nothing to retry
                last = unreachable.message
            except (nats.errors.TimeoutError, httpx.TimeoutException):
                self._unanswered()
                if self._nc is not None and not self._nc.is_connected:
                    last = f"no service at {self.target} (connection lost; reconnecting)"
                else:
                    last = f"no reply within {self.timeout}s"
            except nats.errors.NoRespondersError:
                self._unanswered()
                last = f"no service at {self.target} (no instance is listening)"
            except httpx.TransportError as exc:
                self._unanswered()
                last = f"no service at {self.http_url} ({_reason(exc)})"
            except (
                nats.errors.ConnectionClosedError,
                nats.errors.ConnectionReconnectingError,
                nats.errors.StaleConnectionError,
                nats.errors.OutboundBufferLimitError,
            ) as exc:
                self._unanswered()
                last = f"no service at {self.target} (connection lost: {_reason(exc)})"
            else:
                error = error_from_envelope(envelope) if "error" in envelope else None
                if self.throttle is not None and not isinstance(error, Unavailable):
                    self.throttle.accepted()
                if error is None:
                    return envelope
                if not isinstance(error, Unavailable) or number == self.retry.attempts:
                    raise error
                last = error.message
            if number < self.retry.attempts:
                await asyncio.sleep(self.retry.delay(number))
        raise Unavailable(f"{last} ({what}, {self.retry.attempts} attempts)")

    def _unanswered(self) -> None:
        if self.throttle is not None:
            self.throttle.unanswered()

    async def _nats_request(
        self, subject: str, body: Any, headers: dict[str, str], timeout: float | None = None
    ) -> dict[str, Any]:
        nc = await self._ensure_connected()
        message = await nc.request(subject, _dumps(body), timeout=timeout or self.timeout, headers=headers)
        try:
            decoded = orjson.loads(message.data)
        except orjson.JSONDecodeError:
            decoded = None
        if not isinstance(decoded, dict):
            raise InternalError(f"unexpected reply on {subject}: {message.data[:200]!r}")
        return decoded

    async def command(self, name: str, body: Mapping[str, Any], idempotency_key: str | None = None) -> Activity:
        """Send a command; every attempt carries the same Idempotency-Key. Returns the document after it."""
        headers = {"Authorization": f"Bearer {self.token}", "Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        subject = self.subjects.command(name)
        envelope = await self._with_retry(lambda: self._nats_request(subject, body, headers), f"{name} command")
        position = (envelope.get("meta") or {}).get("position")
        if isinstance(position, int):
            self.position = max(self.position, position)
        return Activity.model_validate(envelope["data"])

    async def command_envelope(
        self, name: str, body: Mapping[str, Any], idempotency_key: str | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send a command (every attempt with the same Idempotency-Key) and return its success envelope
        (`timeout`: of each attempt, else the client's)."""
        headers = {"Authorization": f"Bearer {self.token}", "Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        subject = self.subjects.command(name)
        envelope = await self._with_retry(
            lambda: self._nats_request(subject, body, headers, timeout), f"{name} command"
        )
        position = (envelope.get("meta") or {}).get("position")
        if isinstance(position, int):
            self.position = max(self.position, position)
        return envelope

    async def query(self, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """A NATS query (`get` or `list`) and its success envelope."""
        headers = {"Authorization": f"Bearer {self.token}"}
        subject = self.subjects.query(name)
        return await self._with_retry(lambda: self._nats_request(subject, body, headers), f"{name} query")

    async def http_get(self, path: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """An HTTP GET below `http_url` and its success envelope (a JSON array body becomes `data`)."""
        if self._http is None:
            raise RuntimeError("the client has no http_url, or is not connected")
        http = self._http
        pairs = _http_params(params)

        async def attempt() -> dict[str, Any]:
            response = await http.get(path, params=pairs)
            try:
                decoded = response.json()
            except ValueError:
                decoded = None
            if response.status_code >= 400:
                if isinstance(decoded, dict) and "error" in decoded:
                    return decoded
                return {"error": {"code": _code_of_status(response.status_code), "message": response.text[:500]}}
            if isinstance(decoded, list):
                return {"data": decoded}
            if not isinstance(decoded, dict):
                raise InternalError(f"unexpected HTTP reply from {path}: {response.text[:200]!r}")
            return decoded

        return await self._with_retry(attempt, f"GET {path}")

    # Subscriptions ------------------------------------------------------------------------------

    def _track(self, subscription: Subscription, open_: bool) -> None:
        if open_:
            self._subscriptions.add(subscription)
        else:
            self._subscriptions.discard(subscription)

    # The durable inbox (docs/contract.md section 10) --------------------------------------------

    async def enqueue(self, op: str, body: Any, idempotency_key: str | None = None) -> Enqueued:
        """JetStream-publish a command to `<prefix>.inbox.<op>`; returns once the stream holds it.

        The Idempotency-Key (a fresh one when None) is also the `Nats-Msg-Id`, so a publish retried
        after a lost ack is stored once; the service carries the command out exactly once and
        publishes its reply envelope to the tenant's results (`results()`). Retried like a command
        (timeouts, no stream reachable) with the same key; then `Unavailable`.
        """
        if not op or any(ch in op for ch in ".*> \t\r\n"):
            raise ValueError(f"op is one token such as 'create' or 'patch', not {op!r}")
        key = idempotency_key or str(uuid.uuid4())
        headers = {"Authorization": f"Bearer {self.token}", "Idempotency-Key": key, "Nats-Msg-Id": key}
        subject = self.subjects.inbox(op)
        payload = _dumps(body)
        last = ""
        for number in range(1, self.retry.attempts + 1):
            try:
                nc = await self._ensure_connected()
                ack = await nc.jetstream(timeout=self.timeout).publish(subject, payload, headers=headers)
                return Enqueued(key, ack)
            except Unavailable as unreachable:
                if self._nc_url is None:
                    raise
                last = unreachable.message
            except nats.errors.NoRespondersError:
                last = f"no inbox stream at {self.target} (has the service's inbox role ever run?)"
            except (nats.errors.TimeoutError, TimeoutError):
                last = f"no ack from JetStream within {self.timeout}s"
            except (
                nats.errors.ConnectionClosedError,
                nats.errors.ConnectionReconnectingError,
                nats.errors.StaleConnectionError,
                nats.errors.OutboundBufferLimitError,
            ) as exc:
                self._unanswered()
                last = f"no service at {self.target} (connection lost: {_reason(exc)})"
            except nats.js.errors.APIError as exc:
                raise Unavailable(f"JetStream refused the command: {exc.description or exc}") from None
            if number < self.retry.attempts:
                await asyncio.sleep(self.retry.delay(number))
        raise Unavailable(f"{last} (enqueue {op}, {self.retry.attempts} attempts)")

    def results(
        self,
        start: StartAt = "new",
        durable: str | None = None,
        ack: bool = True,
        idle_timeout: float | None = None,
        batch: int = 64,
        ack_wait: float = 60.0,
    ) -> ResultSubscription:
        """The results of the tenant's inbox commands (`<prefix>.results.<tenant_id>`), as an async
        iterator of `Result`; arguments as `subscribe` (a `durable` name resumes where it stopped)."""
        return ResultSubscription(self, start, durable, ack, idle_timeout, batch, ack_wait)


def _code_of_status(status: int) -> str:
    """The error code of an HTTP status without the contract's error body (e.g. from a proxy)."""
    if status in UNAVAILABLE_HTTP_STATUSES:
        return "unavailable"
    codes = {401: "unauthorized", 404: "not_found", 409: "version_conflict", 410: "gone", 412: "version_conflict"}
    codes.update({422: "validation_error", 400: "validation_error"})
    return codes.get(status, "internal")


def _reason(exc: BaseException) -> str:
    """A one-line reason of a connection failure."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "connect timed out"
    if isinstance(exc, nats.errors.NoServersError):
        return "no server could be reached"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _quiet_error(exc: Exception) -> None:
    """nats-py's error callback: its default logs a traceback for every failed (re)connect."""
    log.debug("nats: %s", _reason(exc))


async def _quiet_event() -> None:
    """nats-py's disconnected/reconnected/closed callbacks: nothing to say (requests report failures)."""


class _Customer:
    """The `customer` namespace (`client.customer.activities`)."""

    def __init__(self, activities: Any) -> None:
        self.activities = activities


class AsyncActivities:
    """`client.customer.activities` of an `AsyncClient`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    # Commands -------------------------------------------------------------------------------

    async def create(self, *, idempotency_key: str | None = None, **fields: Any) -> Activity:
        """Log a new activity from its client-settable fields (at least one of account_id, deal_id, contact_id)."""
        return await self._client.command("create", fields, idempotency_key)

    async def patch(
        self,
        id: str,
        changes: Mapping[str, Any],
        expected_version: int | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Activity:
        """Apply a JSON Merge Patch (`None` clears a field); `expected_version` guards against lost updates."""
        body: dict[str, Any] = {"id": id, "changes": dict(changes)}
        if expected_version is not None:
            body["expected_version"] = expected_version
        return await self._client.command("patch", body, idempotency_key)

    async def delete(
        self, id: str, expected_version: int | None = None, *, idempotency_key: str | None = None
    ) -> Activity:
        """Soft-delete an activity; returns the deleted document."""
        return await self._client.command("delete", _target(id, expected_version), idempotency_key)

    async def restore(
        self, id: str, expected_version: int | None = None, *, idempotency_key: str | None = None
    ) -> Activity:
        """Restore a soft-deleted activity; returns the live document."""
        return await self._client.command("restore", _target(id, expected_version), idempotency_key)

    async def upsert(
        self,
        external_key: str,
        fields: Mapping[str, Any],
        expected_version: int | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Activity:
        """Create the activity keyed `external_key` (in the token's tenant and app) from `fields`, or
        apply `fields` to it as a JSON Merge Patch; `.created` on the result says which."""
        body: dict[str, Any] = {"external_key": external_key, "activity": dict(fields)}
        if expected_version is not None:
            body["expected_version"] = expected_version
        envelope = await self._client.command_envelope("upsert", body, idempotency_key)
        return _activity_of(envelope)

    async def batch(
        self, commands: Sequence[Mapping[str, Any]], *, idempotency_key: str | None = None
    ) -> builtins.list[Activity | ActivitiesError]:
        """1-100 commands, each `{"op": "create" | "patch" | "delete" | "restore" | "upsert",
        "idempotency_key"?: str, ...the body of that command}`, carried out in order and
        independently: one result per command, an `Activity` or the `ActivitiesError` it failed
        with (a malformed batch as a whole raises). Items without a key of their own take the
        batch's key and their index, so a retried batch replays them."""
        envelope = await self._client.command_envelope(
            "batch", {"commands": [dict(command) for command in commands]}, idempotency_key
        )
        return [error_from_envelope(item) if "error" in item else _activity_of(item) for item in envelope["data"]]

    async def erase(
        self,
        id: str | None = None,
        *,
        contact_id: str | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> int:
        """Erase an activity for good (`id`), or every activity of the caller's naming a contact
        (`contact_id`); how many were erased (0: already erased, or none named the contact).
        An erasure by contact may take a while (about a minute for 10,000 activities on a busy
        2-core machine): `timeout` (default: 300 s for it, the client's otherwise) bounds each attempt;
        a retry erases whatever the interrupted attempt had not (and counts only those)."""
        if (id is None) == (contact_id is None):
            raise TypeError("erase(id) or erase(contact_id=...), one of the two")
        body = {"id": id} if id is not None else {"contact_id": contact_id}
        wait = timeout or (max(self._client.timeout, ERASE_BY_CONTACT_TIMEOUT_S) if contact_id is not None else None)
        envelope = await self._client.command_envelope("erase", body, idempotency_key, wait)
        return int(envelope["data"]["erased"])

    # Reads ----------------------------------------------------------------------------------

    async def get_by_key(self, external_key: str, include_deleted: bool = False) -> Activity:
        """The activity an upsert created under `external_key` (in the token's tenant and app)."""
        params: dict[str, Any] = {"include_deleted": include_deleted}
        if self._client.position:
            params["min_position"] = self._client.position
        if self._client.http_url:
            envelope = await self._client.http_get(f"{API_PATH}/by-key/{quote(external_key, safe='')}", params)
        else:
            envelope = await self._client.query("get_by_key", {"external_key": external_key, **params})
        return Activity.model_validate(envelope["data"])

    async def get(self, id: str, include_deleted: bool = False, version: int | None = None) -> Activity:
        """One activity (as it was at `version`, when given); a deleted one is `Gone` unless `include_deleted`."""
        params: dict[str, Any] = {"include_deleted": include_deleted}
        if version is not None:
            params["version"] = version
        if self._client.position:
            params["min_position"] = self._client.position
        if self._client.http_url:
            envelope = await self._client.http_get(f"{API_PATH}/{quote(id, safe='')}", params)
        else:
            envelope = await self._client.query("get", {"id": id, **params})
        return Activity.model_validate(envelope["data"])

    async def list(self, **params: Any) -> Page:
        """One page of the caller's activities; parameters as in docs/contract.md section 5 (`cursor`: next page)."""
        query = {name: _query_value(value) for name, value in params.items() if value is not None}
        if self._client.position:
            query["min_position"] = self._client.position
        if self._client.http_url:
            envelope = await self._client.http_get(API_PATH, query)
        else:
            envelope = await self._client.query("list", query)
        meta = envelope.get("meta") or {}
        return Page(data=envelope["data"], next_cursor=meta.get("next_cursor"), position=meta.get("position"))

    async def iterate(self, **params: Any) -> AsyncGenerator[Activity, None]:
        """Every matching activity, following `next_cursor` to the end (same parameters as `list`)."""
        params.pop("cursor", None)
        cursor: str | None = None
        while True:
            page = await self.list(**params, cursor=cursor)
            for activity in page.data:
                yield activity
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def stats(self, group_by: str, **filters: Any) -> builtins.list[Count]:
        """Counts of the caller's activities matching the filters (any list filter, and
        `include_deleted`) by `group_by` (`type`, `status`, `owner_id`, `priority` or `outcome`),
        largest count first; `key` None counts the activities without a value."""
        query = {name: _query_value(value) for name, value in filters.items() if value is not None}
        query["group_by"] = group_by
        if self._client.position:
            query["min_position"] = self._client.position
        if self._client.http_url:
            envelope = await self._client.http_get(f"{API_PATH}/stats", query)
        else:
            envelope = await self._client.query("stats", query)
        return [Count.model_validate(item) for item in envelope["data"]]

    async def occurrences(
        self, from_: datetime | str, to: datetime | str, *, cursor: str | None = None, **filters: Any
    ) -> OccurrencePage:
        """One page of the occurrences in [from_, to] (at most 366 days; aware date-times or RFC 3339
        strings) of the caller's live activities matching the list filters, recurring ones expanded,
        in time order; `limit` and `cursor` page as in `list`."""
        query = {name: _query_value(value) for name, value in filters.items() if value is not None}
        query["from"], query["to"] = _query_value(from_), _query_value(to)
        if cursor is not None:
            query["cursor"] = cursor
        if self._client.position:
            query["min_position"] = self._client.position
        if self._client.http_url:
            envelope = await self._client.http_get(f"{API_PATH}/occurrences", query)
        else:
            envelope = await self._client.query("occurrences", query)
        meta = envelope.get("meta") or {}
        return OccurrencePage(data=envelope["data"], next_cursor=meta.get("next_cursor"), position=meta.get("position"))

    async def iterate_occurrences(
        self, from_: datetime | str, to: datetime | str, **filters: Any
    ) -> AsyncGenerator[ActivityOccurrence, None]:
        """Every occurrence in the window, following `next_cursor` to the end (as `occurrences`)."""
        filters.pop("cursor", None)
        cursor: str | None = None
        while True:
            page = await self.occurrences(from_, to, cursor=cursor, **filters)
            for occurrence in page.data:
                yield occurrence
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def history(self, id: str) -> builtins.list[Event]:
        """The activity's events, oldest first (needs `http_url`)."""
        if not self._client.http_url:
            raise HistoryUnavailable(
                "history needs the service's HTTP endpoint: create the client with http_url=... "
                "(the event stream cannot give one activity's complete history)"
            )
        envelope = await self._client.http_get(f"{API_PATH}/{quote(id, safe='')}/events", {})
        return [Event.model_validate(item) for item in envelope["data"]]

    def subscribe(
        self,
        start: StartAt = "new",
        durable: str | None = None,
        ack: bool = True,
        idle_timeout: float | None = None,
        batch: int = 16,
        ack_wait: float = 60.0,
    ) -> Subscription:
        """The tenant's events from `start`, as an async iterator (also an async context manager).

        Args:
            start: "new" (only events published from now on), "all" (the whole stream), a stream
                sequence (int, inclusive) or an aware datetime. Ignored when the durable consumer
                already exists: it resumes where it stopped.
            durable: a consumer name (no dots, `*` or `>`): the consumer and its progress outlive
                this process. Without it the consumer is ephemeral.
            ack: acknowledge each event once the loop asks for the next one, or when the
                subscription closes normally. Used as `async with`, an exception in the loop body
                gives the current event back (NAK) so it is delivered again, first: at-least-once.
                Events fetched but never handed out are given back on close. False: no acks.
            idle_timeout: end the iteration when no event arrived for this many seconds.
            batch: events fetched per pull request.
            ack_wait: seconds the server waits for an ack before it delivers an event again. While
                the loop body works, the subscription tells the server every `ack_wait / 3` seconds
                that the current event and the fetched ones still waiting are in progress, so a slow
                loop body does not get the rest of its batch again.
        """
        return Subscription(self._client, start, durable, ack, idle_timeout, batch, ack_wait)

    async def enqueue(self, op: str, body: Any, idempotency_key: str | None = None) -> Enqueued:
        """See `AsyncClient.enqueue`: a durable asynchronous command (docs/contract.md section 10)."""
        return await self._client.enqueue(op, body, idempotency_key)

    def results(
        self,
        start: StartAt = "new",
        durable: str | None = None,
        ack: bool = True,
        idle_timeout: float | None = None,
        batch: int = 64,
        ack_wait: float = 60.0,
    ) -> ResultSubscription:
        """See `AsyncClient.results`."""
        return self._client.results(start, durable, ack, idle_timeout, batch, ack_wait)


def _activity_of(envelope: Mapping[str, Any]) -> Activity:
    """The activity of a command's success envelope, with `created` from its meta (an upsert's)."""
    activity = Activity.model_validate(envelope["data"])
    created = (envelope.get("meta") or {}).get("created")
    if isinstance(created, bool):
        activity.created = created
    return activity


def _target(id: str, expected_version: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": id}
    if expected_version is not None:
        body["expected_version"] = expected_version
    return body


class Subscription:
    """An async iterator over a tenant's events, backed by a JetStream pull consumer."""

    def __init__(
        self,
        client: AsyncClient,
        start: StartAt,
        durable: str | None,
        ack: bool,
        idle_timeout: float | None,
        batch: int,
        ack_wait: float = 60.0,
    ) -> None:
        if ack_wait <= 0:
            raise ValueError("ack_wait is a number of seconds > 0")
        if durable is not None and (not durable or any(ch in durable for ch in ".*> ")):
            raise ValueError("a durable name has no dots, spaces, '*' or '>'")
        self._client = client
        self._start = start
        self._durable = durable
        self._ack = ack
        self._idle_timeout = idle_timeout
        self._batch = max(1, batch)
        self._ack_wait = ack_wait
        self._sub: JetStreamContext.PullSubscription | None = None
        self._consumer: str | None = None
        self._progress: asyncio.Task[None] | None = None
        self._buffer: list[Msg] = []
        self._unacked: Msg | None = None
        self._closed = False

    def _config(self) -> js_api.ConsumerConfig:
        config = js_api.ConsumerConfig(
            ack_policy=js_api.AckPolicy.EXPLICIT if self._ack else js_api.AckPolicy.NONE,
            ack_wait=self._ack_wait,
            max_ack_pending=max(1000, self._batch),
            inactive_threshold=None if self._durable else 300,
        )
        start = self._start
        if start == "new":
            config.deliver_policy = js_api.DeliverPolicy.NEW
        elif start == "all":
            config.deliver_policy = js_api.DeliverPolicy.ALL
        elif isinstance(start, datetime):
            if start.tzinfo is None:
                raise ValueError("start must be an aware datetime (with a time zone)")
            config.deliver_policy = js_api.DeliverPolicy.BY_START_TIME
            config.opt_start_time = start
        elif isinstance(start, int) and not isinstance(start, bool) and start >= 1:
            config.deliver_policy = js_api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = start
        else:
            raise ValueError(f"start is 'new', 'all', a stream sequence >= 1 or an aware datetime, not {start!r}")
        return config

    async def open(self) -> Subscription:
        """Create (or bind to) the consumer; called by the first iteration when not called before."""
        if self._sub is None:
            config = self._config()
            subject = self._client.subjects.tenant_events(self._client.tenant_id)
            nc = await self._client._ensure_connected()
            try:
                self._sub = await nc.jetstream().pull_subscribe(
                    subject, durable=self._durable, stream=self._client.stream_name, config=config
                )
                self._consumer = (await self._sub.consumer_info()).name
            except nats.js.errors.NotFoundError:
                raise Unavailable(
                    f"the stream {self._client.stream_name} does not exist yet (is the service's relay running?)"
                ) from None
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                raise Unavailable(f"no JetStream at {self._client.target} ({_reason(exc)})") from None
            self._client._track(self, True)
            if self._ack:
                self._progress = asyncio.get_running_loop().create_task(self._keep_in_progress())
        return self

    async def _keep_in_progress(self) -> None:
        """Every ack_wait / 3, tell the server that the events handed out or fetched are being worked on.

        Without this, a loop body slower than ack_wait over a fetched batch gets the tail of the batch
        delivered again while the first events are still being handled.
        """
        interval = max(0.05, self._ack_wait / 3)
        while True:
            await asyncio.sleep(interval)
            pending = [*([self._unacked] if self._unacked is not None else []), *self._buffer]
            for message in pending:
                with contextlib.suppress(Exception):  # acked meanwhile, or the connection is down
                    await message.in_progress()

    async def close(self) -> None:
        """Ack the last event handed out, return the fetched rest, stop pulling; an ephemeral consumer is deleted."""
        if self._closed:
            return
        self._closed = True
        if self._progress is not None:
            self._progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._progress
            self._progress = None
        await self._ack_pending()
        buffered, self._buffer = self._buffer, []
        if self._ack:
            # Fetched but never handed out: give them back now rather than after the ack wait.
            for message in buffered:
                with contextlib.suppress(Exception):
                    await message.nak()
        self._client._track(self, False)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            if self._durable is None and self._consumer is not None and self._client._nc is not None:
                with contextlib.suppress(Exception):
                    await self._client._nc.jetstream().delete_consumer(self._client.stream_name, self._consumer)
            self._sub = None

    async def _ack_pending(self) -> None:
        message, self._unacked = self._unacked, None
        if message is not None and self._ack:
            with contextlib.suppress(nats.errors.MsgAlreadyAckdError):
                await message.ack()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        await self._ack_pending()  # the loop asked for the next event: the previous one is processed
        if self._closed:
            raise StopAsyncIteration
        await self.open()
        assert self._sub is not None
        loop = asyncio.get_running_loop()
        deadline = None if self._idle_timeout is None else loop.time() + self._idle_timeout
        while not self._buffer:
            wait = 5.0 if deadline is None else min(5.0, deadline - loop.time())
            if wait <= 0.01:
                raise StopAsyncIteration
            try:
                self._buffer = await self._sub.fetch(self._batch, timeout=wait)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError) as exc:
                raise Unavailable(f"no service at {self._client.target} (connection lost: {_reason(exc)})") from None
        message = self._buffer.pop(0)
        self._unacked = message
        return _event_of(message)

    async def __aenter__(self) -> Subscription:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None and self._unacked is not None:
            # Processing failed: give the event back (NAK) so that it is delivered again, first.
            message, self._unacked = self._unacked, None
            if self._ack:
                with contextlib.suppress(Exception):
                    await message.nak()
        await self.close()


class Enqueued(NamedTuple):
    """An inbox command JetStream holds: its Idempotency-Key and the stream's ack (`key, ack = ...`)."""

    idempotency_key: str
    ack: js_api.PubAck


@dataclass(frozen=True)
class Result:
    """One result of an inbox command (docs/contract.md section 10).

    `envelope` is the command's reply as on request/reply; `activity` is its document when the
    reply is one (create, patch, delete, restore, upsert), `error` the `ActivitiesError` of a
    failure reply; `data` and `meta` are the envelope's raw parts (a batch's list, an erase count).
    """

    idempotency_key: str | None
    op: str | None
    envelope: dict[str, Any]
    activity: Activity | None = None
    error: ActivitiesError | None = None
    stream_sequence: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def data(self) -> Any:
        return self.envelope.get("data")

    @property
    def meta(self) -> dict[str, Any]:
        meta = self.envelope.get("meta")
        return meta if isinstance(meta, dict) else {}

    def outcome(self) -> Any:
        """The activity (or the raw data of a reply that is not one), or raise the error."""
        if self.error is not None:
            raise self.error
        return self.activity if self.activity is not None else self.data


def result_of(message: Msg) -> Result:
    """A results-stream message as a `Result` (a body that is not an envelope becomes an `InternalError`)."""
    headers = message.headers or {}
    try:
        envelope = orjson.loads(message.data)
    except orjson.JSONDecodeError:
        envelope = None
    if not isinstance(envelope, dict):
        envelope = InternalError(f"unreadable result: {message.data[:200]!r}").to_envelope()
    activity: Activity | None = None
    error: ActivitiesError | None = None
    if "error" in envelope:
        error = error_from_envelope(envelope)
    else:
        data = envelope.get("data")
        if isinstance(data, dict) and "id" in data and "version" in data:
            try:
                activity = Activity.model_validate(data)
            except ValueError:
                activity = None
    sequence = None
    with contextlib.suppress(Exception):
        sequence = message.metadata.sequence.stream
    return Result(headers.get("Idempotency-Key"), headers.get("Op"), envelope, activity, error, sequence)


class ResultSubscription(Subscription):
    """An async iterator over the caller's tenant's inbox results; a `Subscription` on the results stream."""

    async def open(self) -> ResultSubscription:
        if self._sub is None:
            config = self._config()
            subject = self._client.subjects.results(self._client.tenant_id)
            nc = await self._client._ensure_connected()
            try:
                self._sub = await nc.jetstream().pull_subscribe(subject, durable=self._durable, config=config)
                info = await self._sub.consumer_info()
                self._consumer, self._results_stream = info.name, info.stream_name
            except nats.js.errors.NotFoundError:
                raise Unavailable(
                    "the results stream does not exist yet (is the service's inbox role running?)"
                ) from None
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                raise Unavailable(f"no JetStream at {self._client.target} ({_reason(exc)})") from None
            self._client._track(self, True)
            if self._ack:
                self._progress = asyncio.get_running_loop().create_task(self._keep_in_progress())
        return self

    async def close(self) -> None:
        consumer, stream = self._consumer, getattr(self, "_results_stream", None)
        ephemeral = self._durable is None and not self._closed
        await super().close()
        if ephemeral and consumer is not None and stream is not None and self._client._nc is not None:
            with contextlib.suppress(Exception):
                await self._client._nc.jetstream().delete_consumer(stream, consumer)

    def __aiter__(self) -> ResultSubscription:
        return self

    async def __anext__(self) -> Result:  # type: ignore[override]
        await self._ack_pending()
        if self._closed:
            raise StopAsyncIteration
        await self.open()
        assert self._sub is not None
        loop = asyncio.get_running_loop()
        deadline = None if self._idle_timeout is None else loop.time() + self._idle_timeout
        while not self._buffer:
            wait = 5.0 if deadline is None else min(5.0, deadline - loop.time())
            if wait <= 0.01:
                raise StopAsyncIteration
            try:
                self._buffer = await self._sub.fetch(self._batch, timeout=wait)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError) as exc:
                raise Unavailable(f"no service at {self._client.target} (connection lost: {_reason(exc)})") from None
        message = self._buffer.pop(0)
        self._unacked = message
        return result_of(message)

    async def __aenter__(self) -> ResultSubscription:
        return await self.open()


# ---------------------------------------------------------------------------------------------
# The blocking client: the async one on a loop in a background thread
# ---------------------------------------------------------------------------------------------


class _LoopThread:
    """An event loop running in a daemon thread; `run` executes a coroutine on it and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="activities-client", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("a blocking Client call cannot be made from its own event loop")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def iterate(self, iterator: AsyncIterator[T], close: Callable[[], Coroutine[Any, Any, None]] | None) -> Iterator[T]:
        """A blocking iterator over an async one; closes it when the caller stops early."""
        try:
            while True:
                try:
                    yield self.run(_anext(iterator))
                except StopAsyncIteration:
                    return
        finally:
            # Closed early (break) or abandoned: close the async iterator, unless the client is already
            # closed (it closed its subscriptions itself then, and its loop is gone).
            if close is not None and self.loop.is_running():
                self.run(close())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


async def _anext(iterator: AsyncIterator[T]) -> T:
    return await iterator.__anext__()


class Client:
    """The blocking client: `with Client(nats_url=..., token=...) as client:`; arguments as `AsyncClient`."""

    def __init__(
        self,
        nats_url: str | None = None,
        token: str | None = None,
        http_url: str | None = None,
        subject_prefix: str = DEFAULT_SUBJECT_PREFIX,
        stream_name: str = DEFAULT_STREAM_NAME,
        timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        data_dir: str | Path | None = None,
    ) -> None:
        self._async = AsyncClient(nats_url, token, http_url, subject_prefix, stream_name, timeout, retry, data_dir)
        self._runner: _LoopThread | None = None
        self.customer = _Customer(SyncActivities(self))

    @property
    def position(self) -> int:
        """The global position of this client's latest command."""
        return self._async.position

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._runner is None:
            coroutine.close()
            raise RuntimeError("the client is not connected: use `with Client(...) as client:` or call connect()")
        return self._runner.run(coroutine)

    def connect(self) -> None:
        """Start the background loop and connect."""
        if self._runner is None:
            self._runner = _LoopThread()
        try:
            self._runner.run(self._async.connect())
        except BaseException:
            self.close()  # `with` does not call __exit__ when __enter__ fails: stop the loop thread here
            raise

    def close(self) -> None:
        """Close the connections and stop the background loop."""
        if self._runner is not None:
            try:
                self._runner.run(self._async.close())
            finally:
                self._runner.stop()
                self._runner = None

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


    def enqueue(self, op: str, body: Any, idempotency_key: str | None = None) -> Enqueued:
        """See `AsyncClient.enqueue`."""
        return self._run(self._async.enqueue(op, body, idempotency_key))

    def results(
        self,
        start: StartAt = "new",
        durable: str | None = None,
        ack: bool = True,
        idle_timeout: float | None = None,
        batch: int = 64,
        ack_wait: float = 60.0,
    ) -> Iterator[Result]:
        """See `AsyncClient.results`; a blocking iterator (break out of it to stop)."""
        if self._runner is None:
            raise RuntimeError("the client is not connected: use `with Client(...) as client:`")
        subscription = self._async.results(start, durable, ack, idle_timeout, batch, ack_wait)
        self._runner.run(subscription.open())
        return self._runner.iterate(subscription, subscription.close)


class SyncActivities:
    """`client.customer.activities` of a blocking `Client`: each method runs the async one."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._async: AsyncActivities = client._async.customer.activities

    def create(self, *, idempotency_key: str | None = None, **fields: Any) -> Activity:
        """See `AsyncActivities.create`."""
        return self._client._run(self._async.create(idempotency_key=idempotency_key, **fields))

    def patch(
        self,
        id: str,
        changes: Mapping[str, Any],
        expected_version: int | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Activity:
        """See `AsyncActivities.patch`."""
        return self._client._run(self._async.patch(id, changes, expected_version, idempotency_key=idempotency_key))

    def delete(self, id: str, expected_version: int | None = None, *, idempotency_key: str | None = None) -> Activity:
        """See `AsyncActivities.delete`."""
        return self._client._run(self._async.delete(id, expected_version, idempotency_key=idempotency_key))

    def restore(self, id: str, expected_version: int | None = None, *, idempotency_key: str | None = None) -> Activity:
        """See `AsyncActivities.restore`."""
        return self._client._run(self._async.restore(id, expected_version, idempotency_key=idempotency_key))

    def upsert(
        self,
        external_key: str,
        fields: Mapping[str, Any],
        expected_version: int | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Activity:
        """See `AsyncActivities.upsert`."""
        return self._client._run(
            self._async.upsert(external_key, fields, expected_version, idempotency_key=idempotency_key)
        )

    def batch(
        self, commands: Sequence[Mapping[str, Any]], *, idempotency_key: str | None = None
    ) -> builtins.list[Activity | ActivitiesError]:
        """See `AsyncActivities.batch`."""
        return self._client._run(self._async.batch(commands, idempotency_key=idempotency_key))

    def get_by_key(self, external_key: str, include_deleted: bool = False) -> Activity:
        """See `AsyncActivities.get_by_key`."""
        return self._client._run(self._async.get_by_key(external_key, include_deleted))

    def erase(
        self,
        id: str | None = None,
        *,
        contact_id: str | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> int:
        """See `AsyncActivities.erase`."""
        return self._client._run(
            self._async.erase(id, contact_id=contact_id, idempotency_key=idempotency_key, timeout=timeout)
        )

    def get(self, id: str, include_deleted: bool = False, version: int | None = None) -> Activity:
        """See `AsyncActivities.get`."""
        return self._client._run(self._async.get(id, include_deleted, version))

    def list(self, **params: Any) -> Page:
        """See `AsyncActivities.list`."""
        return self._client._run(self._async.list(**params))

    def iterate(self, **params: Any) -> Iterator[Activity]:
        """See `AsyncActivities.iterate`."""
        iterator = self._async.iterate(**params)
        return self._runner().iterate(iterator, iterator.aclose)

    def stats(self, group_by: str, **filters: Any) -> builtins.list[Count]:
        """See `AsyncActivities.stats`."""
        return self._client._run(self._async.stats(group_by, **filters))

    def occurrences(
        self, from_: datetime | str, to: datetime | str, *, cursor: str | None = None, **filters: Any
    ) -> OccurrencePage:
        """See `AsyncActivities.occurrences`."""
        return self._client._run(self._async.occurrences(from_, to, cursor=cursor, **filters))

    def iterate_occurrences(
        self, from_: datetime | str, to: datetime | str, **filters: Any
    ) -> Iterator[ActivityOccurrence]:
        """See `AsyncActivities.iterate_occurrences`."""
        iterator = self._async.iterate_occurrences(from_, to, **filters)
        return self._runner().iterate(iterator, iterator.aclose)

    def history(self, id: str) -> Sequence[Event]:
        """See `AsyncActivities.history`."""
        return self._client._run(self._async.history(id))

    def subscribe(
        self,
        start: StartAt = "new",
        durable: str | None = None,
        ack: bool = True,
        idle_timeout: float | None = None,
        batch: int = 16,
        ack_wait: float = 60.0,
    ) -> Iterator[Event]:
        """See `AsyncActivities.subscribe`; a blocking iterator (break out of it to stop)."""
        subscription = self._async.subscribe(start, durable, ack, idle_timeout, batch, ack_wait)
        runner = self._runner()
        runner.run(subscription.open())
        return runner.iterate(subscription, subscription.close)

    def _runner(self) -> _LoopThread:
        runner = self._client._runner
        if runner is None:
            raise RuntimeError("the client is not connected: use `with Client(...) as client:`")
        return runner

    def enqueue(self, op: str, body: Any, idempotency_key: str | None = None) -> Enqueued:
        """See `AsyncClient.enqueue`."""
        return self._client.enqueue(op, body, idempotency_key)

    def results(
        self,
        start: StartAt = "new",
        durable: str | None = None,
        ack: bool = True,
        idle_timeout: float | None = None,
        batch: int = 64,
        ack_wait: float = 60.0,
    ) -> Iterator[Result]:
        """See `AsyncClient.results`."""
        return self._client.results(start, durable, ack, idle_timeout, batch, ack_wait)
