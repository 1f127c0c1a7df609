"""Hostile input (issue 7, "Bad input"): fuzzing of every NATS subject and of the HTTP OpenAPI document.

Property, for every request on `<prefix>.cmd.create|patch|delete|restore` and `<prefix>.query.get|list`
and for every HTTP operation: exactly one well-formed reply within the timeout, either
`{"data": ..., "meta": {"position": int, ...}}` or `{"error": {"code", "message", "details"}}` with a
contract code other than `internal`; and a rejected request stores nothing (`activities_events` has
as many rows after it as before). Afterwards, everything that was accepted is still served: the read
model catches up with the store, and the event stream holds every stored event.

Inputs: arbitrary bytes (non-UTF-8 included), arbitrary JSON, objects of the real field names with
wrong-typed values, huge arrays, deep nesting, oversized bodies, SQL-injection, NATS-wildcard and NUL
strings in every filter and every id, and missing or garbage Authorization and Idempotency-Key headers.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import nats
import orjson
import psycopg
import pytest
import pytest_asyncio
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from nats.aio.client import Client as NatsClient
from nats.errors import TimeoutError as NatsTimeoutError
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from activities_client.document import MAX_BODY_BYTES, SERVER_FIELDS, ActivityFields
from activities_client.filters import LIST_PARAMETERS as LIST_PARAMS
from services.bootstrap import Runtime
from services.config import Settings
from tests.conftest import JWT_SECRET, WITHOUT_SCHEDULER

ERROR_CODES = frozenset(
    {"validation_error", "unauthorized", "not_found", "gone", "version_conflict", "idempotency_conflict", "unavailable"}
)
COMMANDS = ("create", "patch", "delete", "restore")
QUERIES = ("get", "list")
REPLY_TIMEOUT_S = 10.0
CONSISTENCY_WAIT_MS = 200  # a hostile `min_position` costs this long, not the default 2 s

CLIENT_FIELDS = sorted(ActivityFields.model_fields)
HOSTILE_STRINGS = [
    "'; DROP TABLE activities; --",
    "' OR '1'='1",
    '"; DROP TABLE activities_events; --',
    "%",
    "_",
    "\\",
    "*",
    ">",
    "a.b",
    " ",
    "\x00",
    "a\x00b",
    "act_\x00",
    "act_*",
    "act_>",
    "act_8ZZZZZZZZZZZZZZZZZZZZZZZZZ",  # the id pattern, but past 128 bits as a ULID
    "act_01arz3ndektsv4rrffq69g5fav",  # lower case
    "crm.activities.>",
    "$1",
    "\t\r\n",
    "ünïcødé 💥",
    "x" * 600,
]
FIELDS_WITH_IDS = ("account_id", "deal_id", "contact_id", "owner_id", "performed_by_user_id", "linked_trace_id")


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def runtime(make_settings: Callable[..., Settings]) -> AsyncIterator[Runtime]:
    """The whole service, with a short consistency wait (hostile `min_position`s time out quickly)."""
    # without the scheduler: its firings (accepted activities with a past due_date) would add events
    # while the test checks that a refused request stored none
    service = Runtime(make_settings(consistency_wait_ms=CONSISTENCY_WAIT_MS), WITHOUT_SCHEDULER)
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
def store(runtime: Runtime) -> Iterator[psycopg.Connection[Any]]:
    """A connection to the service's database, to count stored events."""
    assert runtime.servers is not None
    with psycopg.connect(runtime.servers.database_url, autocommit=True) as conn:
        yield conn


