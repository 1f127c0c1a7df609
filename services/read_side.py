"""The read side's components for the composition root: `projector` and `http` roles.

Roles (CONTRACT.md section 6): `projector` runs the read-model projection; `http` runs the HTTP
server (queries and the write gateway) and the NATS query subscribers (`<prefix>.query.get`,
`<prefix>.query.list`), because both answer from the read model. When both roles share a process,
the projector wakes waiting `min_position` reads directly instead of leaving them to poll.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from projections.consumer import TrackedConsumer
from projections.read_model import PROJECTOR_SETTINGS, Projector
from services.http_app import HttpRole

if TYPE_CHECKING:
    from services.auth import TokenVerifier
    from services.bootstrap import Runtime
    from services.gateway import CommandGateway


def read_side_components(runtime: Runtime, verifier: TokenVerifier, commands: CommandGateway) -> list[Any]:
    """The components of the runtime's read-side roles, in start order."""
    assert runtime.app is not None and runtime.servers is not None
    components: list[Any] = []
    projector: TrackedConsumer[Projector] | None = None
    if "projector" in runtime.roles:
        database_url = runtime.servers.database_url
        projector = TrackedConsumer(runtime.app, database_url, Projector(runtime.app, database_url), PROJECTOR_SETTINGS)
        components.append(projector)
    if "http" in runtime.roles:
        http = HttpRole(runtime, verifier, commands)
        if projector is not None and not runtime.settings.read_database_url:
            # a replica lags the projector: there, `min_position` waits poll the replica's own position
            projector.add_listener(http.queries.read_model.notify_position)
        components.append(http)
    return components
