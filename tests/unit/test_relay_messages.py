"""The relay's pure parts: the message of an event, the ordering header, the stream config."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from nats.js.api import StreamConfig

from activities_client.document import new_activity_id
from activities_client.subjects import Subjects
from events.activity import ActivityPatched, activity_uuid
from projections.consumer import Backoff
from projections.relay import chained_headers, outgoing, stream_config
from projections.streams import config_changes
from services.bootstrap import stream_spec
from services.config import Settings


def patched_event(tenant: str = "acme") -> tuple[ActivityPatched, str]:
    activity_id = new_activity_id()
    document: dict[str, Any] = {"id": activity_id, "tenant_id": tenant, "app_id": "app-1", "version": 3}
    event = ActivityPatched(
        originator_id=activity_uuid(activity_id),
        originator_version=3,
        timestamp=datetime(2026, 1, 31, 9, 30, tzinfo=UTC),
        document=document,
        changes={"status": "done"},
        actor="usr-9",
        schema_version=1,
    )
    return event, activity_id


def test_outgoing_has_the_contract_subject_headers_and_body() -> None:
    event, activity_id = patched_event()
    message = outgoing(Subjects("crm.activities"), event, position=42)
    assert message.subject == "crm.activities.events.acme.patched"
    assert message.position == 42 and message.msg_id == f"{activity_id}:3"
    assert message.headers["Nats-Msg-Id"] == f"{activity_id}:3"
    assert message.headers["Activity-Id"] == activity_id
    assert message.headers["Activity-Version"] == "3"
    assert message.headers["Event-Type"] == "ActivityPatched"
    body = orjson.loads(message.payload)
    assert body["position"] == 42 and body["version"] == 3 and body["app_id"] == "app-1"
    assert body["changes"] == {"status": "done"} and body["occurred_at"] == "2026-01-31T09:30:00Z"


def test_each_message_after_the_first_must_follow_its_predecessor() -> None:
    event, _ = patched_event()
    message = outgoing(Subjects(), event, 1)
    assert "Nats-Expected-Last-Msg-Id" not in chained_headers(message, None)
    assert chained_headers(message, "act_X:2")["Nats-Expected-Last-Msg-Id"] == "act_X:2"
    assert "Nats-Expected-Last-Msg-Id" not in message.headers  # the message itself is not changed


def test_stream_config_follows_settings_with_a_two_minute_dedup_floor() -> None:
    settings = Settings(
        subject_prefix="x.act", stream_name="XS", stream_replicas=3, stream_retention="interest",
        stream_duplicate_window_s=10,
    )  # fmt: skip
    config = stream_config(stream_spec(settings))
    assert config.name == "XS" and config.subjects == ["x.act.events.>"] and config.num_replicas == 3
    assert config.retention == "interest" and config.storage == "file"
    assert config.duplicate_window == 120
    assert stream_config(stream_spec(Settings(stream_duplicate_window_s=600))).duplicate_window == 600


def test_config_changes_lists_only_the_owned_fields_that_differ() -> None:
    wanted = stream_config(stream_spec(Settings()))
    current = StreamConfig(
        name=wanted.name, subjects=wanted.subjects, retention=wanted.retention, storage=wanted.storage,
        num_replicas=1, duplicate_window=60, max_msgs=1000,
    )  # fmt: skip
    assert config_changes(current, wanted) == {"duplicate_window": 120}
    assert config_changes(wanted, wanted) == {}


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(initial_s=0.1, max_s=0.5)
    assert [backoff.next() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.next() == 0.1