def stored_events(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM activities_events").fetchone()
    assert row is not None
    return int(row[0])


def bearer(tenant: str = "acme", sub: str = "usr-1", app: str | None = None, ttl_s: int = 3600) -> str:
    claims: dict[str, Any] = {"sub": sub, "tenant_id": tenant, "exp": int(time.time()) + ttl_s}
    if app:
        claims["app_id"] = app
    return "Bearer " + jwt.encode(claims, JWT_SECRET, algorithm="HS256")


# ---------------------------------------------------------------------------------------------
# The property: one well-formed reply, never `internal`, nothing stored when rejected
# ---------------------------------------------------------------------------------------------


def check_envelope(
    reply: Any, *, listing: bool = False, counting: bool = False, batch: bool = False, erasing: bool = False
) -> str | None:
    """Assert a reply is a contract envelope; its error code, or None for a success."""
    assert isinstance(reply, dict), reply
    if "error" in reply:
        assert set(reply) == {"error"}, reply
        error = reply["error"]
        assert isinstance(error, dict), reply
        assert error.get("code") in ERROR_CODES, reply  # never `internal`, never an unknown code
        assert isinstance(error.get("message"), str) and error["message"], reply
        details = error.get("details")
        assert isinstance(details, list), reply
        for detail in details:
            assert isinstance(detail, dict) and isinstance(detail.get("field"), str), reply
            assert isinstance(detail.get("message"), str), reply
        if error["code"] == "validation_error":
            assert details, reply  # a validation error names the field
        if error["code"] == "version_conflict":
            assert isinstance(error.get("current_version"), int), reply
        return str(error["code"])
    assert set(reply) == {"data", "meta"}, reply
    meta = reply["meta"]
    assert isinstance(meta, dict) and isinstance(meta.get("position"), int), reply
    if listing:
        assert set(meta) == {"next_cursor", "position"}, reply
        assert isinstance(reply["data"], list) and all(isinstance(d, dict) for d in reply["data"]), reply
    elif batch:  # one envelope per item
        assert set(meta) == {"position"} and isinstance(reply["data"], list), reply
        for item in reply["data"]:
            check_envelope(item)
    elif erasing:  # erase: how many were erased
        assert set(meta) == {"position"} and set(reply["data"]) == {"erased"}, reply
        assert isinstance(reply["data"]["erased"], int) and reply["data"]["erased"] >= 0, reply
    elif counting:  # stats: one {"key", "count"} per group, largest first
        assert set(meta) == {"position"}, reply
        counts = [item["count"] for item in reply["data"]]
        assert all(set(item) == {"key", "count"} for item in reply["data"]) and counts == sorted(counts, reverse=True)
    else:
        assert set(meta) == {"position"} or (set(meta) == {"position", "created"} and meta["created"] in (True, False))
        data = reply["data"]
        assert isinstance(data, dict) and str(data.get("id", "")).startswith("act_"), reply
        assert isinstance(data.get("version"), int), reply
    return None


@dataclass
class Probe:
    """Sends raw requests over NATS from a worker thread and checks every reply against the property."""

    loop: asyncio.AbstractEventLoop
    nc: NatsClient
    prefix: str
    conn: psycopg.Connection[Any]
    tried: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)

    async def _request(self, subject: str, payload: bytes, headers: dict[str, str]) -> Any:
        try:
            message = await self.nc.request(subject, payload, headers=headers or None, timeout=REPLY_TIMEOUT_S)
        except NatsTimeoutError:
            raise AssertionError(f"no reply within {REPLY_TIMEOUT_S} s on {subject}: {payload[:200]!r}") from None
        try:
            return orjson.loads(message.data)
        except orjson.JSONDecodeError:
            raise AssertionError(f"the reply is not JSON: {message.data[:200]!r}") from None

    def send(self, name: str, payload: bytes, headers: dict[str, str]) -> Any:
        """One request; asserts the property and returns the decoded reply."""
        kind = "cmd" if name in COMMANDS else "query"
        before = stored_events(self.conn)
        future = asyncio.run_coroutine_threadsafe(
            self._request(f"{self.prefix}.{kind}.{name}", payload, headers), self.loop
        )
        reply = future.result(REPLY_TIMEOUT_S + 5)
        context = f"{name} {headers!r} {payload[:300]!r}"
        try:
            code = check_envelope(reply, listing=name == "list")
        except AssertionError as exc:
            raise AssertionError(f"{context}: {exc}") from None
        after = stored_events(self.conn)
        if code is not None or kind == "query":
            assert after == before, f"{context}: a rejected request or a query stored {after - before} event(s)"
        else:
            assert after - before <= 1, f"{context}: one command stored {after - before} events"
        if code == "unavailable":  # healthy servers: only a read waiting for a position never reached
            assert kind == "query" and b"min_position" in payload, f"{context}: {reply}"
        self.tried[name] += 1
        self.outcomes[(name, code or "ok")] += 1
        return reply


