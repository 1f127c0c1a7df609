"""The embedded nats-server is started with GOMAXPROCS at half the cores (services/embedded.py):
read from the running server's own environment."""

from __future__ import annotations

import os
from pathlib import Path

from services.embedded import EmbeddedNats


def test_the_started_server_runs_with_half_the_cores(own_nats: EmbeddedNats) -> None:
    assert own_nats.pid is not None
    environ = dict(
        entry.split("=", 1)
        for entry in Path(f"/proc/{own_nats.pid}/environ").read_text().split("\0")
        if "=" in entry
    )
    expected = os.environ.get("GOMAXPROCS") or str(max(1, (os.cpu_count() or 1) // 2))
    assert environ.get("GOMAXPROCS") == expected
