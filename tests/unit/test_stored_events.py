"""The stored form of events: what a create writes, and how events stored by older versions read."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from eventsourcing.persistence import Mapper, StoredEvent

from activities_client.document import CLIENT_FIELDS, client_fields, new_activity_id
from events.activity import ActivityLogged, activity_uuid, event_body
from events.commands import parse_create
from services.application import event_transcoder
from services.domain import Activity, Caller, decide

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
    assert "changes" not in state and state["class_version"] == 2
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
