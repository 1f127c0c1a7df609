"""JetStream streams the service creates, and the NATS servers it connects to.

Every stream the service creates or updates goes through `ensure_stream`, which applies the one
replication setting (`ACTIVITIES_STREAM_REPLICAS`): 1 on a single server, 3 (or 5) in a NATS
cluster, where a stream of R replicas keeps taking writes while a majority of them is up.

`nats_servers` turns `ACTIVITIES_NATS_URL` (one URL, or a comma-separated list of a cluster's
nodes) into the list nats-py connects with: it picks a node, and when that node goes away
reconnects to another of the list (and to nodes the cluster announces).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Final

from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

log = logging.getLogger("activities.streams")

OWNED_FIELDS: Final = ("subjects", "retention", "num_replicas", "duplicate_window")
"""The fields of a stream the service keeps as configured; others (limits an operator set) stay."""


def nats_servers(url: str) -> list[str]:
    """The servers of a NATS URL setting: one URL, or several separated by commas."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError("the NATS URL names no server; set ACTIVITIES_NATS_URL to nats://host:4222[,nats://...]")
    return servers


def replicated(config: StreamConfig, replicas: int) -> StreamConfig:
    """`config` with the configured number of replicas."""
    if replicas < 1:
        raise ValueError("ACTIVITIES_STREAM_REPLICAS must be at least 1")
    return dataclasses.replace(config, num_replicas=replicas)


def config_changes(
    current: StreamConfig, wanted: StreamConfig, owned: Sequence[str] = OWNED_FIELDS
) -> dict[str, Any]:
    """The `owned` fields of `wanted` that differ in `current` (empty: nothing to update)."""
    return {name: getattr(wanted, name) for name in owned if getattr(current, name) != getattr(wanted, name)}


async def ensure_stream(
    js: JetStreamContext, wanted: StreamConfig, replicas: int, owned: Sequence[str] = OWNED_FIELDS
) -> None:
    """Create the stream with `replicas` replicas, or bring its `owned` fields up to date
    (a changed replica count scales the stream in place)."""
    wanted = replicated(wanted, replicas)
    assert wanted.name is not None
    try:
        info = await js.stream_info(wanted.name)
    except NotFoundError:
        await js.add_stream(wanted)
        log.info("created stream", extra={"stream": wanted.name, "replicas": replicas})
        return
    changes = config_changes(info.config, wanted, owned)
    if info.config.storage != wanted.storage:
        log.warning("stream storage differs from the configured one; not changed", extra={"stream": wanted.name})
    if changes:
        await js.update_stream(dataclasses.replace(info.config, **changes))
        log.info("updated stream", extra={"stream": wanted.name, "fields": sorted(changes)})
