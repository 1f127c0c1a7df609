"""Pure helpers of the client and its CLI (no I/O): encoding, start positions, backoff, tables."""

from __future__ import annotations

import argparse
import base64
import re
from datetime import UTC, datetime, timedelta, timezone

import jwt
import pytest

from activities_client.client import (
    AsyncClient,
    RetryPolicy,
    Unauthorized,
    _code_of_status,
    _http_params,
    _query_value,
    tenant_of,
)
from activities_client.document import ACTIVITY_ID_PATTERN, is_activity_id, new_activity_id
from activities_client.errors import ERRORS_BY_CODE
from activities_client.wire import ActivityRefBody, ErrorBody, GetActivityBody, PatchActivityBody
from events.activity import activity_id_of, activity_uuid
from services.cli_client import _start, parse_value, table


def test_parse_value_reads_json_only_where_it_is_meant() -> None:
    assert parse_value("Intro call") == "Intro call"
    assert parse_value("123") == "123"  # a subject of digits stays a string
    assert parse_value('["a", "b"]') == ["a", "b"]
    assert parse_value('{"k": 1}') == {"k": 1}
    assert parse_value("true") is True and parse_value("null") is None
    with pytest.raises(argparse.ArgumentTypeError):
        parse_value("[not json")


def test_start_positions() -> None:
    assert _start("new") == "new" and _start("all") == "all" and _start("42") == 42
    assert _start("2026-01-05T09:30:00+01:00") == datetime(2026, 1, 5, 8, 30, tzinfo=UTC)
    with pytest.raises(argparse.ArgumentTypeError):
        _start("2026-01-05T09:30:00")  # naive


def test_query_values_and_http_params() -> None:
    paris = timezone(timedelta(hours=1))
    assert _query_value(datetime(2026, 1, 5, 10, 0, tzinfo=paris)) == "2026-01-05T09:00:00Z"
    assert _query_value(["call", "note"]) == ["call", "note"]
    pairs = _http_params({"type": ["call", "note"], "include_deleted": True, "cursor": None, "limit": 5})
    assert pairs == [("type", "call"), ("type", "note"), ("include_deleted", "true"), ("limit", "5")]


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(attempts=5, backoff_s=0.2, max_backoff_s=1.0)
    for _ in range(50):
        assert 0.1 <= policy.delay(1) <= 0.2
        assert 0.4 <= policy.delay(3) <= 0.8
        assert 0.5 <= policy.delay(10) <= 1.0


SECRET = "any-secret-of-at-least-32-bytes-long"


def test_tenant_is_read_from_the_unverified_claims() -> None:
    token = jwt.encode({"sub": "s", "tenant_id": "acme", "exp": 2_000_000_000}, SECRET, algorithm="HS256")
    assert tenant_of(token) == "acme"
    assert AsyncClient(nats_url="nats://127.0.0.1:1", token=token).tenant_id == "acme"
    with pytest.raises(Unauthorized):
        tenant_of("not-a-jwt")
    with pytest.raises(Unauthorized):
        tenant_of(jwt.encode({"sub": "s"}, SECRET, algorithm="HS256"))


def test_table_aligns_and_truncates() -> None:
    text = table([("act_1", None, "x" * 60), ("act_22", True, "short")], ("id", "deleted", "subject"))
    lines = text.splitlines()
    assert lines[0].split() == ["ID", "DELETED", "SUBJECT"]
    assert lines[2].split()[:2] == ["act_1", "-"] and lines[2].endswith("…") and len(lines[2].split()[2]) == 40
    assert lines[3].split() == ["act_22", "yes", "short"]


def test_token_payloads_that_are_not_json_objects_are_unauthorized() -> None:
    with pytest.raises(Unauthorized):
        tenant_of("a.!!!.c")
    with pytest.raises(Unauthorized):
        tenant_of("a." + base64.urlsafe_b64encode(b"[1, 2]").decode().rstrip("=") + ".c")


def test_one_activity_id_pattern_for_the_rules_the_wire_models_and_the_store() -> None:
    for _ in range(200):
        activity_id = new_activity_id()
        assert is_activity_id(activity_id) and re.match(ACTIVITY_ID_PATTERN, activity_id)
        assert activity_id_of(activity_uuid(activity_id)) == activity_id  # python-ulid reads our ULIDs
    for model in (PatchActivityBody, ActivityRefBody, GetActivityBody):
        assert model.model_json_schema()["properties"]["id"]["pattern"] == ACTIVITY_ID_PATTERN
    too_big = "act_8" + "0" * 25  # 26 base32 characters starting above 7 are more than 128 bits
    assert not is_activity_id(too_big) and not re.match(ACTIVITY_ID_PATTERN, too_big)


def test_error_codes_are_the_error_classes_codes() -> None:
    assert ErrorBody.model_json_schema()["properties"]["code"]["enum"] == list(ERRORS_BY_CODE)


def test_gateway_statuses_are_unavailable() -> None:
    assert [_code_of_status(status) for status in (502, 503, 504)] == ["unavailable"] * 3
    assert _code_of_status(500) == "internal" and _code_of_status(404) == "not_found"
