"""Erasure's rules (docs/contract.md section 11) as given / when / then, and its log hygiene."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from activities_client.document import EVENT_KINDS, SKELETON_FIELDS, new_activity_id, skeleton
from activities_client.errors import Gone, NotFound, ValidationError
from events.activity import ActivityErased, ActivityLogged, ActivityPatched, activity_uuid, erased_copy, event_body
from events.commands import (
    EraseActivity,
    EraseByContact,
    parse_create,
    parse_delete,
    parse_erase,
    parse_patch,
    parse_restore,
)
from projections.errors import describe
from services.domain import Activity, Caller, decide, names_contact
from services.logs import JsonFormatter

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
ALICE = Caller(tenant_id="acme", sub="usr-alice")
OTHER_TENANT = Caller(tenant_id="globex", sub="usr-eve")
OTHER_APP = Caller(tenant_id="acme", sub="svc", app_id="hubspot")
SECRET = "Top secret pricing"


def logged(body: dict[str, Any] | None = None) -> tuple[str, Activity]:
    activity_id = new_activity_id()
    fields = body or {"contact_id": "c-1", "subject": SECRET, "participants": [{"type": "contact", "id": "c-2"}]}
    decision = decide(None, parse_create(fields), ALICE, NOW, activity_id)
    assert decision is not None
    return activity_id, Activity.log(activity_uuid(activity_id), decision, NOW)


def erase(activity: Activity, command: EraseActivity, caller: Caller = ALICE) -> Any:
    return decide(activity.document, command, caller, NOW + timedelta(minutes=1))


def test_erase_appends_an_erased_event_with_the_skeleton() -> None:
    activity_id, activity = logged()
    decision = erase(activity, EraseActivity(activity_id))
    assert decision.event_class is ActivityErased and decision.changes == {}
    assert set(decision.document) == set(SKELETON_FIELDS)
    assert decision.document["version"] == 2 and decision.document["is_erased"] is True
    assert decision.document["updated_at"] == "2026-11-27T12:01:00Z"
    assert decision.document["created_at"] == activity.document["created_at"]
    assert SECRET not in str(decision.document)


def test_erasing_an_erased_activity_is_a_no_op_and_changing_it_is_gone() -> None:
    activity_id, activity = logged()
    activity.record(erase(activity, EraseActivity(activity_id)), NOW)
    assert erase(activity, EraseActivity(activity_id)) is None
    for command in (
        parse_patch({"id": activity_id, "changes": {"subject": "x"}}),
        parse_delete({"id": activity_id}),
        parse_restore({"id": activity_id}),
    ):
        with pytest.raises(Gone):
            decide(activity.document, command, ALICE, NOW)


def test_erase_of_what_the_caller_cannot_see_is_not_found() -> None:
    activity_id, activity = logged()
    for caller in (OTHER_TENANT, OTHER_APP):
        with pytest.raises(NotFound):
            erase(activity, EraseActivity(activity_id), caller)
    with pytest.raises(NotFound):
        decide(None, EraseActivity(activity_id), ALICE, NOW)


def test_erase_by_contact_applies_only_while_the_activity_names_the_contact() -> None:
    activity_id, activity = logged()
    assert erase(activity, EraseActivity(activity_id, if_names_contact="c-2")) is not None  # a participant
    assert erase(activity, EraseActivity(activity_id, if_names_contact="c-1")) is not None
    assert erase(activity, EraseActivity(activity_id, if_names_contact="c-9")) is None
    assert names_contact({"contact_ids": ["a", "c-3"]}, "c-3")
    assert not names_contact({"participants": [{"type": "user", "id": "c-3"}]}, "c-3")


def test_retention_erases_only_what_is_still_deleted_since_before_the_cutoff() -> None:
    activity_id, activity = logged()
    cutoff = "2026-11-27T12:00:30Z"
    assert erase(activity, EraseActivity(activity_id, if_deleted_before=cutoff)) is None  # live
    deleted = decide(activity.document, parse_delete({"id": activity_id}), ALICE, NOW)
    assert deleted is not None
    activity.record(deleted, NOW)
    assert erase(activity, EraseActivity(activity_id, if_deleted_before=cutoff)) is not None
    assert erase(activity, EraseActivity(activity_id, if_deleted_before="2026-11-27T11:00:00Z")) is None


def test_erase_bodies() -> None:
    activity_id = new_activity_id()
    assert parse_erase({"id": activity_id}) == EraseActivity(activity_id)
    assert parse_erase({"contact_id": "c-1"}) == EraseByContact("c-1")
    for body in ({}, {"id": activity_id, "contact_id": "c"}, {"contact_id": ""}, {"contact_id": 5}, {"id": "x"},
                 {"id": activity_id, "expected_version": 1}):
        with pytest.raises(ValidationError):
            parse_erase(body)


def test_an_erased_copy_keeps_class_version_time_and_position_but_no_content() -> None:
    activity_id, activity = logged()
    patch = decide(activity.document, parse_patch({"id": activity_id, "changes": {"notes": SECRET}}), ALICE, NOW)
    assert patch is not None
    activity.record(patch, NOW, traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    first, second = activity.collect_events()
    for event in (first, second):
        copy = erased_copy(event)  # type: ignore[arg-type]
        assert type(copy) is type(event) and isinstance(copy, ActivityLogged | ActivityPatched)
        assert (copy.originator_id, copy.originator_version, copy.timestamp) == (
            event.originator_id,
            event.originator_version,
            event.timestamp,
        )
        body = event_body(copy, 7)
        assert body["changes"] == {} and set(body["activity"]) == set(SKELETON_FIELDS)
        assert copy.traceparent is None and SECRET not in str(body)


def test_erased_is_an_event_type_published_as_erased() -> None:
    assert EVENT_KINDS["ActivityErased"] == "erased"
    assert skeleton({"id": "x", "is_deleted": None})["is_deleted"] is False


def test_logs_name_errors_by_type_and_sqlstate_never_by_message() -> None:
    class FakeDbError(Exception):
        sqlstate = "22007"

    error = FakeDbError(f'invalid input syntax for type timestamp: "{SECRET}"')
    assert describe(error) == "FakeDbError (SQLSTATE 22007)"
    try:
        try:
            raise error
        except FakeDbError as inner:
            raise RuntimeError(SECRET) from inner
    except RuntimeError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert SECRET not in line and "RuntimeError" in line and "22007" in line and "raise RuntimeError" in line


def test_connection_errors_keep_their_first_line_which_says_what_to_fix() -> None:
    import psycopg

    refused = psycopg.OperationalError("connection failed: server does not support SSL, but SSL was required\nmore")
    assert describe(refused) == "OperationalError: connection failed: server does not support SSL, but SSL was required"
    assert describe(ConnectionRefusedError("refused")) == "ConnectionRefusedError: refused"
    assert describe(ValueError(SECRET)) == "ValueError"
