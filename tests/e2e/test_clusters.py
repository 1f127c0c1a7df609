"""Scale-out on real clusters (tests/e2e/cluster.py): a three-node NATS cluster with a replicated
events stream, and a PostgreSQL primary with a streaming standby, each server a process a test
SIGKILLs while retrying clients keep creating and patching activities through service processes.

Each test prints what it measured (pytest -s shows it; docs/operations.md quotes the numbers).
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import nats
import orjson
import pytest

from services.bootstrap import Runtime
from services.config import Settings
from tests.conftest import TestServers as Servers
from tests.e2e.cluster import (
    LoadReport,
    NatsCluster,
    PostgresPair,
    RetryingLoad,
    missing_acknowledged,
    per_activity_in_order,
    stored_events,
    stream_leader,
    stream_messages,
    wait_until,
)
from tests.e2e.processes import ServiceProcess
from tests.e2e.test_scale import read_model_matches_store, wait_for_projection

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster_dir(test_root: Path) -> Iterator[Path]:
    """The servers' directories: not under pytest's tmp_path, whose root pytest keeps at mode 0700
    (re-applied by every pytest run on the machine), which PostgreSQL's system user cannot reach."""
    directory = test_root / f"cluster-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


async def acknowledged_more(load: RetryingLoad, count: int, timeout_s: float = 30) -> float:
    """Wait until `count` more commands are acknowledged; the seconds it took."""
    started = time.monotonic()
    target = load.acked_count() + count
    while load.acked_count() < target:
        assert time.monotonic() - started < timeout_s, f"only {load.acked_count()} of {target} acknowledged"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def in_thread(function: Callable[[], object]) -> None:
    await asyncio.get_running_loop().run_in_executor(None, function)


def assert_store_holds_each_acknowledged_command_once(report: LoadReport, events: dict[tuple[str, int], bytes]) -> None:
    assert not report.rejected, report.rejected
    assert not missing_acknowledged(report, events)
    # nothing else: no command appended twice, none that was never acknowledged
    assert len(events) == len(report.acked) == len({(a.activity_id, a.version) for a in report.acked})
    for activity_id, acked in report.by_activity().items():
        assert sorted(a.version for a in acked) == list(range(1, len(acked) + 1)), activity_id


async def assert_stream_holds_each_event_once_in_order(
    servers: list[str], settings: Settings, events: dict[tuple[str, int], bytes]
) -> None:
    nc = await nats.connect(servers)
    try:
        js = nc.jetstream(timeout=5)

        async def relayed() -> bool:
            try:
                return (await js.stream_info(settings.stream_name)).state.messages >= len(events)
            except nats.errors.TimeoutError:  # the stream's new leader is still being elected: ask again
                return False

        deadline = time.monotonic() + 60
        while not await relayed():
            assert time.monotonic() < deadline, "the relay did not catch up"
            await asyncio.sleep(0.2)
        messages = await stream_messages(nc, settings.stream_name)
    finally:
        await nc.close()
    msg_ids = [msg_id for _, msg_id, _ in messages]
    assert len(msg_ids) == len(set(msg_ids)) == len(events)
    assert set(msg_ids) == {f"{activity_id}:{version}" for activity_id, version in events}
    for activity_id, versions in per_activity_in_order(messages):
        assert versions == list(range(1, len(versions) + 1)), activity_id


async def assert_reads_answer(process: ServiceProcess, bearer: str, activity_id: str) -> None:
    """History, an old version and a list through a process's HTTP API: each answers at the first try."""
    http_url = orjson.loads((process.settings.data_dir / "endpoints.json").read_bytes())["http_url"]
    path = f"/api/v1/crm/activities/{activity_id}"
    async with httpx.AsyncClient(base_url=http_url, headers={"Authorization": f"Bearer {bearer}"}) as http:
        for response in (
            await http.get(f"{path}/events"),
            await http.get(path, params={"version": 1}),
            await http.get("/api/v1/crm/activities", params={"limit": 5}),
        ):
            assert response.status_code == 200, (response.request.url, response.text)


async def assert_every_activity_takes_a_patch(
    nats_url: str, settings: Settings, bearer: str, events: dict[tuple[str, int], bytes]
) -> None:
    nc = await nats.connect(nats_url)
    try:
        headers = {"Authorization": f"Bearer {bearer}"}
        for activity_id in sorted({activity_id for activity_id, _ in events}):
            body = orjson.dumps({"id": activity_id, "changes": {"subject": "after the failover"}})
            reply = orjson.loads(
                (await nc.request(f"{settings.subject_prefix}.cmd.patch", body, headers=headers, timeout=10)).data
            )
            assert "data" in reply, (activity_id, reply)
    finally:
        await nc.close()


