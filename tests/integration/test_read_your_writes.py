"""Read-your-writes under a steady stream of commands: every read with the position of the reply
before it is answered with that write, none waits out the consistency timeout. (A lost wake-up
between readers that raise the known position and the waiters once made about one read in fifty
answer `unavailable` after two seconds.)"""

from __future__ import annotations

from tests.conftest import Requester


async def test_every_read_after_a_write_sees_it_without_timing_out(request_command: Requester) -> None:
    for i in range(80):
        created = await request_command("create", {"deal_id": f"deal_{i}"})
        got = await request_command(
            "get", {"id": created["data"]["id"], "min_position": created["meta"]["position"]}, kind="query"
        )
        assert "data" in got, (i, got)
        assert got["data"]["deal_id"] == f"deal_{i}"
