"""The stored form of events: what a create writes, and how events stored by older versions read."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from eventsourcing.persistence import Mapper, StoredEvent

from activities_client.document import (
    CLIENT_FIELDS,
    SCHEMA_2_DEFAULTS,
    client_fields,
    new_activity_id,
    upcast_document,
)
from events.activity import ActivityLogged, ActivityPatched, activity_uuid, event_body
from events.commands import parse_create, parse_patch
from services.application import event_transcoder
from services.domain import Activity, Caller, Decision, decide

NOW = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
MAPPER: Mapper[Any] = Mapper(transcoder=event_transcoder())


def logged() -> ActivityLogged:
    activity_id = new_activity_id()
    body = {"account_id": "acc_1", "type": "call", "subject": "Intro", "custom_fields": {"changes": {"x": 1}}}
    decision = decide(None, parse_create(body), Caller("acme", "usr-1"), NOW, activity_id)
    assert decision is not None
    (event,) = Activity.log(activity_uuid(activity_id), decision, NOW).collect_events()
    assert isinstance(event, ActivityLogged)
    return event


def test_a_create_stores_its_document_once_and_derives_its_changes() -> None:
    event = logged()
    stored = MAPPER.to_stored_event(event)
    state = orjson.loads(stored.state)
    assert "changes" not in state and state["class_version"] == 3
    assert state["document"]["subject"] == "Intro"
    revived = MAPPER.to_domain_event(stored)
    assert isinstance(revived, ActivityLogged)
    assert revived.changes == client_fields(event.document) and set(revived.changes) == set(CLIENT_FIELDS)
    assert revived.changes["custom_fields"] == {"changes": {"x": 1}}


def test_a_create_stored_by_version_one_with_its_changes_reads_the_same() -> None:
    event = logged()
    current = MAPPER.to_stored_event(event)
    state = orjson.loads(current.state)
    del state["class_version"]
    state["changes"] = client_fields(event.document)  # how class version 1 stored a create
    old = StoredEvent(current.originator_id, current.originator_version, current.topic, orjson.dumps(state))
    revived = MAPPER.to_domain_event(old)
    assert isinstance(revived, ActivityLogged)
    assert "changes" not in revived.__dict__
    assert event_body(revived, 7) == event_body(event, 7)
    assert event_body(revived, 7)["changes"]["subject"] == "Intro"


def schema_1(document: dict[str, Any]) -> dict[str, Any]:
    """A document as release 1.0 stored it: no remind_at, external_key, is_erased; schema 1."""
    old = {name: value for name, value in document.items() if name not in SCHEMA_2_DEFAULTS}
    return {**old, "schema_version": 1}


def test_events_stored_with_schema_1_documents_read_as_schema_2() -> None:
    event = logged()
    current = MAPPER.to_stored_event(event)
    state = orjson.loads(current.state)
    state.update(class_version=2, document=schema_1(event.document), schema_version=1)  # as 1.0 stored it
    old = StoredEvent(current.originator_id, current.originator_version, current.topic, orjson.dumps(state))
    revived = MAPPER.to_domain_event(old)
    assert isinstance(revived, ActivityLogged)
    assert revived.schema_version == 2 and revived.document["schema_version"] == 2
    assert {name: revived.document[name] for name in SCHEMA_2_DEFAULTS} == SCHEMA_2_DEFAULTS
    assert revived.document == event.document  # the same document the current code writes

    activity = Activity.log(event.originator_id, Decision(ActivityLogged, event.document, {}, "usr-1"), NOW)
    patch = parse_patch({"id": event.document["id"], "changes": {"subject": "Later"}})
    decision = decide(event.document, patch, Caller("acme", "usr-1"), NOW)
    assert decision is not None
    activity.record(decision, NOW)
    patched = activity.collect_events()[-1]
    stored = MAPPER.to_stored_event(patched)
    state = orjson.loads(stored.state)
    assert state["class_version"] == 2
    del state["class_version"]  # class version 1: what release 1.0 stored for every later event
    state.update(document=schema_1(patched.document), schema_version=1)
    old = StoredEvent(stored.originator_id, stored.originator_version, stored.topic, orjson.dumps(state))
    revived_patch = MAPPER.to_domain_event(old)
    assert isinstance(revived_patch, ActivityPatched)
    assert revived_patch.document == patched.document and revived_patch.schema_version == 2
    assert event_body(revived_patch, 9)["activity"]["schema_version"] == 2


def test_a_current_document_is_not_changed_by_the_upcast() -> None:
    document = logged().document
    assert upcast_document(document) is document