@pytest_asyncio.fixture
async def probe(runtime: Runtime, store: psycopg.Connection[Any]) -> AsyncIterator[Probe]:
    assert runtime.servers is not None
    client = await nats.connect(runtime.servers.nats_url)
    yield Probe(asyncio.get_running_loop(), client, runtime.settings.subject_prefix, store)
    await client.drain()


async def in_thread(function: Callable[[], Any]) -> Any:
    """Hypothesis and blocking clients run in a worker thread; the service keeps this loop."""
    return await asyncio.get_running_loop().run_in_executor(None, function)


async def assert_everything_accepted_is_served(runtime: Runtime, conn: psycopg.Connection[Any]) -> None:
    """The read model applies every stored event and the stream holds each: nothing poisoned them."""
    assert runtime.servers is not None and runtime.app is not None
    row = conn.execute("SELECT count(*), coalesce(max(notification_id), 0) FROM activities_events").fetchone()
    assert row is not None
    count, last = int(row[0]), int(row[1])
    client = await nats.connect(runtime.servers.nats_url)
    try:
        stream = client.jetstream()
        deadline = time.monotonic() + 30
        while True:
            tracked = conn.execute(
                "SELECT notification_id FROM activities_projection_tracking WHERE application_name = %s",
                [runtime.app.name],
            ).fetchone()
            applied = int(tracked[0]) if tracked and tracked[0] is not None else 0
            # the last sequence, not the count of messages: an erasure the fuzzer sent deletes some
            published = (await stream.stream_info(runtime.settings.stream_name)).state.last_seq
            if applied >= last and published >= count:
                break
            assert time.monotonic() < deadline, (
                f"stuck: read model at {applied} of {last}, stream holds {published} of {count} events"
            )
            await asyncio.sleep(0.1)
        assert published == count
    finally:
        await client.drain()
    rows = conn.execute("SELECT count(*) FROM activities WHERE tenant_id = 'acme'").fetchone()
    assert rows is not None  # the read model table survived every injection attempt


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),  # past 64 bits: orjson reads a float or refuses
    st.floats(allow_nan=True, allow_infinity=True),  # NaN and Infinity are not JSON
    st.text(max_size=30),
    st.sampled_from(HOSTILE_STRINGS),
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def encoded(draw: st.DrawFn, value_strategy: st.SearchStrategy[Any]) -> bytes:
    """A value as JSON bytes, sometimes with raw (lone-surrogate, non-UTF-8) characters."""
    value = draw(value_strategy)
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


def nested(depth: int, leaf: Any = 1, key: str = "k") -> Any:
    value = leaf
    for _ in range(depth):
        value = {key: value}
    return value


