"""The NATS URL setting as a list of a cluster's nodes, and the one replication setting of streams."""

from __future__ import annotations

import pytest
from nats.js.api import StreamConfig

from projections.relay import stream_config
from projections.streams import nats_servers, replicated
from services.bootstrap import stream_spec
from services.config import Settings


def test_a_comma_separated_nats_url_is_the_list_of_nodes() -> None:
    assert nats_servers("nats://a:4222") == ["nats://a:4222"]
    assert nats_servers(" nats://a:4222, nats://b:4222 ,nats://c:4222,") == [
        "nats://a:4222",
        "nats://b:4222",
        "nats://c:4222",
    ]
    with pytest.raises(ValueError, match="ACTIVITIES_NATS_URL"):
        nats_servers(" , ")


def test_every_stream_gets_the_configured_replicas() -> None:
    events = stream_config(stream_spec(Settings(stream_replicas=3)))
    assert events.num_replicas == 3
    other = StreamConfig(name="CRM_ACTIVITIES_RESULTS", subjects=["crm.activities.results.>"])
    assert replicated(other, 3).num_replicas == 3 and replicated(other, 3).subjects == other.subjects
    with pytest.raises(ValueError, match="at least 1"):
        replicated(other, 0)
