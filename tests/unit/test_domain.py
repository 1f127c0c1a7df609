"""Given events / when command / then events or error: every rule of docs/contract.md sections 1 and 3."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given as given_examples
from hypothesis import strategies as st
from ulid import ULID

from activities_client.document import (
    DATETIME_FIELDS,
    ActivityFields,
    format_datetime,
    is_activity_id,
    new_activity_id,
)
from activities_client.errors import Gone, NotFound, ValidationError, VersionConflict
from events.activity import (
    ActivityDeleted,
    ActivityLogged,
    ActivityPatched,
    ActivityRestored,
    activity_id_of,
    activity_uuid,
    activity_uuid_hex,
)
from events.commands import (
    parse_create,
    parse_delete,
    parse_patch,
    parse_restore,
    reject_server_and_unknown_fields,
    validate_fields,
)
from services.domain import Activity, Caller, Decision, decide, merge_patch

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)
ALICE = Caller(tenant_id="acme", sub="usr-alice")
BOB = Caller(tenant_id="acme", sub="usr-bob")
OTHER_TENANT = Caller(tenant_id="globex", sub="usr-eve")
APP_CALLER = Caller(tenant_id="acme", sub="svc-sync", app_id="gong")
OTHER_APP = Caller(tenant_id="acme", sub="svc-other", app_id="hubspot")
ACTIVITY_ID = new_activity_id()


def given(*commands: tuple[dict[str, Any], Caller, str]) -> Activity:
    """An activity built by applying commands; each item is (body, caller, kind)."""
    activity: Activity | None = None
    for index, (body, caller, kind) in enumerate(commands):
        when = NOW + timedelta(seconds=index)
        if kind == "create":
            decision = decide(None, parse_create(body), caller, when, ACTIVITY_ID)
            assert decision is not None
            activity = Activity.log(activity_uuid(ACTIVITY_ID), decision, when)
        else:
            assert activity is not None
            parsed = {"patch": parse_patch, "delete": parse_delete, "restore": parse_restore}[kind]({"id": ACTIVITY_ID, **body})
            decision = decide(activity.document, parsed, caller, when)
            if decision is not None:
                activity.record(decision, when)
    assert activity is not None
    activity.collect_events()
    return activity


def created(body: dict[str, Any] | None = None, caller: Caller = ALICE) -> Activity:
    return given((body or {"account_id": "acc_1"}, caller, "create"))


def patch(activity: Activity, changes: dict[str, Any], caller: Caller = BOB, **extra: Any) -> Decision | None:
    return decide(activity.document, parse_patch({"id": ACTIVITY_ID, "changes": changes, **extra}), caller, LATER)


def field_errors(error: ValidationError) -> set[str]:
    return {detail["field"] for detail in error.details}


# --- create ----------------------------------------------------------------------------------


def test_create_logs_an_activity_with_server_fields_from_the_caller() -> None:
    decision = decide(None, parse_create({"account_id": "acc_1", "type": "call"}), APP_CALLER, NOW, ACTIVITY_ID)
    assert decision is not None and decision.event_class is ActivityLogged
    document = decision.document
    assert document["id"] == ACTIVITY_ID and is_activity_id(document["id"])
    assert (document["tenant_id"], document["app_id"]) == ("acme", "gong")
    assert document["created_by"] == document["updated_by"] == "svc-sync"
    assert document["created_at"] == document["updated_at"] == "2026-11-27T12:00:00Z"
    assert document["version"] == 1 and document["schema_version"] == 2
    assert document["is_deleted"] is False and document["deleted_at"] is None and document["deleted_by"] is None
    assert decision.changes["account_id"] == "acc_1" and decision.changes["type"] == "call"


def test_human_session_has_null_app_id() -> None:
    assert created().document["app_id"] is None


def test_create_fills_defaults() -> None:
    document = created().document
    assert document["source"] == "edm" and document["source_type"] == "api"
    assert document["reminder_sent"] is False
    assert document["contact_ids"] == [] and document["participants"] == [] and document["tags"] == []
    assert document["attachment_refs"] == [] and document["custom_fields"] == {}
    assert document["recurrence"] is None and document["type"] is None


@pytest.mark.parametrize("link", ["account_id", "deal_id", "contact_id"])
def test_any_one_link_is_enough(link: str) -> None:
    assert created({link: "x_1"}).document[link] == "x_1"


def test_create_without_account_deal_or_contact_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_create({"subject": "orphan", "contact_ids": ["c_1"]})
    assert "account_id" in field_errors(caught.value)


@pytest.mark.parametrize("field", ["id", "tenant_id", "app_id", "created_at", "updated_at", "created_by", "updated_by",
                                   "is_deleted", "deleted_at", "deleted_by", "schema_version", "version",
                                   "external_key", "is_erased"])
def test_server_fields_cannot_be_sent(field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_create({"account_id": "acc_1", field: "x"})
    assert field in field_errors(caught.value)


def test_unknown_field_is_named() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_create({"account_id": "acc_1", "colour": "red"})
    assert field_errors(caught.value) == {"colour"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subject", 42),
        ("reminder_sent", "yes"),
        ("reminder_sent", 1),
        ("tags", "not-a-list"),
        ("tags", [1, 2]),
        ("custom_fields", ["a"]),
        ("recurrence", "FREQ=DAILY"),
        ("participants", [{"type": "robot", "id": "r1"}]),
        ("participants", [{"type": "user"}]),
        ("source_type", "mobile"),
        ("type", "lunch"),
        ("account_id", 7),
        ("account_id", ""),
    ],
)
def test_wrong_types_and_enums_are_named(field: str, value: Any) -> None:
    body = {"account_id": "acc_1", field: value} if field != "account_id" else {"deal_id": "d", field: value}
    with pytest.raises(ValidationError) as caught:
        parse_create(body)
    assert any(name == field or name.startswith(field + ".") for name in field_errors(caught.value))


@pytest.mark.parametrize("value", ["usr-123", "usr-8F14E45F-CEEA-467F-A2BE-0E3E0B6C5B3A", "8f14e45f-ceea-467f-a2be-0e3e0b6c5b3a"])
def test_owner_id_must_be_usr_lowercase_uuid(value: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_create({"account_id": "a", "owner_id": value})
    assert field_errors(caught.value) == {"owner_id"}


def test_owner_id_accepts_the_canonical_form() -> None:
    owner = "usr-8f14e45f-ceea-467f-a2be-0e3e0b6c5b3a"
    assert created({"account_id": "a", "owner_id": owner}).document["owner_id"] == owner


@pytest.mark.parametrize("value", ["2026-01-31T09:30:00", "2026-01-31", "yesterday", 1700000000])
def test_datetimes_need_a_zone(value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_create({"account_id": "a", "activity_date": value})
    assert field_errors(caught.value) == {"activity_date"}


def test_datetimes_are_stored_in_utc_with_z() -> None:
    document = created({"account_id": "a", "activity_date": "2026-01-31T09:30:00+01:00", "due_date": "2026-02-01T00:00:00.5Z"}).document
    assert document["activity_date"] == "2026-01-31T08:30:00Z"
    assert document["due_date"] == "2026-02-01T00:00:00.500000Z"


@pytest.mark.parametrize("field", ["contact_ids", "tags", "attachment_refs"])
def test_lists_hold_no_duplicates(field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_create({"account_id": "a", field: ["x", "x"]})
    assert field_errors(caught.value) == {field}


@given_examples(st.lists(st.sampled_from(["a", "b", "c", "A", "a ", "é"]), max_size=6))
def test_a_list_is_refused_exactly_when_it_holds_a_duplicate(tags: list[str]) -> None:
    """The set check before the named one (`_unique`) refuses what the named one refuses."""
    has_duplicate = len(tags) != len(set(tags))
    try:
        parse_create({"account_id": "a", "tags": tags})
    except ValidationError as error:
        assert has_duplicate and field_errors(error) == {"tags"}
    else:
        assert not has_duplicate


def test_participants_hold_no_duplicates_and_keep_extra_keys() -> None:
    with pytest.raises(ValidationError):
        parse_create({"account_id": "a", "participants": [{"type": "user", "id": "u"}, {"type": "user", "id": "u"}]})
    people = [{"type": "contact", "id": "c1", "email": "c@example.com"}]
    assert created({"account_id": "a", "participants": people}).document["participants"] == people


def test_custom_fields_deeper_than_eight_levels_are_refused() -> None:
    deep: dict[str, Any] = {"v": 1}
    for _ in range(8):
        deep = {"k": deep}
    with pytest.raises(ValidationError) as caught:
        parse_create({"account_id": "a", "custom_fields": deep})
    assert field_errors(caught.value) == {"custom_fields"}
    assert created({"account_id": "a", "custom_fields": deep["k"]}).document["custom_fields"] == deep["k"]


def test_body_over_256_kib_is_refused() -> None:
    body = b'{"account_id": "a", "description": "' + b"x" * (256 * 1024) + b'"}'
    with pytest.raises(ValidationError) as caught:
        parse_create(body)
    assert field_errors(caught.value) == {"body"}


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"text"', b"\xff\xfe", b""])
def test_body_must_be_a_json_object(body: bytes) -> None:
    with pytest.raises(ValidationError):
        parse_create(body)


# --- patch -----------------------------------------------------------------------------------


def test_patch_applies_a_merge_patch_and_stamps_the_writer() -> None:
    activity = created({"account_id": "acc_1", "custom_fields": {"a": 1, "nested": {"x": 1, "y": 2}}})
    decision = patch(activity, {"status": "pending", "custom_fields": {"b": 2, "nested": {"y": None}}})
    assert decision is not None and decision.event_class is ActivityPatched
    document = decision.document
    assert document["status"] == "pending"
    assert document["custom_fields"] == {"a": 1, "b": 2, "nested": {"x": 1}}
    assert document["version"] == 2 and document["updated_by"] == "usr-bob" and document["created_by"] == "usr-alice"
    assert document["updated_at"] == "2026-11-27T12:05:00Z" and document["created_at"] == "2026-11-27T12:00:00Z"
    assert decision.changes == {"status": "pending", "custom_fields": {"b": 2, "nested": {"y": None}}}


def test_patch_null_clears_a_field_and_resets_defaults() -> None:
    activity = created({"account_id": "a", "deal_id": "d", "source": "crm", "source_type": "frontend", "tags": ["t"],
                        "reminder_sent": True, "custom_fields": {"k": 1}})
    decision = patch(activity, {"deal_id": None, "source": None, "source_type": None, "tags": None,
                                "reminder_sent": None, "custom_fields": None})
    assert decision is not None
    document = decision.document
    assert document["deal_id"] is None
    assert (document["source"], document["source_type"], document["tags"]) == ("edm", "api", [])
    assert document["reminder_sent"] is False and document["custom_fields"] == {}


def test_patch_replaces_arrays_whole() -> None:
    decision = patch(created({"account_id": "a", "tags": ["a", "b"]}), {"tags": ["c"]})
    assert decision is not None and decision.document["tags"] == ["c"]


def test_patch_must_keep_a_link() -> None:
    with pytest.raises(ValidationError) as caught:
        patch(created({"account_id": "a"}), {"account_id": None})
    assert field_errors(caught.value) == {"account_id"}
    decision = patch(created({"account_id": "a"}), {"account_id": None, "contact_id": "c"})
    assert decision is not None and decision.document["contact_id"] == "c"


def test_patch_that_changes_nothing_is_a_no_op() -> None:
    activity = created({"account_id": "a", "subject": "Intro", "activity_date": "2026-01-01T10:00:00Z"})
    assert patch(activity, {"subject": "Intro"}) is None
    assert patch(activity, {"activity_date": "2026-01-01T11:00:00+01:00"}) is None
    assert patch(activity, {}) is None


@pytest.mark.parametrize("changes", [{"version": 3}, {"tenant_id": "x"}, {"colour": "red"}, {"subject": 1}])
def test_patch_refuses_server_unknown_and_mistyped_fields(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as caught:
        patch(created(), changes)
    assert field_errors(caught.value) == set(changes)


@pytest.mark.parametrize("body", [{"changes": {}}, {"id": "act_nope", "changes": {}}, {"id": ACTIVITY_ID},
                                  {"id": ACTIVITY_ID, "changes": []}, {"id": ACTIVITY_ID, "changes": {}, "extra": 1},
                                  {"id": ACTIVITY_ID, "changes": {}, "expected_version": "2"},
                                  {"id": ACTIVITY_ID, "changes": {}, "expected_version": 0}])
def test_patch_envelope_is_checked(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        parse_patch(body)


def test_patch_with_stale_expected_version_conflicts() -> None:
    activity = given(({"account_id": "a"}, ALICE, "create"), ({"changes": {"subject": "x"}}, ALICE, "patch"))
    with pytest.raises(VersionConflict) as caught:
        patch(activity, {"subject": "y"}, expected_version=1)
    assert caught.value.current_version == 2
    assert patch(activity, {"subject": "y"}, expected_version=2) is not None


def test_patch_of_a_deleted_activity_is_gone() -> None:
    activity = given(({"account_id": "a"}, ALICE, "create"), ({}, ALICE, "delete"))
    with pytest.raises(Gone):
        patch(activity, {"subject": "y"})


# --- delete and restore ----------------------------------------------------------------------


def test_delete_then_restore() -> None:
    activity = created()
    deleted = decide(activity.document, parse_delete({"id": ACTIVITY_ID}), BOB, LATER)
    assert deleted is not None and deleted.event_class is ActivityDeleted and deleted.changes == {}
    assert deleted.document["is_deleted"] is True
    assert deleted.document["deleted_at"] == "2026-11-27T12:05:00Z" and deleted.document["deleted_by"] == "usr-bob"
    activity.record(deleted, LATER)
    restored = decide(activity.document, parse_restore({"id": ACTIVITY_ID}), ALICE, LATER)
    assert restored is not None and restored.event_class is ActivityRestored
    assert restored.document["is_deleted"] is False
    assert restored.document["deleted_at"] is None and restored.document["deleted_by"] is None
    assert restored.document["version"] == 3


def test_delete_of_deleted_and_restore_of_live_are_no_ops() -> None:
    live = created()
    assert decide(live.document, parse_restore({"id": ACTIVITY_ID}), ALICE, LATER) is None
    deleted = given(({"account_id": "a"}, ALICE, "create"), ({}, ALICE, "delete"))
    assert decide(deleted.document, parse_delete({"id": ACTIVITY_ID}), ALICE, LATER) is None


@pytest.mark.parametrize("kind", ["delete", "restore"])
def test_delete_and_restore_check_expected_version(kind: str) -> None:
    parser = parse_delete if kind == "delete" else parse_restore
    with pytest.raises(VersionConflict):
        decide(created().document, parser({"id": ACTIVITY_ID, "expected_version": 5}), ALICE, LATER)


# --- scoping ---------------------------------------------------------------------------------


@pytest.mark.parametrize("caller", [OTHER_TENANT, OTHER_APP])
def test_other_tenants_and_apps_see_not_found(caller: Caller) -> None:
    activity = created(caller=APP_CALLER)
    for command in (
        parse_patch({"id": ACTIVITY_ID, "changes": {"subject": "x"}}),
        parse_delete({"id": ACTIVITY_ID}),
        parse_restore({"id": ACTIVITY_ID}),
    ):
        with pytest.raises(NotFound):
            decide(activity.document, command, caller, LATER)


def test_a_human_of_the_tenant_sees_app_activities_but_an_app_sees_only_its_own() -> None:
    by_app = created(caller=APP_CALLER)
    assert patch(by_app, {"subject": "seen"}, caller=ALICE) is not None
    by_human = created(caller=ALICE)
    with pytest.raises(NotFound):
        patch(by_human, {"subject": "hidden"}, caller=APP_CALLER)


def test_missing_activity_is_not_found() -> None:
    with pytest.raises(NotFound):
        decide(None, parse_delete({"id": ACTIVITY_ID}), ALICE, LATER)


# --- pure helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "patch_doc", "result"),
    [  # the examples of RFC 7396 appendix A
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch_follows_rfc_7396(target: Any, patch_doc: Any, result: Any) -> None:
    assert merge_patch(target, patch_doc) == result


def test_activity_ids_map_to_store_uuids_and_back() -> None:
    activity_id = new_activity_id()
    assert activity_id.startswith("act_") and len(activity_id) == 30 and activity_id[4:].isupper()
    assert activity_id_of(activity_uuid(activity_id)) == activity_id


@pytest.mark.parametrize("activity_id", [new_activity_id() for _ in range(5)] + ["act_7ZZZZZZZZZZZZZZZZZZZZZZZZZ"])
def test_an_activity_uuid_is_the_ulids_bits_also_as_hex(activity_id: str) -> None:
    expected = ULID.from_str(activity_id[4:]).to_uuid()  # the ULID package's own decoder
    assert activity_uuid(activity_id) == expected
    assert activity_uuid_hex(activity_id) == expected.hex
    assert activity_uuid(activity_id.lower()) == expected  # Crockford's digits are case-free


@pytest.mark.parametrize(
    "activity_id",
    [
        "act_01KB000000000000000000000",  # 25 characters
        "act_81KB0000000000000000000000",  # above 128 bits
        "act_01KB000000000000000000000U",  # a letter Crockford leaves out
        "act_01KB00000000000000000000_0",  # int() would read "_" between digits
        "act_01KB00000000000000000000 0",
        "act_01KB00000000000000000000é0",
    ],
)
def test_a_malformed_activity_id_has_no_uuid(activity_id: str) -> None:
    for convert in (activity_uuid, activity_uuid_hex):
        with pytest.raises(ValueError, match="act_ followed by a 26-character ULID"):
            convert(activity_id)


def test_event_history_rebuilds_the_document() -> None:
    activity = given(
        ({"account_id": "a"}, ALICE, "create"),
        ({"changes": {"subject": "x"}}, ALICE, "patch"),
        ({}, BOB, "delete"),
        ({}, BOB, "restore"),
    )
    assert activity.version == 4 == activity.document["version"]
    assert activity.document["subject"] == "x" and activity.document["is_deleted"] is False


def test_a_detached_copy_takes_a_decision_without_touching_the_original() -> None:
    original = given(({"account_id": "acc_1", "subject": "before"}, ALICE, "create"))
    before = dict(original.document)
    copy = original.detached_copy()
    decision = decide(copy.document, parse_patch({"id": ACTIVITY_ID, "changes": {"subject": "after"}}), BOB, LATER)
    assert decision is not None
    copy.record(decision, LATER)
    assert copy.version == 2 and copy.document["subject"] == "after" and len(copy.collect_events()) == 1
    assert original.version == 1 and original.document == before and original.collect_events() == []


def test_unknown_and_server_fields_are_refused_by_name() -> None:
    for body, field in (({"subject": "x", "colour": "red"}, "colour"), ({"version": 3}, "version")):
        with pytest.raises(ValidationError) as raised:
            reject_server_and_unknown_fields(body)
        assert raised.value.details[0]["field"] == field
    reject_server_and_unknown_fields({"subject": "x", "tags": []})  # client fields pass


# The JSON form of validated fields (what a create stores) -----------------------------------

_OFFSETS = st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
_AWARE = st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=_OFFSETS)


@given_examples(st.sampled_from(DATETIME_FIELDS), _AWARE)
def test_fields_json_writes_every_date_time_as_format_datetime_does(name: str, when: datetime) -> None:
    """`to_json` (pydantic's JSON mode) writes a date-time exactly as `format_datetime`: UTC, `Z`,
    microseconds only when present, whatever offset it was given in."""
    fields = validate_fields({"account_id": "acc-1", name: when.isoformat()})
    assert fields.to_json()[name] == format_datetime(when)
    assert fields.to_json()[name] == when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def test_fields_json_is_plain_json_values() -> None:
    body = {
        "contact_id": "c-1",
        "participants": [{"type": "contact", "id": "c-1", "extra": {"x": [1, 2.5, None, True]}}],
        "custom_fields": {"a": {"b": 1.0e300, "c": 12345678901234567890}},
        "tags": ["x", "y"],
        "completed_at": "2026-01-01T00:00:00.5+02:00",
    }
    data = validate_fields(body).to_json()
    assert data["participants"] == body["participants"]
    assert data["custom_fields"] == body["custom_fields"]
    assert data["completed_at"] == "2025-12-31T22:00:00.500000Z"
    assert set(data) == set(ActivityFields.model_fields)


_RICH_BODIES = [
    {"account_id": "acc-1"},
    {
        "contact_id": "c-1",
        "contact_ids": ["c-1", "c-2"],
        "participants": [
            {"type": "contact", "id": "c-1", "extra": {"x": [1, 2.5, None, True]}},
            {"type": "user", "id": "usr-2", "name": "Ann"},
        ],
        "custom_fields": {"a": {"b": 1.0e300, "c": 12345678901234567890, "d": [{"e": "f"}]}, "g": None},
        "tags": ["x", "y"],
        "attachment_refs": ["s3://a"],
        "activity_date": "2026-03-29T01:30:00+01:00",
        "due_date": "2026-04-01T00:00:00.000001Z",
        "completed_at": "2026-01-01T00:00:00.5+02:00",
        "occurred_at": "1999-12-31T23:59:59-05:30",
        "remind_at": "2026-03-31T09:00:00z",
        "recurrence": {"rrule": "FREQ=WEEKLY;COUNT=3", "exdates": ["2026-04-05T00:30:00Z", "2026-04-12T01:30:00+01:00"]},
        "reminder_sent": True,
        "status": "Completed",
        "type": "meeting",
        "owner_id": "usr-8f14e45f-ceea-467f-a2be-0e3e0b6c5b3a",
        "source": "sync",
        "source_type": "backend",
        "subject": "é ✓",
    },
]


@pytest.mark.parametrize("body", _RICH_BODIES)
def test_fields_json_is_pydantics_json_mode(body: dict[str, Any]) -> None:
    fields = validate_fields(body)
    ours, pydantics = fields.to_json(), fields.model_dump(mode="json")
    assert ours == pydantics
    assert list(ours) == list(pydantics)  # the same order: the stored JSON is the same bytes
    assert orjson.dumps(ours) == orjson.dumps(pydantics)


@pytest.mark.parametrize("traceparent", [None, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"])
def test_log_builds_what_the_librarys_create_builds(traceparent: str | None) -> None:
    """`Activity.log` skips the library's generic `_create`; the activity and its pending event
    are the same as `_create` makes them."""
    originator_id = activity_uuid(new_activity_id())
    decision = decide(None, parse_create({"account_id": "acc-1", "subject": "s"}), ALICE, NOW, new_activity_id())
    assert decision is not None
    ours = Activity.log(originator_id, decision, NOW, traceparent)
    library = Activity._create(
        ActivityLogged,
        id=originator_id,
        timestamp=NOW,
        document=decision.document,
        actor=decision.actor,
        schema_version=decision.document["schema_version"],
        traceparent=traceparent,
    )
    assert type(ours) is Activity
    assert vars(ours) == vars(library)
    assert ours.pending_events == library.pending_events
    (event,), (library_event,) = ours.pending_events, library.pending_events
    assert vars(event) == vars(library_event)  # the same attributes, none more (built without `__init__`)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.actor = "someone else"  # type: ignore[misc]  # still a frozen event
    assert (ours.id, ours.version, ours.created_on, ours.modified_on) == (originator_id, 1, NOW, NOW)
    assert ours.overdue_for is None