def nested_lists(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def _monsters() -> list[bytes]:
    link = {"account_id": "acc_1"}
    bodies: list[Any] = [
        {**link, "tags": [f"t{i}" for i in range(100_000)]},  # 100k distinct tags, ~0.9 MB
        {**link, "tags": ["x"] * 100_000},  # 100k duplicates
        {**link, "tags": [f"t{i}" for i in range(25_000)]},  # huge but under 256 KiB: accepted
        {**link, "contact_ids": [f"con_{i}" for i in range(60_000)]},
        {**link, "participants": [{"type": "user", "id": str(i)} for i in range(20_000)]},
        {**link, "custom_fields": nested(50)},
        {**link, "custom_fields": nested(9)},
        {**link, "custom_fields": nested(8)},  # the deepest allowed
        {**link, "custom_fields": {"a": nested_lists(50)}},
        {**link, "recurrence": nested(50)},
        {**link, "description": "x" * (MAX_BODY_BYTES + 1)},  # oversized
        {**link, "description": "x" * (600 * 1024)},
    ]
    raw = [orjson.dumps(body) for body in bodies]
    raw += [
        b'{"account_id": "acc_1", "custom_fields": ' + deep_json(300) + b"}",  # past orjson's write limit
        b'{"account_id": "acc_1", "custom_fields": ' + deep_json(1000) + b"}",  # past Python's recursion limit
        b'{"account_id": "acc_1", "recurrence": ' + deep_json(1000) + b"}",
        b'{"account_id": "acc_1", "participants": [{"type": "user", "id": "u", "x": ' + deep_json(900) + b"}]}",
        b"[" * 5000 + b"]" * 5000,  # deeper than any JSON parser's limit
        b'{"a":' * 1023 + b"1" + b"}" * 1023,
        b" " * (MAX_BODY_BYTES + 10),
        b"\x00" * 1000,
        b'{"account_id": "\\ud800"}',  # a lone surrogate escape
        b'{"account_id": "acc_1", "subject": "\xc3\x28"}',  # invalid UTF-8 inside a string
        b'{"account_id": "acc_1", "account_id": "acc_2"}',  # duplicate key
        b'{"account_id": "acc_1", "subject": "a\\u0000b"}',  # an escaped NUL
        b"\xef\xbb\xbf{}",  # a byte-order mark
    ]
    return raw


def deep_json(depth: int) -> bytes:
    """Objects nested `depth` levels, written directly (too deep for the JSON encoders)."""
    return b'{"k":' * depth + b"1" + b"}" * depth


MONSTERS = _monsters()


def wrap(name: str, body: Any, activity_id: str) -> Any:
    """A body of one command or query shape around a hostile part."""
    if name == "patch":
        return {"id": activity_id, "changes": body}
    return body


def ids(existing: list[str]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(existing),
        st.sampled_from(HOSTILE_STRINGS),
        st.text(alphabet=CROCKFORD, min_size=26, max_size=26).map(lambda s: "act_" + s),  # valid, unknown
        st.text(max_size=40),
        json_values,
    )


def objects_of(names: list[str], values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(names), values, max_size=6)


def field_objects() -> st.SearchStrategy[dict[str, Any]]:
    """The real field names (and server fields, and unknown ones) with wrong-typed or hostile values."""
    names = [*CLIENT_FIELDS, *sorted(SERVER_FIELDS), "colour", "", "account_id "]
    linked = st.booleans().map(lambda link: {"account_id": "acc_1"} if link else {})
    return st.tuples(linked, objects_of(names, json_values)).map(lambda pair: {**pair[0], **pair[1]})


def bodies(name: str, existing: list[str]) -> st.SearchStrategy[bytes]:
    """Every kind of hostile body for one subject."""
    versions = st.one_of(st.none(), st.integers(-5, 5), st.integers(min_value=2**62), json_values)
    if name == "create":
        shaped: st.SearchStrategy[Any] = field_objects()
    elif name == "patch":
        shaped = st.fixed_dictionaries(
            {"id": ids(existing)},
            optional={"expected_version": versions, "changes": field_objects() | json_values, "extra": json_values},
        )
    elif name in ("delete", "restore"):
        shaped = st.fixed_dictionaries(
            {"id": ids(existing)}, optional={"expected_version": versions, "changes": json_values}
        )
    elif name == "get":
        shaped = st.fixed_dictionaries(
            {"id": ids(existing)},
            optional={
                "include_deleted": json_values,
                "version": versions,
                "min_position": st.one_of(st.integers(-3, 3), st.integers(min_value=2**40), json_values),
                "unknown": json_values,
            },
        )
    else:
        list_values = st.one_of(
            st.sampled_from(HOSTILE_STRINGS),
            st.lists(st.sampled_from(HOSTILE_STRINGS), max_size=3),
            json_values,
            st.sampled_from(["call", "-due_date", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00", "true", "50"]),
        )
        shaped = objects_of([*sorted(LIST_PARAMS), "unknown", "id"], list_values)
    monster = st.sampled_from(MONSTERS)
    if name == "patch":
        monster = st.tuples(st.sampled_from(existing), monster).map(
            lambda pair: b'{"id": "' + pair[0].encode() + b'", "changes": ' + pair[1] + b"}"
        )
    return st.one_of(
        st.binary(max_size=200),
        encoded(json_values),
        encoded(shaped),
        encoded(shaped),
        encoded(shaped),
        monster,
    )


printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
control = st.characters(codec="utf-8", exclude_characters="\r\n")  # CR/LF would end the header line


@st.composite
def headers(draw: st.DrawFn) -> dict[str, str]:
    """Authorization: valid, missing or garbage; Idempotency-Key: absent, fresh, or garbage."""
    result: dict[str, str] = {}
    authorization = draw(
        st.one_of(
            st.just(bearer()),
            st.just(bearer()),
            st.just(bearer(app="crm_app")),
            st.just(bearer(tenant="globex")),
            st.none(),
            st.sampled_from(
                [
                    "",
                    "Bearer",
                    "Bearer ",
                    "bearer " + bearer()[7:],
                    "Basic dXNlcjpwYXNz",
                    "Bearer " + bearer()[7:] + "x",
                    bearer(ttl_s=-60),  # expired
                    "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4IiwidGVuYW50X2lkIjoiYWNtZSJ9.",  # alg none
                    "Bearer " + jwt.encode({"sub": "x", "tenant_id": "a.b", "exp": 2**31}, JWT_SECRET),
                    "Bearer " + jwt.encode({"sub": "x", "tenant_id": "*", "exp": 2**31}, JWT_SECRET),
                    "Bearer " + jwt.encode({"sub": "x", "exp": 2**31}, JWT_SECRET),  # no tenant
                ]
            ),
            st.text(control, max_size=300).map(lambda text: "Bearer " + text),
        )
    )
    if authorization is not None:
        result["Authorization"] = authorization
    key = draw(
        st.one_of(
            st.none(),
            st.none(),
            st.builds(lambda: uuid.uuid4().hex),
            st.text(printable, min_size=201, max_size=2000),
            st.text(control, min_size=1, max_size=50),
            st.sampled_from(["*", ">", "'; DROP TABLE activities_idempotency; --", "\x00", "\x7f", "é"]),
        )
    )
    if key is not None:
        result["Idempotency-Key"] = key
    return result


HEALTH_CHECKS = [
    HealthCheck.function_scoped_fixture,
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.filter_too_much,
]


def hypothesis_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, suppress_health_check=HEALTH_CHECKS, database=None)


async def seed(probe: Probe) -> list[str]:
    """Two live activities and a deleted one, so that ids hit real documents too."""

    def run() -> list[str]:
        auth = {"Authorization": bearer()}
        activity_ids = [probe.send("create", b'{"account_id": "acc_1"}', auth)["data"]["id"] for _ in range(3)]
        probe.send("delete", orjson.dumps({"id": activity_ids[-1]}), auth)
        return activity_ids

    activity_ids: list[str] = await in_thread(run)
    return activity_ids


def read_back(probe: Probe, reply: dict[str, Any]) -> dict[str, Any]:
    """The activity of a command reply, read from the read model once it has applied that command."""
    body = orjson.dumps({"id": reply["data"]["id"], "min_position": reply["meta"]["position"]})
    for _ in range(50):
        got = probe.send("get", body, {"Authorization": bearer()})
        if "data" in got:
            document: dict[str, Any] = got["data"]
            return document
        assert got["error"]["code"] == "unavailable", got
    raise AssertionError(f"the read model never applied {reply}")


# ---------------------------------------------------------------------------------------------
# NATS
# ---------------------------------------------------------------------------------------------

EXAMPLES_PER_SUBJECT = 150


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", COMMANDS + QUERIES)
async def test_every_subject_answers_hostile_bodies_and_headers_well(
    runtime: Runtime, probe: Probe, store: psycopg.Connection[Any], name: str
) -> None:
    existing = await seed(probe)

    @hypothesis_settings(EXAMPLES_PER_SUBJECT)
    @given(payload=bodies(name, existing), sent_headers=headers())
    def check(payload: bytes, sent_headers: dict[str, str]) -> None:
        probe.send(name, payload, sent_headers)

    await in_thread(check)
    assert probe.tried[name] >= EXAMPLES_PER_SUBJECT
    print(f"\n{name}: {probe.tried[name]} requests, outcomes {dict(probe.outcomes)}")
    await assert_everything_accepted_is_served(runtime, store)


async def test_every_monster_body_on_every_subject(
    runtime: Runtime, probe: Probe, store: psycopg.Connection[Any]
) -> None:
    """Each huge, deep, oversized or malformed body, on each subject, with a valid token and key."""
    existing = await seed(probe)

    def run() -> None:
        for name in COMMANDS + QUERIES:
            for body in MONSTERS:
                payload = body
                if name == "patch":
                    payload = b'{"id": "' + existing[0].encode() + b'", "changes": ' + body + b"}"
                for key in (None, uuid.uuid4().hex):
                    sent = {"Authorization": bearer(), **({"Idempotency-Key": key} if key else {})}
                    probe.send(name, payload, sent)

    await in_thread(run)
    print(f"\nmonsters: {sum(probe.tried.values())} requests, outcomes {dict(probe.outcomes)}")
    await assert_everything_accepted_is_served(runtime, store)


async def test_sql_and_wildcard_strings_in_every_id_filter_and_field(
    runtime: Runtime, probe: Probe, store: psycopg.Connection[Any]
) -> None:
    """Every hostile string in every id, every list filter, every get parameter and every string field."""
    existing = await seed(probe)
    auth = {"Authorization": bearer()}
    string_fields = [
        name
        for name, info in ActivityFields.model_fields.items()
        if "str" in str(info.annotation) and "list" not in str(info.annotation)
    ]

    def run() -> None:
        for text in HOSTILE_STRINGS:
            for name in ("patch", "delete", "restore"):
                probe.send(name, orjson.dumps({"id": text, "changes": {"subject": "x"}}), auth)
            probe.send("get", orjson.dumps({"id": text}), auth)
            for parameter in sorted(LIST_PARAMS):
                probe.send("list", orjson.dumps({parameter: text}), auth)
                probe.send("list", orjson.dumps({parameter: [text, "x"]}), auth)
            for parameter in ("include_deleted", "version", "min_position"):
                probe.send("get", orjson.dumps({"id": existing[0], parameter: text}), auth)
            for fieldname in string_fields:
                body = {"account_id": "acc_1", fieldname: text}
                created = probe.send("create", orjson.dumps(body), auth)
                patch = {"id": existing[1], "changes": {fieldname: text}}
                probe.send("patch", orjson.dumps(patch), auth)
                if "data" in created:  # stored as sent, and read back as sent
                    assert created["data"][fieldname] == text
                    assert read_back(probe, created)[fieldname] == text
            for fieldname in ("tags", "contact_ids", "attachment_refs"):
                probe.send("create", orjson.dumps({"account_id": "acc_1", fieldname: [text]}), auth)
            probe.send("create", orjson.dumps({"account_id": "acc_1", "custom_fields": {text: text}}), auth)

    await in_thread(run)
    await assert_everything_accepted_is_served(runtime, store)

    # in a fresh tenant, a filter with a LIKE or wildcard metacharacter matches only that exact value
    auth = {"Authorization": bearer(tenant="wildcards")}
    await in_thread(lambda: probe.send("create", orjson.dumps({"account_id": "acc_1", "status": "open"}), auth))
    tagged = {"account_id": "%", "tags": ["_"], "status": "*"}
    created = await in_thread(lambda: probe.send("create", orjson.dumps(tagged), auth))
    position = created["meta"]["position"]
    for query, expected in (
        ({"account_id": "%"}, 1),
        ({"tag": "_"}, 1),
        ({"status": "*"}, 1),
        ({"tag": "%"}, 0),
        ({"status": "%"}, 0),
        ({"account_id": "_%"}, 0),
        ({"account_id": "acc*"}, 0),
        ({}, 2),
    ):
        body = orjson.dumps({**query, "min_position": position})
        for _ in range(50):
            reply = await in_thread(functools.partial(probe.send, "list", body, auth))
            if "data" in reply:
                break
        assert len(reply["data"]) == expected, (query, reply)
    print(f"\nstrings: {sum(probe.tried.values())} requests, outcomes {dict(probe.outcomes)}")


async def test_a_patch_cannot_grow_a_document_past_the_body_limit(
    runtime: Runtime, probe: Probe, store: psycopg.Connection[Any]
) -> None:
    """Each patch is under 256 KiB, but their sum would make an event too big for a NATS message."""
    auth = {"Authorization": bearer()}
    chunk = "x" * (200 * 1024)

    def run() -> list[Any]:
        created = probe.send("create", orjson.dumps({"account_id": "acc_1", "description": chunk}), auth)
        replies = [created]
        for fieldname in ("notes", "subject", "outcome"):
            body = {"id": created["data"]["id"], "changes": {fieldname: chunk}}
            replies.append(probe.send("patch", orjson.dumps(body), auth))
        return replies

    replies = await in_thread(run)
    assert "data" in replies[0]
    assert replies[1]["error"]["code"] == "validation_error", replies[1]
    await assert_everything_accepted_is_served(runtime, store)


# ---------------------------------------------------------------------------------------------
# HTTP: hostile ids and filters, and schemathesis over the OpenAPI document
# ---------------------------------------------------------------------------------------------


def check_http(response: httpx.Response, listing: bool = False) -> str | None:
    assert response.status_code < 500, (response.request.method, response.request.url, response.text)
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    code = check_envelope(orjson.loads(response.content), listing=listing)
    return code


async def test_http_hostile_ids_and_filters(runtime: Runtime, store: psycopg.Connection[Any]) -> None:
    base = runtime.endpoints["http_url"] + "/api/v1/crm/activities"
    auth = {"Authorization": bearer()}
    tried = 0
    async with httpx.AsyncClient(timeout=REPLY_TIMEOUT_S) as client:
        for text in HOSTILE_STRINGS:
            before = stored_events(store)
            segment = quote(text, safe="")
            for method, path, body in (
                ("GET", f"/{segment}", None),
                ("GET", f"/{segment}/events", None),
                ("PATCH", f"/{segment}", b'{"subject": "x"}'),
                ("DELETE", f"/{segment}", None),
                ("POST", f"/{segment}/restore", None),
            ):
                response = await client.request(method, base + path, content=body, headers=auth)
                assert check_http(response) is not None
                tried += 1
            for parameter in sorted(LIST_PARAMS):
                response = await client.get(base, params=[(parameter, text)], headers=auth)
                check_http(response, listing=True)
                tried += 1
            value = text.strip().encode()
            if any(byte in value for byte in b"\x00\r\n"):
                value = b"x" + value.replace(b"\x00", b"").replace(b"\r", b"").replace(b"\n", b"")  # unsendable
            for header in (b"Idempotency-Key", b"If-Match", b"Authorization"):
                sent = {b"Authorization": auth["Authorization"].encode(), header: value}
                response = await client.post(base, content=b"{}", headers=sent)
                assert check_http(response) is not None
                tried += 1
            assert stored_events(store) == before
    print(f"\nhttp hostile strings: {tried} requests")


HTTP_EXAMPLES_PER_MODE = 15


def documented_unavailable(response: Any) -> bool:
    """The documented 503 `unavailable` ("retry"): a read asked for a generated `min_position`
    beyond this database's log, or an erasure by contact that found the read model behind the log
    on a busy machine. A transient answer every route may give, never a server fault (500)."""
    return response.status_code == 503 and orjson.loads(response.content)["error"]["code"] == "unavailable"


def envelope_check(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schemathesis check: the contract's envelope on every /api response, never a 5xx but the
    documented `unavailable`."""
    assert response.status_code < 500 or documented_unavailable(response), (
        f"{response.status_code}: {response.text[:500]}")
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.headers
    listing = case.operation.path in ("/api/v1/crm/activities", "/api/v1/crm/activities/occurrences")
    listing = listing and case.method.upper() == "GET"  # both pages: data and meta.next_cursor
    counting = case.operation.path == "/api/v1/crm/activities/stats"
    batch = case.operation.path == "/api/v1/crm/activities/batch"
    erasing = case.operation.path.endswith("/erase")
    check_envelope(orjson.loads(response.content), listing=listing, counting=counting, batch=batch, erasing=erasing)
    return None


def fuzz_operation(
    operation: Any, mode: GenerationMode, fixed_headers: dict[str, str], http_url: str, conn: psycopg.Connection[Any]
) -> Counter[int]:
    """Schemathesis cases of one operation: the checks pass (every reply's status and body are the
    ones the OpenAPI document gives for that route), and a rejected request stores nothing."""
    checks = [
        envelope_check,  # in place of schemathesis.checks.not_a_server_error, which refuses the documented 503 too
        schemathesis.checks.status_code_conformance,
        schemathesis.checks.response_schema_conformance,
    ]
    statuses: Counter[int] = Counter()
    strategy = operation.as_strategy(generation_mode=mode, headers=fixed_headers or None)

    @hypothesis_settings(HTTP_EXAMPLES_PER_MODE)
    @given(case=strategy)
    def check(case: Any) -> None:
        before = stored_events(conn)
        response = case.call(base_url=http_url, timeout=REPLY_TIMEOUT_S)
        case.validate_response(response, checks=checks)
        statuses[response.status_code] += 1
        if response.status_code >= 400:
            assert stored_events(conn) == before, f"{case.as_curl_command()} stored an event"

    check()
    return statuses


OPERATIONS = 14  # list, get, events, stats, get by key, occurrences, and the seven commands' routes (erase has two)


@pytest.mark.timeout(300)
async def test_schemathesis_against_the_openapi_document(runtime: Runtime, store: psycopg.Connection[Any]) -> None:
    http_url = runtime.endpoints["http_url"]
    tried: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    unsatisfiable: list[str] = []

    def run() -> None:
        schema = schemathesis.openapi.from_url(http_url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
        operations = [op for op in operations if op.path.startswith("/api/v1/crm/")]
        assert len(operations) == OPERATIONS, [op.label for op in operations]
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                for fixed in ({"authorization": bearer()}, {}):  # a valid token, or a generated one
                    try:
                        seen = fuzz_operation(operation, mode, fixed, http_url, store)
                    except Unsatisfiable:  # nothing of this operation can be made invalid this way
                        assert mode == GenerationMode.NEGATIVE, operation.label
                        unsatisfiable.append(f"{operation.label} {mode.value} {sorted(fixed)}")
                        continue
                    tried[operation.label] += seen.total()
                    statuses.update(seen)

    await in_thread(run)
    print(f"\nschemathesis: {dict(tried)}; statuses {dict(statuses)}; no negative cases: {unsatisfiable}")
    assert len(tried) == OPERATIONS and all(count >= 2 * HTTP_EXAMPLES_PER_MODE for count in tried.values()), tried
    assert statuses[200] + statuses[201] > 0 and statuses[422] > 0 and statuses[401] > 0, statuses
    await assert_everything_accepted_is_served(runtime, store)