async def test_killing_the_stream_leader_node_and_a_service_node_loses_and_repeats_nothing(
    make_settings: Callable[..., Settings], token: Callable[..., str], cluster_dir: Path
) -> None:
    cluster = NatsCluster(cluster_dir / "nats")
    cluster.start()
    settings = make_settings(nats_url=cluster.url, stream_replicas=3)
    assert settings.database_url
    commands = [ServiceProcess(settings, "commands,http", f"commands-{i}") for i in range(2)]
    log_readers = ServiceProcess(settings, "projector,relay", "log-readers")
    processes = [*commands, log_readers]
    load = RetryingLoad(cluster.servers, settings.subject_prefix, token(), workers=8)
    try:
        for process in processes:
            process.start()
        for _ in range(6):  # nats-py picks a node of the list at random: the two on different nodes
            nodes = [cluster.nodes_connected_to(process.pid) for process in commands]
            if nodes[0] != nodes[1]:
                break
            commands[1].stop()
            commands[1].start()
        assert nodes[0] != nodes[1], "the command processes did not connect to different nodes"
        await load.start()
        await acknowledged_more(load, 150)
        nc = await nats.connect(cluster.servers)
        try:
            info = await nc.jetstream(timeout=5).stream_info(settings.stream_name)
            assert info.config.num_replicas == 3
            leader = cluster.node(await stream_leader(nc, settings.stream_name))
        finally:
            await nc.close()

        leader.kill()  # the events stream's leader: the stream elects another, the relay retries
        after_leader = await acknowledged_more(load, 200)
        await in_thread(leader.start)
        await in_thread(cluster.wait_healthy)

        victim = cluster.nodes_connected_to(commands[0].pid)[0]
        victim.kill()  # the node a command process is connected to: it reconnects to another
        after_victim = await acknowledged_more(load, 200)
        await in_thread(lambda: wait_until(lambda: cluster.nodes_connected_to(commands[0].pid), 10, "a reconnect"))
        assert victim not in cluster.nodes_connected_to(commands[0].pid)  # another node of its list
        await in_thread(victim.start)
        await in_thread(cluster.wait_healthy)
        await acknowledged_more(load, 100)
        report = await load.stop()

        events = stored_events(settings.database_url)
        assert_store_holds_each_acknowledged_command_once(report, events)
        await assert_stream_holds_each_event_once_in_order(cluster.servers, settings, events)
        await wait_for_projection(settings.database_url)
        read_model_matches_store(settings.database_url)
        print(
            f"\nNATS cluster: {len(report.acked)} commands acknowledged, {report.retries} retries, longest "
            f"command {report.longest_wait_s:.2f}s; 200 acks after killing the stream leader {leader.name} took "
            f"{after_leader:.2f}s, after killing {victim.name} (a command process's node) {after_victim:.2f}s"
        )
    finally:
        await load.abandon()
        for process in processes:
            process.stop()
        cluster.stop()


@pytest.mark.parametrize("synchronous", [True, False], ids=["synchronous", "asynchronous"])
async def test_primary_failover_to_the_promoted_standby_without_a_restart(
    synchronous: bool,
    make_settings: Callable[..., Settings],
    token: Callable[..., str],
    servers: Servers,
    cluster_dir: Path,
) -> None:
    """The standby 1 s behind (its WAL sender stopped) when the primary is SIGKILLed. Synchronous
    replication: commits waited for it, every acknowledged command survives. Asynchronous: the
    commands acknowledged meanwhile are lost (measured, printed), and what remains is consistent."""
    pair = PostgresPair(cluster_dir / "pg", synchronous=synchronous)
    pair.start()
    settings = make_settings(database_url=pair.multi_host_url)
    commands = [ServiceProcess(settings, "commands,http", f"commands-{i}") for i in range(2)]
    log_readers = ServiceProcess(settings, "projector,relay", "log-readers")
    processes = [*commands, log_readers]
    load = RetryingLoad([servers.nats_url], settings.subject_prefix, token(), workers=8)
    try:
        for process in processes:
            process.start()
        await load.start()
        await acknowledged_more(load, 300)
        pair.stall_replication()  # the standby 1 s behind when the primary dies
        stalled_at = load.acked_count()
        await asyncio.sleep(1.0)
        acked_before = load.acked_count()
        killed_at = time.monotonic()
        pair.primary.kill()
        await asyncio.sleep(0.5)  # the operator's (or the failover manager's) reaction
        await in_thread(pair.standby.promote)
        promoted_after = time.monotonic() - killed_at
        await acknowledged_more(load, 1)
        first_ack_after = time.monotonic() - killed_at
        await acknowledged_more(load, 300)  # the same processes carry on, on the new primary
        report = await load.stop()

        new_primary = pair.standby.url(PostgresPair.DATABASE)
        events = stored_events(new_primary)
        lost = missing_acknowledged(report, events)
        await wait_for_projection(new_primary)
        read_model_matches_store(new_primary)
        print(
            f"\n{'synchronous' if synchronous else 'asynchronous'} replication: {len(report.acked)} commands "
            f"acknowledged ({acked_before} before the kill, {acked_before - stalled_at} of them while the standby "
            f"was stalled), {len(lost)} of them lost, {report.retries} retries, "
            f"rejected {report.rejected}; standby promoted {promoted_after:.2f}s after the kill, first ack "
            f"{first_ack_after:.2f}s after it, longest command {report.longest_wait_s:.2f}s"
        )
        assert all(process.process is not None and process.process.poll() is None for process in processes)
        if synchronous:
            assert_store_holds_each_acknowledged_command_once(report, events)
            # every pool of the HTTP processes found the new primary: the first reads all answer
            some = report.acked[: len(commands) * 3]
            for process, acked in zip(commands * 3, some, strict=True):
                await assert_reads_answer(process, token(), acked.activity_id)
            await assert_stream_holds_each_event_once_in_order([servers.nats_url], settings, events)
        else:
            # what the standby had not received is lost: commits returned before it had the WAL
            assert lost
            # and what remains is whole: no activity with a gap in its versions (a command process's
            # cache, ahead of the new primary, would have appended after the gap), each one readable
            # and writable again through the command path
            for (activity_id, version) in events:
                assert version == 1 or (activity_id, version - 1) in events, (activity_id, version)
            await assert_every_activity_takes_a_patch(servers.nats_url, settings, token(), events)
    finally:
        await load.abandon()
        for process in processes:
            process.stop()
        pair.stop()


