"""Pure rules of upserts and batches (docs/contract.md section 8): given a document / when an upsert
/ then the event or error; a batch's parsing as a whole and per item; the fast activity-id decoder."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from ulid import ULID

from activities_client.document import new_activity_id
from activities_client.errors import Gone, NotFound, ValidationError, VersionConflict
from events.activity import ActivityLogged, ActivityPatched, activity_uuid
from events.commands import BatchCommands, CreateActivity, UpsertActivity, parse_batch, parse_upsert, validate_fields
from services.domain import Caller, decide, new_document

ACTIVITY_ID = "act_01ARZ3NDEKTSV4RRFFQ69G5FAV"
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
CALLER = Caller("acme", "usr-1")


def upsert(**activity: object) -> UpsertActivity:
    return parse_upsert({"external_key": "k-1", "activity": activity})


def test_an_upsert_of_a_new_key_creates_and_stamps_the_key() -> None:
    decision = decide(None, upsert(account_id="acc_1", subject=None), CALLER, NOW, "act_01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert decision is not None and decision.event_class is ActivityLogged
    assert decision.document["external_key"] == "k-1" and decision.document["version"] == 1
    assert decision.document["subject"] is None  # null left out of the create: the default
    with pytest.raises(ValidationError):
        decide(None, upsert(subject="unlinked"), CALLER, NOW, "act_01ARZ3NDEKTSV4RRFFQ69G5FAV")
    with pytest.raises(VersionConflict) as conflict:
        decide(None, parse_upsert({"external_key": "k", "activity": {"account_id": "a"}, "expected_version": 1}),
               CALLER, NOW, "act_01ARZ3NDEKTSV4RRFFQ69G5FAV")  # fmt: skip
    assert conflict.value.current_version == 0


def test_an_upsert_of_a_known_key_is_a_merge_patch() -> None:
    fields = validate_fields({"account_id": "a", "subject": "s"}).to_json()
    document = {**new_document(ACTIVITY_ID, fields, CALLER, NOW), "external_key": "k-1"}
    decision = decide(document, upsert(subject=None, status="done"), CALLER, NOW)
    assert decision is not None and decision.event_class is ActivityPatched
    assert decision.document["subject"] is None and decision.document["account_id"] == "a"
    assert decision.document["external_key"] == "k-1" and decision.document["version"] == 2
    assert decide(document, upsert(subject="s"), CALLER, NOW) is None  # changes nothing: no event
    with pytest.raises(VersionConflict):
        decide(document, parse_upsert({"external_key": "k-1", "activity": {}, "expected_version": 3}), CALLER, NOW)
    with pytest.raises(Gone):
        decide({**document, "is_deleted": True}, upsert(subject="x"), CALLER, NOW)
    with pytest.raises(NotFound):
        decide(document, upsert(subject="x"), Caller("other", "usr-1"), NOW)


def test_a_batch_is_malformed_as_a_whole_or_per_item() -> None:
    for body in ({"commands": []}, {"commands": [{"op": "create"}] * 101}, {"commands": {}}, {}, {"x": []}):
        with pytest.raises(ValidationError):
            parse_batch(body)
    with pytest.raises(ValidationError):
        parse_batch(b'{"commands": [' + b'{"op":"create","subject":"' + b"x" * (1024 * 1024) + b'"}]}')
    batch = parse_batch({"commands": [
        {"op": "create", "account_id": "a", "idempotency_key": "k"},
        {"op": "create", "idempotency_key": "\n"},
        {"op": "nope"},
        [],
        {"op": "upsert", "external_key": "e", "activity": {"deal_id": "d"}},
    ]})  # fmt: skip
    assert isinstance(batch, BatchCommands)
    first, bad_key, bad_op, not_object, keyed = batch.items
    assert isinstance(first.command, CreateActivity) and first.idempotency_key == "k" and first.fingerprint
    assert [item.error.details[0]["field"] for item in (bad_key, bad_op) if item.error] == ["idempotency_key", "op"]
    assert not_object.error is not None and not_object.command is None
    assert isinstance(keyed.command, UpsertActivity) and keyed.error is None


def test_activity_uuid_is_the_ulids_uuid() -> None:
    for _ in range(2000):
        activity_id = new_activity_id()
        assert activity_uuid(activity_id) == ULID.from_str(activity_id[4:]).to_uuid()
    for bad in ("act_8" + "0" * 25, "act_" + "0" * 25, "act_" + "0" * 25 + "U", "act_" + "0" * 24 + "_1",
                "act_" + "0" * 25 + " ", "act_" + "0" * 25 + "é"):  # fmt: skip
        with pytest.raises(ValueError):
            activity_uuid(bad)
