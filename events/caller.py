"""Who is calling: the identity every command and query is decided and filtered by."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    """Who is calling, from a verified JWT."""

    tenant_id: str
    sub: str
    app_id: str | None = None