async def test_reads_from_a_lagging_standby_wait_for_min_position_and_never_serve_older(
    make_settings: Callable[..., Settings], token: Callable[..., str], servers: Servers, cluster_dir: Path
) -> None:
    pair = PostgresPair(cluster_dir / "pg", synchronous=False)
    pair.start()
    database = PostgresPair.DATABASE
    runtime = Runtime(
        make_settings(
            database_url=pair.primary.url(database),
            read_database_url=pair.standby.url(database),
            consistency_wait_ms=3000,
        )
    )
    await runtime.start()
    nc = await nats.connect(servers.nats_url)
    headers = {"Authorization": f"Bearer {token()}"}
    prefix = runtime.settings.subject_prefix

    async def command(name: str, body: dict[str, object]) -> dict[str, object]:
        reply = await nc.request(f"{prefix}.cmd.{name}", orjson.dumps(body), headers=headers, timeout=10)
        result = orjson.loads(reply.data)
        assert "data" in result, result
        return dict(result)

    try:
        assert runtime.http is not None and runtime.http.url is not None
        async with httpx.AsyncClient(base_url=runtime.http.url, headers=headers, timeout=10) as http:
            created = await command("create", {"account_id": "acc_1", "subject": "first"})
            activity_id = created["data"]["id"]  # type: ignore[index]
            path = f"/api/v1/crm/activities/{activity_id}"
            first = await http.get(path, params={"min_position": created["meta"]["position"]})  # type: ignore[index]
            assert first.status_code == 200 and first.json()["data"]["subject"] == "first"

            pair.standby.execute("SELECT pg_wal_replay_pause()")  # the standby lags from here on
            patched = await command("patch", {"id": activity_id, "changes": {"subject": "second"}})
            position = patched["meta"]["position"]  # type: ignore[index]
            stale = await http.get(path)
            assert stale.json()["data"]["subject"] == "first"  # no min_position: the standby's (old) state
            assert stale.json()["meta"]["position"] < position

            waiting = asyncio.create_task(http.get(path, params={"min_position": position}))
            await asyncio.sleep(1.0)
            assert not waiting.done()  # waits for the standby, does not serve the older version
            pair.standby.execute("SELECT pg_wal_replay_resume()")
            fresh = await waiting
            assert fresh.status_code == 200
            assert fresh.json()["data"]["subject"] == "second" and fresh.json()["data"]["version"] == 2
            assert fresh.json()["meta"]["position"] >= position

            listed = await http.get("/api/v1/crm/activities", params={"min_position": position})
            assert [item["subject"] for item in listed.json()["data"]] == ["second"]

            pair.standby.execute("SELECT pg_wal_replay_pause()")
            again = await command("patch", {"id": activity_id, "changes": {"subject": "third"}})
            started = time.monotonic()
            timed_out = await http.get(path, params={"min_position": again["meta"]["position"]})  # type: ignore[index]
            assert timed_out.status_code == 503 and timed_out.json()["error"]["code"] == "unavailable"
            assert time.monotonic() - started >= 2.9  # waited the consistency wait out, then refused
            pair.standby.execute("SELECT pg_wal_replay_resume()")
            wait_until(lambda: pair.standby.execute("SELECT pg_is_wal_replay_paused()") == [(False,)], 5, "resume")
    finally:
        await nc.close()
        await runtime.stop()
        pair.stop()
